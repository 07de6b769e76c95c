# issue 17's rounding / more-widths / grouping rows: source this, then bash benchmarks/gpu_eval17.sh quant.weight_group_sizes=[64,128]
export QUANT=more_bits_gptq KINDS='[w]' METHODS='[uniform,decoupled]'
export POINTS='[{name: W4A8, weight_target: 4, act: 8},{name: W3A8, weight_target: 3, act: 8}]'
R='program: both, guard: true, quality_metric: noise_power, refine: {evaluations: 16, seed: 0, operating_point: false}'
export VARIANTS="[{name: gptq+default_widths+shipped, $R, bits: {content: [2,4,8], quality: [4,8]}},{name: gptq+more_widths+shipped, $R},{name: gptq+more_widths+groups+shipped, $R, groups: true}]"
