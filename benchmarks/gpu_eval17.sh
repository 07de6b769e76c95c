#!/usr/bin/env bash
# Issue 17's table on the compose model, one GPU: calibrate + sensitivity + stage=evaluate at W4A8, W3A8
# and W8A4, 48 held-out prompts x 3 seed sets, every ablation row of conf/stage/evaluate.yaml (uniform,
# sqnr_only, decoupled, +joint, +joint+noise_power, +both, +both+guard, +both+guard+refine (shipped until
# session 27), +both+guard+refine+noise_power = what the pipeline ships, and sqnr_only+both+guard+refine),
# selection ranked by stage.select_metric (ssim by default).
#   bash benchmarks/gpu_eval17.sh [extra overrides for every run.py call...]
# Recipe quant=act_wide: the default recipe's weights (so W4A8/W3A8 are the default recipe's plans) and
# activations 3/4/5/6/8, which gives the W8A4 point freedom at the bytes of uniform A4. No OR-Tools and
# no W&B on the device: solvers highs, tracking disabled. The workspace stays outside $OUT (it holds
# more files than a device call brings back); $OUT (default outputs/gpu_eval17) gets evaluate.md,
# evaluate.json, the sensitivity and calibrate records and one log with every stage's wall time.
# Environment: PYTHON (default python3), DEVICE (default cuda), SELECTION_N (selection prompts, default
# 32: on a GPU more selection prompts cost little; the CPU pipeline keeps conf/prompts/compose.yaml's 8),
# EVAL_N (held-out prompts, default 48), WS (workspace, default a new temporary folder), MODEL (default
# compose; MODEL=tiny_random DEVICE=cpu EVAL_N=2 SELECTION_N=2 is a one-minute check of the script on a CPU),
# QUANT (recipe, default act_wide), KINDS (sensitivity kinds, default [w,a]; [w] when every point keeps
# activations uniform), POINTS (stage.points, default W4A8, W3A8, W8A4), METHODS (stage.methods, default
# null = uniform, sqnr_only, decoupled), VARIANTS (stage.variants, default conf/stage/evaluate.yaml's).
# The weight-rounding / more-widths / grouping rows (docs/method.md, "Session 28"):
#   QUANT=more_bits_gptq KINDS='[w]' METHODS='[uniform]' POINTS='[...W4A8, W3A8...]' VARIANTS='[...]' bash ...
set -u -o pipefail
out=${OUT:-outputs/gpu_eval17}
ws=${WS:-$(mktemp -d -t mixprec_gpu_eval17.XXXXXX)}
py=${PYTHON:-python3}
mkdir -p "$out"
log="$out/gpu_eval17.log"
common=("model=${MODEL:-compose}" "quant=${QUANT:-act_wide}" "device=${DEVICE:-cuda}" tracking=disabled "paths.workspace=$ws"
        "paths.outputs=${ws}_hydra" "$@")
step() {  # one stage, its wall time in the log; stop at the first failure
  local start=$SECONDS
  echo "== $* ($(date -u +%H:%M:%S))" | tee -a "$log"
  PYTHONUNBUFFERED=1 "$py" run.py "${common[@]}" "$@" >> "$log" 2>&1
  local rc=$?
  echo "== rc=$rc in $((SECONDS - start)) s: $1" | tee -a "$log"
  [ "$rc" = 0 ] || { tail -40 "$log"; exit "$rc"; }
}
default_points='[{name: W4A8, weight_target: 4, act: 8},{name: W3A8, weight_target: 3, act: 8},{name: W8A4, weight: 8, act_target: 4}]'
step stage=calibrate
# 64 single-layer perturbations per batched generation (1 sensitivity prompt): the GPU is otherwise idle
step stage=sensitivity stage.batch_size=64 stage.progress=false "stage.kinds=${KINDS:-[w,a]}"
step stage=evaluate stage.solver=highs stage.batch_size=64 stage.progress=false \
  "prompts.evaluation.n=${EVAL_N:-48}" "prompts.selection.n=${SELECTION_N:-32}" \
  "stage.points=${POINTS:-$default_points}" \
  "stage.methods=${METHODS:-null}" ${VARIANTS:+"stage.variants=$VARIANTS"}
cp "$ws/evaluate.md" "$ws/evaluate.json" "$ws/sensitivity.json" "$ws/calibrate.json" "$out/"
cat "$out/evaluate.md"
