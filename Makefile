# devpass: `make run` starts a controller and an agent for this machine,
# `make test` installs what the tests need and runs the whole suite.

PYTHON ?= python3
VENV ?= .venv
STATE_DIR ?= .state
BIN := $(VENV)/bin
PY := $(BIN)/python
APT_PACKAGES := pciutils pci.ids postgresql

.PHONY: run test test-faults venv system-deps protos lint typecheck clean

$(BIN)/devpass: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --retries 10 --upgrade pip
	# A second attempt covers a download cut off half way, which pip does not retry.
	$(PY) -m pip install --quiet --retries 10 -e '.[test]' || $(PY) -m pip install --quiet --retries 10 -e '.[test]'
	touch $@

venv: $(BIN)/devpass

# Installs the Debian packages that devpass reads (pci.ids for vendor and device
# names), that the tests compare against (pciutils for lspci), and the PostgreSQL
# server whose throwaway clusters the registry tests start.
system-deps:
	@missing=""; for p in $(APT_PACKAGES); do \
	  dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
	  echo "installing Debian packages:$$missing"; \
	  if [ "$$(id -u)" = 0 ]; then SUDO=; else SUDO=sudo; fi; \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq $$missing; \
	fi

run: system-deps venv
	$(BIN)/devpass up --state-dir $(STATE_DIR)

# The kernel tests boot a QEMU guest; tests.kernel.assets installs qemu-system-x86 and
# caches the guest's Debian kernel and busybox under .cache/kernel (about 470 MB).
test: system-deps venv
	$(BIN)/ruff check devpass controller agent tests
	$(BIN)/mypy devpass controller agent
	$(PY) -m tests.kernel.assets
	$(PY) -m pytest -q

# The fault tests alone (they also run in `make test`): races, crashes, outages.
test-faults: system-deps venv
	$(PY) -m pytest -q -s tests/faults

protos: venv
	$(PY) -m grpc_tools.protoc -Iprotos --python_out=. --pyi_out=. --grpc_python_out=. protos/devpass/v1/*.proto

lint: venv
	$(BIN)/ruff check devpass controller agent tests
	$(BIN)/ruff format --check devpass controller agent tests

typecheck: venv
	$(BIN)/mypy devpass controller agent

clean:
	rm -rf $(VENV) build *.egg-info
