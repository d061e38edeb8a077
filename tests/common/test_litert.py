"""ModelRunner against the Keras models it was converted from."""

from __future__ import annotations

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import subprocess
import sys
import textwrap
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import tensorflow as tf

from common import litert as runtime
from common.litert import (
    InputShapeError,
    ModelLoadError,
    ModelRunner,
    RuntimeUnavailableError,
    TensorInfo,
    dequantize,
    interpreter_class,
    quantize,
)

REPO_ROOT = Path(__file__).resolve().parents[2]
SAMPLES = 300


# --- model builders (also used by the toolchain tests) --------------------------------------


@dataclass(frozen=True)
class Converted:
    keras_model: Any
    float32: bytes
    int8: bytes
    # The calibration samples double as test inputs, so int8 outputs are never clipped.
    data: np.ndarray


def dense_model() -> Any:
    tf.keras.utils.set_random_seed(0)
    return tf.keras.Sequential(
        [
            tf.keras.Input((8,)),
            tf.keras.layers.Dense(16, activation="relu"),
            tf.keras.layers.Dense(4),
        ]
    )


def conv_model() -> Any:
    tf.keras.utils.set_random_seed(0)
    return tf.keras.Sequential(
        [
            tf.keras.Input((8, 8, 1)),
            tf.keras.layers.Conv2D(4, 3, activation="relu"),
            tf.keras.layers.Conv2D(6, 3, activation="relu"),
            tf.keras.layers.Flatten(),
            tf.keras.layers.Dense(5),
        ]
    )


def to_float32(model: Any) -> bytes:
    return bytes(tf.lite.TFLiteConverter.from_keras_model(model).convert())


def to_int8(model: Any, data: np.ndarray) -> bytes:
    converter = tf.lite.TFLiteConverter.from_keras_model(model)
    converter.optimizations = [tf.lite.Optimize.DEFAULT]

    def representative() -> Iterator[list[np.ndarray]]:
        for i in range(len(data)):
            yield [data[i : i + 1]]

    converter.representative_dataset = representative
    converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
    converter.inference_input_type = tf.int8
    converter.inference_output_type = tf.int8
    with warnings.catch_warnings():
        # The converter's own note about int8 inputs without statistics: expected here.
        warnings.filterwarnings("ignore", message="Statistics for quantized inputs")
        return bytes(converter.convert())


def convert_both(model: Any, data: np.ndarray) -> Converted:
    return Converted(model, to_float32(model), to_int8(model, data), data)


def dense_data() -> np.ndarray:
    return np.random.default_rng(1).uniform(-1, 1, (SAMPLES, 8)).astype(np.float32)


def image_data() -> np.ndarray:
    return np.random.default_rng(2).uniform(0, 1, (SAMPLES, 8, 8, 1)).astype(np.float32)


@pytest.fixture(scope="module")
def dense() -> Converted:
    return convert_both(dense_model(), dense_data())


@pytest.fixture(scope="module")
def conv() -> Converted:
    return convert_both(conv_model(), image_data())


@pytest.fixture(scope="module")
def fixed_batch() -> tuple[Any, bytes]:
    """A model whose batch is fixed at 1, so predict() must go sample by sample."""
    keras_model = dense_model()

    class Fixed(tf.Module):  # type: ignore[misc]
        @tf.function(input_signature=[tf.TensorSpec([1, 8], tf.float32)])  # type: ignore[untyped-decorator]
        def serve(self, x: Any) -> Any:
            return keras_model(x)

    module = Fixed()
    concrete = module.serve.get_concrete_function()
    converter = tf.lite.TFLiteConverter.from_concrete_functions([concrete], module)
    return keras_model, bytes(converter.convert())


@pytest.fixture(scope="module")
def two_inputs() -> tuple[Any, bytes]:
    tf.keras.utils.set_random_seed(0)
    left = tf.keras.Input((4,), name="left")
    right = tf.keras.Input((3,), name="right")
    joined = tf.keras.layers.Concatenate()([left, right])
    output = tf.keras.layers.Dense(2)(joined)
    keras_model = tf.keras.Model(inputs=[left, right], outputs=output)
    return keras_model, to_float32(keras_model)


