# make test: lint + the whole test suite; make demo: the main job; make bench: the benchmarks.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
TEST_WORKERS ?= 2  # pytest-xdist processes; each gets its share of the cores (tests/conftest.py)

.PHONY: install test lint demo bench clean

install: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev,hf,export]' -c constraints.txt
	touch $(STAMP)

lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

test: lint
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadgroup --durations=40

demo: install
	$(VENV)/bin/multimodal demo

bench: install
	$(PY) bench/attention.py
	$(PY) bench/vit.py
	$(PY) bench/generation.py
	$(PY) bench/loader.py
	$(PY) bench/clip_step.py
	$(PY) bench/retrieval.py
	$(PY) bench/mfu.py
	$(PY) bench/accumulation.py
	$(PY) bench/fsdp.py
	$(PY) bench/adapt.py
	$(PY) bench/inference.py
	$(PY) bench/suite.py

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache *.egg-info
