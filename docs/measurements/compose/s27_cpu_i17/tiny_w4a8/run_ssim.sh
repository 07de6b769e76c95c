#!/usr/bin/env bash
# tiny model W4A8 with selection ranked by ${METRIC:-ssim}: the shipped rows with sqnr_db and noise_power
cd "$(dirname "$0")/../../../../.."  # the repository root (outputs/ws_tiny from run_auto.sh)
export PYTHONPATH=$PWD OMP_NUM_THREADS=1 PYTHONUNBUFFERED=1
ws=outputs/ws_tiny
echo "== evaluate start $(date -u +%T)"; s=$SECONDS
/usr/bin/time -v python run.py model=tiny tracking=disabled threads=1 paths.workspace=$ws paths.outputs=${ws}_hydra \
  stage=evaluate stage.progress=false 'stage.points=[{name:W4A8,weight_target:4,act:8}]' stage.select_metric=${METRIC:-ssim} \
  'stage.methods=[uniform]' \
  'stage.variants=[{name:decoupled+both+guard+refine,program:both,guard:true,refine:{evaluations:16,seed:0,operating_point:false}},{name:np_both+guard+refine,program:both,guard:true,quality_metric:noise_power,refine:{evaluations:16,seed:0,operating_point:false}}]' || exit 1
echo "== evaluate done in $((SECONDS-s)) s $(date -u +%T)"
