"""`create_app(settings)`: the FastAPI application, its storage and its MQTT bridge."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request, Response
from starlette.middleware.base import RequestResponseEndpoint

from fleet_server.api import (
    artifacts,
    devices,
    enrollment,
    model_registry,
    rollouts,
    system,
    tokens,
)
from fleet_server.api.docs import mount_docs
from fleet_server.api.errors import answer_service_errors
from fleet_server.blobs import BlobStore
from fleet_server.console import mount_console
from fleet_server.db import make_engine, make_sessions
from fleet_server.metrics.server import ServerMetrics
from fleet_server.migrate import upgrade
from fleet_server.mqtt.runtime import build_mqtt
from fleet_server.rollouts.controller import RolloutController
from fleet_server.rollouts.watch import LiveGates
from fleet_server.services.desired import DesiredPublisher, DesiredStates, NoPublisher
from fleet_server.services.devices import BrokerAccess
from fleet_server.settings import Settings
from fleet_server.state import FleetState
from protocol.topics import Topics

log = logging.getLogger("fleet_server")

SECONDS_PER_DAY = 86400


def build_state(
    settings: Settings,
    *,
    migrate: bool = True,
    broker: BrokerAccess | None = None,
    publisher: DesiredPublisher | None = None,
    with_mqtt: bool = True,
) -> FleetState:
    """Everything the server shares, complete. With `with_mqtt` and settings.mqtt_url, and
    no `publisher` given, the MQTT side is built (not connected: the lifespan does that)
    and is the broker and the publisher. Otherwise `broker` and `publisher` are what the
    caller passes (a test's), or none: commands that only touch the database pass
    `with_mqtt=False` and need no broker credentials."""
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    url = settings.resolved_database_url()
    if migrate:
        upgrade(url)
    engine = make_engine(url)
    sessions = make_sessions(engine)
    topics = Topics(settings.topic_prefix)
    metrics = ServerMetrics()
    runtime = None
    if with_mqtt and publisher is None:
        runtime = build_mqtt(settings, sessions, topics, metrics)
    if runtime is not None:
        broker, publisher = runtime.admin, runtime.bridge
    desired = DesiredStates(
        publisher=publisher or NoPublisher(),
        public_url=settings.resolved_public_url(),
        ttl_s=settings.desired_ttl_days * SECONDS_PER_DAY,
    )
    return FleetState(
        settings=settings,
        engine=engine,
        sessions=sessions,
        blobs=BlobStore(settings.blob_dir()),
        topics=topics,
        metrics=metrics,
        live_gates=LiveGates(settings.live_gates_max_age_s),
        desired=desired,
        broker=broker,
        mqtt=runtime,
    )


def create_app(
    settings: Settings,
    *,
    broker: BrokerAccess | None = None,
    publisher: DesiredPublisher | None = None,
    start_bridge: bool = True,
) -> FastAPI:
    """The whole server. With settings.mqtt_url and start_bridge, the lifespan connects the
    MQTT bridge and the broker admin client; tests may pass their own instead."""
    state = build_state(settings, broker=broker, publisher=publisher, with_mqtt=start_bridge)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        if state.mqtt is not None:
            state.mqtt.start()
        controller = None
        if settings.rollout_interval_s > 0:
            controller = RolloutController(
                state.sessions, state.desired, settings.rollout_interval_s
            )
            controller.start()
        alerts = None
        if settings.alert_interval_s > 0 and settings.webhooks:
            from fleet_server.alerts.dispatcher import AlertDispatcher

            alerts = AlertDispatcher(settings, state.sessions)
            alerts.start()
        try:
            yield
        finally:
            if alerts is not None:
                alerts.stop()
            if controller is not None:
                controller.stop()
            if state.mqtt is not None:
                state.mqtt.stop()
            state.engine.dispose()

    app = FastAPI(
        title="edgefleet fleet server",
        version="0.1.0",
        lifespan=lifespan,
        docs_url=None,  # mount_docs serves it without a CDN
        redoc_url=None,
    )
    app.state.fleet = state
    for router in (
        enrollment.router,
        devices.router,
        model_registry.router,
        artifacts.router,
        rollouts.router,
        system.router,
        tokens.router,
    ):
        app.include_router(router)
    answer_service_errors(app)
    mount_docs(app)
    mount_console(app)

    @app.middleware("http")
    async def count_requests(request: Request, call_next: RequestResponseEndpoint) -> Response:
        response = await call_next(request)
        route = request.scope.get("route")
        template = getattr(route, "path", "unmatched")
        state.metrics.http_requests.labels(request.method, template, response.status_code).inc()
        return response

    return app
