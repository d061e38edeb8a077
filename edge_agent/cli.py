"""edge-agent: enrol a device, run the agent, show its status."""

from __future__ import annotations

import contextlib
import faulthandler
import json
import logging
import os
import platform
import shutil
import signal
import sys
import threading
import urllib.error
import urllib.request
from pathlib import Path
from typing import NoReturn
from urllib.parse import urlsplit

import click

from edge_agent.config import (
    DEFAULT_STATE_DIR,
    ENV_PREFIX,
    ConfigError,
    Credentials,
    load_config,
    load_credentials,
    save_credentials,
    save_settings,
)
from protocol.enrollment import ENROLL_PATH, EnrollmentAnswer, EnrollmentRequest, read_answer
from protocol.schema import encode

STATE_DIR_OPTION = click.option(
    "--state-dir",
    type=click.Path(path_type=Path, file_okay=False),
    default=lambda: os.environ.get(ENV_PREFIX + "STATE_DIR", str(DEFAULT_STATE_DIR)),
    show_default=str(DEFAULT_STATE_DIR),
    help=f"Where the agent keeps its configuration, credentials and models "
    f"({ENV_PREFIX}STATE_DIR).",
)


@click.group()
def main() -> None:
    """The edgefleet agent: local inference, safe model updates, and telemetry."""


@main.command()
@click.option(
    "--server", "server_url", required=True, help="The fleet server, http(s)://host:port."
)
@click.option(
    "--token", required=True, help="An enrolment token from `fleet-server enrollment create`."
)
@click.option("--tags", default="", help="Comma-separated tags, e.g. site-a,camera.")
@click.option("--name", default=None, help="A name for the device (default: the hostname).")
@click.option(
    "--trusted-key",
    "trusted_keys",
    multiple=True,
    type=click.Path(path_type=Path, dir_okay=False, exists=True),
    help="A publisher's .pub key to pin (repeatable); models must be signed by one.",
)
@STATE_DIR_OPTION
def enroll(
    server_url: str,
    token: str,
    tags: str,
    name: str | None,
    trusted_keys: tuple[Path, ...],
    state_dir: Path,
) -> None:
    """Register this device with the fleet server and store its credentials."""
    if urlsplit(server_url).scheme not in ("http", "https"):
        _fail(f"--server {server_url!r} must be an http(s) URL")
    if load_credentials(state_dir) is not None:
        _fail(f"{state_dir} already holds credentials; use another --state-dir to enrol again")
    try:
        request = EnrollmentRequest(
            token=token,
            name=name or platform.node() or None,
            tags=[t.strip() for t in tags.split(",") if t.strip()],
            hardware={"machine": platform.machine(), "system": platform.platform()},
        )
    except ValueError as exc:
        _fail(str(exc))
    answer = _enroll(server_url.rstrip("/") + ENROLL_PATH, request)
    state_dir.mkdir(parents=True, exist_ok=True)
    pinned = []
    for key in trusted_keys:
        (state_dir / "keys").mkdir(exist_ok=True)
        shutil.copyfile(key, state_dir / "keys" / key.name)
        pinned.append(f"keys/{key.name}")
    save_settings(
        state_dir,
        {
            "server_url": answer.api_url,
            "mqtt_url": answer.mqtt_url(server_url),
            "topic_prefix": answer.mqtt.topic_prefix,
            **({"trusted_keys": pinned} if pinned else {}),
        },
    )
    save_credentials(state_dir, Credentials(answer.device_id, answer.secret))
    click.echo(answer.device_id)


@main.command()
@click.option(
    "--model",
    "model_dir",
    type=click.Path(path_type=Path, file_okay=False, exists=True),
    default=None,
    help="Serve this bundle (an edge-convert output folder) with no fleet.",
)
@click.option("--api-port", type=int, default=None, help="The local API's port (default 8765).")
@STATE_DIR_OPTION
def run(model_dir: Path | None, api_port: int | None, state_dir: Path) -> None:
    """Serve the model, follow the fleet's desired state, and report telemetry."""
    from edge_agent.agent import Agent

    # A crash in native code (the interpreter, a delegate) then leaves each thread's Python
    # stack in the journal instead of a bare "Segmentation fault".
    faulthandler.enable()
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    environ = dict(os.environ)
    if api_port is not None:
        environ[ENV_PREFIX + "API_PORT"] = str(api_port)
    try:
        config = load_config(state_dir, environ)
    except ConfigError as exc:
        _fail(str(exc))
    if model_dir is None and config.credentials is None:
        _fail(f"{state_dir} holds no credentials: run `edge-agent enroll` first, or use --model")
    agent = Agent(config, local_model=model_dir)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    try:
        agent.start()
    except Exception as exc:  # a clear line, not a traceback, for a service manager's log
        _fail(f"could not start: {exc}")
    click.echo(
        f"edge-agent serving on http://{config.settings.api_host}:{agent.api.port}", err=True
    )
    stop.wait()
    agent.stop()


@main.command()
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@STATE_DIR_OPTION
def status(as_json: bool, state_dir: Path) -> None:
    """The current model, the update state and the outbox depth, from the state dir."""
    from edge_agent.status import read_status

    info = read_status(state_dir)
    if as_json:
        click.echo(json.dumps(info, indent=2, sort_keys=True))
        return
    for key, value in info.items():
        click.echo(f"{key}: {value if value is not None else '-'}")


def _enroll(url: str, body: EnrollmentRequest) -> EnrollmentAnswer:
    request = urllib.request.Request(
        url, data=json.dumps(encode(body)).encode(), headers={"Content-Type": "application/json"}
    )
    try:
        with urllib.request.urlopen(request, timeout=30) as response:  # http(s) checked above
            raw = response.read()
    except urllib.error.HTTPError as exc:
        detail = exc.read().decode("utf-8", "replace")
        with contextlib.suppress(ValueError, AttributeError):  # not the API's JSON error
            detail = json.loads(detail).get("detail", detail)
        _fail(f"the server refused the enrolment: HTTP {exc.code}: {detail}")
    except (urllib.error.URLError, OSError) as exc:
        _fail(f"cannot reach {url}: {getattr(exc, 'reason', exc)}")
    try:
        return read_answer(json.loads(raw))
    except ValueError as exc:
        _fail(f"the server's enrolment answer is not one this agent understands: {exc}")


def _fail(message: str) -> NoReturn:
    click.echo(f"edge-agent: error: {message}", err=True)
    sys.exit(2)


if __name__ == "__main__":
    main()
