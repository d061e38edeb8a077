# Every target installs what it needs into .venv first, so each works on a fresh clone.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
MODELS_DIR ?= models/build
DEMO_DIR ?= demo-out
AGENT_WHEEL_DIR ?= dist

.PHONY: test lint typecheck pytest bench models demo clean mosquitto chromium screenshots agent-wheel

$(STAMP): setup.cfg pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[convert,agent,server,dev]'
	touch $(STAMP)

# The tests start their own brokers; Debian's packages provide the binary.
mosquitto:
	@command -v mosquitto >/dev/null 2>&1 || { \
		echo "installing mosquitto from Debian's packages"; \
		SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
		$$SUDO apt-get update -qq && \
		DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq mosquitto mosquitto-clients; }
	@command -v mosquitto_ctrl >/dev/null 2>&1 || { \
		SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
		DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq mosquitto-clients; }

# The console's browser tests drive Debian's chromium through Playwright (no browser
# download from elsewhere).
chromium:
	@command -v chromium >/dev/null 2>&1 || { \
		echo "installing chromium from Debian's packages"; \
		SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
		$$SUDO apt-get update -qq && \
		DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq chromium; }

test: $(STAMP) mosquitto chromium
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy
	$(VENV)/bin/lint-imports
	$(VENV)/bin/pytest

models: $(STAMP)
	$(PY) -m models.train --out $(MODELS_DIR)

# The whole story: a broker, the server, five agents, a good rollout and a bad one caught.
# `make demo DEMO_ARGS=--keep-running` leaves the fleet up to explore.
demo: models mosquitto
	$(PY) -m demo.run --out $(DEMO_DIR) --models-dir $(MODELS_DIR) $(DEMO_ARGS)

# The README's pictures of the console: the demo, with screenshots taken at its end.
screenshots: models mosquitto chromium
	$(PY) -m demo.run --out $(DEMO_DIR) --models-dir $(MODELS_DIR) --screenshots docs/screenshots

# The device's package: protocol, common and edge_agent, with the agent's dependencies only
# (docs/agent.md, "Installing on Raspberry Pi OS").
agent-wheel: $(STAMP)
	$(PY) deploy/agent_wheel.py --out $(AGENT_WHEEL_DIR)

bench: $(STAMP) mosquitto
	$(PY) -m bench.run --out BENCHMARKS.md

clean:
	rm -rf $(MODELS_DIR) $(DEMO_DIR) $(AGENT_WHEEL_DIR) .pytest_cache .mypy_cache .ruff_cache
