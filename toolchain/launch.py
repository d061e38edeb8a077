"""`edge-convert`'s entry point: says which extra to install before importing TensorFlow."""

from __future__ import annotations

from common.extras import require_extra


def main() -> None:
    require_extra("edge-convert", "convert")
    from toolchain.cli import main as cli

    cli()
