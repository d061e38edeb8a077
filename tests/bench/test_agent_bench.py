"""The agent benchmark's machinery on the real digits model. Nothing here judges speed."""

from __future__ import annotations

from pathlib import Path

import pytest

from bench import agent

pytestmark = pytest.mark.slow


def test_the_agent_benchmark_measures_every_path(reference_models: dict[str, Path]) -> None:
    figures = agent.measure(reference_models["digits"].parent)
    assert [costs.model for costs in figures.costs] == ["digits (float32)", "digits (int8)"]
    for costs in figures.costs:
        assert min(costs.bare_us, costs.in_process_us, costs.in_process_ratio) > 0
    assert figures.target.http_us is not None
    assert figures.target.http_us > 0
    assert figures.costs[1].http_us is None
    assert figures.rss_bytes > 0
    assert figures.peak_rss_bytes >= figures.rss_bytes
    assert figures.first_answer_s > 0
    lines = agent.markdown(figures)
    assert lines[0] == "## Edge agent: cost per inference, memory, start-up"
    assert any(line.startswith("| digits (int8) | in-process API |") for line in lines)
    assert any(line.startswith("| digits (float32) | local HTTP API |") for line in lines)
    assert any(line.startswith("- resident memory under 80 MiB:") for line in lines)
