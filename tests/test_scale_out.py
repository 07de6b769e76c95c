"""Sensitivity sharded through Hydra's submitit local launcher (sweeps/sensitivity_local.yaml), on CPU.

Every process runs on one CPU thread: float reductions on CPU depend on the thread count, and the
sharded and unsharded runs must compute the same numbers to give the same bytes.
"""

import fcntl
import json
import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from mixprec.runner import run_stage
from mixprec.artifacts import PER_PROMPT_CSV, PROTECTED_YAML
from mixprec.artifacts import sensitivity_table as table_name
from mixprec.shards import ShardError
from mixprec.shards import shard_status

ROOT = Path(__file__).resolve().parents[1]
OUTPUTS = [table_name(k, g) for k in ("w", "a") for g in ("content", "quality")] + [PER_PROMPT_CSV, PROTECTED_YAML]
TINY = ["model=tiny_random", "prompts.sensitivity.n=2", "stage.progress=false", "tracking=disabled", "device=cpu"]
# an attention block and a convolution: content and quality layers, every table kind; few tasks, so the
# sharded subprocess runs spend their time on what is tested (sharding, merging), not on measuring
SLICE = "stage.layers=[up_blocks.0.attentions.0,conv_in]"


@pytest.fixture(scope="module")
def calibrated(tmp_path_factory):
    from tests.conftest import compose
    out = tmp_path_factory.mktemp("scale_cal")
    run_stage(compose([f"paths.outputs={out}", "tracking=disabled", "device=cpu", "model=tiny_random",
                       "stage=calibrate"]))
    return out / "tiny_random"


def _workspace(calibrated: Path, dest: Path) -> Path:
    dest.mkdir(parents=True)
    for name in ("quant_params.safetensors", "layers.csv", "calibrate.json"):
        shutil.copy(calibrated / name, dest / name)
    return dest


@pytest.fixture(scope="module")
def unsharded(calibrated, tmp_path_factory) -> dict[str, bytes]:
    """The files of the unsharded run over SLICE (the sharded runs must give the same bytes); read-only."""
    from tests.conftest import compose
    ws = _workspace(calibrated, tmp_path_factory.mktemp("single") / "ws")
    head = run_stage(compose(["stage=sensitivity", f"paths.workspace={ws}", *TINY, SLICE]))
    assert head["merged"]
    return {n: (ws / n).read_bytes() for n in OUTPUTS}


def _launch(argv: list[str], tmp: Path, gpus: int = 3) -> subprocess.CompletedProcess:
    # A fake nvidia-smi listing `gpus` GPUs: the jobs' GPU pinning is checked without a GPU (device=cpu).
    bin_dir = tmp / "bin"
    bin_dir.mkdir(exist_ok=True)
    smi = bin_dir / "nvidia-smi"
    smi.write_text("#!/bin/sh\n" + "".join(f"echo 'GPU {i}: Fake GPU (UUID: GPU-{i})'\n" for i in range(gpus)))
    smi.chmod(0o755)
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "OMP_NUM_THREADS": "1"}
    env.pop("CUDA_VISIBLE_DEVICES", None)
    return subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


def _sweep(ws: Path, tmp: Path, *overrides: str) -> subprocess.CompletedProcess:
    return _launch([sys.executable, "run.py", "-cd", "sweeps", "-cn", "sensitivity_local", f"paths.workspace={ws}",
                    f"hydra.sweep.dir={tmp / 'sweep'}", "hydra.launcher.cpus_per_task=1", *TINY, *overrides], tmp)


