#!/usr/bin/env bash
# The upstream side of the bench: llm2vec 0.2.3 with the versions it pins, apart from l2v's own requirements.
#   bash bench/setup_peer.sh                  # bench/.peer-venv (torch 2.13.0 CPU): run.py uses it by default
#   bash bench/setup_peer.sh --wheels DIR [PYVER]
#       # only the pinned wheels, for a machine without network that has torch (e.g. the GPU one); PYVER
#       # (default: this python's, e.g. 3.11) must be that machine's: the tokenizers wheel is built per version.
#       # run.py --peer-wheels DIR unpacks them onto the upstream process's PYTHONPATH only.
set -euo pipefail
PINS="transformers==4.44.2 tokenizers==0.19.1 huggingface_hub==0.36.2 peft==0.21.2"
if [ "${1:-}" = "--wheels" ]; then
    DIR=$2
    PYVER=${3:-$(python -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")')}
    python -m pip download -q --no-deps --only-binary=:all: --python-version "$PYVER" \
        --platform manylinux2014_x86_64 -d "$DIR" $PINS
    python -m pip wheel -q --no-deps -w "$DIR" llm2vec==0.2.3  # an sdist on PyPI: built once here
    ls "$DIR"
    exit 0
fi
cd "$(dirname "$0")"
VENV=.peer-venv
[ -x "$VENV/bin/python" ] || python -m venv "$VENV"
"$VENV/bin/python" -m pip install -q --disable-pip-version-check torch==2.13.0
"$VENV/bin/python" -m pip install -q --disable-pip-version-check llm2vec==0.2.3 $PINS accelerate psutil
"$VENV/bin/python" -c "import llm2vec, transformers, peft; print('peer ready: transformers', transformers.__version__, 'peft', peft.__version__)"
