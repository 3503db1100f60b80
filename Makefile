# `make test` is the project's test command (CI calls it through .ci/run).
# It creates .venv when missing, installs the package with its three backends
# under the CPU constraints, then runs the whole suite once per backend.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
CONSTRAINTS := requirements/constraints-cpu.txt
BACKENDS := jax tensorflow torch

.PHONY: install test test-jax test-tensorflow test-torch demo clean

$(VENV)/.installed: pyproject.toml $(CONSTRAINTS)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -c $(CONSTRAINTS) -e ".[all,test,demo,onnx,export,orbax]"
	touch $@

install: $(VENV)/.installed

test: install
	@$(PY) tools/run_suite.py $(BACKENDS)

test-%: install
	@$(PY) tools/run_suite.py $*

# The default preset classifies CC0 / public-domain photographs and draws its
# routing (demo_output/routing_map.png).
demo: install
	@$(PY) tools/demo.py --output demo_output

clean:
	rm -rf $(VENV) build dist *.egg-info .pytest_cache demo_output
