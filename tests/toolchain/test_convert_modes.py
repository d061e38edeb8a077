"""Every reference model in every mode, converted by real TensorFlow and run by LiteRT."""

from __future__ import annotations

import csv
import json
import re
from pathlib import Path

import numpy as np
import pytest
from ai_edge_litert.interpreter import Interpreter

from common.litert import ModelRunner
from protocol.manifest import QuantizationMode, read_manifest
from protocol.signing import file_sha256, generate_keypair
from tests.toolchain.cli_helpers import run_cli, run_json

# Held-out accuracy each converted model must keep (the sources reach about 0.97-0.99).
MIN_ACCURACY = {"digits": 0.94, "tabular": 0.90}


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return generate_keypair(tmp_path_factory.mktemp("keys"))


def _convert(
    models: Path, out: Path, mode: str, key: Path, *extra: str | Path
) -> dict[str, object]:
    result, summary = run_json(
        "convert",
        models / "model.keras",
        "--out",
        out,
        "--quantize",
        mode,
        "--calibration",
        models / "calibration.npz",
        "--eval",
        models / "eval.npz",
        "--labels",
        models / "labels.txt",
        "--name",
        models.name,
        "--version",
        "1.0.0",
        "--signing-key",
        key,
        "--runs",
        "20",
        *extra,
    )
    assert result.exit_code == 0, result.stderr
    return summary


@pytest.mark.parametrize("mode", [m.value for m in QuantizationMode])
@pytest.mark.parametrize("model", ["digits", "tabular"])
def test_every_mode_converts_validates_and_signs(
    reference_models: dict[str, Path],
    keys: tuple[Path, Path],
    tmp_path: Path,
    model: str,
    mode: str,
) -> None:
    private, public = keys
    folder = reference_models[model]
    out = tmp_path / "bundle"
    summary = _convert(folder, out, mode, private)

    assert sorted(p.name for p in out.iterdir()) == ["manifest.json", "model.tflite"]
    verify = run_cli("verify", out, "--public-key", public)
    assert verify.exit_code == 0, verify.stderr
    assert verify.stdout.startswith(f"OK {model} 1.0.0")

    signed = read_manifest(out)
    m = signed.manifest
    sha256, size = file_sha256(out / "model.tflite")
    assert (m.model.sha256, m.model.size) == (sha256, size) == (summary["sha256"], size)
    assert m.name == model
    assert m.quantization.mode.value == mode
    assert m.quantization.integer_only == (mode == "int8")
    assert m.labels == tuple((folder / "labels.txt").read_text().split("\n")[:-1])
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", m.created_at)
    assert m.toolchain.tensorflow.startswith("2.")
    assert m.runtime.min_runtime_version
    assert not m.runtime.requires_flex
    assert m.benchmark is not None
    assert 0 < m.benchmark.p50_ms <= m.benchmark.p99_ms
    expected_dtype = "int8" if mode == "int8" else "float32"
    assert [t.dtype for t in m.inputs] == [expected_dtype]
    assert [t.dtype for t in m.outputs] == [expected_dtype]
    assert (m.inputs[0].scale > 0) == (mode == "int8")

    # The validation figures are the manifest's and agree with a run of our own.
    v = m.validation
    assert v is not None
    assert v.tflite_accuracy is not None
    assert v.accuracy_drop is not None
    assert v.tflite_accuracy >= MIN_ACCURACY[model]
    assert v.accuracy_drop <= 0.01
    with np.load(folder / "eval.npz") as data:
        x, y = data["x"], data["y"]
    assert v.samples == len(x)
    probabilities = ModelRunner(out / "model.tflite").predict([x])[0]
    assert float((probabilities.argmax(axis=1) == y).mean()) == pytest.approx(v.tflite_accuracy)

    # LiteRT itself loads the artifact, with the tensor types the manifest claims.
    interpreter = Interpreter(model_path=str(out / "model.tflite"))
    interpreter.allocate_tensors()
    detail = interpreter.get_input_details()[0]
    assert np.dtype(detail["dtype"]).name == expected_dtype
    assert list(detail["shape"][1:]) == list(x.shape[1:])

    # The self-test vectors reproduce, as a device will check after an update.
    assert m.self_test is not None
    assert len(m.self_test.vectors) == 4
    runner = ModelRunner(out / "model.tflite")
    for vector in m.self_test.vectors:
        got = runner.predict([a.to_array() for a in vector.inputs])
        for out_array, expected in zip(got, vector.expected, strict=True):
            np.testing.assert_allclose(
                out_array, expected.to_array(), atol=m.self_test.atol, rtol=m.self_test.rtol
            )

    # Reference statistics describe the calibration inputs.
    assert m.reference is not None
    with np.load(folder / "calibration.npz") as data:
        calibration = data["x"]
    features = int(np.prod(calibration.shape[1:]))
    assert m.reference.granularity == "feature"
    assert len(m.reference.mean) == features
    np.testing.assert_allclose(
        m.reference.mean, calibration.reshape(len(calibration), -1).mean(axis=0), atol=1e-5
    )
    assert m.reference.class_distribution is not None
    assert sum(m.reference.class_distribution) == pytest.approx(1.0)


