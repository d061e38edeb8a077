"""Bad input: one clear line on stderr, exit 2 (1 for the accuracy gate), no partial bundle."""

from __future__ import annotations

import itertools
import json
import os
import shutil
import signal
import zipfile
from pathlib import Path

import numpy as np
import pytest

from protocol.manifest import read_manifest
from protocol.signing import generate_keypair
from tests.toolchain.cli_helpers import assert_clean_failure, run_cli, run_json
from toolchain.convert import _call
from toolchain.errors import ConversionError
from toolchain.tf_client import TFWorker, WorkerCrashError


@pytest.fixture
def digits(reference_models: dict[str, Path]) -> Path:
    return reference_models["digits"]


def _convert(src: Path, out: Path, *extra: str | Path) -> tuple[str | Path, ...]:
    return ("convert", src, "--out", out, "--runs", "5", *extra)


# -- failures found before TensorFlow is started ------------------------------------------


def test_missing_source(tmp_path: Path) -> None:
    out = tmp_path / "out"
    result = run_cli(*_convert(tmp_path / "nope.keras", out))
    assert_clean_failure(result, 2, "nope.keras does not exist", out)


def test_file_that_is_not_a_model(tmp_path: Path) -> None:
    src = tmp_path / "notes.keras"
    src.write_text("just some text\n")
    out = tmp_path / "out"
    assert_clean_failure(run_cli(*_convert(src, out)), 2, "is not a model", out)


def test_folder_that_is_not_a_saved_model(tmp_path: Path) -> None:
    out = tmp_path / "out"
    result = run_cli(*_convert(tmp_path, out))
    assert_clean_failure(result, 2, "not a SavedModel (no saved_model.pb", out)


def test_zip_that_is_not_a_keras_model(tmp_path: Path) -> None:
    src = tmp_path / "model.keras"
    with zipfile.ZipFile(src, "w") as archive:
        archive.writestr("readme.txt", "hello")
    out = tmp_path / "out"
    assert_clean_failure(run_cli(*_convert(src, out)), 2, "no config.json", out)


