#!/usr/bin/env bash
# The LLM2Vec ablation on the demo model, one row per call (docs/results.md has the table):
#   bash scripts/ablation.sh ROW [TASKS]
#   ROW: uni | uni-weighted | bi | bi-mntp | bi-mntp-simcse | bi-mntp-simcse-lowlr | uni-simcse | bi-simcse
#        | bi-mntp-lr1e-3 | bi-mntp-lr1e-3-simcse   (second attempt: MNTP at lr 1e-3, SimCSE at batch 64)
# Trains what the row needs (configs/ablation/*.json, outputs in runs/ablation/) unless its adapter
# exists, then evaluates (bf16 autocast) into runs/ablation/eval/ROW.<tasks>.json.
# TASKS defaults to the final table; settings and checkpoints were chosen on STS-B dev only.
set -euo pipefail
cd "$(dirname "$0")/.."
row=${1:?usage: scripts/ablation.sh ROW [TASKS]}
tasks=${2:-stsb-test,sick-r-test,sts12,sts13,sts14,sts15,sts16,cranfield}
train() {  # one stage, skipped when its final adapter is already there
  [ -f "runs/ablation/$1/final/adapter_model.safetensors" ] || python train.py --config "configs/ablation/$1.json" --progress false
}
ev() {
  python eval.py --model models/smollm2-135m-instruct --tasks "$tasks" --autocast bfloat16 --batch-size 64 \
    --out "runs/ablation/eval/$row.${tasks//,/+}.json" "$@"
}
case "$row" in
  uni)            ev --causal --pooling mean ;;
  uni-weighted)   ev --causal --pooling weighted_mean ;;
  bi)             ev --pooling mean ;;
  bi-mntp)        train mntp && ev --pooling mean --adapter runs/ablation/mntp/final ;;
  bi-mntp-simcse) train mntp && train mntp-simcse &&
                  ev --pooling mean --adapter runs/ablation/mntp/final --adapter runs/ablation/mntp-simcse/final ;;
  bi-mntp-simcse-lowlr) train mntp && train mntp-simcse-lowlr &&
                  ev --pooling mean --adapter runs/ablation/mntp/final --adapter runs/ablation/mntp-simcse-lowlr/final ;;
  # MNTP at lr 1e-3: the step-40 checkpoint is the one chosen on STS-B dev (49.8; step 120: 36.4).
  bi-mntp-lr1e-3) train mntp-lr1e-3 && ev --pooling mean --adapter runs/ablation/mntp-lr1e-3/checkpoint-000040 ;;
  bi-mntp-lr1e-3-simcse) train mntp-lr1e-3 && train mntp-lr1e-3-simcse &&
                  ev --pooling mean --adapter runs/ablation/mntp-lr1e-3/checkpoint-000040 --adapter runs/ablation/mntp-lr1e-3-simcse/final ;;
  uni-simcse)     train uni-simcse && ev --causal --pooling mean --adapter runs/ablation/uni-simcse/final ;;
  bi-simcse)      train bi-simcse && ev --pooling mean --adapter runs/ablation/bi-simcse/final ;;
  *) echo "unknown row $row" >&2; exit 2 ;;
esac
