# The README's two commands: `make run` and `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip

.PHONY: run test bench gpu-check clean

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip

# Main job: train the default MLP on the bundled digits data.
run: $(PY)
	$(PIP) install -q -e ".[numba]"
	$(VENV)/bin/fastnn train

test: $(PY)
	$(PIP) install -q -e ".[test]"
	$(PY) -m pytest -q tests bench --benchmark-disable

bench: $(PY)
	$(PIP) install -q -e ".[test]"
	$(PY) -m pytest bench --benchmark-only --benchmark-json=bench/results/pytest-benchmark-latest.json

clean:
	rm -rf $(VENV) build dist *.egg-info .pytest_cache

# Whole test suite on a GPU machine with its preinstalled packages; report in bench/results/.
gpu-check:
	PYTHON=$(PYTHON) bash bench/gpu_check.sh
