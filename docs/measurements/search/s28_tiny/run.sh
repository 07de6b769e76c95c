#!/usr/bin/env bash
# Session 28, tiny model W4A8 (64 held-out prompts x 3 seed sets, selection ranked by ssim): the shipped
# noise-power rows without refinement, with refinement keeping moves by the ranking alone (accept: key,
# session 27) and with accept: no_worse (session 28)
cd "$(dirname "$0")/../../../.."  # the repository root
export PYTHONPATH=$PWD OMP_NUM_THREADS=${THREADS:-1} PYTHONUNBUFFERED=1
ws=${WS:-$(mktemp -d -t mixprec_tiny_s28.XXXXXX)}
common=(model=tiny tracking=disabled threads=${THREADS:-1} paths.workspace=$ws paths.outputs=${ws}_hydra)
for st in calibrate sensitivity; do
  echo "== $st start $(date -u +%T)"; s=$SECONDS
  python run.py "${common[@]}" stage=$st 2>&1 | grep -v Warn | tail -3
  echo "== $st done in $((SECONDS-s)) s $(date -u +%T)"
done
R='program:both,guard:true,quality_metric:noise_power'
echo "== evaluate start $(date -u +%T)"; s=$SECONDS
python run.py "${common[@]}" stage=evaluate stage.progress=false 'stage.points=[{name:W4A8,weight_target:4,act:8}]' \
  'stage.methods=[uniform]' \
  "stage.variants=[{name:np_both+guard,$R},{name:np_both+guard+refine_key,$R,refine:{evaluations:16,seed:0,accept:key}},{name:np_both+guard+refine,$R,refine:{evaluations:16,seed:0,accept:no_worse}}]" || exit 1
echo "== evaluate done in $((SECONDS-s)) s $(date -u +%T)"
cp "$ws/evaluate.md" "$ws/evaluate.json" "$(dirname "$0")/"
