# The two entry points: `make demo` (the main job) and `make test`. Both set up .venv if missing.
PY := .venv/bin/python
STAMP := .venv/.installed

.PHONY: demo test test-hf-floor lint bench setup

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

# The Hugging Face tests again in a second environment with the oldest supported transformers
# (the floor of the `hf` extra in pyproject.toml); `.ci/run` runs it after `make test`.
FLOOR_PY := .venv-floor/bin/python
FLOOR_STAMP := .venv-floor/.installed
TRANSFORMERS_FLOOR = $(shell sed -n 's/.*"transformers>=\([0-9.]*\),.*/\1/p' pyproject.toml | head -n 1)
HF_TESTS := tests/look_inside/test_hf.py tests/look_inside/test_hf_matrix.py tests/look_inside/test_hf_integration.py \
	tests/look_inside/test_metrics_p3.py

$(FLOOR_STAMP): pyproject.toml
	test -x $(FLOOR_PY) || python3 -m venv .venv-floor
	$(FLOOR_PY) -m pip install -q --upgrade pip
	$(FLOOR_PY) -m pip install -q torch==2.13.0
	$(FLOOR_PY) -m pip install -q -e '.[dev]' 'transformers==$(TRANSFORMERS_FLOOR)'
	touch $(FLOOR_STAMP)

test-hf-floor: $(FLOOR_STAMP)
	$(FLOOR_PY) -c "import transformers; assert transformers.__version__ == '$(TRANSFORMERS_FLOOR)', transformers.__version__"
	$(FLOOR_PY) -m pytest -q -m "not slow" -p no:cacheprovider $(HF_TESTS)
