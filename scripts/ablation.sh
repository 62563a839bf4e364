#!/usr/bin/env bash
# The demo model's results table, one row per call (docs/results.md):
#   bash scripts/ablation.sh ROW [TASKS]       then   python scripts/results_table.py
#   ROW: uni | uni-weighted | bi | prompteol | prompt-ke           (no training)
#        | paper | paper-weighted                                 (Bi+MNTP+SimCSE, the paper's recipe)
#        | paper-gpu | paper-gpu-weighted                         (the same at the paper's budget: needs a GPU)
#        | prompteol-simcse | prompteol-simcse-instruction        (causal + PromptEOL + SimCSE)
#        | supervised-sick | supervised-sick-eol | supervised-sick-548   (SICK-train triples: KE prompt; PromptEOL; the first set)
#        | supervised-sick-cosent                               (supervised-sick, then CoSENT on SICK-train's graded pairs)
#        | supervised-sick-b256                                 (supervised-sick at batch 256: needs a GPU)
#        | supervised-sick-b256-cpu                             (the same in cached micro-batches of 32: a CPU)
#        | bi-mntp-lr1e-3 | bi-mntp-lr1e-3-simcse | uni-simcse | bi-simcse   (Bi+MNTP at one CPU-hour; SimCSE ablations)
# Trains what the row needs (configs/ablation/*.json, outputs in runs/ablation/) unless its adapter
# exists, then evaluates into docs/results/ROW.json. TASKS defaults to the dev sets and the 7 STS test
# sets; checkpoints and settings were chosen on the dev sets only. Several jobs on a 2-core CPU:
# OMP_NUM_THREADS=1 each.
set -euo pipefail
cd "$(dirname "$0")/.."
# PY picks the interpreter; default `python`, else `python3` (some GPU images have only python3)
py=${PY:-$(command -v python || command -v python3 || true)}
[ -n "$py" ] || { echo "scripts/ablation.sh: neither python nor python3 is on PATH (or set PY)" >&2; exit 2; }
row=${1:?usage: scripts/ablation.sh ROW [TASKS]}
tasks=${2:-dev,sts}
prompt='This sentence : "{text}" means in one word:"'
[ -f data/sts-dev-500.csv ] || { mkdir -p data && head -500 ../shared/data/stsbenchmark/sts-dev.csv > data/sts-dev-500.csv; }
train() {  # one stage, skipped when its final adapter is already there
  [ -f "runs/ablation/$1/final/adapter_model.safetensors" ] || "$py" train.py --config "configs/ablation/$1.json" --progress false
}
# Every row states its settings: --no-causal, no prompt and mean pooling unless it says otherwise (the demo
# model folder carries encoder settings of its own, which would otherwise apply)
ev() { "$py" eval.py --tasks "$tasks" --out "docs/results/$row.json" --no-causal --prompt "" --pooling mean "$@"; }
a=runs/ablation
eol=(--causal --pooling last_token --prompt "$prompt")  # PromptEOL: causal, the prompt, its last token
# KE: PromptEOL behind a knowledge-enhancement prefix (Zhang et al. 2024, arXiv 2404.03921); read from the
# supervised row's config, so that its evaluation always uses the prompt it was trained with
ke=(--causal --pooling last_token --prompt "$("$py" -c 'import json; print(json.load(open("configs/ablation/supervised-sick.json"))["prompt"])')")
case "$row" in
  uni)            ev --causal --pooling mean ;;
  uni-weighted)   ev --causal --pooling weighted_mean ;;
  bi)             ev --pooling mean ;;
  prompteol)      ev "${eol[@]}" --sts-instruction '' ;;
  prompt-ke)      ev "${ke[@]}" --sts-instruction '' ;;
  paper)          train paper-mntp && train paper-simcse &&
                  ev --pooling mean --adapter $a/paper-mntp/final --adapter $a/paper-simcse/final ;;
  paper-weighted) train paper-mntp && train paper-simcse &&
                  ev --pooling weighted_mean --adapter $a/paper-mntp/final --adapter $a/paper-simcse/final ;;
  # the paper's budget (MNTP 1000 x 32 x 512, SimCSE 1000 x 128); evaluated in float32 like the CPU rows
  paper-gpu)      train paper-gpu-mntp && train paper-gpu-simcse && ev --pooling mean --autocast none \
                    --adapter $a/paper-gpu-mntp/final --adapter $a/paper-gpu-simcse/final ;;
  paper-gpu-weighted) train paper-gpu-mntp && train paper-gpu-simcse && ev --pooling weighted_mean --autocast none \
                    --adapter $a/paper-gpu-mntp/final --adapter $a/paper-gpu-simcse/final ;;
  prompteol-simcse) train prompteol-simcse && ev "${eol[@]}" --sts-instruction '' --adapter $a/prompteol-simcse/final ;;
  prompteol-simcse-instruction) train prompteol-simcse-instruction &&
                  ev "${eol[@]}" --adapter $a/prompteol-simcse-instruction/final ;;
  supervised-sick) "$py" scripts/sick_triples.py &&  # deterministic: an older set is never used
                  train supervised-sick && ev "${ke[@]}" --sts-instruction '' --adapter $a/supervised-sick/final ;;
  supervised-sick-cosent) "$py" scripts/sick_triples.py && "$py" scripts/sick_triples.py --pairs &&
                  train supervised-sick && train supervised-sick-cosent &&
                  ev "${ke[@]}" --sts-instruction '' --adapter $a/supervised-sick/final --adapter $a/supervised-sick-cosent/final ;;
  supervised-sick-b256) "$py" scripts/sick_triples.py && train supervised-sick-b256 &&
                  ev "${ke[@]}" --sts-instruction '' --autocast none --adapter $a/supervised-sick-b256/final ;;
  supervised-sick-b256-cpu) "$py" scripts/sick_triples.py && train supervised-sick-b256-cpu &&
                  ev "${ke[@]}" --sts-instruction '' --autocast none --adapter $a/supervised-sick-b256-cpu/final ;;
  supervised-sick-eol) "$py" scripts/sick_triples.py &&
                  train supervised-sick-eol && ev "${eol[@]}" --sts-instruction '' --adapter $a/supervised-sick-eol/final ;;
  supervised-sick-548) "$py" scripts/sick_triples.py --negatives contradiction --min-related 0 --out data/sick-train-triples-548.jsonl &&
                  train supervised-sick-548 && ev "${eol[@]}" --sts-instruction '' --adapter $a/supervised-sick-548/final ;;
  # Bi+MNTP at one CPU-hour: MNTP at lr 1e-3, its step-40 checkpoint chosen on STS-B dev; SimCSE 80 x 64 at 32 tokens
  bi-mntp-lr1e-3) train mntp-lr1e-3 && ev --pooling mean --adapter $a/mntp-lr1e-3/checkpoint-000040 ;;
  bi-mntp-lr1e-3-simcse) train mntp-lr1e-3 && train mntp-lr1e-3-simcse &&
                  ev --pooling mean --adapter $a/mntp-lr1e-3/checkpoint-000040 --adapter $a/mntp-lr1e-3-simcse/final ;;
  uni-simcse)     train uni-simcse && ev --causal --pooling mean --adapter $a/uni-simcse/final ;;
  bi-simcse)      train bi-simcse && ev --pooling mean --adapter $a/bi-simcse/final ;;
  *) echo "unknown row $row" >&2; exit 2 ;;
esac
