"""The quantization recipe as a typed object, and the one kernel-options merge."""

import pytest
from omegaconf import OmegaConf

from mixprec.context import fingerprints, quant_recipe
from mixprec.kernels import BackendConfig
from mixprec.recipe import ProtectAct, QuantRecipe


def test_the_shipped_recipe_is_the_dataclass_default(make_cfg):
    cfg = make_cfg("model=tiny_random")
    recipe = quant_recipe(cfg)
    assert recipe == QuantRecipe(kernels={"w8a8": "int8"}) and recipe.protect_act == ProtectAct()
    assert recipe.bits_by_group("weight") == {"content": (2, 4, 8), "quality": (4, 8)}
    # the recipe's identity is the config as it was fingerprinted before it was typed: workspaces stay valid
    # (settings added later are left out at their neutral value)
    neutral = {"act_timestep_groups": 1, "weight_group_sizes": [], "rounding": "nearest"}
    old = {k: v for k, v in OmegaConf.to_container(cfg.quant, resolve=True).items()
           if k not in ("name", "kernels", "gptq") and not (k in neutral and v == neutral[k])}
    assert recipe.identity() == old


def test_unknown_or_impossible_settings_are_refused(make_cfg):
    with pytest.raises(ValueError, match=r"unknown quant settings \['weight_bitz'\]"):
        QuantRecipe.from_dict({"weight_bitz": [4]})
    with pytest.raises(ValueError, match="quant.weight_clip must be one of"):
        QuantRecipe(weight_clip="max")
    with pytest.raises(ValueError, match=r"quant.act_bits_by_group.content uses bits \[2\]"):
        QuantRecipe(act_bits_by_group={"content": (2, 8), "quality": (8,)})
    with pytest.raises(ValueError, match="more than the model's 2 sampler steps"):
        quant_recipe(make_cfg("model=tiny_random", "quant.act_timestep_groups=3"))
    with pytest.raises(ValueError, match=r"quant.rounding must be one of \('nearest', 'gptq'\), got 'adaround'"):
        QuantRecipe.from_dict({"rounding": "adaround"})
    with pytest.raises(ValueError, match=r"quant.weight_group_sizes must be distinct integers >= 2.*got \[64, 64\]"):
        QuantRecipe.from_dict({"weight_group_sizes": [64, 64]})
    with pytest.raises(ValueError, match=r"weight_group_sizes must be a list such as \[64, 128\], got 64"):
        QuantRecipe.from_dict({"weight_group_sizes": 64})
    with pytest.raises(ValueError, match=r"unknown quant.gptq settings \['dampening'\]"):
        QuantRecipe.from_dict({"gptq": {"dampening": 0.1}})
    with pytest.raises(ValueError, match=r"quant.gptq.damp must be a number in \(0, 1\)"):
        QuantRecipe.from_dict({"gptq": {"damp": 0}})


def test_the_wide_recipe_offers_every_width_and_group_and_gptq(make_cfg):
    recipe = quant_recipe(make_cfg("model=tiny_random", "quant=wide"))
    assert recipe.weight_bits == (2, 3, 4, 5, 6, 7, 8) and recipe.act_bits == (4, 5, 6, 7, 8)
    assert recipe.bits_by_group("weight")["quality"] == (2, 3, 4, 5, 6, 7, 8)
    assert recipe.weight_group_sizes == (64, 128) and recipe.rounding == "gptq"
    base = fingerprints(make_cfg("model=tiny_random"))["quant"]
    assert fingerprints(make_cfg("model=tiny_random", "quant.rounding=gptq"))["quant"] != base
    assert fingerprints(make_cfg("model=tiny_random", "quant.weight_group_sizes=[64]"))["quant"] != base
    # GPTQ settings matter only with GPTQ rounding
    assert fingerprints(make_cfg("model=tiny_random", "quant.gptq.damp=0.1"))["quant"] == base


def test_the_low_bit_recipe_is_more_widths_gptq_and_groups(make_cfg):
    recipe = quant_recipe(make_cfg("model=tiny_random", "quant=low_bit"))
    assert recipe.bits_by_group("weight") == {"content": (2, 3, 4, 5, 6, 8), "quality": (3, 4, 5, 6, 8)}
    assert recipe.weight_group_sizes == (64, 128) and recipe.rounding == "gptq" and recipe.act_bits == (4, 8)
    # the same recipe as the measured sweep's overrides: its workspaces stay valid under the new name
    same = make_cfg("model=tiny_random", "quant=more_bits_gptq", "quant.weight_group_sizes=[64,128]")
    assert fingerprints(make_cfg("model=tiny_random", "quant=low_bit"))["quant"] == fingerprints(same)["quant"]


def test_kernel_options_do_not_change_the_recipe_fingerprint(make_cfg):
    base = fingerprints(make_cfg("model=tiny_random"))
    assert fingerprints(make_cfg("model=tiny_random", "quant.kernels.w8a8=fp8")) == base
    assert fingerprints(make_cfg("model=tiny_random", "quant.weight_clip=mse"))["quant"] != base["quant"]


def test_infer_and_benchmark_share_one_w8a8_default(make_cfg):
    cfgs = [make_cfg("model=tiny_random", f"stage={s}") for s in ("infer", "benchmark")]
    merged = [BackendConfig.merged(quant_recipe(c).kernels, OmegaConf.to_container(c.stage.kernels)) for c in cfgs]
    assert merged[0].w8a8 == merged[1].w8a8 == "int8"
    assert merged[0].bos == "exact"  # infer's own option stays
    fp8 = make_cfg("model=tiny_random", "stage=benchmark", "quant.kernels.w8a8=fp8")
    assert BackendConfig.merged(quant_recipe(fp8).kernels, OmegaConf.to_container(fp8.stage.kernels)).w8a8 == "fp8"
    assert BackendConfig.merged({"w8a8": "fp8"}, {"w8a8": "int8"}).w8a8 == "int8"
