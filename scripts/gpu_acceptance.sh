#!/usr/bin/env bash
# The GPU figures the issues ask for, one step per call (each fits a 10-minute device call):
#
#   bench       hpsearch bench --device cuda --json           (issues 2 and 5: rows, roofline)
#   population  the default 100-trial, 20-epoch study, population training (issue 5: <= 90 s)
#   sequential  the same study one trial at a time, --population 1 (issue 5: accuracy to match)
#   report      report of the population study (issue 3: test accuracy): it tests the model the search
#               kept out of its GPU population, checked first on the validation split (its log says)
#   precision   the population study again with --precision tf32 and bf16 (speed and accuracy)
#
# Usage: bash scripts/gpu_acceptance.sh STEP [STEP ...]
# Results land in $OUT (the device tool's output folder) or ./gpu-results. On the project's device
# machine, prepare first from the repo root here: bash ../shared/tools/device-prep.sh, then carry
# [".whl", ".data"] and start the device command with the line that script prints.
# DEVICE, TRIALS, EPOCHS, SUBSET and DATA_DIR override the defaults (e.g. a CPU smoke run).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu-results}
DEVICE=${DEVICE:-cuda}
TRIALS=${TRIALS:-100}
EPOCHS=${EPOCHS:-20}
DATA_DIR=${DATA_DIR:-$( [ -d .data/fashion-mnist ] && echo .data/fashion-mnist || echo /usr/share/datasets/fashion-mnist )}
SUBSET_ARGS=()
[ -n "${SUBSET:-}" ] && SUBSET_ARGS=(--subset "$SUBSET")
mkdir -p "$OUT"
hp() { python3 -m hpsearch "$@"; }
study() {  # name, extra run flags...
  local name=$1; shift
  local start end
  start=$(date +%s.%N)
  hp run --trials "$TRIALS" --epochs "$EPOCHS" --dataset fashion-mnist --data-dir "$DATA_DIR" \
    --device "$DEVICE" --storage "sqlite:///$OUT/studies.db" --study "$name" "${SUBSET_ARGS[@]}" "$@" \
    2>&1 | tee "$OUT/$name.log"
  end=$(date +%s.%N)
  python3 - "$OUT/studies.db" "$name" "$start" "$end" <<'PY' | tee "$OUT/$name.summary.json"
import json, sys, optuna
optuna.logging.set_verbosity(optuna.logging.ERROR)
db, name, start, end = sys.argv[1:]
s = optuna.load_study(study_name=name, storage=f"sqlite:///{db}")
states = {}
for t in s.trials:
    states[t.state.name] = states.get(t.state.name, 0) + 1
print(json.dumps({"study": name, "wall_seconds_incl_startup": round(float(end) - float(start), 1),
                  "trials": states, "best_value": s.best_value, "best_params": s.best_params}, indent=1))
PY
}

[ $# -gt 0 ] || { sed -n 2,16p "$0"; exit 2; }
(command -v nvidia-smi >/dev/null && nvidia-smi -L; python3 -c "import torch; print('torch', torch.__version__)") \
  > "$OUT/machine.txt" 2>&1 || true
for step in "$@"; do
  case $step in
    bench) hp bench --device "$DEVICE" --data-dir "$DATA_DIR" --json "${SUBSET_ARGS[@]}" | tee "$OUT/bench.json" ;;
    population) study population ;;
    sequential) study sequential --population 1 ;;
    report) hp report --study population --storage "sqlite:///$OUT/studies.db" --out "$OUT/report" \
              --device "$DEVICE" --data-dir "$DATA_DIR" 2>&1 | tee "$OUT/report.log" ;;
    precision) study population-tf32 --precision tf32; study population-bf16 --precision bf16 ;;
    *) echo "unknown step $step (bench, population, sequential, report, precision)" >&2; exit 2 ;;
  esac
done
