"""README's "Use from Python": sensitivity -> allocate -> select from plain Python, no Hydra."""

from mixprec import sensitivity as sens
from mixprec.allocation import AllocationRequest, allocate
from mixprec.artifacts import Budget
from mixprec.calibration import calibrate_layers
from mixprec.generation import Sampler
from mixprec.models import ModelSpec, census, denoiser_of, layer_group, load_pipeline
from mixprec.quantizers import quantize_, set_plan
from mixprec.selection import Candidate, generate_and_score, rank


def test_sensitivity_allocate_select_without_hydra(tmp_path):
    spec = ModelSpec.from_dict({"name": "t", "source": "tiny_random", "resolution": 32, "num_inference_steps": 2,
                                "arch": {"image_size": 32, "unet": {"block_out_channels": [8, 16],
                                                                    "attention_head_dim": [2, 2],
                                                                    "norm_num_groups": 4,
                                                                    "addition_time_embed_dim": 4}}})
    pipe = load_pipeline(spec)
    layers = quantize_(denoiser_of(pipe))
    sampler = Sampler(pipe, resolution=32, num_inference_steps=2)
    prompts, seeds = ["a red circle on a blue background"], [0]
    calibrate_layers(layers, lambda: sampler.generate(prompts, seeds, decode=False), weight_bits=[4, 8],
                     act_bits=[8])

    groups = {name: layer_group(name, ["attn2", "ff"]) for name in layers}
    tasks = sens.make_tasks(groups, weight_bits=[4, 8], act_bits=[8], kinds=["w"])
    reference = sens.compute_reference(sampler, prompts, seeds, need_images=True, need_denoiser=True)
    records = sens.run_tasks(tasks, layers, sampler, reference, prompts, seeds,
                             sens.RecordFile(tmp_path / "sensitivity.jsonl"), progress=False)
    per_prompt = sens.per_prompt_table(records.values())

    rows = census(denoiser_of(pipe), content_patterns=["attn2", "ff"])
    bits = {"content": [4, 8], "quality": [4, 8]}
    plans = {K: allocate(AllocationRequest("weight", Budget(6.0), K=K, bits=bits), rows, per_prompt["weight"])[0]
             for K in (1.0, 1.5)}
    assert all(abs(p.header["achieved_mean_bits"]["overall"] - 6.0) <= 0.1 + 1e-9 for p in plans.values())

    full_precision = sampler.generate(prompts, seeds).images
    candidates = [Candidate(f"K={K}", p.header, p.bits) for K, p in plans.items()]
    for c in candidates:
        c.scores = generate_and_score(sampler, layers, prompts, seeds, full_precision, None, weight_bits=c.bits).scores
    set_plan(layers)
    best = rank(candidates, "mse")[0]
    assert best.scores["mse"] == min(c.scores["mse"] for c in candidates) and best.bits
