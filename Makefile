# cwt-ray: `make run` (install + quickstart) and `make test` (install + test suite).
PY      ?= python3
VENV    ?= .venv
BIN     := $(VENV)/bin
CONFIG  ?= configs/quickstart.yaml
export HF_HUB_OFFLINE := 1
export HF_DATASETS_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: install run smoke test test-fast docs study-cpu-reduced clean

install: $(VENV)/.installed

# torch is installed first and pinned through the constraints file, so nothing drags in CUDA.
$(VENV)/.installed: pyproject.toml constraints-cpu.txt requirements-assets.txt
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -c constraints-cpu.txt -e '.[test]'
	$(BIN)/python -m pip install -q --no-deps -r requirements-assets.txt
	touch $@

run: install
	$(BIN)/cwt-ray run $(CONFIG) $(ARGS)

smoke: install
	$(BIN)/cwt-ray run configs/smoke.yaml $(ARGS)

test: install
	$(BIN)/python -m pytest tests -q --durations=15 $(ARGS)

test-fast: install
	$(BIN)/python -m pytest tests -q -m "not slow" $(ARGS)

# Generated docs: every config key (docs/config.md) and the README's result tables from the
# published artefacts under docs/results/. tests/test_config_doc.py and tests/test_docs.py fail when
# either is stale.
docs: install
	$(BIN)/python -m cwt_ray.config_doc
	$(BIN)/python scripts/readme_tables.py

# The CPU reduced protocol of the study (docs/results.md), every run and sweep, then its table (~2.5 h).
study-cpu-reduced: install
	VENV=$(VENV) bash jobs/study_cpu_reduced.sh

clean:
	rm -rf runs .pytest_cache
