"""read_model_info against models converted in the test, and against files that are not models."""

from __future__ import annotations

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import hashlib
import json
import re
from pathlib import Path
from typing import Any

import pytest
import tensorflow as tf

from common.litert import ModelLoadError, ModelRunner
from tests.common.test_litert import (
    Converted,
    conv_model,
    convert_both,
    dense_data,
    dense_model,
    image_data,
)
from toolchain.errors import ArtifactError
from toolchain.model_info import ModelInfo, read_model_info


@pytest.fixture(scope="module")
def conv() -> Converted:
    return convert_both(conv_model(), image_data())


@pytest.fixture(scope="module")
def dense() -> Converted:
    return convert_both(dense_model(), dense_data())


class _Inverse(tf.Module):  # type: ignore[misc]
    """MatrixInverse has no TFLite builtin: it becomes a Flex op or a custom op."""

    @tf.function(input_signature=[tf.TensorSpec([3, 3], tf.float32)])  # type: ignore[untyped-decorator]
    def serve(self, x: Any) -> Any:
        return tf.linalg.inv(x) + 1.0


def _convert_inverse(**settings: Any) -> bytes:
    module = _Inverse()
    concrete = module.serve.get_concrete_function()
    converter = tf.lite.TFLiteConverter.from_concrete_functions([concrete], module)
    for name, value in settings.items():
        if name == "supported_ops":
            converter.target_spec.supported_ops = value
        else:
            setattr(converter, name, value)
    return bytes(converter.convert())


@pytest.fixture(scope="module")
def flex_model() -> bytes:
    return _convert_inverse(
        supported_ops=[tf.lite.OpsSet.TFLITE_BUILTINS, tf.lite.OpsSet.SELECT_TF_OPS]
    )


@pytest.fixture(scope="module")
def custom_op_model() -> bytes:
    return _convert_inverse(allow_custom_ops=True)


def _version(text: str | None) -> tuple[int, ...]:
    assert text is not None
    assert re.fullmatch(r"\d+(\.\d+)+", text), text
    return tuple(int(part) for part in text.split("."))


# --- what the file holds --------------------------------------------------------------------


def test_ops_are_counted_across_the_model(conv: Converted) -> None:
    for model in (conv.float32, conv.int8):
        info = read_model_info(model)
        assert info.ops["CONV_2D"] == 2
        assert info.ops["FULLY_CONNECTED"] == 1
        assert info.flex_ops == []
        assert info.custom_ops == []


def test_int8_io_needs_no_quantize_ops_at_the_edges(dense: Converted) -> None:
    assert read_model_info(dense.int8).ops == {"FULLY_CONNECTED": 2}
    assert read_model_info(dense.float32).ops == {"FULLY_CONNECTED": 2}


@pytest.mark.parametrize("kind", ["float32", "int8"])
def test_tensors_agree_with_the_interpreter(conv: Converted, kind: str) -> None:
    model = getattr(conv, kind)
    info = read_model_info(model)
    runner = ModelRunner(model)
    assert info.inputs == runner.inputs
    assert info.outputs == runner.outputs


def test_float32_tensors(conv: Converted) -> None:
    info = read_model_info(conv.float32)
    [tensor] = info.inputs
    assert tensor.shape == (1, 8, 8, 1)
    assert tensor.shape_signature == (-1, 8, 8, 1)
    assert tensor.dtype == "float32"
    assert not tensor.quantized
    assert info.per_channel == {}


def test_int8_tensors_and_per_channel_weights(conv: Converted) -> None:
    info = read_model_info(conv.int8)
    for tensor in [*info.inputs, *info.outputs]:
        assert tensor.dtype == "int8"
        assert tensor.quantized
    # Weights are quantized per output channel: 4 and 6 for the convolutions, 5 for the dense.
    assert sorted(set(info.per_channel.values())) == [4, 5, 6]


def test_min_runtime_version_is_read_from_the_metadata(dense: Converted) -> None:
    float_version = _version(read_model_info(dense.float32).min_runtime_version)
    int8_version = _version(read_model_info(dense.int8).min_runtime_version)
    # Int8 kernels arrived after float ones, so they can only ask for a newer runtime.
    assert int8_version >= float_version


def test_size_hash_and_json(dense: Converted, tmp_path: Path) -> None:
    path = tmp_path / "dense.tflite"
    path.write_bytes(dense.int8)
    info = read_model_info(path)
    assert info == read_model_info(dense.int8)
    assert info.size_bytes == len(dense.int8)
    assert info.sha256 == hashlib.sha256(dense.int8).hexdigest()
    data = json.loads(json.dumps(info.to_dict()))
    assert data["inputs"][0]["shape_signature"] == [-1, 8]
    assert data["ops"] == {"FULLY_CONNECTED": 2}
    assert set(data) == set(ModelInfo.__dataclass_fields__)


# --- ops the runtime lacks ------------------------------------------------------------------


def test_flex_ops_are_listed(flex_model: bytes) -> None:
    info = read_model_info(flex_model)
    assert info.flex_ops == ["FlexMatrixInverse"]
    assert info.ops["FlexMatrixInverse"] == 1
    assert info.custom_ops == []


@pytest.mark.parametrize("runtime_key", ["ai-edge-litert", "tensorflow"])
def test_the_runner_refuses_flex_ops_in_one_line(flex_model: bytes, runtime_key: str) -> None:
    # Neither runtime carries the Flex delegate: TensorFlow's pip wheel (2.21) has lost it too.
    with pytest.raises(ModelLoadError) as caught:
        ModelRunner(flex_model, runtime=runtime_key)
    message = str(caught.value)
    assert "TF Select (Flex)" in message
    assert "FlexMatrixInverse" in message
    assert runtime_key in message
    assert "\n" not in message


def test_custom_ops_are_listed_apart_from_flex(custom_op_model: bytes) -> None:
    info = read_model_info(custom_op_model)
    assert info.custom_ops == ["MatrixInverse"]
    assert info.flex_ops == []
    with pytest.raises(ModelLoadError, match="needs custom op MatrixInverse"):
        ModelRunner(custom_op_model, runtime="ai-edge-litert")


# --- not a model ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        pytest.param(b"", "empty", id="empty"),
        pytest.param(b"PK\x03\x04 a zip, say", "no TFL3 identifier", id="zip"),
        pytest.param(b"TFL3", "no TFL3 identifier", id="identifier-misplaced"),
    ],
)
def test_non_flatbuffers_raise_artifact_error(content: bytes, expected: str) -> None:
    with pytest.raises(ArtifactError, match=expected):
        read_model_info(content)


@pytest.mark.parametrize("fraction", [0.02, 0.25, 0.5, 0.9, 0.999])
def test_truncated_files_raise_artifact_error(
    conv: Converted, fraction: float, tmp_path: Path
) -> None:
    path = tmp_path / "cut.tflite"
    path.write_bytes(conv.int8[: max(8, int(len(conv.int8) * fraction))])
    with pytest.raises(ArtifactError) as caught:
        read_model_info(path)
    assert "truncated or corrupt" in str(caught.value)
    assert "\n" not in str(caught.value)


def test_a_missing_file_raises_artifact_error(tmp_path: Path) -> None:
    with pytest.raises(ArtifactError, match="cannot read"):
        read_model_info(tmp_path / "absent.tflite")
