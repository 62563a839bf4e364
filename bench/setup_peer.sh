#!/usr/bin/env bash
# Creates bench/.peer-venv with the upstream llm2vec package (the peer we benchmark against).
# Kept apart from l2v's own requirements: llm2vec pins transformers==4.44.2.
set -euo pipefail
cd "$(dirname "$0")"
VENV=.peer-venv
[ -x "$VENV/bin/python" ] || python -m venv "$VENV"
"$VENV/bin/python" -m pip install -q --disable-pip-version-check torch==2.13.0
"$VENV/bin/python" -m pip install -q --disable-pip-version-check llm2vec==0.2.3 transformers==4.44.2 peft psutil
"$VENV/bin/python" -c "import llm2vec, transformers, peft; print('peer ready: llm2vec', llm2vec.__version__ if hasattr(llm2vec, '__version__') else '0.2.3', 'transformers', transformers.__version__, 'peft', peft.__version__)"
