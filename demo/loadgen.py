"""Simulated traffic for the agents' local APIs: predictions on real digits, and the
ground truth sent back as feedback, as an application that learns labels later would.

One thread per agent, each on a kept-alive connection, at a steady rate. Per agent it
counts requests, failures, feedback sent, and how many answers were right, so the demo
can show what the devices saw beside what the fleet server measured.
"""

from __future__ import annotations

import http.client
import json
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np


@dataclass
class Traffic:
    requests: int = 0
    failures: int = 0
    feedback: int = 0
    correct: int = 0


class LoadGenerator:
    def __init__(
        self,
        ports: Sequence[int],
        x: np.ndarray,
        y: np.ndarray,
        *,
        rate_per_s: float = 20.0,
        feedback_share: float = 1.0,
        seed: int = 0,
    ) -> None:
        self.ports = list(ports)
        self.x, self.y = x, y
        self.interval_s = 1.0 / rate_per_s
        self.feedback_share = feedback_share
        self.seed = seed
        self.traffic = {port: Traffic() for port in self.ports}
        self._stop = threading.Event()
        self._threads = [
            threading.Thread(target=self._drive, args=(i, port), daemon=True, name=f"load-{port}")
            for i, port in enumerate(self.ports)
        ]

    def start(self) -> LoadGenerator:
        for thread in self._threads:
            thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(10)

    def _drive(self, index: int, port: int) -> None:
        rng = np.random.default_rng(self.seed + index)
        traffic = self.traffic[port]
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
        next_at = time.monotonic()
        while not self._stop.is_set():
            i = int(rng.integers(len(self.x)))
            try:
                answer = _post(connection, "/v1/predict", {"inputs": self.x[i].tolist()})
                traffic.requests += 1
                if answer is None:
                    traffic.failures += 1
                elif rng.random() < self.feedback_share:
                    truth = int(self.y[i])
                    traffic.correct += answer.get("top1") == truth
                    feedback = {"prediction_id": answer["prediction_id"], "label": truth}
                    if _post(connection, "/v1/feedback", feedback) is not None:
                        traffic.feedback += 1
            except (OSError, http.client.HTTPException):
                # The agent restarting or switching: try again on a new connection.
                traffic.failures += 1
                connection.close()
                connection = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
            next_at += self.interval_s
            self._stop.wait(max(0.0, next_at - time.monotonic()))
        connection.close()


def _post(
    connection: http.client.HTTPConnection, path: str, body: dict[str, object]
) -> dict[str, object] | None:
    connection.request("POST", path, json.dumps(body), {"Content-Type": "application/json"})
    response = connection.getresponse()
    data = response.read()
    if response.status != 200:
        return None
    answer: dict[str, object] = json.loads(data)
    return answer
