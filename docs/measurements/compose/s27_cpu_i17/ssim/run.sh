#!/usr/bin/env bash
# selection ranked by SSIM (stage.select_metric=ssim) on the default recipe's sweep (a copy of ws_default)
cd "$(dirname "$0")/../../../../.."  # the repository root; outputs/ws_np_ssim = a copy of outputs/ws_default (calibration + sensitivity)
export PYTHONPATH=$PWD OMP_NUM_THREADS=2 PYTHONUNBUFFERED=1
ws=${WS:-outputs/ws_np_ssim}
PTS=${PTS:-W4A8}; [ "$PTS" = W4A8 ] && PTS="[{name:W4A8,weight_target:4,act:8}]"
echo "== evaluate start $(date -u +%T)"; s=$SECONDS
/usr/bin/time -v python run.py model=compose tracking=disabled threads=2 paths.workspace=$ws paths.outputs=${ws}_hydra \
  stage=evaluate stage.progress=false "stage.points=$PTS" prompts.evaluation.n=${EVAL_N:-48} \
  stage.select_metric=${METRIC:-ssim} 'stage.methods=[uniform]' \
  'stage.variants=[{name:np_both+guard,program:both,guard:true,quality_metric:noise_power},{name:np_both+guard+refine,program:both,guard:true,quality_metric:noise_power,refine:{evaluations:16,seed:0,operating_point:false}},{name:decoupled+both+guard+refine,program:both,guard:true,refine:{evaluations:16,seed:0,operating_point:false}}]' "$@" || exit 1
echo "== evaluate done in $((SECONDS-s)) s $(date -u +%T)"
