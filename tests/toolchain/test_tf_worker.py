"""The worker's fallback and error mapping, driven with a stand-in for the converter call.

The real converter runs in test_convert_modes and test_convert_errors; what cannot be
provoked on demand there (a Keras model that from_keras_model trips over) is driven here.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from toolchain.tf_worker import JobError, Source, _convert_with_fallback, _missing_ops

REAL_FLEX_MESSAGE = """<unknown>:0: error: failed while converting: 'main':
Some ops are not supported by the native TFLite runtime, you can enable TF kernels fallback
TF Select ops: MatrixInverse, Svd
Details:
\ttf.MatrixInverse(tensor<?x4x4xf32>) -> (tensor<?x4x4xf32>) : {adjoint = false}
<unknown>:0: note: Error code: ERROR_NEEDS_FLEX_OPS
"""


def _keras_source() -> Source:
    return Source(path=Path("model.keras"), format="keras")


def test_keras_path_failure_falls_back_to_saved_model_and_sticks() -> None:
    calls: list[bool] = []

    def build(via_saved_model: bool) -> bytes:
        calls.append(via_saved_model)
        if not via_saved_model:
            raise RuntimeError("from_keras_model: 'KerasTensor' object has no attribute 'op'")
        return b"model"

    source = _keras_source()
    assert _convert_with_fallback(source, build) == (b"model", "saved_model")
    assert calls == [False, True]
    # Once exported, later modes go straight to the SavedModel path.
    source.exported = Path("exported")
    calls.clear()
    assert _convert_with_fallback(source, build) == (b"model", "saved_model")
    assert calls == [True]


def test_direct_keras_path_is_used_when_it_works() -> None:
    assert _convert_with_fallback(_keras_source(), lambda via: b"m") == (b"m", "keras")


def test_missing_ops_do_not_trigger_the_fallback() -> None:
    calls: list[bool] = []

    def build(via_saved_model: bool) -> bytes:
        calls.append(via_saved_model)
        raise RuntimeError(REAL_FLEX_MESSAGE)

    with pytest.raises(JobError) as caught:
        _convert_with_fallback(_keras_source(), build)
    assert caught.value.kind == "unsupported_ops"
    assert caught.value.extra["ops"] == ["MatrixInverse", "Svd"]
    assert calls == [False]


def test_saved_model_sources_use_the_saved_model_path_only() -> None:
    calls: list[bool] = []

    def build(via_saved_model: bool) -> bytes:
        calls.append(via_saved_model)
        raise RuntimeError("junk\n<unknown>:0: error: 'tfl.conv_2d' op quantization failed\nmore")

    with pytest.raises(JobError) as caught:
        _convert_with_fallback(Source(path=Path("sm"), format="saved_model"), build)
    assert caught.value.kind == "conversion"
    assert str(caught.value) == "<unknown>:0: error: 'tfl.conv_2d' op quantization failed"
    assert calls == [True]


def test_missing_ops_parsing() -> None:
    assert _missing_ops(REAL_FLEX_MESSAGE) == ["MatrixInverse", "Svd"]
    assert _missing_ops("'tf.Foo' op is neither a custom op nor a flex op") == ["Foo"]
    assert _missing_ops("nothing to see") == []