def test_auto_keeps_the_smallest_candidate_within_budget(
    reference_models: dict[str, Path], keys: tuple[Path, Path], tmp_path: Path
) -> None:
    private, _ = keys
    summary = _convert(reference_models["digits"], tmp_path / "auto", "auto", private)
    candidates = summary["candidates"]
    assert isinstance(candidates, list)
    assert [c["label"] for c in candidates][:5] == [m.value for m in QuantizationMode]
    passing = [c for c in candidates if c["passed"]]
    smallest = min(passing, key=lambda c: c["size_bytes"])
    assert summary["label"] == smallest["label"]
    assert summary["mode"] != "float32"
    assert summary["metrics"]["accuracy_drop"] <= 0.01  # type: ignore[index]
    manifest = json.loads((tmp_path / "auto" / "manifest.json").read_text())["manifest"]
    assert manifest["model"]["size"] == smallest["size_bytes"]


def test_auto_objective_latency_keeps_the_fastest(
    reference_models: dict[str, Path], keys: tuple[Path, Path], tmp_path: Path
) -> None:
    summary = _convert(
        reference_models["tabular"], tmp_path / "fast", "auto", keys[0], "--objective", "latency"
    )
    candidates = summary["candidates"]
    assert isinstance(candidates, list)
    passing = [c for c in candidates if c["passed"]]
    # Tabular invokes take a microsecond or two, so p50s often tie; the smaller one wins.
    fastest = min(passing, key=lambda c: (c["benchmark"]["p50_ms"], c["size_bytes"]))
    assert summary["label"] == fastest["label"]


def test_auto_require_integer_and_layer_report(
    reference_models: dict[str, Path], keys: tuple[Path, Path], tmp_path: Path
) -> None:
    report = tmp_path / "layers.csv"
    summary = _convert(
        reference_models["digits"],
        tmp_path / "int",
        "auto",
        keys[0],
        "--require-integer",
        "--layer-report",
        report,
    )
    assert summary["label"] == "int8"
    candidates = summary["candidates"]
    assert isinstance(candidates, list)
    assert [c["label"] for c in candidates] == ["int8"]
    manifest = read_manifest(tmp_path / "int").manifest
    assert manifest.quantization.integer_only

    rows = list(csv.DictReader(report.read_text().splitlines()))
    assert len(rows) > 3
    errors = [float(r["rmse_per_scale"]) for r in rows]
    assert errors == sorted(errors, reverse=True)
    worst = summary["worst_layers"]
    assert isinstance(worst, list)
    assert len(worst) == 3
    assert rows[0]["tensor"].split(";")[0] in worst[0]


def test_saved_model_source_converts_through_the_saved_model_path(
    reference_models: dict[str, Path], tmp_path: Path
) -> None:
    import keras

    folder = reference_models["digits"]
    exported = tmp_path / "digits_saved_model"
    keras.models.load_model(folder / "model.keras").export(str(exported), verbose=False)
    out = tmp_path / "bundle"
    result, summary = run_json(
        "convert",
        exported,
        "--out",
        out,
        "--quantize",
        "int8",
        "--calibration",
        folder / "calibration.npz",
        "--eval",
        folder / "eval.npz",
        "--runs",
        "5",
    )
    assert result.exit_code == 0, result.stderr
    manifest = read_manifest(out).manifest
    assert manifest.name == "digits_saved_model"
    assert (manifest.source.format, manifest.source.conversion_path) == ("saved_model",) * 2
    assert summary["metrics"]["tflite_accuracy"] >= MIN_ACCURACY["digits"]


def test_image_folder_data_and_its_class_names(
    reference_models: dict[str, Path], tmp_path: Path
) -> None:
    """Evaluation data as one folder of PNGs per class; the folder names become the labels."""
    from PIL import Image

    folder = reference_models["digits"]
    with np.load(folder / "eval.npz") as data:
        x, y = data["x"][:200], data["y"][:200]
    names = [f"digit-{i}" for i in range(10)]
    images = tmp_path / "images"
    for i, (pixels, label) in enumerate(zip(x, y, strict=True)):
        (images / names[label]).mkdir(parents=True, exist_ok=True)
        gray = np.round(pixels[..., 0] * 255).astype(np.uint8)
        Image.fromarray(gray, mode="L").save(images / names[label] / f"{i}.png")
    out = tmp_path / "bundle"
    result = run_cli(
        "convert", folder / "model.keras", "--out", out, "--eval", images, "--runs", "5"
    )
    assert result.exit_code == 0, result.stderr
    manifest = read_manifest(out).manifest
    assert manifest.labels == tuple(names)
    assert manifest.validation is not None
    assert manifest.validation.samples == 200
    assert manifest.validation.tflite_accuracy is not None
    assert manifest.validation.tflite_accuracy >= MIN_ACCURACY["digits"]


def test_legacy_h5_source_converts(reference_models: dict[str, Path], tmp_path: Path) -> None:
    import keras

    folder = reference_models["tabular"]
    h5 = tmp_path / "tabular.h5"
    keras.models.load_model(folder / "model.keras").save(h5)
    out = tmp_path / "bundle"
    result = run_cli(
        "convert", h5, "--out", out, "--eval", folder / "eval.npz", "--quantize", "float16"
    )
    assert result.exit_code == 0, result.stderr
    manifest = read_manifest(out).manifest
    assert (manifest.name, manifest.source.format) == ("tabular", "h5")
    assert manifest.validation is not None
    assert manifest.validation.accuracy_drop is not None
    assert manifest.validation.accuracy_drop <= 0.01
