"""`make bench`: run every benchmark under bench/ and write BENCHMARKS.md."""

from __future__ import annotations

import datetime as dt
import os
import sys
import tempfile
from pathlib import Path

import click

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


@click.command()
@click.option("--out", type=click.Path(path_type=Path), default=Path("BENCHMARKS.md"))
@click.option(
    "--models",
    "models_dir",
    type=click.Path(path_type=Path),
    default=None,
    help="Folder of trained reference models (default: train them afresh).",
)
@click.option(
    "--only",
    type=click.Choice(["conversion", "agent", "ingest", "rollout", "console"]),
    default=None,
    help="Run just this benchmark (default: every one).",
)
def main(out: Path, models_dir: Path | None, only: str | None) -> None:
    from bench import agent, console, conversion, ingest, pipeline, rollout
    from toolchain.convert import machine_description

    def wanted(name: str) -> bool:
        return only in (None, name)

    agent_section: list[str] = []
    rollout_section: list[str] = []
    with tempfile.TemporaryDirectory(prefix="bench-models-") as tmp:
        if only in ("ingest", "console"):
            models_dir = Path(tmp)  # no models needed: do not even import TensorFlow
        if models_dir is None:
            from models.train import RECIPES

            models_dir = Path(tmp)
            for name, train in RECIPES.items():
                click.echo(f"training {name}", err=True)
                train(models_dir / name, seed=0)
        figures = []
        for name in ("digits", "tabular") if wanted("conversion") else ():
            click.echo(f"converting {name} in every mode", err=True)
            figures.append(conversion.measure(name, models_dir / name))
        if wanted("agent"):
            click.echo("measuring the edge agent", err=True)
            agent_section = agent.markdown(agent.measure(models_dir))
        if wanted("rollout"):
            click.echo("measuring staged rollouts", err=True)
            measured = rollout.measure(models_dir, progress=lambda s: click.echo(s, err=True))
            rollout_section = rollout.markdown(measured)

    text = [
        "# Benchmarks",
        "",
        f"Written by `make bench` (`{Path(sys.executable).name} -m bench.run`) on "
        f"{dt.date.today().isoformat()}, on {machine_description()}. Every figure in a table "
        "comes from one run; compare the ratios, not absolute times, across machines.",
        "",
    ]
    sections = [
        "## Conversion: every quantization mode against float32",
        "",
        "Each reference model converted by `edge-convert convert --quantize auto` "
        f"(validated on its held-out set; latency is the p50 of {conversion.RUNS} single-sample "
        "invokes on LiteRT with its default threads, each candidate in a fresh process).",
        "",
        *conversion.markdown(figures),
        "Reading the figures:",
        "- `dynamic` quantizes only weight tensors of 1024 elements or more; the tabular "
        "model has none, so it stays float32 byte for byte.",
        "- `int16x8` runs on LiteRT's reference kernels (XNNPACK has no 16x8 path), hence its "
        "latency; it is there for accuracy when int8 activations lose too much.",
        "- The tabular model is mostly graph structure, not weights, so no mode shrinks it "
        "the way it shrinks digits.",
        "- Tabular invokes take one or two microseconds, which is the resolution of timing "
        "one Python call to invoke(): its latency ratios are noise (its float32 and dynamic "
        "models are the same bytes). The digits ratios are the meaningful ones.",
        "",
    ]
    if not wanted("conversion"):
        sections = []
    sections += agent_section
    if wanted("ingest"):
        click.echo("measuring telemetry ingest", err=True)
        sections += ingest.markdown(ingest.measure(progress=lambda s: click.echo(s, err=True)))
        click.echo("measuring the server pipeline per message", err=True)
        sections += pipeline.markdown(pipeline.measure())
    sections += rollout_section
    if wanted("console"):
        click.echo("measuring the web console at fleet scale", err=True)
        sections += console.markdown(console.measure(progress=lambda s: click.echo(s, err=True)))
    out.write_text("\n".join(text + sections))
    click.echo(f"wrote {out}", err=True)


if __name__ == "__main__":
    main()
