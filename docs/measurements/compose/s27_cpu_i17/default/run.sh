#!/usr/bin/env bash
# default recipe: calibrate, sensitivity, evaluate W4A8+W3A8 at 48 held-out prompts x 3 seed sets
cd "$(dirname "$0")/../../../../.."  # the repository root
export PYTHONPATH=$PWD OMP_NUM_THREADS=2 PYTHONUNBUFFERED=1
py=python
ws=outputs/ws_default
common=(model=compose tracking=disabled threads=2 paths.workspace=$ws paths.outputs=outputs/hydra_default)
for st in calibrate sensitivity; do
  echo "== $st start $(date -u +%T)"; s=$SECONDS
  /usr/bin/time -v $py run.py "${common[@]}" stage=$st || exit 1
  echo "== $st done in $((SECONDS-s)) s $(date -u +%T)"
done
echo "== evaluate start $(date -u +%T)"; s=$SECONDS
/usr/bin/time -v $py run.py "${common[@]}" stage=evaluate \
  'stage.points=[{name:W4A8,weight_target:4,act:8},{name:W3A8,weight_target:3,act:8}]' prompts.evaluation.n=48 || exit 1
echo "== evaluate done in $((SECONDS-s)) s $(date -u +%T)"
