"""A model the agent serves, and what each prediction tells the parts that watch it.

Shared by serving (which runs predictions), telemetry (which observes them) and the update
machine (which loads and self-tests candidates). Loading does not verify the signature:
the update machine does that before a model gets this far, and a local `--model` bundle is
the operator's own choice.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np

from edge_agent.runtime import ModelRunner
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


def load_model(
    folder: Path, *, threads: int | None = None, runtime: str | None = None
) -> LoadedModel:
    """Load a bundle folder; raises ManifestError or ModelLoadError saying what is wrong."""
    manifest = read_manifest(folder).manifest
    runner = ModelRunner(folder / manifest.model.path, threads=threads, runtime=runtime)
    return LoadedModel(runner, manifest, folder)


@dataclass(frozen=True)
class Prediction:
    prediction_id: str  # unique across processes and devices; the key for later feedback
    outputs: tuple[np.ndarray, ...]  # real (dequantized) values, one array per model output
    top1: int | None  # argmax of the first output, for classifiers; None otherwise
    label: str | None  # labels[top1] when the manifest has labels
    confidence: float | None  # the first output's value at top1, when it is a probability
    model_name: str
    model_version: str
    latency_ms: float  # the inference alone, as telemetry reports it


class PredictionObserver(Protocol):
    """What serving tells telemetry. Called on the request's thread: keep it cheap."""

    def on_prediction(
        self, model: LoadedModel, prediction: Prediction, inputs: list[np.ndarray]
    ) -> None: ...

    def on_error(self, model: LoadedModel) -> None: ...

    def on_shadow(
        self,
        active: LoadedModel,
        candidate: LoadedModel,
        active_top1: int | None,
        candidate_top1: int | None,
    ) -> None: ...

    def on_feedback(self, model_name: str, model_version: str, correct: bool) -> None: ...
