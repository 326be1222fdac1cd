# The documented entry points. `make demo` and `make test` are the README's two commands.
VENV ?= .venv
PY := $(VENV)/bin/python
BIN := $(VENV)/bin

.PHONY: lock setup demo test lint typecheck unit e2e node-deps images shellcheck generate verify bench fuzz clean

# One virtual environment with both packages of the workspace (kubetune, operator/'s
# kubetune-operator; editable), the trainer stack and the dev tools, exactly as uv.lock pins them. uv
# (installed into the venv itself, from PyPI, at the version the lock also pins) makes the ~5 GB torch
# install take seconds when cached.
$(VENV)/.installed: pyproject.toml operator/pyproject.toml uv.lock
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check uv==0.13.9
	UV_PROJECT_ENVIRONMENT=$(VENV) $(BIN)/uv sync -q --frozen --inexact --all-extras --all-packages \
		--compile-bytecode
	touch $@

setup: $(VENV)/.installed

demo: setup
	$(BIN)/kubetune validate jobs/
	$(BIN)/kubetune run jobs/tiny-local.yaml --local --output out/tiny-local

lint: setup
	$(BIN)/ruff check src operator tests bench hack
	$(BIN)/ruff format --check src operator tests bench hack

typecheck: setup
	$(BIN)/mypy

unit: setup
	$(BIN)/pytest -m "not trainer and not e2e"

e2e: setup
	$(BIN)/pytest tests/e2e

# The e2e tests' real node (hack/node/): its Debian packages (root; a no-op when installed), and its
# images, built here with podman (the `real_node` fixture builds them too, when missing).
node-deps:
	bash hack/node/install-deps.sh

images:
	bash hack/node/images.sh build

# The shell scripts (not in `lint`: shellcheck is a Debian package, not a PyPI one).
shellcheck:
	shellcheck -x .ci/run hack/*.sh hack/*/*.sh

# The real e2e node's Debian packages come first (a no-op when present; skipped with the e2e tests).
test: lint typecheck
	@[ "$${KUBETUNE_SKIP_E2E:-}" = 1 ] || bash hack/node/install-deps.sh
	$(BIN)/pytest

# The lock file, after an edit of a pyproject.toml's dependencies.
lock: setup
	$(BIN)/uv lock

# Regenerate the CRD, the JSON schema, the README reference, the Argo CD patch, the admission policies,
# the RBAC rules and the chart's values schema, and the golden files, from the code that defines them.
generate: setup
	$(PY) -m kubetune.api.generate
	$(PY) -m kubetune.policy
	$(PY) -m kubetune_operator.generate
	UPDATE_GOLDEN=1 $(BIN)/pytest -q tests/test_examples.py

verify: setup
	$(BIN)/pytest -q tests/test_generated.py tests/test_examples.py

bench: setup
	$(PY) bench/startup.py
	$(PY) bench/tiny_run.py

# A long run of the property tests (tests/test_properties.py; its short "ci" run is part of `make test`):
# FUZZ_EXAMPLES random mutations per property, failures kept in .hypothesis/ and replayed first next time.
FUZZ_EXAMPLES ?= 5000
fuzz: setup
	HYPOTHESIS_PROFILE=long FUZZ_EXAMPLES=$(FUZZ_EXAMPLES) $(BIN)/pytest -q -p no:cacheprovider \
		tests/test_properties.py; status=$$?; cat .hypothesis/fuzz-summary.txt; exit $$status

clean:
	rm -rf $(VENV) out .pytest_cache .mypy_cache .ruff_cache
