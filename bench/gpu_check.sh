#!/usr/bin/env bash
# One prepared GPU run: everything the GPU figures need, in one call of under 8 minutes on one
# GPU, into one JSON with the device named (bench/results/gpu_check-cuda.json):
#   concept_time  sd15-random, 512 px, fp16 and bf16, the default and the lowest-memory setting
#                 (seconds per minibatch over STEPS minibatches, x 200 for a concept at the
#                 CLI's default; peak memory above the loaded model)
#   step_cost     seqlora / alternating time and memory per step (target <= 1.5x)
#   kept_graph    the twice-differentiated pass's kept graph and peak at 512 px, per memory setting
#   compile_check whether torch.compile speeds the once-differentiated pass, and whether the
#                 twice-differentiated pass runs compiled
# The goals it is read against: <= 120 s per concept on an H100-class GPU, <= 10 GB peak at
# 512 px, bilevel step <= 1.5x alternating.
#
#   bash bench/gpu_check.sh             # on the GPU machine (CUDA), from the repository root
#   bash bench/gpu_check.sh --dry-run   # the same steps on the CPU: tiny, 64 px, 2 minibatches (CI runs it)
# PYTHON=... picks the interpreter (default: .venv/bin/python if present, else python3).
# A GPU machine without network and without diffusers (the lent ones have torch, transformers,
# safetensors and scikit-image): `make gpu-wheels` here, then carry .cache/gpu-wheels with the
# call; the script installs what is missing from there, offline.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}"

if [ "${1:-}" = "--dry-run" ]; then
  DEVICE=cpu BASE=tiny RES=64 STEPS=2 STEP_COST_STEPS=1 BACKEND=aot_eager PASSES=1
  OUT=out/gpu_check-dryrun FINAL=out/gpu_check-dryrun/gpu_check-cpu.json
  export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
elif [ -z "${1:-}" ]; then
  DEVICE=cuda BASE=sd15-random RES=512 STEPS=10 STEP_COST_STEPS=3 BACKEND=inductor PASSES=5
  OUT=out/gpu_check FINAL=bench/results/gpu_check-cuda.json
else
  echo "usage: bash bench/gpu_check.sh [--dry-run]" >&2; exit 2
fi
if ! "$PY" -c "import diffusers" 2>/dev/null; then
  [ -d .cache/gpu-wheels ] || { echo "diffusers is missing: run 'make gpu-wheels' and carry .cache/gpu-wheels" >&2; exit 2; }
  "$PY" -m pip install -q --no-index --no-deps .cache/gpu-wheels/*.whl
fi
rm -rf "$OUT"; mkdir -p "$OUT"
start=$(date +%s)
# after every step the JSON so far is written, so a run cut short by the device's time limit
# still brings back what it measured
report() { "$PY" bench/gpu_check_report.py "$OUT" "$FINAL" --seconds $(( $(date +%s) - start )) "$@"; }
step() { echo "== $* ($(( $(date +%s) - start )) s)"; "$PY" "$@"; report --quiet || true; }

for dtype in fp16 bf16; do
  for memory in default low+checkpoint; do
    step bench/concept_time.py --base "$BASE" --device "$DEVICE" --dtype "$dtype" --resolution "$RES" \
      --steps "$STEPS" --memory "$memory" --images 2 --workdir "$OUT/work" --out "$OUT/concept_time"
  done
done
step bench/step_cost.py --base "$BASE" --device "$DEVICE" --resolution "$RES" --steps "$STEP_COST_STEPS" \
  --methods seqlora,alternating --workdir "$OUT/work" --out "$OUT/step_cost"
step bench/kept_graph.py --base "$BASE" --device "$DEVICE" --resolution "$RES" --modes default,checkpoint+slice \
  --out "$OUT/kept_graph"
step bench/compile_check.py --base "$BASE" --device "$DEVICE" --resolution "$RES" --backend "$BACKEND" \
  --passes "$PASSES" --out "$OUT/compile_check"
report
