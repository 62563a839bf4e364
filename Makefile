# make setup: install everything (l2v itself editable, so `import l2v` works from anywhere), build the demo
# model, and the SICK triples and pairs when ../shared/data is there; make test: run the tests.
PY ?= python

setup:
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install torch==2.13.0
	$(PY) -m pip install -r requirements-dev.txt
	$(PY) -m pip install --no-deps -e .
	$(PY) scripts/build_demo_model.py
	$(PY) scripts/sick_triples.py --setup

test:
	$(PY) -m pytest -q tests

.PHONY: setup test
