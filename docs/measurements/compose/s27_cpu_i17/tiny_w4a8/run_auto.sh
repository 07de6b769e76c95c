#!/usr/bin/env bash
# tiny model W4A8 (docs/method.md "Measured: the tiny model at W4A8"): the shipped row with sqnr_db and with noise_power
cd "$(dirname "$0")/../../../../.."  # the repository root
export PYTHONPATH=$PWD OMP_NUM_THREADS=${THREADS:-1} PYTHONUNBUFFERED=1
py=python
ws=outputs/ws_tiny
common=(model=tiny tracking=disabled threads=${THREADS:-1} paths.workspace=$ws paths.outputs=${ws}_hydra)
for st in calibrate sensitivity; do
  echo "== $st start $(date -u +%T)"; s=$SECONDS
  /usr/bin/time -v $py run.py "${common[@]}" stage=$st || exit 1
  echo "== $st done in $((SECONDS-s)) s $(date -u +%T)"
done
echo "== evaluate start $(date -u +%T)"; s=$SECONDS
/usr/bin/time -v $py run.py "${common[@]}" stage=evaluate stage.progress=false 'stage.points=[{name:W4A8,weight_target:4,act:8}]' \
  'stage.methods=[uniform]' \
  'stage.variants=[{name:decoupled+both+guard+refine,program:both,guard:true,refine:{evaluations:16,seed:0,operating_point:false}},{name:np_both+guard+refine,program:both,guard:true,quality_metric:noise_power,refine:{evaluations:16,seed:0,operating_point:false}}]' || exit 1
echo "== evaluate done in $((SECONDS-s)) s $(date -u +%T)"
