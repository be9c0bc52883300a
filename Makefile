# Every target that runs project code first runs scripts/bootstrap: it installs what is missing
# (Debian packages, .venv, the editable install) and is a quiet no-op when all is in place.
SHELL := /bin/bash
PY := .venv/bin/python

.PHONY: demo test test-vm vm-artefacts lint bench binary image clean bootstrap

# The main job: a dozen tabs on a built-in origin server, each in a sandboxed renderer, as a live
# table until Ctrl-C (fos_host/demo.py); `fos-host demo --sandbox-report` is the isolation report.
demo: bootstrap
	@$(PY) -m fos_host.cli demo

# The test suite (slow tests deselected); pytest's "no tests collected" counts as success.
test: bootstrap
	@scripts/test

# A focused selection (tests/vm/selection.txt) inside a qemu VM, booted once per cgroup layout
# (v2, hybrid, v1), as root and as an unprivileged user; the image is cached under build/vm/
# (tests/vm/harness.py); results, console logs and doctor reports go to build/vm/run/.
test-vm: bootstrap
	@$(PY) tests/vm/harness.py

# Keep the last VM run's matrix and doctor reports in the repository (tests/vm/artefacts/).
vm-artefacts:
	cp build/vm/run/matrix.md build/vm/run/doctor-*.json tests/vm/artefacts/

lint: bootstrap
	.venv/bin/ruff check
	.venv/bin/ruff format --check
	.venv/bin/mypy

# Spawn latency and memory, IPC round trips and transfers, open-tab latency and the memory of
# 200 tabs, then the tab lifecycle's steps and pressure onset to the first action, against
# peers measured in the same run.
bench: bootstrap
	@$(PY) -m fos_host.cli bench spawn
	@$(PY) -m fos_host.cli bench ipc
	@$(PY) -m fos_host.cli bench tabs
	@$(PY) -m fos_host.cli bench lifecycle

# build/fos-host: fos-host as one executable file (a shiv zipapp) for any machine with Python
# 3.11+, libseccomp2 and libcap2; rebuilt only when an input changed (packaging/binary/build.py).
binary: bootstrap
	@$(PY) packaging/binary/build.py

# The OCI image (Debian bookworm + fos-host) as build/image/<key>/fos-host.oci.tar, cached by a
# hash of its inputs (packaging/container/build.py; how to run it: README.md, "Container image").
image: bootstrap
	@$(PY) packaging/container/build.py

bootstrap:
	@scripts/bootstrap

# Caches and build output; keeps .venv (rm -rf .venv to start over).
clean:
	rm -rf .pytest_cache .mypy_cache .ruff_cache build dist
	find . -path ./.venv -prune -o -path ./.git -prune -o -name __pycache__ -type d -exec rm -rf {} +
