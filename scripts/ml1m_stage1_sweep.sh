#!/usr/bin/env bash
# Stage 1 (the costly, text-free stage) of the ML-1M recipe for several variants at once on one GPU,
# each under a wall-clock budget; keeps the best checkpoint per backbone (validation NDCG@10).
# The variants are the lines of $SWEEP_FILE (default configs/ml1m-sweep.txt).
# Stages 2-3 and the evaluation then run on the CPU from those checkpoints (make ml1m ML1M_STAGE1=OUT_DIR).
#   bash scripts/ml1m_stage1_sweep.sh DATA_DIR OUT_DIR [MINUTES]
set -uo pipefail
export PYTHONSAFEPATH=1   # never the repository root on sys.path: its kernels/ would hide the installed package
cd "$(dirname "$0")/.."
DATA=${1:?ml-1m folder}; OUT=${2:?output folder}; MIN=${3:-4.5}
PY=${PYTHON:-python3}
DEVICE=${DEVICE:-cuda}; EXTRA=${EXTRA:-}   # EXTRA: flags added to every run (e.g. a quick CPU smoke test)
# KEEP_RUNS=1 keeps every run's checkpoint (OUT/runs.tar), not only the best per backbone
mkdir -p "$OUT/runs"
run() {  # name config extra-flags...
  local name=$1 cfg=$2; shift 2
  OMP_NUM_THREADS=2 PYTHONUNBUFFERED=1 $PY -m dpr.cli.train --dataset ml-1m --data-dir "$DATA" --stages 1 \
    --config "$cfg" --device "$DEVICE" --stage1-max-minutes "$MIN" $EXTRA "$@" --out "$OUT/runs/$name.pt" \
    > "$OUT/runs/$name.log" 2>&1 &
}
# one run per line of the sweep file: NAME CONFIG [FLAGS...]
SWEEP_FILE=${SWEEP_FILE:-configs/ml1m-sweep.txt}
while read -r name cfg flags; do
  [ -z "$name" ] || [ "${name:0:1}" = "#" ] && continue
  run "$name" "$cfg" $flags
done < "$SWEEP_FILE"
wait
$PY - "$OUT" <<'PYEOF'
import json, shutil, sys
from pathlib import Path
from dpr.checkpoint import load_checkpoint
out = Path(sys.argv[1]); rows = []
for p in sorted((out / "runs").glob("*.pt")):
    ck = load_checkpoint(p); r = ck.meta["stage_results"]["1"]
    rows.append({"run": p.stem, "backbone": ck.model_config.backbone, "d": ck.model_config.d,
                 "best_valid_ndcg@10": r["best_valid_ndcg@10"], "epochs": r["epochs"],
                 "seconds": round(r["seconds"], 1), "history": r["history"]})
for r in sorted(rows, key=lambda r: -r["best_valid_ndcg@10"]):
    best_ep = max((h for h in r["history"] if "ndcg@10" in h), key=lambda h: h["ndcg@10"])["epoch"]
    print(f"{r['run']:18s} valid ndcg@10 {r['best_valid_ndcg@10']:.4f}  best epoch {best_ep:4d} of {r['epochs']:4d}  {r['seconds']:6.0f}s")
for bb in ("sasrec", "gru4rec"):
    c = [r for r in rows if r["backbone"] == bb]
    if c:
        best = max(c, key=lambda r: r["best_valid_ndcg@10"])
        shutil.copy(out / "runs" / f"{best['run']}.pt", out / f"{bb}_s1.pt")
        print(f"best {bb}: {best['run']}")
(out / "sweep.json").write_text(json.dumps(rows, indent=1))
PYEOF
tar czf "$OUT/sweep_logs.tgz" -C "$OUT/runs" $(cd "$OUT/runs" && ls *.log)
# KEEP_RUNS=1: every run's checkpoint, in one tar (a device tool returns only so many files)
if [ -n "${KEEP_RUNS:-}" ]; then rm -f "$OUT"/runs/*.log; tar cf "$OUT/runs.tar" -C "$OUT" runs; fi
rm -rf "$OUT/runs"
