# make setup: install everything and build the demo model; make test: run the tests.
PY ?= python

setup:
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install torch==2.13.0
	$(PY) -m pip install -r requirements-dev.txt
	$(PY) scripts/build_demo_model.py

test:
	$(PY) -m pytest -q tests

.PHONY: setup test
