"""Real model bundles for tests: converted, validated and signed by edge-convert."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from tests.toolchain.cli_helpers import run_cli


@dataclass(frozen=True)
class Bundle:
    folder: Path  # holds model.tflite and manifest.json
    public_key: Path
    private_key: Path

    def files(self) -> dict[str, tuple[str, bytes]]:
        """The multipart fields POST /api/v1/models takes."""
        return {
            "manifest": ("manifest.json", (self.folder / "manifest.json").read_bytes()),
            "model": ("model.tflite", (self.folder / "model.tflite").read_bytes()),
        }


def convert(
    model_folder: Path,
    out: Path,
    name: str,
    version: str,
    private_key: Path,
    public_key: Path,
    *options: str | Path,
) -> Bundle:
    """`edge-convert convert` on a reference model folder (model.keras, calibration.npz,
    eval.npz, labels.txt), signed with `private_key`."""
    result = run_cli(
        "convert",
        model_folder / "model.keras",
        "--out",
        out,
        "--name",
        name,
        "--version",
        version,
        "--signing-key",
        private_key,
        "--runs",
        "5",
        *options,
    )
    assert result.exit_code == 0, result.stderr
    return Bundle(out, public_key, private_key)
