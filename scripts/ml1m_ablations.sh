#!/usr/bin/env bash
# ML-1M ablations of the steering design (issue 7), all on the same stage-1 SASRec backbone: each run
# redoes stages 2-3 with one change and is evaluated on the same users as the default row.
#   bash scripts/ml1m_ablations.sh [STAGE1_CKPT] [OUT_DIR] [EVAL_USERS]
set -euo pipefail
export PYTHONSAFEPATH=1   # never the repository root on sys.path: its kernels/ would hide the installed package
cd "$(dirname "$0")/.."
S1=${1:-build/ml1m-s1/sasrec_s1.pt}; OUT=${2:-build/ml1m/ablations}; USERS=${3:-2000}
PY=${PYTHON:-.venv/bin/python}; DATA=${ML1M_DIR:-../shared/data/ml-1m}
mkdir -p "$OUT"
train() {  # name flags...
  local name=$1; shift
  [ -f "$OUT/$name.pt" ] || $PY -m dpr.cli.train --dataset ml-1m --data-dir "$DATA" --config configs/ml1m-sasrec.json \
    --resume "$S1" --out "$OUT/$name.pt" "$@" > "$OUT/$name.log" 2>&1
  $PY -m dpr.cli.eval "$OUT/$name.pt" --dataset ml-1m --data-dir "$DATA" --max-users "$USERS" \
    --tasks standard,positive,negative,compound --no-heldout --json "$OUT/$name.json" >> "$OUT/$name.log" 2>&1
  echo "$name done"
}
train default         --stages 2,3
train no-fusion       --stages 2,3 --fusion add
train no-moe          --stages 2,3 --moe shared
train no-stage2       --stages 3
train top1            --stages 2,3 --top-k 1
train top4-all        --stages 2,3 --top-k 4
train no-s3-mask      --stages 2,3 --no-stage3-mask-history
train no-keep-order   --stages 2,3 --neg-keep-lambda 0 --neg-lambda 1
$PY -m dpr.eval.results_md "$OUT"/{default,no-fusion,no-moe,no-stage2,top1,top4-all,no-s3-mask,no-keep-order}.json --ablation
