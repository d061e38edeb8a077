"""Errors named for what the user must fix.

The CLI turns each into one line on stderr and its exit code: 2 for bad input or a
conversion that cannot be done, 1 for a model that converts but misses its accuracy budget.
"""

from typing import Any


class EdgeConvertError(Exception):
    """Base class: the message is the one line the user sees."""

    exit_code = 2


class SourceModelError(EdgeConvertError):
    """SRC is missing, unreadable, not a model, or a model that cannot be loaded."""


class DataError(EdgeConvertError):
    """A calibration or evaluation data set does not fit the model."""


class ConversionError(EdgeConvertError):
    """TensorFlow's converter refused or crashed on the model."""


class UnsupportedOpsError(ConversionError):
    """The model needs TensorFlow ops that the TFLite builtins lack."""

    def __init__(self, ops: list[str]) -> None:
        self.ops = ops
        names = ", ".join(ops) if ops else "(the converter did not name them)"
        super().__init__(
            f"the model needs TensorFlow ops that TFLite builtins lack: {names}; "
            "pass --allow-tf-ops to keep them as TF Select (Flex) ops, "
            "which the device runtime must then carry"
        )


class ArtifactError(EdgeConvertError):
    """A bundle or .tflite file is missing, malformed, tampered with or unsigned."""


class OptionError(EdgeConvertError):
    """Options that do not fit together or a value of the wrong form."""


class AccuracyGateError(EdgeConvertError):
    """The converted model loses more accuracy than the budget allows."""

    exit_code = 1

    def __init__(self, message: str, result: Any = None) -> None:
        super().__init__(message)
        # The candidates, so the CLI can show what was tried (a ConvertResult).
        self.result = result
