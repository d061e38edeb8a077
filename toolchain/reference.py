"""What a device needs to judge the model in the field: input statistics and self-tests."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import numpy as np

from protocol.manifest import (
    ArrayData,
    QuantizationMode,
    ReferenceStats,
    SelfTest,
    SelfTestVector,
    TensorSpec,
)

# Past this many features, per-feature statistics bloat the manifest; images get one
# mean and std per channel instead.
MAX_PER_FEATURE = 1024
HISTOGRAM_BINS = 32
SELF_TEST_VECTORS = 4


def reference_stats(x: np.ndarray, outputs: np.ndarray | None) -> ReferenceStats:
    """Statistics of the inputs `x` (N, ...) and, for class scores, of the model's answers."""
    features = int(np.prod(x.shape[1:]))
    granularity: Literal["feature", "channel"] = (
        "feature" if features <= MAX_PER_FEATURE else "channel"
    )
    rows = len(x) if granularity == "feature" else -1
    flat = x.reshape(rows, -1 if granularity == "feature" else x.shape[-1]).astype(np.float64)
    counts, edges = np.histogram(x.astype(np.float64), bins=HISTOGRAM_BINS)
    distribution = confidence = None
    if outputs is not None and outputs.ndim == 2 and outputs.shape[1] > 1:
        top1 = outputs.argmax(axis=1)
        distribution = tuple(
            float(v) for v in np.bincount(top1, minlength=outputs.shape[1]) / len(top1)
        )
        confidence = float(outputs.max(axis=1).mean())
    return ReferenceStats(
        samples=len(x),
        granularity=granularity,
        mean=tuple(float(v) for v in flat.mean(axis=0)),
        std=tuple(float(v) for v in flat.std(axis=0)),
        min=float(x.min()),
        max=float(x.max()),
        histogram_edges=tuple(float(e) for e in edges),
        histogram_counts=tuple(int(c) for c in counts),
        class_distribution=distribution,
        mean_confidence=confidence,
    )


def self_test_tolerance(
    mode: QuantizationMode, outputs: Sequence[TensorSpec], answers: Sequence[np.ndarray]
) -> float:
    """How far a device's answer may stray from ours and still be the same model.

    Other CPUs run other kernels (NEON vs AVX, XNNPACK vs reference) that round
    differently: quantized outputs move by a few quantization steps, hybrid kernels by more
    than float ones. The relative part is scaled by the outputs' own spread, so logits in
    the hundreds get as much room as probabilities do.
    """
    steps = [4.0 * t.scale for t in outputs if t.scale > 0]
    spread = max([1.0, *(float(np.ptp(a)) for a in answers if a.size)])
    relative = {
        QuantizationMode.FLOAT32: 1e-4,
        QuantizationMode.FLOAT16: 1e-3,
        QuantizationMode.DYNAMIC: 2e-2,
        QuantizationMode.INT8: 2e-2,
        QuantizationMode.INT16X8: 2e-2,
    }[mode]
    return max([relative * spread, *steps])


def self_test(
    samples: Sequence[np.ndarray], expected: Sequence[np.ndarray], atol: float
) -> SelfTest:
    """Vectors from samples spread over the data (which is often sorted by class)."""
    picks = np.linspace(0, len(samples[0]) - 1, num=min(SELF_TEST_VECTORS, len(samples[0])))
    vectors = tuple(
        SelfTestVector(
            inputs=tuple(ArrayData.from_array(x[i : i + 1]) for x in samples),
            expected=tuple(ArrayData.from_array(y[i : i + 1].astype(np.float32)) for y in expected),
        )
        for i in sorted({int(p) for p in picks})
    )
    return SelfTest(vectors=vectors, atol=atol, rtol=1e-3)
