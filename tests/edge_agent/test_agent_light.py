"""The agent is the leaf that ships to devices: after a real run it has imported nothing
heavy, and nothing of the toolchain or the server; not even the crypto library after it
applied a signed update (the signature is checked in a child process)."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import numpy as np

from tests.bundles import Bundle, DigitsBundles
from tests.venvs import CLEAN_ENV

REPO = Path(__file__).resolve().parents[2]

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
    # ~8 MiB resident with the OpenSSL it bundles: signatures are checked in a child
    # process (docs/agent.md, "Where the signature is checked").
    "cryptography",
    "_cffi_backend",
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
    source = edge_agent.cli.__file__  # where the agent was imported from
    print(json.dumps({"answer": answer, "modules": sorted(sys.modules), "source": source}))
    """
)


def real_run(python: str, state: Path, bundle: Path, image: object, cwd: Path) -> dict[str, Any]:
    """RUN with this interpreter, from `cwd`: what it answered and every module it loaded."""
    return _run_script(python, RUN, [str(state), str(bundle), json.dumps(image)], cwd)


def signed_update(
    python: str, state: Path, bundle: Bundle, image: object, cwd: Path
) -> dict[str, Any]:
    """UPDATE with this interpreter, from `cwd`: the update's end state, the answer after
    it and every module it loaded."""
    args = [str(state), str(bundle.folder), str(bundle.public_key), json.dumps(image)]
    return _run_script(python, UPDATE, args, cwd)


def heavy(report: dict[str, Any]) -> list[str]:
    return sorted(name for name in report["modules"] if name.split(".")[0] in FORBIDDEN)


def _run_script(python: str, script: str, args: list[str], cwd: Path) -> dict[str, Any]:
    result = subprocess.run(
        [python, "-c", script, *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        env=CLEAN_ENV,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    report: dict[str, Any] = json.loads(result.stdout.splitlines()[-1])
    return report


def test_a_real_run_imports_nothing_heavy(digits: DigitsBundles, tmp_path: Path) -> None:
    image = np.load(digits.eval_npz)["x"][0].tolist()
    report = real_run(sys.executable, tmp_path, digits.v1.folder, image, REPO)
    assert report["answer"]["model"]["version"] == "1.0.0"  # it did serve
    assert heavy(report) == []
    assert "ai_edge_litert" in {name.split(".")[0] for name in report["modules"]}


UPDATE = textwrap.dedent(
    """
    import json, sys, threading, time, urllib.request
    from functools import partial
    from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
    from pathlib import Path

    import edge_agent.cli  # every part the program loads
    from edge_agent.agent import Agent
    from edge_agent.config import load_config
    from protocol.manifest import read_manifest
    from protocol.messages import DesiredState, ModelTarget
    from protocol.schema import encode

    state, bundle, key = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3]
    image = json.loads(sys.argv[4])
    state.mkdir(parents=True, exist_ok=True)
    (state / "credentials.json").write_text('{"device_id": "dev-1", "secret": "s"}')

    class Quiet(SimpleHTTPRequestHandler):
        def log_message(self, *args):
            pass

    files = ThreadingHTTPServer(("127.0.0.1", 0), partial(Quiet, directory=str(bundle)))
    threading.Thread(target=files.serve_forever, daemon=True).start()

    environ = {"EDGE_AGENT_API_PORT": "0", "EDGE_AGENT_TRUSTED_KEYS": key}
    agent = Agent(load_config(state, environ))
    agent.start()
    signed = read_manifest(bundle)
    m = signed.manifest
    url = f"http://127.0.0.1:{files.server_address[1]}/{m.model.path}"
    target = ModelTarget(m.name, m.version, m.model.sha256, m.model.size, url, encode(signed))
    now = time.time()
    desired = DesiredState(1, 1, now, now + 3600, "dep-1", "active", False, target)
    updated = agent.machine.apply(desired)
    request = urllib.request.Request(
        f"http://127.0.0.1:{agent.api.port}/v1/predict",
        data=json.dumps({"inputs": image}).encode(),
        headers={"Content-Type": "application/json"},
    )
    answer = json.loads(urllib.request.urlopen(request).read())
    agent.stop()
    files.shutdown()
    report = {"update": updated.value, "answer": answer, "modules": sorted(sys.modules)}
    print(json.dumps({**report, "source": edge_agent.cli.__file__}))
    """
)


def test_an_agent_that_applied_a_signed_update_never_loaded_cryptography(
    digits: DigitsBundles, tmp_path: Path
) -> None:
    image = np.load(digits.eval_npz)["x"][0].tolist()
    report = signed_update(sys.executable, tmp_path / "agent", digits.v1, image, REPO)
    # The signature was checked (by the child) and the update went all the way.
    assert report["update"] == "active"
    assert report["answer"]["model"]["version"] == "1.0.0"
    assert heavy(report) == []
