#!/usr/bin/env bash
# the session-27 defaults (selection ranked by SSIM, weight plans with quality_metric=noise_power) on the default
# recipe's sweep (a copy of ws_default, with its content-SQNR records for the sqnr_only rows): W4A8 and W3A8,
# uniform, sqnr_only, and the shipped row
cd "$(dirname "$0")/../../../../.."  # the repository root; outputs/ws_final = a copy of outputs/ws_default (calibration, sensitivity, evaluate/sqnr_content.jsonl); run as PTS=W3A8 run.sh, or PTS=W4A8 WS=outputs/ws_final32 run.sh prompts.selection.n=32
export PYTHONPATH=$PWD OMP_NUM_THREADS=2 PYTHONUNBUFFERED=1
ws=${WS:-outputs/ws_final}
PTS=${PTS:-W3A8}; case $PTS in W3A8) PTS="[{name:W3A8,weight_target:3,act:8}]";; W4A8) PTS="[{name:W4A8,weight_target:4,act:8}]";; esac
echo "== evaluate start $(date -u +%T)"; s=$SECONDS
/usr/bin/time -v python run.py model=compose tracking=disabled threads=2 paths.workspace=$ws paths.outputs=${ws}_hydra \
  stage=evaluate stage.progress=false "stage.points=$PTS" \
  prompts.evaluation.n=${EVAL_N:-48} "stage.methods=${METHODS:-[uniform,sqnr_only]}" "$@" \
  'stage.variants=[{name:decoupled+both+guard+refine+noise_power,program:both,guard:true,quality_metric:noise_power,refine:{evaluations:16,seed:0,operating_point:false}}]' || exit 1
echo "== evaluate done in $((SECONDS-s)) s $(date -u +%T)"