def keras_predict(model: Any, *inputs: np.ndarray) -> np.ndarray:
    arguments = list(inputs) if len(inputs) > 1 else inputs[0]
    return np.asarray(model(arguments, training=False))


# --- choosing the runtime -------------------------------------------------------------------


def test_default_runtime_is_ai_edge_litert(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(runtime.RUNTIME_ENV, raising=False)
    cls, description = interpreter_class()
    assert cls.__module__ == "ai_edge_litert.interpreter"
    assert description.startswith("ai-edge-litert ")
    assert description.split()[1][0].isdigit()


def test_env_can_force_tensorflow(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(runtime.RUNTIME_ENV, "tensorflow")
    cls, description = interpreter_class()
    assert cls is tf.lite.Interpreter
    assert description == f"tensorflow {tf.__version__}"


def test_the_argument_overrides_the_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(runtime.RUNTIME_ENV, "tensorflow")
    _, description = interpreter_class("ai-edge-litert")
    assert description.startswith("ai-edge-litert ")
    with pytest.raises(RuntimeUnavailableError, match="runtime=litert is not one of"):
        interpreter_class("litert")


def test_a_runner_can_be_told_its_runtime(dense: Converted) -> None:
    on_tensorflow = ModelRunner(dense.float32, runtime="tensorflow")
    on_litert = ModelRunner(dense.float32, runtime="ai-edge-litert")
    assert on_tensorflow.runtime == f"tensorflow {tf.__version__}"
    assert on_litert.runtime.startswith("ai-edge-litert ")
    x = dense.data[:20]
    np.testing.assert_allclose(
        on_tensorflow.predict([x])[0], on_litert.predict([x])[0], rtol=0, atol=1e-5
    )


def test_env_naming_an_unknown_runtime_fails(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(runtime.RUNTIME_ENV, "onnxruntime")
    with pytest.raises(RuntimeUnavailableError, match="not one of: ai-edge-litert"):
        interpreter_class()


def test_forcing_a_runtime_that_is_not_installed_fails(monkeypatch: pytest.MonkeyPatch) -> None:
    if _installed("tflite_runtime"):
        pytest.skip("tflite-runtime is installed here")
    monkeypatch.setenv(runtime.RUNTIME_ENV, "tflite-runtime")
    with pytest.raises(RuntimeUnavailableError, match="pip install tflite-runtime") as caught:
        interpreter_class()
    assert isinstance(caught.value, ImportError)


def _installed(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None


def test_the_interpreter_gets_the_thread_count(
    monkeypatch: pytest.MonkeyPatch, dense: Converted
) -> None:
    real_cls, description = interpreter_class()
    seen: list[dict[str, Any]] = []

    def spy(**kwargs: Any) -> Any:
        seen.append(kwargs)
        return real_cls(**kwargs)

    def spying_class(runtime: str | None = None) -> tuple[Any, str]:
        return spy, description

    monkeypatch.setattr(runtime, "interpreter_class", spying_class)
    ModelRunner(dense.float32, threads=3)
    ModelRunner(dense.float32)
    assert seen[0]["num_threads"] == 3
    assert "num_threads" not in seen[1]


def test_threads_must_be_positive(dense: Converted) -> None:
    with pytest.raises(ValueError, match="threads"):
        ModelRunner(dense.float32, threads=0)


def test_importing_the_runtime_leaves_tensorflow_out(dense: Converted, tmp_path: Path) -> None:
    model = tmp_path / "dense.tflite"
    model.write_bytes(dense.float32)
    script = textwrap.dedent(
        f"""
        import sys
        from pathlib import Path
        import numpy as np
        import common.litert as runtime
        assert "tensorflow" not in sys.modules, "import pulled in tensorflow"
        runner = runtime.ModelRunner(Path({str(model)!r}))
        runner.invoke_once([np.zeros((1, 8), np.float32)])
        assert "tensorflow" not in sys.modules, "running a model pulled in tensorflow"
        assert "keras" not in sys.modules
        """
    )
    env = {k: v for k, v in os.environ.items() if k != runtime.RUNTIME_ENV}
    env["PYTHONPATH"] = str(REPO_ROOT)
    completed = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, env=env, check=False
    )
    assert completed.returncode == 0, completed.stderr


# --- tensor descriptions --------------------------------------------------------------------


def test_tensor_info_of_a_float_model(dense: Converted) -> None:
    runner = ModelRunner(dense.float32)
    [tensor] = runner.inputs
    assert tensor.shape == (1, 8)
    assert tensor.shape_signature == (-1, 8)
    assert tensor.dtype == "float32"
    assert not tensor.quantized
    assert (tensor.scale, tensor.zero_point) == (0.0, 0)
    assert [out.shape for out in runner.outputs] == [(1, 4)]
    assert runner.runtime


def test_tensor_info_of_an_int8_model(dense: Converted) -> None:
    runner = ModelRunner(dense.int8)
    for tensor in [*runner.inputs, *runner.outputs]:
        assert tensor.dtype == "int8"
        assert tensor.quantized
        assert tensor.scale > 0
        assert -128 <= tensor.zero_point <= 127
    assert runner.inputs[0].to_dict()["shape_signature"] == [-1, 8]


def test_a_path_loads_like_bytes(dense: Converted, tmp_path: Path) -> None:
    model = tmp_path / "dense.tflite"
    model.write_bytes(dense.float32)
    x = dense.data[:5]
    from_path = ModelRunner(model).predict([x])[0]
    from_bytes = ModelRunner(dense.float32).predict([x])[0]
    np.testing.assert_array_equal(from_path, from_bytes)


# --- answers --------------------------------------------------------------------------------


@pytest.mark.parametrize("which", ["dense", "conv"])
def test_float32_matches_keras(which: str, request: pytest.FixtureRequest) -> None:
    converted: Converted = request.getfixturevalue(which)
    runner = ModelRunner(converted.float32)
    [got] = runner.predict([converted.data])
    expected = keras_predict(converted.keras_model, converted.data)
    assert got.dtype == np.float32
    assert got.shape == expected.shape
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-5)


@pytest.mark.parametrize("which", ["dense", "conv"])
def test_int8_stays_within_a_few_quanta_of_keras(
    which: str, request: pytest.FixtureRequest
) -> None:
    converted: Converted = request.getfixturevalue(which)
    runner = ModelRunner(converted.int8)
    [got] = runner.predict([converted.data])
    expected = keras_predict(converted.keras_model, converted.data)
    quantum = runner.outputs[0].scale
    assert got.dtype == np.float32
    assert np.abs(got - expected).max() <= 4 * quantum
    agreement = np.mean(got.argmax(axis=1) == expected.argmax(axis=1))
    assert agreement >= 0.9


@pytest.mark.parametrize("which", ["dense", "conv"])
@pytest.mark.parametrize("kind", ["float32", "int8"])
def test_batch_size_does_not_change_answers(
    which: str, kind: str, request: pytest.FixtureRequest
) -> None:
    converted: Converted = request.getfixturevalue(which)
    runner = ModelRunner(getattr(converted, kind))
    x = converted.data
    [all_at_once] = runner.predict([x])
    [first_seven] = runner.predict([x[:7]])
    [first_one] = runner.predict([x[:1]])
    one_by_one = np.concatenate([runner.invoke_once([x[i : i + 1]])[0] for i in range(len(x))])
    assert all_at_once.shape[0] == len(x) == 300
    np.testing.assert_allclose(first_seven, all_at_once[:7], rtol=0, atol=1e-6)
    np.testing.assert_allclose(first_one, all_at_once[:1], rtol=0, atol=1e-6)
    np.testing.assert_allclose(one_by_one, all_at_once, rtol=0, atol=1e-6)


def test_large_batches_run_in_bounded_chunks(dense: Converted) -> None:
    runner = ModelRunner(dense.float32)
    x = np.concatenate([dense.data] * 3)  # 900 samples: more than one chunk
    [got] = runner.predict([x])
    assert got.shape == (900, 4)
    assert runner._batch_size <= runtime.MAX_CHUNK
    np.testing.assert_allclose(got[600:], got[:300], rtol=0, atol=1e-6)


def test_a_repeated_batch_size_is_not_reallocated(
    dense: Converted, monkeypatch: pytest.MonkeyPatch
) -> None:
    runner = ModelRunner(dense.float32)
    runner.predict([dense.data[:7]])
    resizes: list[Any] = []
    batch_interpreter = runner._batch_interpreter
    real_resize = batch_interpreter.resize_tensor_input

    def counting_resize(*args: Any, **kwargs: Any) -> Any:
        resizes.append(args)
        return real_resize(*args, **kwargs)

    monkeypatch.setattr(batch_interpreter, "resize_tensor_input", counting_resize)
    runner.predict([dense.data[7:14]])
    runner.invoke_once([dense.data[:1]])  # the hot path has an interpreter of its own
    runner.predict([dense.data[:7]])
    assert resizes == []
    runner.predict([dense.data[:5]])
    assert len(resizes) == 1


def test_a_failed_resize_falls_back_to_one_sample_at_a_time(
    dense: Converted, monkeypatch: pytest.MonkeyPatch
) -> None:
    runner = ModelRunner(dense.float32)

    def refuse(size: int) -> Any:
        raise ValueError("cannot resize")

    monkeypatch.setattr(runner, "_batch_interpreter_for", refuse)
    [got] = runner.predict([dense.data[:9]])
    expected = keras_predict(dense.keras_model, dense.data[:9])
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-5)


def test_a_fixed_batch_model_runs_sample_by_sample(fixed_batch: tuple[Any, bytes]) -> None:
    keras_model, model = fixed_batch
    runner = ModelRunner(model)
    assert runner.inputs[0].shape_signature == (1, 8)
    x = dense_data()[:7]
    [got] = runner.predict([x])
    np.testing.assert_allclose(got, keras_predict(keras_model, x), rtol=0, atol=1e-5)


def test_several_inputs_are_matched_by_position(two_inputs: tuple[Any, bytes]) -> None:
    keras_model, model = two_inputs
    runner = ModelRunner(model)
    rng = np.random.default_rng(3)
    by_name = {"left": rng.normal(size=(11, 4)), "right": rng.normal(size=(11, 3))}
    # TFLite may order inputs differently from Keras; runner.inputs says which is which.
    ordered = [next(v for k, v in by_name.items() if k in t.name) for t in runner.inputs]
    [got] = runner.predict(ordered)
    expected = keras_predict(keras_model, by_name["left"], by_name["right"])
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-5)
    [single] = runner.invoke_once([a[:1] for a in ordered])
    np.testing.assert_allclose(single, expected[:1], rtol=0, atol=1e-5)


