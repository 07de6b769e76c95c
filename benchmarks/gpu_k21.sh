#!/usr/bin/env bash
# Issue 21, compiled bf16 vs W8A8 at 512 px batch 1, in one device call of at most T_TOTAL seconds
# (default 280): benchmarks/issue21_compiled.py (docs/kernels.md, "Session 26").
# Run from the repository root of a device call, or from a copy of this tree under it
# (e.g. carry=[".wt/s26-k21", ".whlmin"], command "bash .wt/s26-k21/benchmarks/gpu_k21.sh"). Writes to $OUT:
# issue21_compiled_h200.json (rewritten after every step), issue21_compiled_h200.log, gpu.txt.
S=$(date +%s)
T_TOTAL=${T_TOTAL:-280}
HERE=$(cd "$(dirname "$0")/.." && pwd)  # the repository root (this file is in benchmarks/)
OUT=${OUT:-$HERE/outputs/gpu_k21}  # a device call sets OUT
mkdir -p "$OUT"
WHL=""
for d in "$HERE/.whlmin" "$HERE/../../.whlmin" "$PWD/.whlmin"; do
  if ls "$d"/*.whl >/dev/null 2>&1; then WHL=$d; break; fi
done
if [ -n "$WHL" ]; then
  SITE=$(mktemp -d)  # the carried wheels, installed beside the image's torch
  # optional extra wheels (e.g. fbgemm-gpu-genai for kernels.low_bit=fbgemm) in .whlx beside .whlmin
  EXTRA=$(ls "$WHL"/../.whlx/*.whl 2>/dev/null)
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" "$WHL"/*.whl $EXTRA \
    || { echo "wheel install from $WHL failed" | tee "$OUT/issue21_compiled_h200.log"; exit 1; }
  export PYTHONPATH=$SITE
else
  echo "no .whlmin found: using the installed diffusers" | tee -a "$OUT/issue21_compiled_h200.log"
fi
cd "$HERE" || exit 1
export PYTHONPATH=$HERE${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version,utilization.gpu,memory.used,clocks.sm,clocks.max.sm --format=csv \
  > "$OUT/gpu.txt" 2>&1
LEFT=$((T_TOTAL - $(date +%s) + S))
# the script's budget starts after its imports (~15-25 s); timeout kills it 5 s before the end at the latest
timeout $((LEFT - 5)) python3 benchmarks/issue21_compiled.py --budget $((LEFT - 40)) "$@" \
  --out "$OUT/issue21_compiled_h200.json" 2>&1 | grep --line-buffered -v "Enum subclass\|kept in float32\|torchao" \
  | tee -a "$OUT/issue21_compiled_h200.log" | tail -40
echo "total $(( $(date +%s) - S ))s" | tee -a "$OUT/issue21_compiled_h200.log"
