cd . && . .venv/bin/activate && . .wt/s28/wide_env.sh
export OMP_NUM_THREADS=2 DEVICE=cpu EVAL_N=48 SELECTION_N=8 PYTHON=python
WS=<ws>
for p in W4A8 W3A8; do
  case $p in W4A8) POINTS='[{name: W4A8, weight_target: 4, act: 8}]';; W3A8) POINTS='[{name: W3A8, weight_target: 3, act: 8}]';; esac
  OUT=<runs>/out_c_$p WS=$WS POINTS="$POINTS" bash benchmarks/gpu_eval17.sh 'quant.weight_group_sizes=[64,128]'
  echo "$p rc=$? $(date)" >> <runs>/progress_c.txt
done
