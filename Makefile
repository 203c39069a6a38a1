# The two quick-start targets (`make serve`, `make test`) set everything up themselves:
# a virtualenv in .venv with the package and its development tools.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# The fault engine's C fast path (shmfault/fastpath.py), loaded with ctypes. Without a C
# compiler it is not built and the engine serves every fault in Python.
FAST_PATH := shmfault/_fastpath.so
CFLAGS_FAST_PATH := -O2 -Wall -Wextra -Werror -shared -fPIC

.PHONY: setup serve probe test unit integration check fmt clean

setup: $(STAMP) $(FAST_PATH)

$(FAST_PATH): shmfault/_fastpath.c
	@if command -v $(CC) >/dev/null 2>&1; then \
		echo "$(CC) $(CFLAGS_FAST_PATH) -o $@ $< -lpthread"; \
		$(CC) $(CFLAGS_FAST_PATH) -o $@ $< -lpthread; \
	else \
		echo "no C compiler ($(CC)): the fault engine runs without its C fast path"; \
	fi

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $(STAMP)

serve: setup
	$(BIN)/shmfault serve

probe: setup
	$(BIN)/shmfault probe

test: setup
	$(BIN)/python -m pytest tests

unit: setup
	$(BIN)/python -m pytest tests/unit

integration: setup
	$(BIN)/python -m pytest tests/integration

# All static checks: lint, format, types.
check: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

fmt: setup
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .mypy_cache .ruff_cache $(FAST_PATH)

# Other kernels, each booted in a throwaway VM (Debian 12's 6.1 besides the running one): the
# probe and the tests there, results into docs/kernels.md. Installs what it needs itself (apt as
# root, virtme-ng from PyPI into its own virtualenv, the kernel package unpacked, never
# installed), all kept in its cache (~/.cache/shmfault-kernel-matrix) between runs:
# `make kernel-clean` removes the cache, `scripts/kernel_matrix.py clean --uninstall` also purges
# the Debian packages it installed. Slow where KVM does not work: the VM is emulated (hours for
# the whole suite; KERNEL_MATRIX_ARGS="--subset" or "--budget SECONDS" bounds it).
KERNEL_MATRIX_ARGS ?=
.PHONY: kernel-matrix kernel-subset kernel-clean
kernel-matrix: setup
	$(BIN)/python scripts/kernel_matrix.py run --write $(KERNEL_MATRIX_ARGS)

# The bounded subset under 6.1 (the probe, one attach per mode, the fallbacks), as `make test`
# runs it: about two minutes once installed, five at most (SHMFAULT_KERNEL_SUBSET_BUDGET).
kernel-subset: setup
	$(BIN)/python -m pytest tests/kernel/test_kernel_61.py

kernel-clean:
	$(PYTHON) scripts/kernel_matrix.py clean

# The soak (docs/reliability.md): client processes hammering the service with racing faults and
# drops against a counter oracle, then fds and memory compared. SECONDS bounds it.
SECONDS ?= 60
.PHONY: soak
soak: setup
	$(BIN)/python scripts/soak.py --seconds $(SECONDS)
