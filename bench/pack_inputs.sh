#!/usr/bin/env bash
# Copies the bench's text inputs and the demo tokenizer's files into one small folder (default bench/.inputs,
# ~6 MB, git-ignored) for a machine without ../shared, e.g. a GPU one: python bench/run.py --gpu --data bench/.inputs
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-bench/.inputs}
DATA=${DATA:-../shared/data}
TOK=models/smollm2-135m-instruct
[ -f "$TOK/tokenizer.json" ] || TOK=../shared/reference/smollm2-135m-instruct
mkdir -p "$OUT"
install -m 644 "$DATA/stsbenchmark/sts-test.csv" "$OUT/sts-test.csv"
install -m 644 "$DATA/wiki1m_subset/wiki1m_for_simcse.head11914.txt" "$OUT/wiki1m.txt"
install -m 644 "$DATA/retrieval/agentset_msmarco_subset/corpus.jsonl" "$OUT/msmarco-corpus.jsonl"
install -m 644 -t "$OUT" "$TOK/tokenizer.json" "$TOK/tokenizer_config.json" "$TOK/special_tokens_map.json"
du -sh "$OUT"
