#!/bin/bash
# Session 27, device call 1: compose config with unet_init_dof=3 trained to completion through the
# stage (fp16 weights back), eval on 96 held-out prompts x 3 seed sets, and concurrently (after the
# training) the LoRA kernel benchmark on these weights (compose W8A8/W4A8, eager + compiled).
set -u
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
R=$(mktemp -d)  # as run: a fixed folder in the device temp dir
T0=$(date +%s)
python3 run.py stage=train_compose stage.output=$R/compose stage.unet_init_dof=3.0 stage.progress=false device=cuda tracking=disabled > $R/train.log 2>&1
echo "train rc $? wall $(( $(date +%s) - T0 )) s"
(cd $R && tar cf - compose | split -b 15M - $OUT/weights.tar.part.)
cp -r $R/compose/. mixprec/assets/compose/
T1=$(date +%s)
( timeout 200 python3 -m mixprec.compose.eval --path $R/compose --device cuda --prompts 96 --sensitivity-prompts 8 --points fp,w8a8,w4a8,w3a8,w4a16,w2a16 --out $R/eval.json > $R/eval.log 2>&1; echo "eval rc $? wall $(( $(date +%s) - T1 )) s" ) &
( timeout 220 python3 benchmarks/lora_kernels.py --models compose --plans w8a8,w4a8 --compile-models compose --out $R/lora_kernels_compose.json > $R/lora.log 2>&1; echo "lora rc $? wall $(( $(date +%s) - T1 )) s" ) &
wait
tar czf $OUT/results.tgz --exclude=compose --exclude='*.work' -C $R .
ls -la $OUT
grep -h '"fp"\|"w8a8"\|"w4a8"\|"w3a8"\|"w2a16"\|"w4a16"\|ratio' $R/eval.log | cut -c1-300
tail -5 $R/lora.log | cut -c1-400
grep -i "fingerprint\|wall\|adherence" $R/train.log | tail -5 | cut -c1-300
