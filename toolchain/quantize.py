"""The quantization modes and what each recipe means.

The TensorFlow settings for each mode live in toolchain.tf_worker._configure; this table
is the part the rest of the toolchain needs without importing TensorFlow.
"""

from __future__ import annotations

from dataclasses import dataclass

from protocol.manifest import QuantizationMode

AUTO = "auto"


@dataclass(frozen=True)
class Recipe:
    mode: QuantizationMode
    weights: str
    activations: str
    io: str
    needs_calibration: bool
    integer_only: bool


RECIPES: dict[QuantizationMode, Recipe] = {
    r.mode: r
    for r in (
        Recipe(QuantizationMode.FLOAT32, "float32", "float32", "float32", False, False),
        # Weights in int8, activations quantized on the fly: no data needed, CPU only.
        Recipe(QuantizationMode.DYNAMIC, "int8", "float32 (dynamic)", "float32", False, False),
        # Half the size, and GPU delegates run it natively; CPUs dequantize to float32.
        Recipe(QuantizationMode.FLOAT16, "float16", "float32", "float32", False, False),
        # Everything int8, inputs and outputs too: what the Edge TPU and most NPUs need.
        Recipe(QuantizationMode.INT8, "int8", "int8", "int8", True, True),
        # 16-bit activations keep more precision where int8 activations lose too much.
        Recipe(QuantizationMode.INT16X8, "int8", "int16", "float32", True, False),
    )
}

MODE_CHOICES = [m.value for m in QuantizationMode] + [AUTO]
