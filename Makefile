# `make demo` and `make test` each do their own setup on a fresh machine with nothing but Python.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# The CPU build of torch where there is no CUDA (on these machines it comes from local disk);
# with a GPU, whatever CUDA build pip picks for the range in pyproject.toml.
TORCH_CPU ?= torch==2.13.0

.PHONY: setup assets demo evaluate-demo test clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml scripts/install-llama-cpp
	$(PYTHON) -m venv $(VENV)
	if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi >/dev/null 2>&1; then \
		$(PY) -m pip install 'torch>=2.4'; \
	else \
		$(PY) -m pip install '$(TORCH_CPU)'; \
	fi
	# llama.cpp's runtime, built for this CPU (about 10 minutes the first time; then a cached wheel).
	sh scripts/install-llama-cpp $(PY)
	$(PY) -m pip install -e '.[dev,dashboard]'
	touch $@

assets: setup
	$(VENV)/bin/planner assets fetch

# The main job: a budget-driven search on the built-in model and corpus (studies/demo.toml), then the
# recommended recipe rebuilt, checked and written as a checkpoint. Running it again continues the study.
demo: assets
	$(VENV)/bin/planner search --study-file studies/demo.toml
	$(VENV)/bin/planner apply studies/demo-recipe.yaml --out studies/demo-deploy --force

# Measure the uncompressed built-in model only (perplexity, latency, memory).
evaluate-demo: assets
	$(VENV)/bin/planner evaluate --model builtin:smollm2-135m --data builtin:shakespeare --json studies/demo-evaluation.json

# One worker process a core, each single-threaded (tests/conftest.py): 11.5-12.5 minutes on 2 cores.
test: setup
	$(PY) -m pytest -n auto

clean:
	rm -rf $(VENV) build *.egg-info
