# Issue 17 on one GPU, alone: workspace B (quant=act_wide), every row of conf/stage/evaluate.yaml
# (session 28: refinement accept no_worse vs key), W4A8 / W8A4 / W3A8, 48 held-out prompts x 3 seed
# sets, 32 selection prompts; each point tarred into $OUT as soon as it ends.
S=$(date +%s)
SITE=$(mktemp -d)
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target $SITE .whlmin/*.whl || exit 1
export PYTHONPATH=$PWD:$SITE PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version,utilization.gpu,memory.used --format=csv > $OUT/gpu.txt
python3 -c "import torch, diffusers, sys; print(sys.version.split()[0], torch.__version__, diffusers.__version__)" >> $OUT/gpu.txt
ws=$(mktemp -d)
for p in W4A8 W8A4 W3A8; do
  [ $(( $(date +%s) - S )) -lt ${LAST_START:-470} ] || { echo "skip $p at $(( $(date +%s) - S )) s" >> $OUT/progress.txt; continue; }
  case $p in
    W4A8) pts='[{name: W4A8, weight_target: 4, act: 8}]';;
    W3A8) pts='[{name: W3A8, weight_target: 3, act: 8}]';;
    W8A4) pts='[{name: W8A4, weight: 8, act_target: 4}]';; esac
  o=$(mktemp -d)
  OUT=$o WS=$ws POINTS="$pts" SELECTION_N=32 bash benchmarks/gpu_eval17.sh > /dev/null 2>&1
  echo "$p rc=$? at $(( $(date +%s) - S )) s" >> $OUT/progress.txt
  sed -i "s#$ws#<ws>#g; s#$SITE#<site>#g; s#$PWD/#./#g" $o/* 2>/dev/null
  tar czf $OUT/B2_$p.tgz -C $o .
done
echo "all done at $(( $(date +%s) - S )) s" >> $OUT/progress.txt
