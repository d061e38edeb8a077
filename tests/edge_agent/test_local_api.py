"""The local HTTP API over a real socket, answering with real digits models."""

from __future__ import annotations

import ast
import http.client
import io
import json
import logging
import socket
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from edge_agent.loaded_model import LoadedModel
from edge_agent.local_api import LocalApi
from edge_agent.serving import Predictor
from tests.bundles import DigitsBundles
from tests.edge_agent.doubles import Recorder, failing_model, two_input_model

REPO_ROOT = Path(__file__).resolve().parents[2]
HEAVY = ("tensorflow", "keras", "fastapi", "pydantic", "sqlalchemy", "starlette", "flask")


Response = tuple[int, http.client.HTTPMessage, Any]


def call(
    port: int,
    method: str,
    path: str,
    body: bytes | None = None,
    headers: dict[str, str] | None = None,
    connection: http.client.HTTPConnection | None = None,
) -> Response:
    """One request; every answer must be JSON, whatever its status."""
    conn = connection or http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        response = conn.getresponse()
        raw = response.read()
    finally:
        if connection is None:
            conn.close()
    assert response.getheader("Content-Type") == "application/json"
    data = json.loads(raw) if method != "HEAD" else None
    return response.status, response.headers, data


def post_json(port: int, path: str, payload: Any, **kwargs: Any) -> Response:
    body = json.dumps(payload).encode()
    return call(port, "POST", path, body, {"Content-Type": "application/json"}, **kwargs)


def assert_error(response: Response, status: int, *fragments: str) -> None:
    code, _, data = response
    assert code == status, data
    assert isinstance(data, dict)
    assert list(data) == ["error"]
    message = data["error"]
    assert isinstance(message, str)
    assert message
    assert "Traceback" not in message
    for fragment in fragments:
        assert fragment in message


def assert_healthy(port: int) -> None:
    status, _, data = call(port, "GET", "/v1/health")
    assert status == 200
    assert data["status"] == "ok"


# --- fixtures -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def samples(digits: DigitsBundles) -> tuple[np.ndarray, np.ndarray]:
    with np.load(digits.eval_npz) as data:
        return data["x"][:50], data["y"][:50]


@pytest.fixture
def api(predictor: Predictor) -> Iterator[LocalApi]:
    api = LocalApi(predictor, port=0, health=lambda: {"agent": "edge-7", "uptime_s": 12.5})
    api.start()
    yield api
    api.stop()


# --- predict --------------------------------------------------------------------------------


def test_predict_json_answers_like_the_model(
    api: LocalApi, v1: LoadedModel, samples: tuple[np.ndarray, np.ndarray]
) -> None:
    x, y = samples
    correct = 0
    for sample, truth in zip(x, y, strict=True):
        status, _, data = post_json(api.port, "/v1/predict", {"inputs": sample.tolist()})
        assert status == 200
        assert set(data) == {
            "prediction_id",
            "model",
            "outputs",
            "top1",
            "label",
            "confidence",
            "latency_ms",
        }
        expected = v1.runner.invoke_once([sample])[0]
        assert data["model"] == {"name": "digits", "version": "1.0.0"}
        assert len(data["outputs"]) == 1
        np.testing.assert_allclose(np.asarray(data["outputs"][0]), expected, rtol=1e-6)
        assert data["top1"] == int(np.argmax(expected))
        assert data["label"] == str(data["top1"])
        assert data["confidence"] == pytest.approx(float(expected.max()), rel=1e-6)
        assert isinstance(data["prediction_id"], str)
        assert data["latency_ms"] >= 0.0
        correct += data["top1"] == truth
    assert correct / len(y) >= 0.9


def test_predict_json_with_the_batch_axis(api: LocalApi, samples: Any) -> None:
    sample = samples[0][1]
    _, _, without = post_json(api.port, "/v1/predict", {"inputs": sample.tolist()})
    status, _, with_batch = post_json(
        api.port, "/v1/predict", {"inputs": sample[np.newaxis].tolist()}
    )
    assert status == 200
    assert with_batch["outputs"] == without["outputs"]
    assert with_batch["prediction_id"] != without["prediction_id"]


