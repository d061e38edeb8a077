# Every target installs what it needs into .venv first, so each works on a fresh clone.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
MODELS_DIR ?= models/build
DEMO_DIR ?= demo-out

.PHONY: test lint typecheck pytest bench models demo clean mosquitto

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

test: $(STAMP) mosquitto
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy
	$(VENV)/bin/pytest

models: $(STAMP)
	$(PY) -m models.train --out $(MODELS_DIR)

# Until the fleet demo exists: train the digits model and let edge-convert pick a quantization.
demo: models
	rm -rf $(DEMO_DIR)
	$(VENV)/bin/edge-convert keygen --out $(DEMO_DIR)/keys
	$(VENV)/bin/edge-convert convert $(MODELS_DIR)/digits/model.keras --out $(DEMO_DIR)/digits \
		--quantize auto --calibration $(MODELS_DIR)/digits/calibration.npz \
		--eval $(MODELS_DIR)/digits/eval.npz --labels $(MODELS_DIR)/digits/labels.txt \
		--name digits --version 1.0.0 --signing-key $(DEMO_DIR)/keys/signing.key \
		--layer-report $(DEMO_DIR)/digits-layers.csv
	$(VENV)/bin/edge-convert verify $(DEMO_DIR)/digits --public-key $(DEMO_DIR)/keys/signing.pub
	$(VENV)/bin/edge-convert inspect $(DEMO_DIR)/digits

bench: $(STAMP) mosquitto
	$(PY) -m bench.run --out BENCHMARKS.md

clean:
	rm -rf $(MODELS_DIR) $(DEMO_DIR) .pytest_cache .mypy_cache .ruff_cache
