"""The composition root: start the parts in order, stop them in reverse.

Also the in-process API for applications that embed the agent:

    agent = Agent(load_config(state_dir))
    agent.start()
    prediction = agent.predictor.predict(image)
"""

from __future__ import annotations

import importlib.metadata
import logging
import threading
import time
from pathlib import Path
from typing import Any

from edge_agent.config import AgentConfig
from edge_agent.counters import COUNTERS_FILE, Counter, Counters
from edge_agent.health import HealthMonitor
from edge_agent.link import Link
from edge_agent.loaded_model import LoadedModel, load_model
from edge_agent.local_api import LocalApi
from edge_agent.outbox import Outbox
from edge_agent.serving import Predictor
from edge_agent.status import OUTBOX_FILE
from edge_agent.telemetry import TelemetryCollector
from edge_agent.update.machine import UpdateMachine
from edge_agent.update.report import update_report
from protocol.messages import (
    MESSAGE_SCHEMA_VERSION,
    DesiredState,
    PayloadError,
    TelemetryBatch,
    UpdateReport,
    UpdateState,
    decode_payload,
    encode_payload,
)
from protocol.signing import verify_model_file
from protocol.topics import Topics

log = logging.getLogger("edge_agent")


def agent_version() -> str:
    # The device's own package, or the whole project where the agent runs from it.
    for distribution in ("edgefleet-agent", "edgefleet"):
        try:
            return importlib.metadata.version(distribution)
        except importlib.metadata.PackageNotFoundError:
            continue
    return "0+unknown"


class Agent:
    def __init__(self, config: AgentConfig, *, local_model: Path | None = None) -> None:
        self.config = config
        settings = config.settings
        state_dir = config.state_dir
        state_dir.mkdir(parents=True, exist_ok=True)
        self.version = agent_version()
        self.topics = Topics(settings.topic_prefix)
        self.telemetry = TelemetryCollector()
        self.predictor = Predictor(self.telemetry)
        self.health = HealthMonitor(self.version, state_dir)
        self.outbox = Outbox(state_dir / OUTBOX_FILE, settings.outbox_max_items)
        self._local_model = local_model
        self.counters = Counters(state_dir / COUNTERS_FILE)
        self._stop = threading.Event()
        self._telemetry_thread = threading.Thread(
            target=self._telemetry_loop, name="telemetry", daemon=True
        )
        credentials = config.credentials
        self.link: Link | None = None
        self.machine: UpdateMachine | None = None
        if local_model is None:
            auth = (credentials.device_id, credentials.secret) if credentials else None
            self.machine = UpdateMachine(
                state_dir,
                self.predictor,
                config.keys,
                auth,
                settings.max_artifact_bytes,
                self._queue_report,
                self._load,
                counters=self.counters,
                download_patience_s=settings.download_patience_s,
            )
        address = config.mqtt_address
        if credentials is not None and address is not None and local_model is None:
            self.link = Link(
                device_id=credentials.device_id,
                secret=credentials.secret,
                host=address[0],
                port=address[1],
                topics=self.topics,
                outbox=self.outbox,
                on_desired=self._on_desired,
                agent_version=self.version,
                keepalive=settings.keepalive_s,
            )
        self.api = LocalApi(
            self.predictor, host=settings.api_host, port=settings.api_port, health=self.status
        )

    # -- lifecycle ------------------------------------------------------------------------

    def start(self) -> None:
        if self._local_model is not None:
            self.predictor.activate(self._load_local(self._local_model))
        elif self.machine is not None:
            self.machine.boot()  # serves the current model before anything else starts
        self.api.start()
        if self.link is not None:
            self.link.start()
        if self.machine is not None:
            self.machine.start()
        self._telemetry_thread.start()
        log.info(
            "edge-agent %s serving on %s:%d",
            self.version,
            self.config.settings.api_host,
            self.api.port,
        )

    def stop(self) -> None:
        self._stop.set()
        if self.machine is not None:
            self.machine.stop()
        self._telemetry_thread.join(5.0)
        if self.link is not None:
            self.link.stop()
        self.api.stop()
        self.outbox.close()

    def status(self) -> dict[str, Any]:
        record = self.machine.record if self.machine is not None else None
        self.predictor.fold()  # so the counts include every prediction answered
        return {
            "agent_version": self.version,
            "device_id": self.config.credentials.device_id if self.config.credentials else None,
            "connected": self.link.connected if self.link is not None else False,
            "update": {
                "state": record.state.value,
                "desired_seq": record.seq,
                "reason": record.reason,
            }
            if record is not None
            else None,
            "outbox": len(self.outbox),
            "telemetry": self.telemetry.summary(),
        }

    # -- wiring ---------------------------------------------------------------------------

    def _load(self, folder: Path) -> LoadedModel:
        settings = self.config.settings
        return load_model(folder, threads=settings.threads, runtime=settings.runtime)

    def _load_local(self, folder: Path) -> LoadedModel:
        model = self._load(folder)
        verify_model_file(model.manifest, folder / model.manifest.model.path)
        return model

    def _on_desired(self, payload: bytes) -> None:
        assert self.machine is not None
        try:
            desired = decode_payload(DesiredState, payload)
        except PayloadError as exc:
            log.error("refused a desired state: %s", exc)
            self._queue_report(self._rejection(str(exc)))
            return
        self.machine.offer(desired)

    def _rejection(self, reason: str) -> UpdateReport:
        msg_id = self.counters.next(Counter.REPORT_MSG_ID)
        active = self.predictor.active
        return update_report(
            msg_id, time.time(), UpdateState.REJECTED, reason, desired=None, active=active
        )

    def _queue_report(self, report: UpdateReport) -> None:
        device = self._device_id()
        if device is None:
            return  # no fleet to tell
        self.outbox.put(self.topics.reports(device), encode_payload(report), droppable=False)
        if self.link is not None:
            self.link.wake()

    def _telemetry_loop(self) -> None:
        interval = self.config.settings.telemetry_interval_s
        while not self._stop.wait(interval):
            try:
                self._queue_telemetry()
            except Exception:
                log.exception("telemetry could not be queued")

    def _queue_telemetry(self) -> None:
        device = self._device_id()
        now = time.time()
        self.predictor.fold()  # predictions still queued belong to this window
        inference, accuracy, shadow = self.telemetry.flush(now)
        health = self.health.sample(now)
        if device is None:
            return
        seq = self.counters.next(Counter.TELEMETRY_SEQ)

        def batch(dropped: int) -> bytes:
            return encode_payload(
                TelemetryBatch(
                    schema_version=MESSAGE_SCHEMA_VERSION,
                    seq=seq,
                    sent_at=now,
                    dropped=dropped,
                    health=(health,),
                    inference=inference,
                    accuracy=accuracy,
                    shadow=shadow,
                )
            )

        self.outbox.put_counting_dropped(self.topics.telemetry(device), batch)
        if self.link is not None:
            self.link.wake()

    def _device_id(self) -> str | None:
        credentials = self.config.credentials
        return credentials.device_id if credentials else None
