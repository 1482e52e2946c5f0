# The two entry points: `make demo` (the main job) and `make test`. Both set up .venv if missing.
PY := .venv/bin/python
STAMP := .venv/.installed

.PHONY: demo test lint bench setup

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv .venv
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[dev]'
	touch $(STAMP)

setup: $(STAMP)

# OMP_WAIT_POLICY=PASSIVE: OpenMP threads sleep instead of spinning, so a shared CPU does not slow torch down 4x.
demo: $(STAMP)
	OMP_WAIT_POLICY=$${OMP_WAIT_POLICY:-PASSIVE} $(PY) -m attnzoo compare --preset quick

test: $(STAMP)
	$(PY) -m ruff check attnzoo tests benchmarks
	$(PY) -m pytest -q -m "not slow" -p no:cacheprovider

lint: $(STAMP)
	$(PY) -m ruff check attnzoo tests benchmarks

bench: $(STAMP)
	$(PY) benchmarks/bench_patterns.py
