"""Reading a classifier's answer from a model's first output: the top-1 class and, when the
output is a probability distribution, its confidence.

A `Classifier` is decided once per model from the manifest (the first output's shape and
quantization, and the labels), so that serving, telemetry and feedback all count classes
the same way. `one` reads a single prediction, in plain Python for short vectors: numpy's
per-call overhead on a handful of numbers costs more than the arithmetic. `many` reads a
stack of predictions with numpy, for telemetry. The two give the same answers (a test
holds them to it); they may differ only for a vector whose sum lies within rounding error
of the probability tolerance, as they add up in different orders.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from enum import StrEnum

import numpy as np

from protocol.manifest import Manifest, TensorSpec

# How far from 1.0 a float output may sum and still be read as a probability distribution.
PROBABILITY_TOLERANCE = 1e-3
# Score vectors up to this long are read in plain Python by `one`.
SMALL_VECTOR = 64
NO_CLASS = -1  # in `many`'s top-1 array: the output names no class


class Kind(StrEnum):
    SCORES = "scores"  # one vector of K > 1 scores per sample: argmax
    SINGLE = "single"  # one labelled score per sample: a binary classifier
    NONE = "none"  # anything else (a regression, an image): no class


@dataclass(frozen=True)
class Classifier:
    kind: Kind
    width: int  # values in one sample's first output that are read (0 when kind is NONE)
    classes: int  # classes a top-1 may name: the labels' count when there are labels
    two_labels: bool  # a SINGLE score with exactly two labels may be a logit
    tolerance: float  # on the sum of a probability distribution

    @classmethod
    def for_manifest(cls, manifest: Manifest) -> Classifier:
        return cls.for_output(manifest.outputs[0], manifest.labels)

    @classmethod
    def for_output(cls, output: TensorSpec, labels: Sequence[str] | None) -> Classifier:
        # Every axis but the last holds one sample (1) or a batch (-1): one vector per sample.
        vector = len(output.shape) >= 1 and all(d in (1, -1) for d in output.shape[:-1])
        last = output.shape[-1] if vector else 0
        if last > 1:
            kind, classes = Kind.SCORES, len(labels) if labels else last
        elif last == 1 and labels:
            kind, classes = Kind.SINGLE, max(len(labels), 2)
        else:
            # A single unlabelled value is a regression, not a class.
            kind, last, classes = Kind.NONE, 0, 0
        tolerance = PROBABILITY_TOLERANCE
        if output.scale and np.dtype(output.dtype).kind in "iu":
            # A quantized output sits on a grid of width `scale`: a dequantized softmax sums
            # to 1 only within half a step per value.
            tolerance += last * output.scale / 2
        two_labels = labels is not None and len(labels) == 2
        return cls(kind, last, classes, two_labels, tolerance)

    def one(self, output: np.ndarray) -> tuple[int | None, float | None]:
        """(top1, confidence) from one sample's first output (with or without batch axis)."""
        if self.kind is Kind.NONE:
            return None, None
        if self.kind is Kind.SINGLE:
            if output.size != 1:
                return None, None
            return self._single(float(output.reshape(-1)[0]))
        if output.size != self.width:
            return None, None  # a dynamically shaped output that does not match its manifest
        if self.width <= SMALL_VECTOR:
            answer = self._small(output.reshape(-1).tolist())
            if answer is not None:
                return answer
        top1, confidence = self.many(output.reshape(1, -1))
        value = float(confidence[0])
        return int(top1[0]), (None if math.isnan(value) else value)

    def _single(self, score: float) -> tuple[int | None, float | None]:
        if 0.0 <= score <= 1.0:
            top1 = 1 if score >= 0.5 else 0
            return top1, (score if top1 == 1 else 1.0 - score)
        if self.two_labels and math.isfinite(score):
            # A single logit for a two-label model: class 1 where sigmoid(logit) >= 0.5.
            return (1 if score >= 0.0 else 0), None
        return 0, None

    def _small(self, scores: list[float]) -> tuple[int, float | None] | None:
        """None when a score is not finite: numpy's argmax decides those, as in `many`."""
        total = math.fsum(scores)
        if not math.isfinite(total):
            return None
        top1 = max(range(len(scores)), key=scores.__getitem__)  # the first of equal maxima
        if min(scores) >= 0.0 and scores[top1] <= 1.0 and abs(total - 1.0) <= self.tolerance:
            return top1, scores[top1]
        return top1, None

    def many(self, outputs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(top1, confidence) for a stack of first outputs, one sample each along axis 0:
        int64 with NO_CLASS where there is no class, float64 with NaN where there is no
        confidence."""
        count = outputs.shape[0]
        scores = outputs.reshape(count, -1).astype(np.float64, copy=False)
        if self.width == 0 or scores.shape[1] != self.width:
            return np.full(count, NO_CLASS, dtype=np.int64), np.full(count, np.nan)
        if np.isfinite(scores).all():
            return self._many_finite(scores)
        finite = np.isfinite(scores).all(axis=1)
        with np.errstate(invalid="ignore", over="ignore"):
            top1, confidence = self._many_finite(scores)
        if self.kind is Kind.SINGLE:
            top1[~finite] = 0
        confidence[~finite] = np.nan
        return top1, confidence

    def _many_finite(self, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        # Reductions along a short row are slow in numpy: row sums go through a matrix
        # product, and the sign check is made on the whole stack before row by row.
        if self.kind is Kind.SINGLE:
            score = scores[:, 0]
            in_unit = (score >= 0.0) & (score <= 1.0)
            logit = (score >= 0.0) & self.two_labels
            top1 = np.where(in_unit, score >= 0.5, logit).astype(np.int64)
            confidence = np.where(top1 == 1, score, 1.0 - score)
            return top1, np.where(in_unit, confidence, np.nan)
        top1 = scores.argmax(axis=1)
        picked = scores[np.arange(len(scores)), top1]
        distribution = (picked <= 1.0) & (
            np.abs(scores @ np.ones(scores.shape[1]) - 1.0) <= self.tolerance
        )
        if distribution.any() and scores.min() < 0.0:
            distribution &= scores.min(axis=1) >= 0.0
        return top1, np.where(distribution, picked, np.nan)


def non_finite(outputs: Sequence[np.ndarray]) -> np.ndarray:
    """Per sample, whether any floating output value is NaN or infinite; each array in
    `outputs` is one output stacked over the samples along axis 0."""
    count = outputs[0].shape[0] if outputs else 0
    flags: np.ndarray = np.zeros(count, dtype=bool)
    for stacked in outputs:
        if stacked.dtype.kind in "fc" and not np.isfinite(stacked).all():
            flags |= ~np.isfinite(stacked.reshape(count, -1)).all(axis=1)
    return flags