def test_version_that_is_not_semver(digits: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    result = run_cli(*_convert(digits / "model.keras", out, "--version", "1.0"))
    assert_clean_failure(result, 2, "version '1.0' is not semver", out)


def test_int8_without_calibration(digits: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    result = run_cli(*_convert(digits / "model.keras", out, "--quantize", "int8"))
    assert_clean_failure(result, 2, "--quantize int8 needs --calibration", out)


def test_auto_without_eval(digits: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    args = _convert(digits / "model.keras", out, "--quantize", "auto", "--calibration")
    result = run_cli(*args, digits / "calibration.npz")
    assert_clean_failure(result, 2, "auto needs --eval", out)


def test_unreadable_signing_key(digits: Path, tmp_path: Path) -> None:
    key = tmp_path / "signing.key"
    key.write_text("not a key")
    out = tmp_path / "out"
    result = run_cli(*_convert(digits / "model.keras", out, "--signing-key", key))
    assert_clean_failure(result, 2, "is not an unencrypted PEM private key", out)


def test_existing_output_is_kept_without_force(digits: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    result = run_cli(*_convert(digits / "model.keras", out))
    assert result.exit_code == 2
    assert "already exists" in result.stderr
    assert (out / "keep.txt").read_text() == "mine"


def test_json_errors_are_json(tmp_path: Path) -> None:
    result, payload = run_json(*_convert(tmp_path / "nope.keras", tmp_path / "out"))
    assert result.exit_code == 2
    assert payload == {
        "ok": False,
        "error": f"{tmp_path / 'nope.keras'} does not exist",
        "exit_code": 2,
    }


# -- failures that need the model's signature ---------------------------------------------


def test_corrupt_keras_file(digits: Path, tmp_path: Path) -> None:
    src = tmp_path / "model.keras"
    # Keep a valid zip directory with config.json but destroy the weights inside.
    with zipfile.ZipFile(digits / "model.keras") as original, zipfile.ZipFile(src, "w") as copy:
        for item in original.infolist():
            data = original.read(item)
            copy.writestr(item, data if item.filename == "config.json" else b"\0" * 64)
    out = tmp_path / "out"
    assert_clean_failure(run_cli(*_convert(src, out)), 2, "cannot load model.keras", out)


def test_truncated_h5_file(tmp_path: Path) -> None:
    src = tmp_path / "model.h5"
    src.write_bytes(b"\x89HDF\r\n\x1a\n" + b"\0" * 100)
    out = tmp_path / "out"
    assert_clean_failure(run_cli(*_convert(src, out)), 2, "cannot load model.h5", out)


def test_calibration_of_the_wrong_shape(digits: Path, tmp_path: Path) -> None:
    data = tmp_path / "cal.npz"
    np.savez(data, x=np.zeros((200, 8, 8), dtype=np.float32))
    out = tmp_path / "out"
    args = _convert(digits / "model.keras", out, "--quantize", "int8", "--calibration", data)
    assert_clean_failure(run_cli(*args), 2, "x has shape (200, 8, 8)", out)


def test_calibration_of_the_wrong_dtype(digits: Path, tmp_path: Path) -> None:
    data = tmp_path / "cal.npz"
    np.savez(data, x=np.full((200, 8, 8, 1), "a"))
    out = tmp_path / "out"
    args = _convert(digits / "model.keras", out, "--quantize", "int8", "--calibration", data)
    assert_clean_failure(run_cli(*args), 2, "calibration data", out)


def test_empty_calibration(digits: Path, tmp_path: Path) -> None:
    data = tmp_path / "cal.npz"
    np.savez(data, x=np.zeros((0, 8, 8, 1), dtype=np.float32))
    out = tmp_path / "out"
    args = _convert(digits / "model.keras", out, "--quantize", "int8", "--calibration", data)
    assert_clean_failure(run_cli(*args), 2, "holds no samples", out)


def test_labels_out_of_range(digits: Path, tmp_path: Path) -> None:
    with np.load(digits / "eval.npz") as archive:
        x, y = archive["x"], archive["y"].copy()
    y[3] = 12
    data = tmp_path / "eval.npz"
    np.savez(data, x=x, y=y)
    out = tmp_path / "out"
    result = run_cli(*_convert(digits / "model.keras", out, "--eval", data))
    assert_clean_failure(result, 2, "label 12 at sample 3 is out of range", out)


def test_labels_file_that_does_not_fit_the_model(digits: Path, tmp_path: Path) -> None:
    labels = tmp_path / "labels.txt"
    labels.write_text("cat\ndog\n")
    out = tmp_path / "out"
    result = run_cli(*_convert(digits / "model.keras", out, "--labels", labels))
    assert_clean_failure(result, 2, "names 2 classes but the model has 10", out)


def test_accuracy_gate_fails_with_exit_1_and_writes_nothing(digits: Path, tmp_path: Path) -> None:
    # Calibrating on inputs a hundred times smaller than real ones saturates every int8
    # activation: the converted model cannot keep its accuracy.
    with np.load(digits / "calibration.npz") as archive:
        x = archive["x"] * 0.01
    data = tmp_path / "cal.npz"
    np.savez(data, x=x)
    out = tmp_path / "out"
    args = _convert(
        digits / "model.keras", out, "--quantize", "int8", "--calibration", data, "--eval"
    )
    result = run_cli(*args, digits / "eval.npz")
    assert_clean_failure(result, 1, "accuracy drop", out)
    assert "exceeds the budget of 0.0100" in result.stderr
    assert "warning:" in result.stderr  # the range mismatch was pointed out before converting


def test_auto_tries_float_fallbacks_when_int8_misses(digits: Path, tmp_path: Path) -> None:
    with np.load(digits / "calibration.npz") as archive:
        x = archive["x"] * 0.01
    data = tmp_path / "cal.npz"
    np.savez(data, x=x)
    out = tmp_path / "out"
    result, summary = run_json(
        *_convert(digits / "model.keras", out, "--quantize", "auto", "--calibration", data),
        "--eval",
        digits / "eval.npz",
    )
    assert result.exit_code == 0, result.stderr
    labels = [c["label"] for c in summary["candidates"]]
    assert labels[:5] == ["float32", "dynamic", "float16", "int8", "int16x8"]
    fallbacks = [c for c in summary["candidates"] if c["float_layers"]]
    assert fallbacks, labels
    # Each fallback keeps one more of the worst layers in float, worst first.
    first = fallbacks[0]["float_layers"]
    assert len(first) == 1
    assert first[0].split(";")[0] in summary["worst_layers"][0]
    for before, after in itertools.pairwise(fallbacks):
        assert after["float_layers"][: len(before["float_layers"])] == before["float_layers"]
    # int8 itself missed the budget, so the chosen model is not it.
    int8 = next(c for c in summary["candidates"] if c["label"] == "int8")
    assert not int8["passed"]
    assert summary["label"] != "int8"


def _inverse_saved_model(path: Path) -> Path:
    import tensorflow as tf

    class Inverse(tf.Module):  # type: ignore[misc]
        @tf.function(input_signature=[tf.TensorSpec([None, 4, 4], tf.float32)])  # type: ignore[untyped-decorator]
        def __call__(self, x: tf.Tensor) -> dict[str, tf.Tensor]:
            return {"y": tf.linalg.inv(x)}

    module = Inverse()
    tf.saved_model.save(module, str(path), signatures=module.__call__)
    return path


def test_ops_tflite_lacks_are_named_with_the_flag_to_allow_them(tmp_path: Path) -> None:
    src = _inverse_saved_model(tmp_path / "inverse")
    out = tmp_path / "out"
    result = run_cli(*_convert(src, out))
    assert_clean_failure(result, 2, "TFLite builtins lack: MatrixInverse", out)
    assert "--allow-tf-ops" in result.stderr


def test_allow_tf_ops_records_flex_in_the_manifest(tmp_path: Path) -> None:
    """TensorFlow 2.20+ wheels carry no Flex delegate, and neither does LiteRT's: the model
    converts and is described, and the manifest says plainly that it was not validated."""
    src = _inverse_saved_model(tmp_path / "inverse")
    out = tmp_path / "out"
    result = run_cli(*_convert(src, out, "--allow-tf-ops", "--name", "inverse"))
    assert result.exit_code == 0, result.stderr
    assert "not validated, benchmarked or self-tested" in result.stderr
    manifest = read_manifest(out).manifest
    assert manifest.source.format == "saved_model"
    assert manifest.source.conversion_path == "saved_model"
    assert manifest.runtime.requires_flex
    assert manifest.runtime.flex_ops == ("FlexMatrixInverse",)
    assert manifest.validation is None
    assert manifest.benchmark is None
    assert manifest.self_test is None
    assert manifest.toolchain.validated_with == "not validated"


def test_flex_model_with_eval_data_is_refused_rather_than_left_unvalidated(
    tmp_path: Path,
) -> None:
    src = _inverse_saved_model(tmp_path / "inverse")
    data = tmp_path / "eval.npz"
    np.savez(data, x=np.tile(np.eye(4, dtype=np.float32), (20, 1, 1)))
    out = tmp_path / "out"
    result = run_cli(*_convert(src, out, "--allow-tf-ops", "--eval", data))
    assert_clean_failure(result, 2, "cannot be validated", out)


def test_converter_crash_becomes_a_clear_error(digits: Path, tmp_path: Path) -> None:
    """An abort inside TensorFlow takes only the worker down, and is reported as such."""
    with TFWorker(tmp_path / "tf.log") as worker:
        _call(
            worker,
            "load",
            None,
            src=str(digits / "model.keras"),
            format="keras",
            workdir=str(tmp_path),
        )
        pid = worker.pid
        assert pid is not None
        os.kill(pid, signal.SIGABRT)
        with pytest.raises(ConversionError, match=r"TensorFlow killed by SIGABRT.* mode int8"):
            _call(worker, "convert", "int8", mode="float32", out=str(tmp_path / "m.tflite"))
        # The worker comes back for the next job.
        reply = _call(worker, "ping", None)
        assert reply["pid"] != pid


# -- verify, inspect and bench on bad artifacts -------------------------------------------


@pytest.fixture(scope="module")
def signed_bundle(
    reference_models: dict[str, Path], tmp_path_factory: pytest.TempPathFactory
) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("signed")
    private, public = generate_keypair(root / "keys")
    out = root / "bundle"
    digits = reference_models["tabular"]
    args = _convert(digits / "model.keras", out, "--signing-key", private, "--name", "tabular")
    result = run_cli(*args)
    assert result.exit_code == 0, result.stderr
    return out, public


def _copy(bundle: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "copy"
    shutil.copytree(bundle, copy)
    return copy


def _flip(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x01
    path.write_bytes(bytes(data))


def test_verify_fails_when_one_model_byte_flips(
    signed_bundle: tuple[Path, Path], tmp_path: Path
) -> None:
    bundle, public = signed_bundle
    copy = _copy(bundle, tmp_path)
    assert run_cli("verify", copy, "--public-key", public).exit_code == 0
    _flip(copy / "model.tflite", (copy / "model.tflite").stat().st_size // 2)
    result = run_cli("verify", copy, "--public-key", public)
    assert_clean_failure(result, 2, "the model was changed")


def test_verify_fails_when_one_manifest_byte_flips(
    signed_bundle: tuple[Path, Path], tmp_path: Path
) -> None:
    bundle, public = signed_bundle
    copy = _copy(bundle, tmp_path)
    text = (copy / "manifest.json").read_text()
    # Flip a byte inside a value the signature covers: "tabular" -> "tabulas".
    offset = text.index('"name": "tabular"') + len('"name": "tabula')
    _flip(copy / "manifest.json", offset)
    result = run_cli("verify", copy, "--public-key", public)
    assert_clean_failure(result, 2, "does not verify")


def test_verify_refuses_unsigned_and_untrusted(
    signed_bundle: tuple[Path, Path], tmp_path: Path
) -> None:
    bundle, _ = signed_bundle
    _, stranger = generate_keypair(tmp_path / "stranger")
    assert_clean_failure(
        run_cli("verify", bundle, "--public-key", stranger), 2, "none of which is trusted"
    )
    copy = _copy(bundle, tmp_path)
    data = json.loads((copy / "manifest.json").read_text())
    data["signatures"] = []
    (copy / "manifest.json").write_text(json.dumps(data))
    assert_clean_failure(run_cli("verify", copy, "--public-key", stranger), 2, "not signed")
    assert_clean_failure(
        run_cli("verify", tmp_path, "--public-key", stranger), 2, "is not a bundle"
    )


def test_inspect_and_bench_refuse_a_file_that_is_not_a_model(tmp_path: Path) -> None:
    fake = tmp_path / "fake.tflite"
    fake.write_bytes(b"hello world, not a flatbuffer at all")
    assert_clean_failure(run_cli("inspect", fake), 2, "fake.tflite")
    assert_clean_failure(run_cli("bench", fake), 2, "fake.tflite")
    assert_clean_failure(run_cli("inspect", tmp_path / "missing.tflite"), 2, "does not exist")


def test_inspect_shows_tensors_ops_and_manifest(signed_bundle: tuple[Path, Path]) -> None:
    bundle, _ = signed_bundle
    result = run_cli("inspect", bundle)
    assert result.exit_code == 0, result.stderr
    assert "FULLY_CONNECTED" in result.stdout
    assert "tabular 0.1.0, float32" in result.stdout
    result, info = run_json("inspect", bundle)
    assert info["manifest"]["name"] == "tabular"
    assert info["inputs"][0]["shape"][1:] == [30]
    assert info["ops"]["FULLY_CONNECTED"] >= 2
    assert info["size_bytes"] == (bundle / "model.tflite").stat().st_size


def test_bench_reports_percentiles(signed_bundle: tuple[Path, Path]) -> None:
    bundle, _ = signed_bundle
    result, figures = run_json("bench", bundle, "--runs", "30", "--warmup", "5")
    assert result.exit_code == 0, result.stderr
    assert figures["runs"] == 30
    assert 0 < figures["p50_ms"] <= figures["p90_ms"] <= figures["p99_ms"]
    assert figures["peak_rss_bytes"] >= figures["baseline_rss_bytes"] > 0


def test_keygen_refuses_to_overwrite(tmp_path: Path) -> None:
    assert run_cli("keygen", "--out", tmp_path / "k").exit_code == 0
    before = (tmp_path / "k" / "signing.key").read_bytes()
    assert_clean_failure(run_cli("keygen", "--out", tmp_path / "k"), 2, "already exists")
    assert (tmp_path / "k" / "signing.key").read_bytes() == before


def test_force_replaces_an_existing_bundle(
    reference_models: dict[str, Path], tmp_path: Path
) -> None:
    out = tmp_path / "out"
    src = reference_models["tabular"] / "model.keras"
    assert run_cli(*_convert(src, out, "--version", "1.0.0")).exit_code == 0
    result = run_cli(*_convert(src, out, "--version", "1.0.1", "--force"))
    assert result.exit_code == 0, result.stderr
    assert read_manifest(out).manifest.version == "1.0.1"
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_debug_shows_the_traceback(tmp_path: Path) -> None:
    result = run_cli(*_convert(tmp_path / "nope.keras", tmp_path / "out"), "--debug")
    assert result.exit_code == 2
    assert "Traceback" in result.stderr
    assert "SourceModelError" in result.stderr


def test_markup_in_a_path_is_printed_not_interpreted(tmp_path: Path) -> None:
    out = tmp_path / "out"
    result = run_cli(*_convert(tmp_path / "a[/x]b.keras", out))
    assert_clean_failure(result, 2, "a[/x]b.keras does not exist", out)


def test_a_folder_that_cannot_be_created_is_a_clean_error(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("")
    result = run_cli("keygen", "--out", tmp_path / "file" / "keys")
    assert_clean_failure(result, 2, "file")


def test_a_hung_worker_is_stopped_after_its_timeout(digits: Path, tmp_path: Path) -> None:
    with TFWorker(tmp_path / "tf.log") as worker:
        worker.call("ping")
        pid = worker.pid
        assert pid is not None
        os.kill(pid, signal.SIGSTOP)  # frozen: alive, but never answers
        with pytest.raises(WorkerCrashError, match=r"did not answer within 2 s"):
            worker.call("ping", timeout=2)
        assert worker.pid is None
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