def test_three_shards_through_submitit_equal_the_unsharded_run(calibrated, unsharded, tmp_path):
    ws = _workspace(calibrated, tmp_path / "sharded")
    r = _sweep(ws, tmp_path, SLICE, "stage.num_shards=3", "stage.shard=range(3)")
    assert r.returncode == 0, r.stderr[-3000:]
    assert {n: (ws / n).read_bytes() for n in OUTPUTS} == unsharded
    # Each job wrote only its own files; the merge was recorded once, with the sweep's time.
    files = sorted(p.name for p in (ws / "sensitivity").iterdir())
    assert files == sorted(["merge.lock"] + [f"{stem}{i}of3{ext}" for i in range(3) for stem, ext in
                                             (("shard", ".json"), ("shard", ".jsonl"), ("shard", ".lock"),
                                              ("run_shard", ".json"))])
    rec = json.loads((ws / "sensitivity.json").read_text())
    assert rec["headline"]["merged"] and rec["headline"]["num_shards"] == 3 and rec["headline"]["sweep"]["wall_time_s"]
    sweep = json.loads((ws / "sensitivity_sweep.json").read_text())
    assert sweep["merged"] and [s["state"] for s in sweep["shards"]] == ["complete"] * 3 and not sweep["to_finish"]
    # submitit gave every job GPU 0; the callback moved job k to GPU k.
    logs = "".join(p.read_text() for p in (tmp_path / "sweep" / ".submitit").glob("*/*_log.*"))
    assert all(f"runs on GPU(s) {k}" in logs for k in range(3)), logs[-2000:]


def test_a_missing_then_preempted_shard_reruns_alone_and_resumes(calibrated, unsharded, tmp_path, make_cfg):
    ws = _workspace(calibrated, tmp_path / "sharded")
    r = _sweep(ws, tmp_path, SLICE, "stage.num_shards=3", "stage.shard=0,2")
    assert r.returncode == 0, r.stderr[-3000:]
    sweep = json.loads((ws / "sensitivity_sweep.json").read_text())
    assert not sweep["merged"] and sweep["shards"][1]["state"] == "not run"
    assert "shard 1: not run" in r.stdout + r.stderr and not (ws / OUTPUTS[0]).exists()
    (command,) = sweep["to_finish"]
    assert "stage.shard=1" in command and "-cn sensitivity_local" in command
    # Shard 1 starts, is pre-empted after two tasks and dies mid-record.
    head = run_stage(make_cfg("stage=sensitivity", f"paths.workspace={ws}", *TINY, SLICE, "stage.shard=1",
                              "stage.num_shards=3", "stage.max_tasks=2"))
    assert not head["merged"] and head["shard_tasks_done"] == 2
    records = ws / "sensitivity" / "shard1of3.jsonl"
    kept = records.read_bytes()
    with open(records, "a") as f:
        f.write('{"layer": "up_blo')
    assert shard_status(ws, 3)[1]["state"] == "incomplete"
    # The command the sweep printed finishes it: only shard 1 runs, from its third task on.
    argv = shlex.split(command)
    assert argv[:6] == ["python", "run.py", "-cd", "sweeps", "-cn", "sensitivity_local"]
    r = _launch([sys.executable, *argv[1:], f"hydra.sweep.dir={tmp_path / 'sweep2'}"], tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    assert records.read_bytes().startswith(kept)
    assert {n: (ws / n).read_bytes() for n in OUTPUTS} == unsharded
    assert json.loads((ws / "sensitivity_sweep.json").read_text())["merged"]


def test_a_shard_runs_once_at_a_time_and_duplicated_records_are_refused(calibrated, tmp_path, make_cfg):
    ws = _workspace(calibrated, tmp_path / "ws")
    args = ["stage=sensitivity", f"paths.workspace={ws}", *TINY, "stage.layers=[conv_in,conv_out]",
            "stage.num_shards=2"]
    (ws / "sensitivity").mkdir()
    with open(ws / "sensitivity" / "shard0of2.lock", "a") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        with pytest.raises(ShardError, match="shard 0 of 2 is being run by another process"):
            run_stage(make_cfg(*args, "stage.shard=0"))
    run_stage(make_cfg(*args, "stage.shard=0"))
    head = run_stage(make_cfg(*args, "stage.shard=1"))
    assert head["merged"]
    # The same task recorded twice (a shard run twice at once, before locks): the merge refuses it.
    records = ws / "sensitivity" / "shard1of2.jsonl"
    records.write_text(records.read_text() + records.read_text().splitlines(keepends=True)[0])
    assert shard_status(ws, 2)[1]["duplicates"] == 1
    with pytest.raises(ShardError, match="shard 1 holds 1 duplicated records"):
        run_stage(make_cfg(*args, "stage.merge_only=true"))
