"""The agent's local HTTP API: predictions, feedback and health for applications on the device.

Built on the stdlib's ThreadingHTTPServer so that the agent carries no web framework. It binds
to loopback by default: the API has no authentication, so it is for processes on the device.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import socket
import threading
import time
from collections.abc import Callable
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import urlsplit

import numpy as np

from common.litert import InputShapeError
from edge_agent.loaded_model import LoadedModel, Prediction
from edge_agent.serving import NoModelError, Predictor, UnknownPredictionError

logger = logging.getLogger(__name__)

JSON_TYPE = "application/json"
NPY_TYPE = "application/x-npy"

# Idle keep-alive connections and stalled uploads give their thread back after this long.
CONNECTION_TIMEOUT_S = 30.0
# After refusing a body unread, how much of it to swallow so the client can see the answer.
LINGER_S = 2.0
LINGER_BYTES = 64 * 1024 * 1024

_ROUTES: dict[str, tuple[str, ...]] = {
    "/v1/predict": ("POST",),
    "/v1/feedback": ("POST",),
    "/v1/health": ("GET", "HEAD"),
}


class _ApiError(Exception):
    """An error answer: its status and one clear sentence for the client."""

    def __init__(self, status: HTTPStatus, message: str, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.headers = headers or {}


def _too_large(length: int, limit: int) -> _ApiError:
    return _ApiError(
        HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
        f"body of {length} bytes is over the limit of {limit} bytes",
    )


def _describe(model: LoadedModel | None) -> dict[str, str] | None:
    return None if model is None else {"name": model.name, "version": model.version}


def _jsonable(array: np.ndarray) -> Any:
    if array.dtype.kind == "f" and not np.isfinite(array).all():
        # JSON has no NaN or Infinity; null keeps the shape of the answer intact.
        values = array.astype(object)
        values[~np.isfinite(array)] = None
        return values.tolist()
    return array.tolist()


def _prediction_body(prediction: Prediction) -> dict[str, Any]:
    confidence = prediction.confidence
    return {
        "prediction_id": prediction.prediction_id,
        "model": {"name": prediction.model_name, "version": prediction.model_version},
        "outputs": [_jsonable(output) for output in prediction.outputs],
        "top1": prediction.top1,
        "label": prediction.label,
        "confidence": confidence if confidence is None or np.isfinite(confidence) else None,
        "latency_ms": prediction.latency_ms,
    }


def _reject_constant(name: str) -> float:
    raise ValueError(f"{name} is not allowed here")


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, address: tuple[str, int], api: LocalApi) -> None:
        if ":" in address[0]:
            self.address_family = socket.AF_INET6
        self.api = api
        self.stopping = False
        self._connections: set[socket.socket] = set()
        self._connections_lock = threading.Lock()
        super().__init__(address, _Handler)

    def process_request(self, request: Any, client_address: Any) -> None:
        with self._connections_lock:
            self._connections.add(request)
        super().process_request(request, client_address)

    def shutdown_request(self, request: Any) -> None:
        with self._connections_lock:
            self._connections.discard(request)
        super().shutdown_request(request)

    def close_connections(self) -> None:
        """End keep-alive connections too, so that nothing is answered after stop()."""
        with self._connections_lock:
            connections = list(self._connections)
        for connection in connections:
            with contextlib.suppress(OSError):  # the client may be gone already
                connection.shutdown(socket.SHUT_RDWR)

    def handle_error(self, request: Any, client_address: Any) -> None:
        # The default prints a traceback to stderr; a client hanging up is routine, not news.
        logger.debug("connection from %s ended abruptly", client_address, exc_info=True)


class _Handler(BaseHTTPRequestHandler):
    server: _Server
    protocol_version = "HTTP/1.1"
    server_version = "edgefleet-agent"
    sys_version = ""
    timeout = CONNECTION_TIMEOUT_S

    def setup(self) -> None:
        super().setup()
        # Headers and body go out as separate small writes; with Nagle's algorithm the body
        # would wait for the client's delayed ACK, some 40 ms on a kept-alive connection.
        self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    # --- dispatch ---

    def do_GET(self) -> None:
        self._dispatch()

    def do_HEAD(self) -> None:
        self._dispatch()

    def do_POST(self) -> None:
        self._dispatch()

    def do_PUT(self) -> None:
        self._dispatch()

    def do_DELETE(self) -> None:
        self._dispatch()

    def do_PATCH(self) -> None:
        self._dispatch()

    def do_OPTIONS(self) -> None:
        self._dispatch()

    def _dispatch(self) -> None:
        # Until the body has been read whole, the connection cannot carry another request.
        self._body_read = self.headers.get("Content-Length") in (None, "0") and (
            "Transfer-Encoding" not in self.headers
        )
        if self.server.stopping:
            self.close_connection = True
        path = urlsplit(self.path).path
        try:
            allowed = _ROUTES.get(path)
            if allowed is None:
                raise _ApiError(HTTPStatus.NOT_FOUND, f"no such endpoint: {path}")
            if self.command not in allowed:
                raise _ApiError(
                    HTTPStatus.METHOD_NOT_ALLOWED,
                    f"{path} does not accept {self.command}; use {' or '.join(allowed)}",
                    {"Allow": ", ".join(allowed)},
                )
            if path == "/v1/predict":
                status, body = self._predict()
            elif path == "/v1/feedback":
                status, body = self._feedback()
            else:
                status, body = self._health()
            # Encoded inside the try: a health() value JSON cannot carry must be a 500, not a
            # dropped connection.
            payload = json.dumps(body, allow_nan=False).encode("utf-8")
        except _ApiError as exc:
            self._send_api_error(exc, path)
            return
        except Exception as exc:
            logger.exception("%s %s failed", self.command, path)
            self._send(
                HTTPStatus.INTERNAL_SERVER_ERROR,
                {"error": f"internal error: {type(exc).__name__}"},
            )
            return
        self._write(status, payload)

    def _send_api_error(self, exc: _ApiError, path: str) -> None:
        # A client's mistake is the client's to fix: it gets the sentence, the log a line.
        level = logging.ERROR if exc.status >= 500 else logging.INFO
        logger.log(level, "%s %s -> %d: %s", self.command, path, exc.status, exc.message)
        self._send(exc.status, {"error": exc.message}, exc.headers)

    def handle_expect_100(self) -> bool:
        """Refuse an oversized upload before the client sends it, not after "100 Continue"."""
        limit = self.server.api.max_body_bytes
        try:
            length = int(self.headers.get("Content-Length", "0"))
        except ValueError:
            length = 0  # _read_body answers a malformed length
        if length > limit:
            self._body_read = False
            self._send_api_error(_too_large(length, limit), urlsplit(self.path).path)
            return False
        return super().handle_expect_100()

    # --- routes ---

    def _predict(self) -> tuple[HTTPStatus, dict[str, Any]]:
        api = self.server.api
        content_type = self._content_type()
        if content_type not in (JSON_TYPE, NPY_TYPE):
            raise _ApiError(
                HTTPStatus.UNSUPPORTED_MEDIA_TYPE,
                f"Content-Type {content_type} is not supported; send {JSON_TYPE} or {NPY_TYPE}",
            )
        raw = self._read_body(api.max_body_bytes)
        inputs: Any
        if content_type == NPY_TYPE:
            inputs = self._load_npy(raw)
        else:
            data = self._load_json(raw)
            if not isinstance(data, dict) or "inputs" not in data:
                raise _ApiError(
                    HTTPStatus.BAD_REQUEST, 'body must be a JSON object with an "inputs" field'
                )
            inputs = data["inputs"]
        try:
            prediction = api.predictor.predict(inputs)
        except NoModelError as exc:
            raise _ApiError(HTTPStatus.SERVICE_UNAVAILABLE, f"{exc}; try again later") from exc
        except InputShapeError as exc:
            raise _ApiError(HTTPStatus.BAD_REQUEST, str(exc)) from exc
        except Exception as exc:
            logger.exception("the model failed on a request")
            raise _ApiError(
                HTTPStatus.INTERNAL_SERVER_ERROR,
                f"the model failed to run on this input ({type(exc).__name__})",
            ) from exc
        return HTTPStatus.OK, _prediction_body(prediction)

    def _feedback(self) -> tuple[HTTPStatus, dict[str, Any]]:
        api = self.server.api
        content_type = self._content_type()
        if content_type != JSON_TYPE:
            raise _ApiError(
                HTTPStatus.UNSUPPORTED_MEDIA_TYPE,
                f"Content-Type {content_type} is not supported; send {JSON_TYPE}",
            )
        data = self._load_json(self._read_body(api.max_body_bytes))
        if not isinstance(data, dict):
            raise _ApiError(
                HTTPStatus.BAD_REQUEST,
                'body must be a JSON object with "prediction_id" and "label"',
            )
        prediction_id = data.get("prediction_id")
        label = data.get("label")
        if not isinstance(prediction_id, str):
            raise _ApiError(HTTPStatus.BAD_REQUEST, '"prediction_id" must be a string')
        if isinstance(label, bool) or not isinstance(label, int | str):
            raise _ApiError(
                HTTPStatus.BAD_REQUEST, '"label" must be a class index or a label string'
            )
        try:
            correct = api.predictor.feedback(prediction_id, label)
        except UnknownPredictionError as exc:
            raise _ApiError(HTTPStatus.NOT_FOUND, str(exc)) from exc
        except ValueError as exc:
            raise _ApiError(HTTPStatus.BAD_REQUEST, str(exc)) from exc
        return HTTPStatus.OK, {"correct": correct}

    def _health(self) -> tuple[HTTPStatus, dict[str, Any]]:
        api = self.server.api
        active = api.predictor.active
        body: dict[str, Any] = {
            "status": "ok" if active is not None else "no_model",
            "model": _describe(active),
            "shadow": _describe(api.predictor.shadow),
        }
        if api.health is not None:
            body.update(api.health())
        return HTTPStatus.OK, body

    # --- reading requests ---

    def _content_type(self) -> str:
        # Without a Content-Type, JSON is the sensible guess for a body a client built by hand.
        header = self.headers.get("Content-Type")
        if header is None:
            return JSON_TYPE
        return header.split(";", 1)[0].strip().lower()

    def _read_body(self, limit: int) -> bytes:
        if "Transfer-Encoding" in self.headers:
            raise _ApiError(
                HTTPStatus.LENGTH_REQUIRED, "chunked bodies are not supported; send Content-Length"
            )
        header = self.headers.get("Content-Length")
        if header is None:
            return b""
        try:
            length = int(header)
        except ValueError:
            length = -1
        if length < 0:
            raise _ApiError(HTTPStatus.BAD_REQUEST, f"Content-Length {header!r} is not valid")
        if length > limit:
            # Refused before reading a byte: the client may not upload what we would drop.
            raise _too_large(length, limit)
        body = self.rfile.read(length)
        if len(body) != length:
            self.close_connection = True
            raise _ApiError(
                HTTPStatus.BAD_REQUEST, f"body ended after {len(body)} of {length} bytes"
            )
        self._body_read = True
        return body

    @staticmethod
    def _load_json(raw: bytes) -> Any:
        try:
            return json.loads(raw)
        except (ValueError, RecursionError) as exc:
            # ValueError covers bad UTF-8 as well as bad JSON.
            detail = exc.msg if isinstance(exc, json.JSONDecodeError) else "not valid JSON"
            raise _ApiError(HTTPStatus.BAD_REQUEST, f"body is not valid JSON: {detail}") from None

    @staticmethod
    def _load_npy(raw: bytes) -> np.ndarray:
        try:
            loaded = np.load(io.BytesIO(raw), allow_pickle=False)
        except Exception as exc:
            raise _ApiError(
                HTTPStatus.BAD_REQUEST, f"body is not a valid .npy array: {exc}"
            ) from None
        if not isinstance(loaded, np.ndarray):
            # np.load also opens .npz archives; a request carries one array.
            if hasattr(loaded, "close"):
                loaded.close()
            raise _ApiError(HTTPStatus.BAD_REQUEST, "body is an .npz archive, not a .npy array")
        return loaded

    # --- writing responses ---

    def _send(
        self, status: HTTPStatus, body: dict[str, Any], headers: dict[str, str] | None = None
    ) -> None:
        self._write(status, json.dumps(body, allow_nan=False).encode("utf-8"), headers)

    def _write(
        self, status: HTTPStatus, payload: bytes, headers: dict[str, str] | None = None
    ) -> None:
        if not self._body_read:
            self.close_connection = True
        self.send_response(status)
        self.send_header("Content-Type", JSON_TYPE)
        self.send_header("Content-Length", str(len(payload)))
        self.send_header("Cache-Control", "no-store")
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(payload)
        if not self._body_read:
            self._linger()

    def _linger(self) -> None:
        """Discard what the client is still uploading, for a little while, before closing.

        Closing a socket with unread data resets the connection, and a client still busy
        sending its body then sees a broken pipe instead of our answer (a 413 above all).
        """
        connection = self.connection
        try:
            connection.shutdown(socket.SHUT_WR)
            deadline = time.monotonic() + LINGER_S
            drained = 0
            while drained < LINGER_BYTES:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                connection.settimeout(remaining)
                chunk = connection.recv(64 * 1024)
                if not chunk:
                    break
                drained += len(chunk)
        except OSError:
            pass  # the client gave up or timed out: nothing more to do for it

    def send_error(self, code: int, message: str | None = None, explain: str | None = None) -> None:
        """Errors the stdlib raises itself (a bad request line, oversized headers), as JSON."""
        try:
            status = HTTPStatus(code)
            text = message or status.phrase
        except ValueError:
            text = message or "error"
        logger.info("HTTP %d: %s", code, text)
        payload = json.dumps({"error": text}).encode("utf-8")
        self.close_connection = True
        self.send_response(code, message)
        self.send_header("Content-Type", JSON_TYPE)
        self.send_header("Content-Length", str(len(payload)))
        self.send_header("Connection", "close")
        self.end_headers()
        if getattr(self, "command", None) != "HEAD" and code >= 200 and code not in (204, 304):
            self.wfile.write(payload)

    def log_message(self, format: str, *args: Any) -> None:
        # One line per request would drown the agent's log; errors are logged where they occur.
        pass


class LocalApi:
    """predict, feedback and health over HTTP, served on a daemon thread."""

    def __init__(
        self,
        predictor: Predictor,
        *,
        host: str = "127.0.0.1",
        port: int = 8765,
        health: Callable[[], dict[str, Any]] | None = None,
        max_body_bytes: int = 16 * 1024 * 1024,
    ) -> None:
        if max_body_bytes < 0:
            raise ValueError(f"max_body_bytes must not be negative, got {max_body_bytes}")
        self.predictor = predictor
        self.host = host
        self.health = health
        self.max_body_bytes = max_body_bytes
        self._requested_port = port
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        """Bind and serve; port 0 picks a free port (see `port`). Raises OSError if taken."""
        if self._server is not None:
            raise RuntimeError("the local API is already running")
        server = _Server((self.host, self._requested_port), self)
        thread = threading.Thread(
            target=server.serve_forever, name="edge-agent-local-api", daemon=True
        )
        thread.start()
        self._server, self._thread = server, thread
        logger.info("local API listening on %s:%d", self.host, self.port)

    @property
    def port(self) -> int:
        if self._server is None:
            raise RuntimeError("the local API is not running: call start() first")
        return int(self._server.server_address[1])

    def stop(self) -> None:
        """Stop serving and close the socket; connections still open are ended too."""
        server, thread = self._server, self._thread
        if server is None:
            return
        server.stopping = True
        server.shutdown()
        server.close_connections()
        server.server_close()
        if thread is not None:
            thread.join()
        self._server = self._thread = None
