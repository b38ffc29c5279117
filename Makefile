# The two commands of the README. Both run scripts/setup.sh first (idempotent, ~1 s when done).
PY := .venv/bin/python
export OMP_NUM_THREADS ?= 2

.PHONY: setup demo test

setup:
	bash scripts/setup.sh

# The main job on the tiny embedded default.
demo: setup
	bash scripts/demo.sh

# The whole test suite (what CI runs).
test: setup
	$(PY) -m pytest tests -q -p no:cacheprovider -W ignore::DeprecationWarning -W ignore::FutureWarning --timeout=1800
