"""Train the reference models: ``python -m models.train --out DIR [--only NAME]``."""

from __future__ import annotations

import os

# TensorFlow reads this once, when it is first imported (by the recipes below); without it
# every run starts with screens of CUDA and oneDNN notices. setdefault so that a user
# debugging TensorFlow can still turn the logs back on.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from collections.abc import Callable
from pathlib import Path

import click

from models import digits, tabular
from models.common import RecipeResult

RECIPES: dict[str, Callable[..., RecipeResult]] = {
    digits.NAME: digits.train,
    tabular.NAME: tabular.train,
}


def format_result(result: RecipeResult) -> str:
    return (
        f"{result.name:<8} accuracy={result.accuracy:.4f} params={result.params:,} "
        f"seconds={result.seconds:.1f}  -> {result.path}"
    )


@click.command()
@click.option(
    "--out",
    required=True,
    type=click.Path(file_okay=False, path_type=Path),
    help="Folder to write into; each model goes to OUT/<name>/.",
)
@click.option(
    "--only",
    type=click.Choice(sorted(RECIPES)),
    default=None,
    help="Train just this recipe.",
)
@click.option("--seed", default=0, show_default=True, help="Training seed.")
@click.option(
    "--shuffled-labels",
    is_flag=True,
    help="Train digits on shuffled labels: a deliberately broken model (for the demo).",
)
def main(out: Path, only: str | None, seed: int, shuffled_labels: bool) -> None:
    """Train the reference models and write each one's model, data and labels."""
    if shuffled_labels:
        if only != digits.NAME:
            raise click.UsageError("--shuffled-labels goes with --only digits")
        click.echo(format_result(digits.train(out / digits.NAME, seed=seed, shuffled_labels=True)))
        return
    names = [only] if only else list(RECIPES)
    for name in names:
        result = RECIPES[name](out / name, seed=seed)
        click.echo(format_result(result))


if __name__ == "__main__":
    main()