def test_invoke_once_accepts_a_sample_without_its_batch_axis(dense: Converted) -> None:
    runner = ModelRunner(dense.int8)
    [with_axis] = runner.invoke_once([dense.data[:1]])
    [without_axis] = runner.invoke_once([dense.data[0]])
    np.testing.assert_array_equal(with_axis, without_axis)
    assert with_axis.shape == (1, 4)


def test_an_empty_batch_gives_empty_outputs(dense: Converted) -> None:
    [got] = ModelRunner(dense.float32).predict([np.zeros((0, 8), np.float32)])
    assert got.shape == (0, 4)
    assert got.dtype == np.float32


# --- bad input ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "bad",
    [
        pytest.param(b"", id="empty"),
        pytest.param(b"definitely not a model, just some text", id="text"),
        pytest.param(b"\x18\x00\x00\x00TFL3" + bytes(40), id="header-only"),
    ],
)
def test_corrupt_bytes_raise_model_load_error(bad: bytes) -> None:
    with pytest.raises(ModelLoadError) as caught:
        ModelRunner(bad)
    assert "\n" not in str(caught.value)


def test_a_truncated_model_raises_model_load_error(dense: Converted) -> None:
    with pytest.raises(ModelLoadError, match="not a valid TFLite flatbuffer"):
        ModelRunner(dense.float32[: len(dense.float32) // 2])


def test_a_missing_file_raises_model_load_error(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match="cannot read"):
        ModelRunner(tmp_path / "absent.tflite")


@pytest.mark.parametrize(
    ("shape", "expected"),
    [((5, 7), r"expects shape \(N, 8\), got \(5, 7\)"), ((5, 8, 1), r"got \(5, 8, 1\)")],
)
def test_predict_rejects_the_wrong_shape(
    dense: Converted, shape: tuple[int, ...], expected: str
) -> None:
    runner = ModelRunner(dense.float32)
    with pytest.raises(InputShapeError, match=expected):
        runner.predict([np.zeros(shape, np.float32)])


def test_invoke_once_rejects_the_wrong_shape(dense: Converted) -> None:
    runner = ModelRunner(dense.int8)
    with pytest.raises(InputShapeError, match=r"expects shape \(1, 8\), got \(2, 8\)"):
        runner.invoke_once([np.zeros((2, 8), np.float32)])


def test_non_numeric_inputs_are_rejected(dense: Converted) -> None:
    runner = ModelRunner(dense.float32)
    words = np.array([["1.0"] * 8])
    with pytest.raises(InputShapeError, match="must be numeric"):
        runner.predict([words])
    with pytest.raises(InputShapeError, match="must be numeric"):
        runner.invoke_once([words])


def test_the_wrong_number_of_inputs_is_rejected(dense: Converted) -> None:
    runner = ModelRunner(dense.float32)
    x = dense.data[:2]
    with pytest.raises(InputShapeError, match="takes 1 input"):
        runner.predict([x, x])
    with pytest.raises(InputShapeError, match="takes 1 input"):
        runner.invoke_once([])


def test_inputs_must_agree_on_the_batch(two_inputs: tuple[Any, bytes]) -> None:
    runner = ModelRunner(two_inputs[1])
    arrays = [np.zeros((3 if i == 0 else 4, *t.shape[1:])) for i, t in enumerate(runner.inputs)]
    with pytest.raises(InputShapeError, match="disagree on the batch"):
        runner.predict(arrays)


# --- quantization math ----------------------------------------------------------------------


def _info(dtype: str, scale: float, zero_point: int) -> TensorInfo:
    return TensorInfo("t", 0, (1, 4), (-1, 4), dtype, scale, zero_point)


def test_quantize_rounds_half_away_from_zero_and_clips() -> None:
    info = _info("int8", 0.5, 3)
    got = quantize(np.array([0.0, 1.25, -1.25, 0.7, 1000.0, -1000.0]), info)
    assert got.dtype == np.int8
    assert got.tolist() == [3, 3 + 3, 3 - 3, 3 + 1, 127, -128]


@pytest.mark.parametrize(
    ("dtype", "scale", "zero_point"),
    [("int8", 0.02, -5), ("uint8", 1 / 255, 0), ("int16", 0.001, 0), ("uint8", 0.1, 128)],
)
def test_quantization_round_trips_within_half_a_quantum(
    dtype: str, scale: float, zero_point: int
) -> None:
    info = _info(dtype, scale, zero_point)
    limits = np.iinfo(np.dtype(dtype))
    low, high = (limits.min - zero_point) * scale, (limits.max - zero_point) * scale
    x = np.random.default_rng(4).uniform(low, high, 1000).astype(np.float32)
    back = dequantize(quantize(x, info), info)
    assert back.dtype == np.float32
    assert np.abs(back - x).max() <= scale / 2 + 1e-6
    every_level = np.arange(limits.min, limits.max + 1, dtype=np.dtype(dtype))
    np.testing.assert_array_equal(quantize(dequantize(every_level, info), info), every_level)


def test_quantized_property() -> None:
    assert _info("int8", 0.1, 0).quantized
    assert not _info("float32", 0.0, 0).quantized
