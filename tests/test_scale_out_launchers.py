"""The SLURM sweep's submission, per-job GPU pinning for local jobs, and the parallel allocate sweep."""

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import torch
from omegaconf import OmegaConf

from mixprec.search.synthetic import write_synthetic_workspace
from mixprec.sweep_callbacks import LocalJobsCallback

ROOT = Path(__file__).resolve().parents[1]


def test_the_slurm_sweep_submits_a_valid_array_job(tmp_path):
    # Stand-ins for SLURM's commands: sbatch keeps the script it was given and refuses it, so the
    # launcher stops right after writing the submission (nothing is waited for).
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "sbatch").write_text('#!/bin/sh\ncp "$1" "$SBATCH_COPY"\necho "sbatch: test, not submitted" >&2\nexit 1\n')
    (bin_dir / "srun").write_text("#!/bin/sh\nexit 1\n")
    for f in bin_dir.iterdir():
        f.chmod(0o755)
    script = tmp_path / "submission.sh"
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "SBATCH_COPY": str(script)}
    r = subprocess.run([sys.executable, "run.py", "-cd", "sweeps", "-cn", "sensitivity_slurm", "model=tiny_random",
                        f"paths.workspace={tmp_path / 'ws'}", "tracking=disabled", "stage.num_shards=3",
                        "stage.shard=range(3)", "hydra.launcher.partition=a100", "hydra.launcher.timeout_min=45",
                        "hydra.launcher.account=proj7", 'hydra.launcher.setup=[". .venv/bin/activate"]',
                        f"hydra.sweep.dir={tmp_path / 'sweep'}"],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode != 0 and "sbatch: test, not submitted" in r.stdout + r.stderr
    text = script.read_text()
    lines = text.splitlines()
    for expected in ("#SBATCH --partition=a100", "#SBATCH --time=45", "#SBATCH --gpus-per-task=1",
                     "#SBATCH --ntasks-per-node=1", "#SBATCH --nodes=1", "#SBATCH --cpus-per-task=8",
                     "#SBATCH --mem=64GB", "#SBATCH --account=proj7", "#SBATCH --array=0-2%3",
                     "#SBATCH --signal=USR2@120", ". .venv/bin/activate"):
        assert expected in lines, (expected, text)
    srun = [l for l in lines if l.startswith("srun ")]
    assert len(srun) == 1 and "-m submitit.core._submit" in srun[0]
    assert subprocess.run(["bash", "-n", str(script)]).returncode == 0


def test_local_jobs_get_their_own_gpu_and_thread_count(monkeypatch):
    threads = torch.get_num_threads()
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3,5")
    cb = LocalJobsCallback()
    cb.on_multirun_start(OmegaConf.create({}))
    assert cb.gpus == ["3", "5"]

    def job(num, gpus_per_node=1, cpus=None):
        return OmegaConf.create({"hydra": {"job": {"num": num},
                                           "launcher": {"gpus_per_node": gpus_per_node, "cpus_per_task": cpus}}})

    monkeypatch.setenv("SUBMITIT_EXECUTOR", "local")
    for num, gpu in ((0, "3"), (1, "5"), (2, "3")):
        monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0")  # what submitit sets for every job
        cb.on_job_start(job(num))
        assert os.environ["CUDA_VISIBLE_DEVICES"] == gpu
    wide = LocalJobsCallback(gpus=[0, 1, 2, 3])
    wide.on_job_start(job(3, gpus_per_node=2))
    assert os.environ["CUDA_VISIBLE_DEVICES"] == "2,3"
    try:
        monkeypatch.setenv("OMP_NUM_THREADS", "8")
        wide.on_job_start(job(0, gpus_per_node=0, cpus=1))
        assert os.environ["OMP_NUM_THREADS"] == "1" and torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(threads)
    monkeypatch.setenv("SUBMITIT_EXECUTOR", "slurm")  # SLURM assigns GPUs itself
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "7")
    wide.on_job_start(job(1))
    assert os.environ["CUDA_VISIBLE_DEVICES"] == "7"


def test_the_allocate_grid_runs_in_parallel_jobs_and_one_pareto_front(tmp_path):
    ws = write_synthetic_workspace(tmp_path / "ws", n_prompts=4)
    r = subprocess.run([sys.executable, "run.py", "-cd", "sweeps", "-cn", "allocate_local", f"paths.workspace={ws}",
                        f"paths.outputs={tmp_path / 'out'}", "tracking=disabled", "stage.target=4,5", "stage.K=1,2",
                        "stage.seed=1", "hydra.sweeper.max_batch_size=2"],
                       cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    # 4 cells in two batches of 2 jobs (a job is a Python start: 2 at a time on a 2-core CI machine)
    rows = list(csv.DictReader(open(ws / "pareto.csv")))
    assert {(float(r["target"]), float(r["K"]), int(r["seed"])) for r in rows} == {
        (t, k, 1) for t in (4.0, 5.0) for k in (1.0, 2.0)}
    # one run record per job, none shared
    assert len(list((ws / "allocate").glob("*.json"))) == 4 and not (ws / "allocate.json").exists()
    assert json.loads((ws / "allocate_sweep.json").read_text())["candidates"] == 4
