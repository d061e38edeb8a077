"""`fleet-server rollout ...`: drive rollouts over the server's HTTP API, as a CI pipeline
or a person at a terminal would. The server's address and an operator token come from
--server/--token or EDGEFLEET_SERVER_URL/EDGEFLEET_TOKEN.

`create --wait` (and `wait`) follow a rollout to its end and exit 0 only when it completed:
3 when it was rolled back, 4 when it paused or was aborted, so a pipeline can gate on it.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

import click
import httpx

from fleet_server.rollouts.states import RolloutState

# How a followed rollout ended, as a pipeline reads it: it ends here, or waits for a person.
EXIT_CODES = {
    RolloutState.COMPLETED: 0,
    RolloutState.ROLLED_BACK: 3,
    RolloutState.ABORTED: 4,
    RolloutState.PAUSED: 4,
}


class Client:
    def __init__(self, server: str, token: str) -> None:
        self.base = server.rstrip("/")
        self.headers = {"Authorization": f"Bearer {token}"}

    def call(self, method: str, path: str, body: object = None) -> Any:
        try:
            response = httpx.request(
                method, f"{self.base}/api/v1{path}", json=body, headers=self.headers, timeout=30
            )
        except httpx.HTTPError as exc:
            raise click.ClickException(f"cannot reach {self.base}: {exc}") from None
        if response.status_code >= 400:
            try:
                detail = response.json().get("detail", response.text)
            except ValueError:
                detail = response.text
            raise click.ClickException(f"{response.status_code}: {detail}")
        return response.json()


@click.group()
@click.option("--server", envvar="EDGEFLEET_SERVER_URL", default="http://127.0.0.1:8080")
@click.option("--token", envvar="EDGEFLEET_TOKEN", required=True, help="An operator token.")
@click.pass_context
def rollout(ctx: click.Context, server: str, token: str) -> None:
    """Staged rollouts: create, follow, pause, resume, abort, roll back."""
    ctx.obj = Client(server, token)


def _wave(text: str) -> dict[str, Any]:
    """`10%`, `25` (devices), optionally `:BAKE_S`, `:shadow`, `:pause` in any order."""
    size, *flags = text.split(":")
    wave: dict[str, Any] = {}
    try:
        if size.endswith("%"):
            wave["percent"] = float(size[:-1])
        else:
            wave["count"] = int(size)
        for flag in flags:
            if flag == "shadow":
                wave["shadow_first"] = True
            elif flag == "pause":
                wave["pause_after"] = True
            else:
                wave["bake_s"] = float(flag)
    except ValueError:
        raise click.BadParameter(f"{text!r}: use e.g. 10%:300, 25:600:shadow or 100%") from None
    return wave


def _gate(text: str) -> tuple[str, float]:
    name, _, value = text.partition("=")
    try:
        return name.strip(), float(value)
    except ValueError:
        raise click.BadParameter(f"{text!r}: use NAME=VALUE, e.g. max_accuracy_drop=0.02") from None


@rollout.command("create")
@click.option("--model", help="Model name.")
@click.option("--version", "model_version", help="Model version.")
@click.option("--tags", default="", help="Target: devices with every one of these tags.")
@click.option("--devices", default="", help="Target: these device ids, comma-separated.")
@click.option("--all", "everyone", is_flag=True, help="Target: the whole fleet.")
@click.option("--wave", "waves", multiple=True, help="A wave: 10%%:300 (share:bake seconds).")
@click.option("--gate", "gates", multiple=True, help="A gate threshold: NAME=VALUE.")
@click.option("--on-failure", type=click.Choice(["pause", "rollback"]), default="rollback")
@click.option(
    "--spec",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="The whole request as JSON (POST /api/v1/rollouts); other options are ignored.",
)
@click.option("--wait", is_flag=True, help="Follow the rollout to its end.")
@click.pass_obj
def create(
    client: Client,
    model: str | None,
    model_version: str | None,
    tags: str,
    devices: str,
    everyone: bool,
    waves: tuple[str, ...],
    gates: tuple[str, ...],
    on_failure: str,
    spec: Path | None,
    wait: bool,
) -> None:
    """Start a rollout; prints its id."""
    if spec is not None:
        body = json.loads(spec.read_text())
    else:
        if not (model and model_version and waves):
            raise click.UsageError("give --model, --version and at least one --wave (or --spec)")
        target: dict[str, Any] = {"all": True} if everyone else {}
        if tags:
            target["tags"] = [t for t in tags.split(",") if t]
        if devices:
            target["devices"] = [d for d in devices.split(",") if d]
        body = {
            "model": model,
            "version": model_version,
            "target": target,
            "waves": [_wave(w) for w in waves],
            "gates": dict(_gate(g) for g in gates),
            "on_failure": on_failure,
        }
    created = client.call("POST", "/rollouts", body)
    click.echo(created["id"])
    if wait:
        _follow(client, created["id"])


@rollout.command("list")
@click.option("--state", default=None, help="Only rollouts in this state.")
@click.pass_obj
def list_(client: Client, state: str | None) -> None:
    """One line per rollout, newest first."""
    rows = client.call("GET", "/rollouts" + (f"?state={state}" if state else ""))
    for row in rows:
        click.echo(
            f"{row['id']:>5}  {row['state']:<12} {row['model']} {row['version']:<10} "
            f"wave {row['wave'] + 1}/{len(row['waves'])}  {row['reason'] or ''}".rstrip()
        )


@rollout.command("show")
@click.argument("rollout_id", type=int)
@click.option("--json", "as_json", is_flag=True, help="The API's answer as it is.")
@click.pass_obj
def show(client: Client, rollout_id: int, as_json: bool) -> None:
    """Waves, gates against their thresholds, devices and history."""
    detail = client.call("GET", f"/rollouts/{rollout_id}")
    if as_json:
        click.echo(json.dumps(detail, indent=2))
        return
    click.echo(_describe(detail))


def _describe(detail: dict[str, Any]) -> str:
    lines = [
        f"rollout {detail['id']}: {detail['model']} {detail['version']} — {detail['state']}"
        + (f" ({detail['reason']})" if detail["reason"] else "")
    ]
    for wave in detail["waves"]:
        states = ", ".join(f"{n} {s}" for s, n in sorted(wave["states"].items()))
        lines.append(
            f"  wave {wave['index'] + 1}: {wave['status']:<9} {wave['devices']} device(s): {states}"
        )
    for gate in detail["gates"]:
        measured = "n/a" if gate["measured"] is None else f"{gate['measured']:.4g}"
        name, verdict, threshold = gate["gate"], gate["verdict"], gate["threshold"]
        lines.append(
            f"  gate {name:<22} {verdict:<4} {measured:>8} vs {threshold:.4g}"
            f"  ({gate['evidence']}/{gate['needed']} {gate['note']})"
        )
    for event in detail["events"]:
        lines.append(f"  {event['ts'][:19]}  {event['kind']:<14} {event['message']}")
    return "\n".join(lines)


def _act(action: str) -> click.Command:
    helps = {
        "pause": "Pause a rollout (the controller stops driving it).",
        "resume": "Resume a paused rollout (the current wave's bake starts over).",
        "abort": "Stop a rollout; devices keep the model they run.",
        "rollback": "Give every device the rollout touched its previous model back.",
    }

    @click.command(action, help=helps[action])
    @click.argument("rollout_id", type=int)
    @click.pass_obj
    def command(client: Client, rollout_id: int) -> None:
        answer = client.call("POST", f"/rollouts/{rollout_id}/{action}")
        click.echo(f"rollout {rollout_id}: {answer['state']}")

    return command


for _action in ("pause", "resume", "abort", "rollback"):
    rollout.add_command(_act(_action))


@rollout.command("wait")
@click.argument("rollout_id", type=int)
@click.pass_obj
def wait_(client: Client, rollout_id: int) -> None:
    """Follow a rollout until it ends or pauses; the exit code says how it ended."""
    _follow(client, rollout_id)


def _follow(client: Client, rollout_id: int) -> None:
    seen = 0
    while True:
        detail = client.call("GET", f"/rollouts/{rollout_id}")
        for event in detail["events"][seen:]:
            click.echo(f"{event['ts'][:19]}  {event['kind']:<14} {event['message']}")
        seen = len(detail["events"])
        state = RolloutState(detail["state"])
        if state in EXIT_CODES:
            click.echo(f"rollout {rollout_id}: {state}")
            sys.exit(EXIT_CODES[state])
        time.sleep(1.0)
