# Two commands on a fresh machine: `make demo` (set up, run the main job) and `make test`.
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.edgecompress-installed
OUT    ?= out/demo

.PHONY: setup demo test bench clean

# torch==2.13.0 first: pip takes the CPU wheel on disk and never resolves a CUDA build.
$(STAMP): pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[cpu,dev]'
	touch $(STAMP)

setup: $(STAMP)

demo: setup
	$(VENV)/bin/edgecompress run -o $(OUT)

test: setup
	$(PY) -m pytest -q -p no:cacheprovider

bench: setup
	$(PY) benchmarks/layers.py
	$(PY) benchmarks/models.py

clean:
	rm -rf $(VENV) out build *.egg-info
