"""A new user's first hour (issue 19): threads, typos and wrong types, early errors, --help, quiet W&B.

The tests that need a finished workspace (stale report sections, force, hand-selected finals,
truncated artifacts) are in tests/test_pipeline.py, on its copy of the session's one pipeline run.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from mixprec import settings, threads
from mixprec.runner import run_stage
from tests.conftest import CONF, ROOT


def _cli(*args: str, timeout: float = 120) -> tuple[subprocess.CompletedProcess, float]:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "run.py", *args], cwd=ROOT, capture_output=True, text=True, env=env,
                          timeout=timeout)
    return proc, time.perf_counter() - start


# ------------------------------------------------------------------ threads

def test_thread_count_follows_cores_jobs_and_load():
    assert threads.auto_threads(parallel_jobs=1, cores=8, busy=0) == 8
    assert threads.auto_threads(parallel_jobs=2, cores=8, busy=0) == 4  # a launcher running 2 jobs at once
    assert threads.auto_threads(parallel_jobs=1, cores=2, busy=1) == 1  # one core kept busy by another process
    assert threads.auto_threads(parallel_jobs=4, cores=2, busy=0) == 1  # never below one
    assert 1 <= threads.auto_threads() <= len(os.sched_getaffinity(0))


def test_thread_setting_and_environment(monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert threads.resolve("auto") == 3  # the user's own OMP_NUM_THREADS wins over the guess
    assert threads.resolve(2) == 2
    assert threads.resolve(2, small_model=True) == 2  # an explicit count always wins
    monkeypatch.delenv("OMP_NUM_THREADS")
    assert threads.resolve("auto", small_model=True) == 1
    monkeypatch.setenv(threads.PARALLEL_JOBS_ENV, "64")
    assert threads.resolve("auto") == 1
    monkeypatch.setenv(threads.PARALLEL_JOBS_ENV, "two")
    with pytest.raises(ValueError, match="MIXPREC_PARALLEL_JOBS='two' is not a whole number"):
        threads.resolve("auto")
    with pytest.raises(ValueError, match=r"threads=0: expected a whole number >= 1 or 'auto'"):
        threads.resolve(0)


def test_apply_sets_torch_threads_and_passive_waiting(monkeypatch):
    import torch

    before = torch.get_num_threads()
    monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    try:
        threads.apply(1)
        assert torch.get_num_threads() == 1
        assert os.environ["OMP_WAIT_POLICY"] == "PASSIVE" and os.environ["OMP_NUM_THREADS"] == "1"
    finally:
        torch.set_num_threads(before)


# ------------------------------------------------------------------ typed stage settings

def test_every_stage_yaml_matches_its_settings_class():
    for stage, path in settings.stage_config_files(CONF).items():
        keys = {k for k in yaml.safe_load(path.read_text()) if k != "defaults"}
        assert keys <= set(settings.valid_keys(stage)), (stage, keys - set(settings.valid_keys(stage)))
        assert set(settings.valid_keys(stage)) - keys <= {"record", *settings.PIPELINE_ENTRIES}, stage


def test_composed_stage_configs_pass_their_check(make_cfg):
    from mixprec.context import to_dict

    for stage in settings.SCHEMAS:
        settings.check_stage(to_dict(make_cfg(f"stage={stage}").stage))


@pytest.mark.parametrize("override", ["stage.weight_targt=5", "+stage.weight_targt=5"])
def test_stage_typos_fail_with_the_valid_keys_before_hydra(override):
    proc, seconds = _cli("stage=select", override)
    assert proc.returncode != 0
    assert "stage.weight_targt is not a setting of stage=select; valid keys: act_target, batch_size" in proc.stderr
    assert "weight_target" in proc.stderr and "Traceback" not in proc.stderr
    assert seconds < 30  # no model, no torch: the message comes first


def test_typos_in_pipeline_entries_and_added_keys_fail_after_composition(make_cfg):
    with pytest.raises(SystemExit, match=r"stage.select.weight_targt is not a setting of stage=select; valid keys"):
        settings.check_command_line(["stage.select.weight_targt=5"])
    settings.check_command_line(["stage.select.weight_target=5", "stage.allocate_weight.target=[3,4]"])
    # keys added another way (a sweep file, compose in a notebook) are refused by the runner, before any work
    with pytest.raises(settings.SettingsError, match=r"stage.weight_targt is not a setting of stage=select; valid "
                                                     r"keys: act_target, batch_size, force, guard, kinds"):
        run_stage(make_cfg("model=tiny_random", "stage=select", "+stage.weight_targt=5"))
    with pytest.raises(settings.SettingsError, match=r"stage.sensitivity.batchsize is not a setting of "
                                                     r"stage=sensitivity; valid keys"):
        run_stage(make_cfg("model=tiny_random", "+stage.sensitivity.batchsize=4"))


def test_wrong_types_name_the_setting_and_the_expected_type(make_cfg):
    with pytest.raises(settings.SettingsError, match=r"stage.weight_target='abc': expected a number or null, got str"):
        run_stage(make_cfg("model=tiny_random", "stage=select", "stage.weight_target=abc"))
    with pytest.raises(settings.SettingsError, match=r"stage.batch_size='8x': expected an integer"):
        run_stage(make_cfg("model=tiny_random", "stage=calibrate", "stage.batch_size=8x"))
    with pytest.raises(settings.SettingsError, match=r"stage.force=3: expected true/false or a string or a list"):
        run_stage(make_cfg("model=tiny_random", "stage=sensitivity", "stage.force=3"))
    proc, _ = _cli("model=tiny_random", "tracking=disabled", "stage=select", "stage.weight_target=abc")
    assert proc.returncode == 2 and "stage.weight_target='abc': expected a number or null" in proc.stdout + proc.stderr


def test_force_is_a_setting_of_every_stage():
    for stage in settings.SCHEMAS:
        assert "force" in settings.valid_keys(stage)
    assert settings.is_forced(True, "sensitivity") and not settings.is_forced(False, "sensitivity")
    assert settings.is_forced(["sensitivity"], "sensitivity") and not settings.is_forced(["select"], "sensitivity")
    assert settings.is_forced("select", "select")


# ------------------------------------------------------------------ early errors

def _tiny_copy(tmp_path: Path) -> Path:
    from mixprec.models import ASSETS_DIR

    folder = tmp_path / "tiny_model"
    shutil.copytree(ASSETS_DIR / "tiny", folder)
    return folder


def _no_long_work(monkeypatch):
    import mixprec.context as common

    def refuse(*a, **k):
        raise AssertionError("the model was loaded before the input was checked")

    monkeypatch.setattr(common, "load_pipeline", refuse)


def test_junk_model_index_is_named_before_loading(make_cfg, tmp_path, monkeypatch):
    folder = _tiny_copy(tmp_path)
    (folder / "model_index.json").write_text("{not json")
    _no_long_work(monkeypatch)
    with pytest.raises(ValueError, match=r"model_index.json is not valid JSON .*save_pretrained"):
        run_stage(make_cfg(f"model.path={folder}", "stage=inspect"))
    (folder / "model_index.json").write_text('["a list"]')
    with pytest.raises(ValueError, match=r"model_index.json is not a diffusers model index"):
        run_stage(make_cfg(f"model.path={folder}", "stage=inspect"))


def test_truncated_model_weights_are_named_before_loading(make_cfg, tmp_path, monkeypatch):
    folder = _tiny_copy(tmp_path)
    weights = sorted((folder / "unet").glob("*.safetensors"))[0]
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    _no_long_work(monkeypatch)
    with pytest.raises(ValueError, match=rf"the weights {weights} are unreadable: .*truncated\. "
                                         rf"`python run.py stage=train_tiny` writes the built-in model again"):
        run_stage(make_cfg(f"model.path={folder}", "stage=inspect"))
    weights.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00junk junk junk !")
    with pytest.raises(ValueError, match=r"header is not JSON"):
        run_stage(make_cfg(f"model.path={folder}", "stage=inspect"))


def test_a_workspace_that_cannot_be_written_fails_first(make_cfg, tmp_path, monkeypatch):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    _no_long_work(monkeypatch)
    with pytest.raises(PermissionError, match=r"the workspace .*a_file/ws is not writable .*point paths.workspace"):
        run_stage(make_cfg("model=tiny_random", "stage=calibrate", f"paths.workspace={blocker / 'ws'}"))
    if os.geteuid() != 0:  # root writes anywhere
        ro = tmp_path / "ro"
        ro.mkdir()
        ro.chmod(0o500)
        with pytest.raises(PermissionError, match="is not writable"):
            run_stage(make_cfg("model=tiny_random", "stage=calibrate", f"paths.workspace={ro}"))


def test_safetensors_check_names_file_cause_and_writer(tmp_path):
    import torch
    from safetensors.torch import save_file

    from mixprec.workspace import UnreadableArtifactError, check_safetensors

    path = tmp_path / "x.safetensors"
    save_file({"a": torch.zeros(64)}, str(path))
    assert check_safetensors(path, "stage=calibrate") == path
    path.write_bytes(path.read_bytes()[:-10])
    with pytest.raises(UnreadableArtifactError, match=rf"{path} is unreadable: its tensors need \d+ bytes but the file "
                                                      rf"has \d+: truncated\. It is written by stage=calibrate"):
        check_safetensors(path, "stage=calibrate")


def test_benchmark_is_cpu_sized_on_cpu(make_cfg):
    from mixprec.context import to_dict
    from mixprec.settings import check_stage
    from mixprec.stages.benchmark import sized_settings

    def settings(*overrides):
        return check_stage(to_dict(make_cfg("stage=benchmark", *overrides).stage))
    s = settings()
    cpu, cuda = sized_settings(s, "cpu"), sized_settings(s, "cuda")
    assert cpu.resolutions is None and list(cpu.batch_sizes) == [1] and cpu.iters <= 5 and cpu.compile == "none"
    assert list(cuda.resolutions) == [512, 1024] and cuda.iters == 50
    assert list(sized_settings(settings("stage.resolutions=[64]"), "cpu").resolutions) == [64]


# ------------------------------------------------------------------ console

def test_help_lists_stages_options_and_readme_examples():
    proc, _ = _cli("--help")
    assert proc.returncode == 0
    out = proc.stdout
    for stage in settings.SCHEMAS:
        assert f"\n  {stage} " in out, stage
    assert "threads=auto|N" in out and "stage.force=true" in out
    readme = (ROOT / "README.md").read_text()
    examples = [l.split("#")[0].strip() for l in out.split("Examples (README):")[1].splitlines()
                if l.strip().startswith("python run.py")]
    assert len(examples) >= 6 and all(e in readme for e in examples)


def test_wandb_is_quiet_in_the_console_and_still_writes_its_files(tmp_path):
    pytest.importorskip("wandb")
    proc, _ = _cli("model=tiny_random", "stage=inspect", f"paths.outputs={tmp_path}", "tracking=offline")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "wandb:" not in (proc.stdout + proc.stderr).lower()  # its banners start so
    assert list((tmp_path / "wandb" / "wandb").glob("offline-run-*/run-*.wandb"))
