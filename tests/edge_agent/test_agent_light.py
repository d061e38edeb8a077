"""The agent is the leaf that ships to devices: after a real run it has imported nothing
heavy, and nothing of the toolchain or the server."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np

from tests.bundles import DigitsBundles

FORBIDDEN = (
    "tensorflow",
    "keras",
    "fastapi",
    "starlette",
    "pydantic",
    "sqlalchemy",
    "alembic",
    "uvicorn",
    "psycopg",
    "toolchain",
    "fleet_server",
)

RUN = textwrap.dedent(
    """
    import json, os, sys, urllib.request
    from pathlib import Path

    import edge_agent.cli  # every part the program loads
    from edge_agent.agent import Agent
    from edge_agent.config import load_config

    state, bundle, image = Path(sys.argv[1]), Path(sys.argv[2]), json.loads(sys.argv[3])
    agent = Agent(load_config(state, {"EDGE_AGENT_API_PORT": "0"}), local_model=bundle)
    agent.start()
    request = urllib.request.Request(
        f"http://127.0.0.1:{agent.api.port}/v1/predict",
        data=json.dumps({"inputs": image}).encode(),
        headers={"Content-Type": "application/json"},
    )
    answer = json.loads(urllib.request.urlopen(request).read())
    agent.stop()
    print(json.dumps({"answer": answer, "modules": sorted(sys.modules)}))
    """
)


def test_a_real_run_imports_nothing_heavy(digits: DigitsBundles, tmp_path: Path) -> None:
    image = np.load(digits.eval_npz)["x"][0].tolist()
    result = subprocess.run(
        [sys.executable, "-c", RUN, str(tmp_path), str(digits.v1.folder), json.dumps(image)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout.splitlines()[-1])
    assert report["answer"]["model"]["version"] == "1.0.0"  # it did serve
    heavy = sorted(name for name in report["modules"] if name.split(".")[0] in FORBIDDEN)
    assert heavy == []
    assert "ai_edge_litert" in {name.split(".")[0] for name in report["modules"]}
