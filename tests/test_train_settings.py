"""The training stages' settings come from the library's training configs (one source of the knobs'
names, types, defaults and allowed values), and conf/stage/train_*.yaml states every knob with the
library's default."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
import typing
from pathlib import Path

import pytest
import yaml

from mixprec import settings
from mixprec.compose import train_config as compose_config
from mixprec.compose.train_config import ComposeTrainConfig
from mixprec.context import to_dict
from mixprec.tiny.train_config import TrainConfig

ROOT = Path(__file__).resolve().parents[1]
STAGES = {"train_tiny": (TrainConfig, settings.TrainTinySettings),
          "train_compose": (ComposeTrainConfig, settings.TrainComposeSettings)}
# The YAML keys whose value is not the library field's default, on purpose: `arch` in the YAML (and the
# settings) holds overrides deep-merged over the model's architecture, null for none; the library field
# holds the merged architecture.
YAML_DIFFERS = {"arch": None}


def _yaml(stage: str) -> dict:
    return yaml.safe_load((ROOT / "conf" / "stage" / f"{stage}.yaml").read_text())


@pytest.mark.parametrize("stage", STAGES)
def test_stage_yaml_states_every_library_knob_with_the_library_default(stage):
    config, schema = STAGES[stage]
    conf = _yaml(stage)
    fields = {f.name: f for f in dataclasses.fields(config)}
    missing = sorted(set(fields) - set(conf))
    assert not missing, f"conf/stage/{stage}.yaml has no key for the {config.__name__} fields {missing}"
    differ = {k: conf[k] for k, f in fields.items()
              if k not in YAML_DIFFERS and (conf[k] != f.default or type(conf[k]) is not type(f.default))}
    assert not differ, f"conf/stage/{stage}.yaml differs from the {config.__name__} defaults: {differ}"
    assert {k: conf[k] for k in YAML_DIFFERS} == YAML_DIFFERS
    # the stage's own keys: the YAML states the settings class's defaults too
    own = {f.name: f.default for f in dataclasses.fields(schema) if f.name not in fields and f.name != "name"}
    assert conf["name"] == stage and {k: conf[k] for k in own if k in conf} == {k: v for k, v in own.items() if k in conf}


@pytest.mark.parametrize("stage", STAGES)
def test_composed_stage_config_is_the_library_default_config(stage, make_cfg):
    from mixprec.tiny.train import config_from_settings

    config, _ = STAGES[stage]
    typed = settings.check_stage(to_dict(make_cfg(f"stage={stage}").stage))
    assert config_from_settings(typed, config) == config()
    assert config_from_settings(typed, config).arch == config.merged_arch(None)


@pytest.mark.parametrize("stage", STAGES)
def test_settings_fields_are_the_config_fields_with_their_types_and_defaults(stage):
    config, schema = STAGES[stage]
    config_hints, schema_hints = typing.get_type_hints(config), typing.get_type_hints(schema)
    schema_fields = {f.name: f for f in dataclasses.fields(schema)}
    for f in dataclasses.fields(config):
        if f.name == "arch":
            assert schema_fields["arch"].default is None
            continue
        assert schema_hints[f.name] == config_hints[f.name] and schema_fields[f.name].default == f.default, f.name
    own = set(schema_fields) - {f.name for f in dataclasses.fields(config)}
    assert own == {"name", "force", "record", "output", "device", "resume", "progress", "eval_heldout_prompts"} | \
        ({"save_dtype"} if stage == "train_compose" else set())


def test_allowed_values_come_from_the_library_constants():
    from mixprec.compose import scenes

    hints = typing.get_type_hints(settings.TrainComposeSettings)
    assert typing.get_args(hints["layout"]) == compose_config.LAYOUTS == scenes.LAYOUTS
    assert typing.get_args(hints["timesteps"]) == compose_config.TIMESTEP_MODES
    assert typing.get_args(hints["accelerate"]) == compose_config.ACCELERATE_MODES
    assert typing.get_args(hints["unet_init"]) == compose_config.UNET_INITS


@pytest.mark.parametrize("key, value, allowed", [
    ("layout", "middle", "'random' | 'centred'"), ("timesteps", "some", "'inference' | 'uniform'"),
    ("accelerate", "fast", "'cuda_graph' | 'compile' | 'none'"), ("unet_init", "t", "'default' | 'student_t'"),
    ("save_dtype", "bfloat16", "'float32' | 'float16'")])
def test_bad_choice_is_refused_naming_the_allowed_values(key, value, allowed):
    with pytest.raises(settings.SettingsError, match=rf"stage.{key}='{value}': expected {allowed}, got str"):
        settings.check_stage({"name": "train_compose", key: value})


def test_wrong_type_and_unknown_key_are_refused():
    with pytest.raises(settings.SettingsError, match=r"stage.unet_lr='fast': expected a number, got str"):
        settings.check_stage({"name": "train_tiny", "unet_lr": "fast"})
    assert settings.check_stage({"name": "train_tiny", "unet_lr": 1}).unet_lr == 1  # an integer is a number
    with pytest.raises(settings.SettingsError, match=r"stage.layout is not a setting of stage=train_tiny; valid keys: "
                                                     r"arch, checkpoint_every, dataset_size, device"):
        settings.check_stage({"name": "train_tiny", "layout": "centred"})
    with pytest.raises(SystemExit, match=r"stage.unet_stepz is not a setting of stage=train_compose; valid keys: "
                                         r"accelerate, arch, bf16"):
        settings.check_command_line(["stage=train_compose", "stage.unet_stepz=5"])


def test_settings_load_no_torch():
    # the command line is checked before the thread settings that must precede `import torch`
    code = "import sys, mixprec.settings; assert 'torch' not in sys.modules, 'torch imported'"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
