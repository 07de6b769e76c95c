# Issue 17 on one GPU: two evaluate workspaces side by side (B: act_wide = default weight widths with
# nearest rounding + wide activations, every ablation row, W4A8 / W8A4 / W3A8; C: more_bits_gptq + groups
# 64/128, weights only, W4A8 / W3A8). Each point is its own evaluate call (calibrate/sensitivity reused),
# tarred into $OUT as soon as it ends.
S=$(date +%s)
SITE=$(mktemp -d)
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target $SITE .whlmin/*.whl || exit 1
export PYTHONPATH=$PWD:$SITE PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version,utilization.gpu,memory.used --format=csv > $OUT/gpu.txt
python3 -c "import torch, diffusers, sys; print(sys.version.split()[0], torch.__version__, diffusers.__version__)" >> $OUT/gpu.txt
pt() { case $1 in
  W4A8) echo '[{name: W4A8, weight_target: 4, act: 8}]';;
  W3A8) echo '[{name: W3A8, weight_target: 3, act: 8}]';;
  W8A4) echo '[{name: W8A4, weight: 8, act_target: 4}]';; esac; }
run_ws() {  # $1 = tag, $2.. = points; env from the caller
  local tag=$1; shift; local ws=$(mktemp -d)
  for p in "$@"; do
    local o=$(mktemp -d)
    OUT=$o WS=$ws POINTS="$(pt $p)" bash benchmarks/gpu_eval17.sh $EXTRA > /dev/null 2>&1
    echo "$tag $p rc=$? at $(( $(date +%s) - S )) s" >> $OUT/progress.txt
    sed -i "s#$ws#<ws>#g; s#$SITE#<site>#g; s#$PWD/#./#g" $o/* 2>/dev/null
    tar czf $OUT/${tag}_$p.tgz -C $o .
  done
}
( SELECTION_N=${SEL:-32} EXTRA= run_ws B W4A8 W8A4 W3A8 ) &
( . .wt/s28/wide_env.sh; SELECTION_N=${SEL:-32} EXTRA='quant.weight_group_sizes=[64,128]' run_ws C W4A8 W3A8 ) &
wait
echo "all done at $(( $(date +%s) - S )) s" >> $OUT/progress.txt
