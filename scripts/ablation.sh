#!/usr/bin/env bash
# The LLM2Vec ablation on the demo model, one row per call (see docs/results.md):
#   bash scripts/ablation.sh uni|bi|bi-mntp|bi-mntp-simcse|uni-simcse|bi-simcse [TASKS]
# Trains what the row needs (configs/ablation/*.json; outputs under runs/ablation/), then evaluates it.
# TASKS defaults to the final table (STS-B test, SICK-R test, STS12-16, Cranfield); checkpoints and
# settings were chosen on `dev` (STS-B dev, SICK-R trial) only.
set -euo pipefail
cd "$(dirname "$0")/.."
row=${1:?usage: scripts/ablation.sh ROW [TASKS]}
tasks=${2:-stsb-test,sick-r-test,sts12,sts13,sts14,sts15,sts16,cranfield}
model=models/smollm2-135m-instruct
out=runs/ablation/eval
mkdir -p "$out"
train() {  # train a stage unless its final adapter exists
  [ -f "runs/ablation/$1/final/adapter_model.safetensors" ] || python train.py --config "configs/ablation/$1.json" --progress false
}
ev() { python eval.py --model "$model" --tasks "$tasks" --autocast bfloat16 --batch-size 64 --out "$out/$row.$(echo "$tasks" | tr ',' '_' | cut -c1-40).json" "$@"; }
case "$row" in
  uni)            ev --causal --pooling mean && ev --causal --pooling weighted_mean --out "$out/uni-weighted.json" ;;
  bi)             ev --pooling mean ;;
  bi-mntp)        train mntp && ev --pooling mean --adapter runs/ablation/mntp/final ;;
  bi-mntp-simcse) train mntp && train mntp-simcse && ev --pooling mean --adapter runs/ablation/mntp/final --adapter runs/ablation/mntp-simcse/final ;;
  uni-simcse)     train uni-simcse && ev --causal --pooling mean --adapter runs/ablation/uni-simcse/final ;;
  bi-simcse)      train bi-simcse && ev --pooling mean --adapter runs/ablation/bi-simcse/final ;;
  *) echo "unknown row $row" >&2; exit 2 ;;
esac
