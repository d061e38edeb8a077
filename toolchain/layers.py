"""The per-layer int8 error report (`--layer-report`)."""

from __future__ import annotations

import csv
import io
from collections.abc import Sequence
from typing import Any

COLUMNS = (
    "op",
    "tensor",
    "rmse_per_scale",
    "mean_squared_error",
    "mean_error",
    "max_abs_error",
    "scale",
    "zero_point",
    "num_elements",
)
# The RMSE of pure rounding is scale/sqrt(12), about 0.29 steps; a layer far above that
# loses more than its quantization step alone explains.
ROUNDING_RMSE_PER_SCALE = 12**-0.5


def layer_report_csv(layers: Sequence[dict[str, Any]]) -> str:
    """Worst layer first, one row per quantized tensor."""
    out = io.StringIO()
    writer = csv.DictWriter(out, COLUMNS, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for layer in layers:
        writer.writerow(layer)
    return out.getvalue()


def worst_layers(layers: Sequence[dict[str, Any]], count: int = 3) -> list[str]:
    """One line each for the layers that lose most, for the summary (the CSV has all)."""
    return [
        f"{layer['op']} {_short(layer['tensor'])}: RMSE {layer['rmse_per_scale']:.2f} steps"
        for layer in layers[:count]
    ]


def _short(tensor: str) -> str:
    # Fused tensors are named "a;b;c" after every op folded into them; the first says which.
    return tensor.split(";", 1)[0]
