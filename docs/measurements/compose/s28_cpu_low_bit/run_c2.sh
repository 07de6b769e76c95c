cd . && . .venv/bin/activate
while pgrep -f run_c.sh > /dev/null; do sleep 10; done
export OMP_NUM_THREADS=2
ws=<ws>
echo "== sqnr_only start $(date -u +%T)"; s=$SECONDS
python run.py model=compose quant=more_bits_gptq 'quant.weight_group_sizes=[64,128]' device=cpu tracking=disabled paths.workspace=$ws paths.outputs=${ws}_hydra \
  stage=evaluate stage.solver=highs stage.batch_size=64 stage.progress=false prompts.evaluation.n=48 prompts.selection.n=8 \
  'stage.points=[{name: W4A8, weight_target: 4, act: 8},{name: W3A8, weight_target: 3, act: 8}]' 'stage.methods=[sqnr_only]' \
  'stage.variants=[{name: sqnr_only+gptq+more_widths+groups+shipped, metric: sqnr_only, program: both, guard: true, refine: {evaluations: 16, seed: 0, operating_point: false}, groups: true}]' > <runs>/c2.log 2>&1
echo "== sqnr_only rc=$? in $((SECONDS-s)) s $(date -u +%T)"
mkdir -p <runs>/out_c_sqnr && cp $ws/evaluate.md $ws/evaluate.json <runs>/out_c_sqnr/
