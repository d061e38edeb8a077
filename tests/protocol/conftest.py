from __future__ import annotations

import numpy as np
import pytest

from protocol.manifest import (
    MANIFEST_SCHEMA_VERSION,
    ArrayData,
    Benchmark,
    Manifest,
    ModelFile,
    Quantization,
    QuantizationMode,
    ReferenceStats,
    RuntimeRequirements,
    SelfTest,
    SelfTestVector,
    SourceInfo,
    TensorSpec,
    ToolchainInfo,
    Validation,
)


def make_manifest(**changes: object) -> Manifest:
    fields: dict[str, object] = {
        "schema_version": MANIFEST_SCHEMA_VERSION,
        "name": "digits",
        "version": "1.2.0",
        "created_at": "2026-11-21T00:00:00Z",
        "model": ModelFile(path="model.tflite", sha256="ab" * 32, size=1234),
        "source": SourceInfo(format="keras", sha256="cd" * 32, conversion_path="keras"),
        "inputs": (TensorSpec("input", (-1, 8, 8, 1), "int8", 0.0039, -128),),
        "outputs": (TensorSpec("output", (-1, 10), "int8", 0.00390625, -128),),
        "quantization": Quantization(QuantizationMode.INT8, integer_only=True),
        "labels": tuple(str(i) for i in range(10)),
        "toolchain": ToolchainInfo("0.1.0", "2.21.0", "ai-edge-litert 2.3.0"),
        "runtime": RuntimeRequirements("2.3.0", ("CONV_2D", "SOFTMAX"), requires_flex=False),
        "validation": Validation(450, 0.98, 0.975, 0.005, 0.99, 0.1, 0.002),
        "benchmark": Benchmark(100, None, 0.05, 0.06, 0.08, 20000.0, 30_000_000, "x86_64"),
        "reference": ReferenceStats(
            samples=2,
            granularity="feature",
            mean=(0.5, 0.25),
            std=(0.1, 0.2),
            min=0.0,
            max=1.0,
            histogram_edges=(0.0, 0.5, 1.0),
            histogram_counts=(3, 1),
            class_distribution=(0.5, 0.5),
            mean_confidence=0.9,
        ),
        "self_test": SelfTest(
            vectors=(
                SelfTestVector(
                    inputs=(ArrayData.from_array(np.arange(4, dtype=np.float32).reshape(1, 4)),),
                    expected=(ArrayData.from_array(np.array([[0.25, 0.75]], dtype=np.float32)),),
                ),
            ),
            atol=0.02,
            rtol=0.001,
        ),
    }
    fields.update(changes)
    return Manifest(**fields)  # type: ignore[arg-type]


@pytest.fixture
def manifest() -> Manifest:
    return make_manifest()
