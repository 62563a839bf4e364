# make setup: install everything, build the demo model and the SICK triples and pairs; make test: run the tests.
PY ?= python

setup:
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install torch==2.13.0
	$(PY) -m pip install -r requirements-dev.txt
	$(PY) scripts/build_demo_model.py
	-$(PY) scripts/sick_triples.py  # data/sick-train-triples.jsonl, when ../shared/data is there
	-$(PY) scripts/sick_triples.py --pairs  # data/sick-train-pairs.jsonl (for --objective cosent)

test:
	$(PY) -m pytest -q tests

.PHONY: setup test
