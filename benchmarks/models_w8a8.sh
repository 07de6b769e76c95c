#!/usr/bin/env bash
# Uniform W8A8 against the 16-bit denoiser for every full-size model family (random weights, eager +
# CUDA graph, channels-last): one stage=benchmark per model, its benchmark.json copied to $OUT.
#   bash benchmarks/models_w8a8.sh "$OUT" [extra run.py overrides...]
out=${1:?usage: models_w8a8.sh OUT_DIR [overrides]}; shift
mkdir -p "$out"
while read -r model res batches; do
  [ -z "$model" ] && continue
  ws=/tmp/mixprec_bench_$model
  rm -rf "$ws"
  start=$(date +%s)
  timeout 300 python3 run.py stage=benchmark model="$model" model.weights=random stage.calibration=random \
    "stage.plans=[uniform:w8a8]" "stage.resolutions=[$res]" "stage.batch_sizes=$batches" stage.compile=none \
    tracking=disabled paths.workspace="$ws" "$@" > "$ws.log" 2>&1
  rc=$?
  echo "$model: rc=$rc in $(( $(date +%s) - start )) s"
  grep -E "INFO|Error|error" "$ws.log" | grep -v -i warn | tail -4
  cp "$ws/benchmark.json" "$out/$model.json" 2>/dev/null || tail -30 "$ws.log"
done <<'MODELS'
lcm_sd15 512 [1,4]
sd_turbo 512 [1,4]
pixart_alpha 512 [2,8]
sdxl_base 1024 [2,8]
MODELS
