# Two commands do all the set-up: `make serve` (environment + the main job) and `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# torch first, pinned. From PyPI on Linux this is the CUDA build (about 3 GB with its NVIDIA wheels);
# for the CPU-only build: make TORCH_INDEX=https://download.pytorch.org/whl/cpu
TORCH_SPEC ?= torch==2.13.0
TORCH_INDEX ?=
PYTEST_ARGS ?=

.PHONY: venv serve test lint bench clean

venv: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH_SPEC)" $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX))
	$(PY) -m pip install -q -e ".[test]"
	touch $@

# the main job: a local cluster on embedded Ray (1 attention shard, 2 expert actors) on the tiny checkpoint,
# with the Gradio page on http://127.0.0.1:7860 (Ctrl-C stops everything)
serve: venv
	$(VENV)/bin/raymoe serve $(SERVE_ARGS)

test: venv
	$(PY) -m pytest $(PYTEST_ARGS)

lint: venv
	$(VENV)/bin/ruff check .

bench: venv
	$(VENV)/bin/raymoe bench generate

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