def test_predict_npy_body(api: LocalApi, v1: LoadedModel, samples: Any) -> None:
    sample = samples[0][2]
    for array in (sample, sample[np.newaxis], sample.astype(np.float64)):
        buffer = io.BytesIO()
        np.save(buffer, array, allow_pickle=False)
        status, _, data = call(
            api.port,
            "POST",
            "/v1/predict",
            buffer.getvalue(),
            {"Content-Type": "application/x-npy"},
        )
        assert status == 200, data
        expected = v1.runner.invoke_once([sample])[0]
        np.testing.assert_allclose(np.asarray(data["outputs"][0]), expected, rtol=1e-6)


def test_predict_with_the_int8_model_gives_real_values(
    api: LocalApi, predictor: Predictor, v2: LoadedModel, samples: Any
) -> None:
    predictor.activate(v2)
    status, _, data = post_json(api.port, "/v1/predict", {"inputs": samples[0][0].tolist()})
    assert status == 200
    assert data["model"]["version"] == "2.0.0"
    probabilities = np.asarray(data["outputs"][0])
    assert probabilities.shape == (1, 10)
    assert not np.all(probabilities == np.round(probabilities))  # not raw int8 codes
    assert probabilities.min() >= 0.0
    assert probabilities.max() <= 1.0
    assert data["confidence"] == pytest.approx(float(probabilities.max()))


def test_predict_two_inputs_in_manifest_order(
    predictor: Predictor, v1: LoadedModel, tmp_path: Path
) -> None:
    pair = two_input_model(v1, tmp_path / "pair")
    predictor.activate(pair)
    api = LocalApi(predictor, port=0)
    api.start()
    try:
        features = {4: [0.5, -1.0, 2.0, 0.25], 3: [1.0, 0.0, -0.5]}
        inputs = [features[info.shape[-1]] for info in pair.runner.inputs]
        status, _, data = post_json(api.port, "/v1/predict", {"inputs": inputs})
        assert status == 200, data
        expected = pair.runner.invoke_once([np.asarray(v, dtype=np.float32) for v in inputs])
        np.testing.assert_allclose(np.asarray(data["outputs"][0]), expected[0], rtol=1e-6)
        assert data["label"] in ("red", "green", "blue")
        assert_error(
            post_json(api.port, "/v1/predict", {"inputs": inputs[:1]}),
            400,
            "model takes 2 inputs, got 1",
        )
    finally:
        api.stop()


def test_nan_outputs_become_null(api: LocalApi) -> None:
    nan_image = [[[float("nan")]] * 8] * 8
    body = json.dumps({"inputs": nan_image}).encode()  # NaN as Python's json writes it
    status, _, data = call(
        api.port, "POST", "/v1/predict", body, {"Content-Type": "application/json"}
    )
    assert status == 200
    assert all(value is None or isinstance(value, float) for value in data["outputs"][0][0])


# --- feedback -------------------------------------------------------------------------------


def test_feedback_by_index_and_label(api: LocalApi, recorder: Recorder, samples: Any) -> None:
    _, _, prediction = post_json(api.port, "/v1/predict", {"inputs": samples[0][0].tolist()})
    top1 = prediction["top1"]
    pid = prediction["prediction_id"]
    for label, correct in ((top1, True), ((top1 + 1) % 10, False), (str(top1), True)):
        status, _, data = post_json(
            api.port, "/v1/feedback", {"prediction_id": pid, "label": label}
        )
        assert status == 200
        assert data == {"correct": correct}
    assert recorder.feedback == [
        ("digits", "1.0.0", True),
        ("digits", "1.0.0", False),
        ("digits", "1.0.0", True),
    ]


def test_feedback_errors(api: LocalApi, samples: Any) -> None:
    _, _, prediction = post_json(api.port, "/v1/predict", {"inputs": samples[0][0].tolist()})
    pid = prediction["prediction_id"]
    cases: list[tuple[Any, int, str]] = [
        ({"prediction_id": "0" * 32, "label": 1}, 404, "unknown or has been forgotten"),
        ({"prediction_id": pid, "label": 10}, 400, "out of range"),
        ({"prediction_id": pid, "label": "ten"}, 400, "'ten' is not one of the labels"),
        ({"prediction_id": pid, "label": True}, 400, '"label" must be'),
        ({"prediction_id": pid, "label": 1.5}, 400, '"label" must be'),
        ({"prediction_id": pid}, 400, '"label" must be'),
        ({"label": 1}, 400, '"prediction_id" must be a string'),
        ([pid, 1], 400, "JSON object"),
    ]
    for payload, status, fragment in cases:
        assert_error(post_json(api.port, "/v1/feedback", payload), status, fragment)
        assert_healthy(api.port)
    assert_error(
        call(api.port, "POST", "/v1/feedback", b"{", {"Content-Type": "application/json"}),
        400,
        "not valid JSON",
    )


