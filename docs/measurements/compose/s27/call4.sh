#!/bin/bash
# Session 27, device call (last of the budget), everything beside everything: the reproduction
# training of the committed compose config (dof 3, library CLI) || the whole GPU pipeline on the
# shipped dof-3 weights (its wall time is an upper bound: it shared the GPU) || the GPU LoRA tests
# then the LoRA kernel benchmark on pipeline inputs (correctness only). Then the reproduction's eval.
# Each result goes to $OUT as soon as it exists.
set -u
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
R=$(mktemp -d)  # as run: a fixed folder in the device temp dir
T0=$(date +%s)
( python3 -m mixprec.compose.train $R/A --device cuda --config '{}' > $R/A_train.log 2>&1; echo "train rc $? wall $(( $(date +%s) - T0 )) s" | tee $R/A_train.rc ) &
TRAIN=$!
( timeout 100 python3 -m pytest -q -s -m gpu -p no:cacheprovider tests/test_lora.py -k "pipeline_inputs" > $R/pytest_gpu.log 2>&1; echo "pytest rc $? wall $(( $(date +%s) - T0 )) s" | tee -a $R/pytest_gpu.log
  tar czf $OUT/pytest.tgz -C $R pytest_gpu.log
  timeout 200 python3 benchmarks/lora_kernels.py --models compose,tiny --plans w8a8,w4a8 --compile-models compose,tiny --no-compiled-unload --inputs prompts --out $R/lora_kernels_prompts_h200.json > $R/lora.log 2>&1; echo "lora rc $? wall $(( $(date +%s) - T0 )) s" | tee $R/lora.rc
  tar czf $OUT/lora.tgz -C $R lora.log lora.rc $(cd $R && ls lora_kernels_prompts_h200.json 2>/dev/null) ) &
LORA=$!
python3 run.py model=compose device=cuda tracking=disabled paths.workspace=$R/ws stage.allocate_weight.solver=highs stage.allocate_act.solver=highs > $R/pipeline.log 2>&1
echo "pipeline rc $? wall $(( $(date +%s) - T0 )) s" | tee $R/pipeline.rc
mkdir -p $R/p && cp $R/pipeline.* $R/p/ && cp $R/ws/*.json $R/p/ 2>/dev/null
tar czf $OUT/pipeline.tgz -C $R/p .
grep -h "finished in\|adherence" $R/pipeline.log | cut -c1-250 | tail -12
wait $TRAIN
T1=$(date +%s)
pA=$R/A; [ -d $pA ] || pA=$R/A.partial
timeout 100 python3 -m mixprec.compose.eval --path $pA --device cuda --prompts 48 --sensitivity-prompts 0 --points fp,w8a8,w4a8 --out $R/A_eval.json > $R/A_eval.log 2>&1
echo "eval rc $? wall $(( $(date +%s) - T1 )) s"
tar czf $OUT/resultsA.tgz -C $R A_train.log A_train.rc A_eval.log $(cd $R && ls A_eval.json 2>/dev/null)
grep -h '"fp"\|"w8a8"\|"w4a8"' $R/A_eval.log | cut -c1-300
grep -h '"summary"' $R/A_train.log | tail -1 | cut -c1-600
wait $LORA
tail -2 $R/lora.log | cut -c1-300; grep -h "dB\|passed\|failed" $R/pytest_gpu.log | tail -4
