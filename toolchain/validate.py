"""Compare a converted model with its source on the same evaluation data."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from protocol.manifest import Validation


def is_class_vector(output: np.ndarray) -> bool:
    """A (N, K) output with K > 1 is read as class scores; argmax is the prediction."""
    return output.ndim == 2 and output.shape[1] > 1


def is_binary_score(output: np.ndarray) -> bool:
    """A (N,) or (N, 1) output is one score per sample: a binary classifier or a regressor."""
    return output.ndim == 1 or (output.ndim == 2 and output.shape[1] == 1)


def top1(output: np.ndarray, threshold: float) -> np.ndarray:
    if is_class_vector(output):
        return np.asarray(output.argmax(axis=1))
    return (output.reshape(len(output)) > threshold).astype(np.int64)


def binary_threshold(source: np.ndarray) -> float:
    """0.5 for probabilities (a sigmoid), 0 for logits: judged on the source's own outputs."""
    return 0.5 if source.min() >= 0.0 and source.max() <= 1.0 else 0.0


def align_outputs(source: Sequence[np.ndarray], tflite: Sequence[np.ndarray]) -> list[np.ndarray]:
    """TFLite's output order for a multi-output model is not the source's; match by shape.

    Raises ValueError when the outputs cannot be matched without guessing.
    """
    if len(source) != len(tflite):
        raise ValueError(f"the source has {len(source)} outputs, the TFLite model {len(tflite)}")
    if all(s.shape == t.shape for s, t in zip(source, tflite, strict=True)) and (
        len(source) == 1 or len({s.shape for s in source}) == len(source)
    ):
        return list(tflite)
    by_shape = {t.shape: t for t in tflite}
    if len(by_shape) != len(tflite) or len({s.shape for s in source}) != len(source):
        raise ValueError(
            "the model has several outputs of the same shape, which cannot be matched to the "
            "source's reliably; convert without --eval"
        )
    try:
        return [by_shape[s.shape] for s in source]
    except KeyError as exc:
        raise ValueError(f"no TFLite output has the source's output shape {exc}") from None


def compare(
    source: Sequence[np.ndarray], tflite: Sequence[np.ndarray], labels: np.ndarray | None
) -> Validation:
    """Accuracy of both (with labels), top-1 agreement, and the error of dequantized outputs.

    Classification figures come from the first output; errors span all outputs. Outputs
    must already be aligned (see align_outputs).
    """
    errors = [
        np.abs(s.astype(np.float64) - t.astype(np.float64))
        for s, t in zip(source, tflite, strict=True)
    ]
    max_err = max(float(e.max()) if e.size else 0.0 for e in errors)
    total = sum(e.size for e in errors)
    mean_err = sum(float(e.sum()) for e in errors) / total if total else 0.0

    source_acc = tflite_acc = drop = agreement = None
    first_src, first_tfl = source[0], tflite[0]
    if is_class_vector(first_src) or (is_binary_score(first_src) and labels is not None):
        threshold = binary_threshold(first_src)
        src_top1 = top1(first_src, threshold)
        tfl_top1 = top1(first_tfl, threshold)
        agreement = float((src_top1 == tfl_top1).mean())
        if labels is not None:
            source_acc = float((src_top1 == labels).mean())
            tflite_acc = float((tfl_top1 == labels).mean())
            drop = source_acc - tflite_acc
    return Validation(
        samples=len(first_src),
        source_accuracy=source_acc,
        tflite_accuracy=tflite_acc,
        accuracy_drop=drop,
        top1_agreement=agreement,
        max_abs_error=max_err,
        mean_abs_error=mean_err,
    )


@dataclass(frozen=True)
class GateResult:
    passed: bool
    measure: str  # what was compared with the budget
    value: float | None

    def describe(self, budget: float) -> str:
        if self.value is None:
            return self.measure
        verdict = "within" if self.passed else "exceeds"
        return f"{self.measure} {self.value:.4f} {verdict} the budget of {budget:.4f}"


def accuracy_gate(validation: Validation, max_drop: float) -> GateResult:
    """Labels decide when there are any; otherwise top-1 disagreement stands in for them."""
    if validation.accuracy_drop is not None:
        drop = validation.accuracy_drop
        return GateResult(drop <= max_drop + 1e-12, "accuracy drop", drop)
    if validation.top1_agreement is not None:
        disagreement = 1.0 - validation.top1_agreement
        return GateResult(disagreement <= max_drop + 1e-12, "top-1 disagreement", disagreement)
    return GateResult(True, "not gated: no labels and the output is not a class vector", None)
