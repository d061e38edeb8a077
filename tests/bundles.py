"""Real model bundles for tests: converted, validated and signed by edge-convert."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from protocol.signing import generate_keypair
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


@dataclass(frozen=True)
class DigitsBundles:
    v1: Bundle  # 1.0.0, float32
    v2: Bundle  # 2.0.0, full int8 (quantized inputs and outputs)
    v3: Bundle  # 3.0.0, float16 weights
    eval_npz: Path  # held-out inputs `x` and labels `y`
    labels: tuple[str, ...]


def digits_bundles(folder: Path, root: Path) -> DigitsBundles:
    """Three versions of the digits reference model in `folder`, signed by one new key."""
    private, public = generate_keypair(root / "keys")
    data = ("--calibration", folder / "calibration.npz", "--eval", folder / "eval.npz")
    options = ("--labels", folder / "labels.txt", *data)
    v1, v2, v3 = (
        convert(folder, root / f"v{n}", "digits", f"{n}.0.0", private, public, *mode, *options)
        for n, mode in ((1, ()), (2, ("--quantize", "int8")), (3, ("--quantize", "float16")))
    )
    names = tuple((folder / "labels.txt").read_text().split())
    return DigitsBundles(v1, v2, v3, folder / "eval.npz", names)
