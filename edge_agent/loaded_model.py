"""A model the agent serves, and what each prediction tells the parts that watch it.

Shared by serving (which runs predictions), telemetry (which observes them) and the update
machine (which loads and self-tests candidates). Loading does not verify the signature:
the update machine does that before a model gets this far, and a local `--model` bundle is
the operator's own choice.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Protocol

import numpy as np

from common.litert import ModelRunner
from edge_agent.classify import Classifier
from protocol.manifest import Manifest, read_manifest


@dataclass(frozen=True, eq=False)
class LoadedModel:
    runner: ModelRunner
    manifest: Manifest
    folder: Path  # the bundle: manifest.json and the model file it names

    @property
    def name(self) -> str:
        return self.manifest.name

    @property
    def version(self) -> str:
        return self.manifest.version

    @property
    def labels(self) -> tuple[str, ...] | None:
        return self.manifest.labels

    @cached_property
    def classifier(self) -> Classifier:
        return Classifier.for_manifest(self.manifest)

    def answer(self, outputs: tuple[np.ndarray, ...]) -> tuple[int | None, float | None]:
        """(top-1 class, confidence) as the first of one sample's outputs reads."""
        return self.classifier.one(outputs[0]) if outputs else (None, None)


def load_model(
    folder: Path, *, threads: int | None = None, runtime: str | None = None
) -> LoadedModel:
    """Load a bundle folder; raises ManifestError or ModelLoadError saying what is wrong."""
    manifest = read_manifest(folder).manifest
    runner = ModelRunner(folder / manifest.model.path, threads=threads, runtime=runtime)
    return LoadedModel(runner, manifest, folder)


class Prediction:
    """One answer of the active model.

    Built on every request, so it holds only what the inference produced; the prediction
    id and the reading of the first output as a class are worked out when first asked for.
    """

    __slots__ = ("_answer", "_prefix", "latency_ms", "model", "number", "raw_outputs")

    def __init__(
        self,
        model: LoadedModel,
        outputs: tuple[np.ndarray, ...],
        latency_ms: float,
        number: int,
        prefix: str,
    ) -> None:
        self.model = model
        # Real (dequantized) values, one array per output, as the runtime returned them. The
        # agent's own readers take these; callers get them read-only through `outputs`.
        self.raw_outputs = outputs
        self.latency_ms = latency_ms  # the inference alone, as telemetry reports it
        self.number = number  # the issuing Predictor's sequence number
        self._prefix = prefix
        self._answer: tuple[int | None, float | None] | None = None

    @property
    def outputs(self) -> tuple[np.ndarray, ...]:
        """One array per output, read-only: telemetry reads the same arrays later.

        Flagged here rather than on every request, where it cost 2 % of a small model's
        inference, and most callers read only `top1` or `label`.
        """
        outputs = self.raw_outputs
        for output in outputs:
            output.flags.writeable = False
        return outputs

    @property
    def prediction_id(self) -> str:
        """Unique across processes and devices; the key for later feedback."""
        return f"{self._prefix}{self.number:016x}"

    @property
    def model_name(self) -> str:
        return self.model.name

    @property
    def model_version(self) -> str:
        return self.model.version

    @property
    def top1(self) -> int | None:
        """argmax of the first output, for classifiers; None otherwise."""
        return self._read()[0]

    @property
    def confidence(self) -> float | None:
        """The first output's value at top1, when that output is a probability distribution."""
        return self._read()[1]

    @property
    def label(self) -> str | None:
        """labels[top1] when the manifest has labels."""
        top1, labels = self._read()[0], self.model.labels
        return labels[top1] if labels and top1 is not None and top1 < len(labels) else None

    def _read(self) -> tuple[int | None, float | None]:
        answer = self._answer
        if answer is None:
            answer = self._answer = self.model.answer(self.raw_outputs)
        return answer

    def __repr__(self) -> str:
        return (
            f"Prediction({self.prediction_id}, {self.model_name} {self.model_version}, "
            f"top1={self.top1}, confidence={self.confidence}, latency_ms={self.latency_ms:.3f})"
        )


@dataclass(frozen=True)
class PredictionBatch:
    """What serving tells telemetry about a run of one model's predictions.

    Serving hands predictions over in batches (see `edge_agent.serving.FOLD_EVERY`) so
    that the per-prediction bookkeeping is a few numpy operations over many of them.
    """

    latencies_ms: np.ndarray  # float64, one per prediction
    top1: np.ndarray  # int64, classify.NO_CLASS where the output names no class
    confidence: np.ndarray  # float64, NaN where the output is not a distribution
    non_finite: np.ndarray  # bool: an output value was NaN or infinite
    # A sample of the inputs, at most one per the observer's drift_sample_interval_s: each
    # a private copy of one sample's arrays (one per model input, with the batch axis).
    inputs: tuple[tuple[np.ndarray, ...], ...]

    def __len__(self) -> int:
        return len(self.latencies_ms)


class PredictionObserver(Protocol):
    """What serving tells telemetry. Called on a request's thread: keep it cheap."""

    # Hand over a copy of at most one input per this many seconds, for drift statistics
    # (0: every input; infinity: the first only).
    @property
    def drift_sample_interval_s(self) -> float: ...

    def on_predictions(self, model: LoadedModel, batch: PredictionBatch) -> None: ...

    def on_error(self, model: LoadedModel) -> None: ...

    def on_shadow(
        self,
        active: LoadedModel,
        candidate: LoadedModel,
        active_top1: int | None,
        candidate_top1: int | None,
    ) -> None: ...

    def on_feedback(self, model_name: str, model_version: str, correct: bool) -> None: ...
