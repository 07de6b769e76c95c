"""Bad input gets a message that says what is wrong and what to do."""

import pytest
import torch.nn as nn
from safetensors.torch import save_file

from mixprec.calibration import attach_params, calibrate_layers, load_params
from mixprec.models import ModelSpec
from mixprec.prompts import resolve_prompt_set
from mixprec.quantizers import quantize_
from mixprec.runner import run_stage
from mixprec.context import quant_recipe


def test_model_spec_errors():
    with pytest.raises(ValueError, match="model.dtype must be one of"):
        ModelSpec.from_dict({"name": "x", "source": "tiny_random", "dtype": "float8"})
    with pytest.raises(ValueError, match=r"needs model.path .* or model.hub_id"):
        ModelSpec.from_dict({"name": "x", "source": "diffusers"})


def test_prompt_set_errors(tmp_path):
    with pytest.raises(ValueError, match="exactly one of 'prompts', 'file' or 'split'"):
        resolve_prompt_set({"prompts": ["a"], "split": "train"}, "calibration")
    with pytest.raises(FileNotFoundError, match="prompts file .* does not exist"):
        resolve_prompt_set({"file": str(tmp_path / "none.txt")}, "selection")
    (tmp_path / "empty.txt").write_text("# only a comment\n")
    with pytest.raises(ValueError, match="prompt set 'selection' is empty"):
        resolve_prompt_set({"file": str(tmp_path / "empty.txt")}, "selection")
    assert resolve_prompt_set({"prompts": ["a", "b"], "seed": 7}) == [("a", 7), ("b", 8)]


def test_bit_width_range_is_checked(make_cfg):
    with pytest.raises(ValueError, match="between 2 and 8"):
        quant_recipe(make_cfg("model=tiny_random", "quant.weight_bits=[1,2,4,8]"))


def test_calibration_errors(tmp_path):
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4))
    layers = quantize_(model)
    with pytest.raises(RuntimeError, match="saw no input during calibration .*exclude_patterns"):
        calibrate_layers(layers, lambda: None, [4], [8])
    with pytest.raises(KeyError, match="made for another model: rerun stage=calibrate"):
        attach_params(layers, {})
    save_file({"x": __import__("torch").zeros(1)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(ValueError, match="is not a mixprec calibration file"):
        load_params(tmp_path / "other.safetensors")


def test_pipeline_and_select_config_errors(make_cfg):
    with pytest.raises(ValueError, match=r"stage.stages names \['nope'\], which have no settings"):
        run_stage(make_cfg("model=tiny_random", "stage.stages=[calibrate,nope]"))
    with pytest.raises(ValueError, match="metric=adherence needs a model with a content checker"):
        run_stage(make_cfg("model=tiny_random", "model.checker=null", "stage=select", "stage.metric=adherence"))
    with pytest.raises(ValueError, match=r"stage.metric='lpips': expected 'auto' \| 'adherence' \| 'psnr' \| 'ssim' "
                                         r"\| 'mse'"):
        run_stage(make_cfg("model=tiny_random", "stage=select", "stage.metric=lpips"))