# --- errors ---------------------------------------------------------------------------------


def _npy(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    return buffer.getvalue()


def _npz() -> bytes:
    buffer = io.BytesIO()
    np.savez(buffer, x=np.zeros((8, 8, 1), dtype=np.float32))
    return buffer.getvalue()


JSON = {"Content-Type": "application/json"}
NPY = {"Content-Type": "application/x-npy"}


@pytest.mark.parametrize(
    ("method", "path", "headers", "body", "status", "fragment"),
    [
        ("POST", "/v1/predict", JSON, b"{not json", 400, "not valid JSON"),
        ("POST", "/v1/predict", JSON, b"\xff\xfe\x00", 400, "not valid JSON"),
        ("POST", "/v1/predict", JSON, b"[" * 100_000, 400, "not valid JSON"),
        ("POST", "/v1/predict", JSON, b"", 400, "not valid JSON"),
        ("POST", "/v1/predict", JSON, b'{"input": [1]}', 400, '"inputs"'),
        ("POST", "/v1/predict", JSON, b"[1, 2]", 400, '"inputs"'),
        (
            "POST",
            "/v1/predict",
            JSON,
            b'{"inputs": [1, 2, 3]}',
            400,
            "expects shape (1, 8, 8, 1) or (8, 8, 1), got (3,)",
        ),
        ("POST", "/v1/predict", JSON, b'{"inputs": "eight"}', 400, "must be numeric"),
        ("POST", "/v1/predict", JSON, b'{"inputs": [[1], [2, 3]]}', 400, "ragged"),
        ("POST", "/v1/predict", JSON, b'{"inputs": {"a": 1}}', 400, "must be numeric"),
        ("POST", "/v1/predict", NPY, b"definitely not npy", 400, "not a valid .npy"),
        ("POST", "/v1/predict", NPY, _npy(np.zeros((8, 8, 1)))[:-10], 400, "not a valid .npy"),
        ("POST", "/v1/predict", NPY, _npy(np.zeros(3)), 400, "got (3,)"),
        ("POST", "/v1/predict", NPY, _npz(), 400, "not a .npy array"),
        ("POST", "/v1/predict", {"Content-Type": "text/plain"}, b"1 2 3", 415, "text/plain"),
        (
            "POST",
            "/v1/predict",
            {"Content-Type": "application/x-www-form-urlencoded"},
            b"a=1",
            415,
            "not supported",
        ),
        ("POST", "/v1/feedback", NPY, _npy(np.zeros(3)), 415, "not supported"),
        ("POST", "/v1/predict", {"Content-Length": "-5"}, None, 400, "Content-Length"),
        ("GET", "/v2/predict", {}, None, 404, "/v2/predict"),
        ("POST", "/", JSON, b"{}", 404, "no such endpoint"),
        ("GET", "/v1/predict", {}, None, 405, "POST"),
        ("PUT", "/v1/feedback", JSON, b"{}", 405, "POST"),
        ("DELETE", "/v1/health", {}, None, 405, "GET"),
    ],
)
def test_error_answers_are_json_and_the_server_keeps_serving(
    api: LocalApi,
    method: str,
    path: str,
    headers: dict[str, str],
    body: bytes | None,
    status: int,
    fragment: str,
) -> None:
    response = call(api.port, method, path, body, headers)
    assert_error(response, status, fragment)
    if status == 405:
        allow = response[1]["Allow"]
        assert allow in ("POST", "GET, HEAD")
        assert method not in allow
    assert_healthy(api.port)


def test_no_model_answers_503_and_health_says_so(
    api: LocalApi, predictor: Predictor, v1: LoadedModel, samples: Any
) -> None:
    predictor.activate(None)
    status, _, health = call(api.port, "GET", "/v1/health")
    assert status == 200
    assert health == {
        "status": "no_model",
        "model": None,
        "shadow": None,
        "agent": "edge-7",
        "uptime_s": 12.5,
    }
    assert_error(
        post_json(api.port, "/v1/predict", {"inputs": samples[0][0].tolist()}), 503, "no model"
    )
    predictor.activate(v1)
    assert_healthy(api.port)
    status, _, _ = post_json(api.port, "/v1/predict", {"inputs": samples[0][0].tolist()})
    assert status == 200


def test_health_shows_model_and_shadow(
    api: LocalApi, predictor: Predictor, v2: LoadedModel
) -> None:
    predictor.set_shadow(v2)
    status, _, health = call(api.port, "GET", "/v1/health")
    assert status == 200
    assert health == {
        "status": "ok",
        "model": {"name": "digits", "version": "1.0.0"},
        "shadow": {"name": "digits", "version": "2.0.0"},
        "agent": "edge-7",
        "uptime_s": 12.5,
    }
    status, headers, _ = call(api.port, "HEAD", "/v1/health")
    assert status == 200
    assert int(headers["Content-Length"]) > 0


@pytest.mark.parametrize(
    "health",
    [
        pytest.param(lambda: 1 // 0, id="raises"),
        pytest.param(lambda: {"temperature": float("nan")}, id="not-json"),
        pytest.param(lambda: {"since": object()}, id="not-serializable"),
    ],
)
def test_a_failing_health_callable_is_a_json_500(
    predictor: Predictor, health: Callable[[], dict[str, Any]]
) -> None:
    api = LocalApi(predictor, port=0, health=health)
    api.start()
    try:
        assert_error(call(api.port, "GET", "/v1/health"), 500, "internal error")
        status, _, _ = post_json(api.port, "/v1/feedback", {"prediction_id": "x", "label": 1})
        assert status == 404
    finally:
        api.stop()


def test_oversized_body_is_refused_before_it_is_read(predictor: Predictor) -> None:
    api = LocalApi(predictor, port=0, max_body_bytes=1024)
    api.start()
    try:
        conn = http.client.HTTPConnection("127.0.0.1", api.port, timeout=60)
        # Announce a gigabyte and send none of it: an answer proves the body was never read.
        conn.putrequest("POST", "/v1/predict")
        conn.putheader("Content-Type", "application/json")
        conn.putheader("Content-Length", str(10**9))
        conn.endheaders()
        response = conn.getresponse()
        raw = response.read()
        conn.close()
        assert response.status == 413
        assert response.getheader("Content-Type") == "application/json"
        assert "over the limit of 1024 bytes" in json.loads(raw)["error"]

        # A client that uploads the whole body still gets to read the answer.
        status, _, data = post_json(api.port, "/v1/predict", {"inputs": [0.0] * 50_000})
        assert status == 413
        assert "over the limit" in data["error"]

        # A client that asks first is refused before it sends anything.
        conn = http.client.HTTPConnection("127.0.0.1", api.port, timeout=60)
        conn.putrequest("POST", "/v1/predict")
        conn.putheader("Content-Type", "application/json")
        conn.putheader("Content-Length", "5000")
        conn.putheader("Expect", "100-continue")
        conn.endheaders()
        response = conn.getresponse()
        assert response.status == 413
        assert "over the limit" in json.loads(response.read())["error"]
        conn.close()

        small = {"inputs": [[[0.0]] * 8] * 8}
        assert len(json.dumps(small)) <= 1024
        status, _, _ = post_json(api.port, "/v1/predict", small)
        assert status == 200
    finally:
        api.stop()


def test_a_failing_model_is_a_json_500(
    predictor: Predictor, digits: DigitsBundles, v1: LoadedModel, samples: Any
) -> None:
    predictor.activate(failing_model(digits.v1.folder))
    api = LocalApi(predictor, port=0)
    api.start()
    try:
        sample = samples[0][0].tolist()
        assert_error(
            post_json(api.port, "/v1/predict", {"inputs": sample}),
            500,
            "the model failed to run on this input",
        )
        predictor.activate(v1)
        status, _, _ = post_json(api.port, "/v1/predict", {"inputs": sample})
        assert status == 200
    finally:
        api.stop()


def test_one_connection_carries_many_requests_and_errors(api: LocalApi, samples: Any) -> None:
    conn = http.client.HTTPConnection("127.0.0.1", api.port, timeout=60)
    try:
        sample = samples[0][0].tolist()
        for _ in range(3):
            status, _, _ = post_json(api.port, "/v1/predict", {"inputs": sample}, connection=conn)
            assert status == 200
            assert_error(
                post_json(api.port, "/v1/predict", {"nope": 1}, connection=conn), 400, '"inputs"'
            )
            assert_error(call(api.port, "GET", "/nowhere", connection=conn), 404)
            status, _, _ = call(api.port, "GET", "/v1/health", connection=conn)
            assert status == 200
    finally:
        conn.close()


def test_malformed_request_line_gets_a_json_error(api: LocalApi) -> None:
    with socket.create_connection(("127.0.0.1", api.port), timeout=60) as raw:
        raw.sendall(b"GET /v1/health extra HTTP/1.1\r\n\r\n")
        answer = b""
        while chunk := raw.recv(4096):
            answer += chunk
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 400")
    assert b"Content-Type: application/json" in head
    assert "error" in json.loads(body)
    assert_healthy(api.port)


def test_switching_models_while_clients_call(
    api: LocalApi, predictor: Predictor, v2: LoadedModel, samples: Any
) -> None:
    sample = samples[0][0].tolist()
    versions: list[str] = []
    failures: list[BaseException] = []
    switched = threading.Event()
    lock = threading.Lock()
    started = threading.Barrier(5)

    def client() -> None:
        try:
            started.wait()
            for index in range(30):
                after = switched.is_set()
                status, _, data = post_json(api.port, "/v1/predict", {"inputs": sample})
                assert status == 200, data
                version = data["model"]["version"]
                assert not after or version == "2.0.0"
                with lock:
                    versions.append(version)
                if index == 10 and not switched.is_set():
                    with lock:
                        if not switched.is_set():
                            predictor.activate(v2)
                            switched.set()
        except BaseException as exc:
            failures.append(exc)

    clients = [threading.Thread(target=client) for _ in range(5)]
    for thread in clients:
        thread.start()
    for thread in clients:
        thread.join()
    assert failures == []
    assert len(versions) == 150
    assert set(versions) == {"1.0.0", "2.0.0"}


# --- the server itself ----------------------------------------------------------------------


def test_quiet_but_errors_are_logged_and_bound_to_loopback(
    api: LocalApi,
    samples: Any,
    capfd: pytest.CaptureFixture[str],
    caplog: pytest.LogCaptureFixture,
) -> None:
    with caplog.at_level(logging.DEBUG, logger="edge_agent.local_api"):
        post_json(api.port, "/v1/predict", {"inputs": samples[0][0].tolist()})
        call(api.port, "GET", "/v1/health")
        assert caplog.records == []
        call(api.port, "GET", "/missing")
    assert [r.getMessage() for r in caplog.records] == [
        "GET /missing -> 404: no such endpoint: /missing"
    ]
    # Nothing goes to stderr the way BaseHTTPRequestHandler's per-request lines do.
    captured = capfd.readouterr()
    assert captured.err == ""
    assert captured.out == ""
    assert api._server is not None
    assert api._server.server_address[0] == "127.0.0.1"


def test_start_stop_and_port(predictor: Predictor) -> None:
    api = LocalApi(predictor, port=0)
    with pytest.raises(RuntimeError, match="not running"):
        _ = api.port
    api.start()
    port = api.port
    assert port > 0
    with pytest.raises(RuntimeError, match="already running"):
        api.start()
    idle = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    idle.request("GET", "/v1/health")
    idle.getresponse().read()
    api.stop()

    def reuse_idle() -> None:
        idle.request("GET", "/v1/health")
        idle.getresponse().read()

    # The listening socket is gone, and so is the connection that was idle.
    with pytest.raises(ConnectionRefusedError):
        call(port, "GET", "/v1/health")
    with pytest.raises((OSError, http.client.HTTPException)):
        reuse_idle()
    idle.close()
    api.stop()  # a second stop is harmless


def test_serving_and_local_api_import_nothing_heavy() -> None:
    result = subprocess.run(
        [sys.executable, "-c", "import edge_agent.local_api, sys; print(sorted(sys.modules))"],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        check=True,
    )
    modules = set(ast.literal_eval(result.stdout))
    assert "edge_agent.serving" in modules
    loaded = {name.split(".")[0] for name in modules}
    assert loaded.isdisjoint(HEAVY), sorted(loaded & set(HEAVY))
