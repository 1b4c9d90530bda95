# The two front doors: `make run` and `make test`. Both set themselves up on a fresh machine.
VENV ?= .venv
PYTHON ?= python3
PY := $(VENV)/bin/python
PIP := $(PY) -m pip --disable-pip-version-check -q
# The pins of this platform, from app/verified_versions.py (one place): on a machine whose nvidia-smi
# lists a GPU, the torch, bitsandbytes and liger-kernel the GPU tests passed on; elsewhere the CPU
# torch (on a machine with a local CPU wheel, CI, pip takes that). `make run TORCH_SPEC=...` overrides.
TORCH_SPEC ?= $(shell $(PYTHON) app/verified_versions.py)
DATA_DIR ?= data
# Empty: TUNEBOARD_PORT, else 8000. `make run PORT=8001` when 8000 is taken.
PORT ?=
PYTEST_ARGS ?=
# `make test` runs the suite in this many processes (pytest-xdist, a test file to a process: most
# tests wait on the processes they start); 0: one process. 2 on this project's 2-core machines,
# each with one OpenMP thread (tests/conftest.py): pytest 11 min, against 17 with a thread a core
# and 32 in one process (2026-12-07).
TEST_WORKERS ?= 2
# llama.cpp (GGUF exports) built for any x86-64 with AVX2, not for this CPU: a native build used the
# AMX instructions a virtual machine's CPU listed but did not allow (Illegal instruction, 2026-12-06).
# Built from source without pip's wheel cache, where a native wheel of an earlier build may wait.
LLAMA_CMAKE_ARGS ?= -DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON
LLAMA_SPEC := $(shell grep -o '"llama-cpp-python==[^"]*"' pyproject.toml)
# That build takes 3 minutes on 2 cores: its wheel is kept per machine, under a name made of the
# version and the flags, so a second clone (or `make clean`) installs it instead of compiling.
LLAMA_WHEELS ?= $(HOME)/.cache/tuneboard/llama-wheels/$(shell echo '$(LLAMA_SPEC) $(LLAMA_CMAKE_ARGS)' | sha1sum | cut -c1-12)

.PHONY: run setup setup-dev test test-fast security lint gpu-test screenshots clean chromium

$(VENV)/.installed: pyproject.toml app/verified_versions.py
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install --upgrade pip setuptools wheel
	@echo "Installing $(TORCH_SPEC) (app/verified_versions.py)"
	$(PIP) install $(TORCH_SPEC)
	@# (where the home folder cannot be written, the wheel is kept in the environment instead)
	@dir=$(LLAMA_WHEELS); { mkdir -p $$dir && [ -w $$dir ]; } 2>/dev/null || dir=$(VENV)/llama-wheel; \
	ls $$dir/llama_cpp_python-*.whl >/dev/null 2>&1 || { \
	  echo "Building $(LLAMA_SPEC) once for this machine (3 minutes on 2 cores), kept in $$dir"; \
	  mkdir -p $$dir && tmp=$$(mktemp -d $$dir.partial-XXXXXX) && \
	  CMAKE_ARGS="$(LLAMA_CMAKE_ARGS)" $(PIP) wheel --no-deps --no-cache-dir -w $$tmp $(LLAMA_SPEC) && \
	  mv $$tmp/llama_cpp_python-*.whl $$dir/ && rmdir $$tmp; } && \
	$(PIP) install $$dir/llama_cpp_python-*.whl
	$(PIP) install -e ".[worker]" $(TORCH_SPEC)
	# llama.cpp's GGUF converter scripts, from llama-cpp-python's sdist, once per environment.
	$(PY) -m worker.gguf_converter --install
	touch $@

$(VENV)/.installed-dev: $(VENV)/.installed
	$(PIP) install -e ".[worker,dev]"
	touch $@

setup: $(VENV)/.installed

setup-dev: $(VENV)/.installed-dev

run: setup
	TUNEBOARD_DATA_DIR=$(DATA_DIR) $(VENV)/bin/tuneboard migrate
	TUNEBOARD_DATA_DIR=$(DATA_DIR) $(VENV)/bin/tuneboard demo --if-missing
	TUNEBOARD_DATA_DIR=$(DATA_DIR) $(VENV)/bin/tuneboard serve $(if $(PORT),--port $(PORT))

# Browser tests drive the system Chromium; install it when we may (root on Debian), else they skip.
chromium:
	@command -v chromium >/dev/null 2>&1 || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null && \
	  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null) || \
	  echo "chromium not found: browser tests will be skipped (apt-get install chromium)"; }

test: setup-dev chromium
	$(PY) -m pytest -n $(TEST_WORKERS) --dist loadfile $(PYTEST_ARGS)

# The security and fault suite alone, ending with its totals (attacks and faults tried, held).
security: setup-dev
	$(PY) -m tests.security_tally $(PYTEST_ARGS)

test-fast: setup-dev
	$(PY) -m pytest -m "not slow and not browser" $(PYTEST_ARGS)

lint: setup-dev
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy
	$(VENV)/bin/lint-imports
	$(VENV)/bin/vulture

# On a CUDA machine: the GPU tests.
gpu-test: setup-dev
	$(PY) -m pytest -m gpu $(PYTEST_ARGS)

# The README's screenshots (docs/*.png), taken by the browser tests.
screenshots: setup-dev chromium
	TUNEBOARD_UPDATE_SCREENSHOTS=1 $(PY) -m pytest tests/browser/test_navigation.py \
	  tests/browser/test_live_job_page.py -k "nav_page or gains_points or cpu_run" $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache .mypy_cache
