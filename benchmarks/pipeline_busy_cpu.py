"""Wall time of README command 1 (`python run.py`, whole pipeline, tiny model, CPU) from a clean
workspace, on an idle machine and with CPU-bound processes running beside it.

    python benchmarks/pipeline_busy_cpu.py                      # idle, then one busy process beside it
    python benchmarks/pipeline_busy_cpu.py --busy 0 1 --repeats 2 -- threads=1

Each run gets a fresh paths.outputs; the JSON (docs/measurements/pipeline_busy_cpu_<host>.json by
default) has every run's wall time, exit code, the thread count the run chose (from its log), the
load average before and after, the CPU seconds the run used (user + system: on a machine shared
with other work, wall time over CPU time shows how much of a core the run got), and the usable cores. The busy processes are plain Python busy
loops started by this script and stopped (by their own process ids) when the run ends.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def one_run(busy: int, extra: list[str]) -> dict:
    spinners = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(busy)]
    try:
        time.sleep(1.0 if busy else 0.0)
        load_before = os.getloadavg()
        with tempfile.TemporaryDirectory(prefix="mixprec_busy_") as out:
            cpu0 = resource.getrusage(resource.RUSAGE_CHILDREN)
            start = time.perf_counter()
            proc = subprocess.run([sys.executable, "run.py", f"paths.outputs={out}", *extra], cwd=ROOT,
                                  capture_output=True, text=True)
            wall = time.perf_counter() - start
            cpu1 = resource.getrusage(resource.RUSAGE_CHILDREN)
        load_after = os.getloadavg()
    finally:
        for p in spinners:
            p.kill()
            p.wait()
    log = proc.stdout + proc.stderr
    threads = re.search(r"CPU threads: (\d+)", log)
    stages = dict(re.findall(r"stage (\w+) finished in ([\d.]+) s", log))
    cpu = (cpu1.ru_utime - cpu0.ru_utime) + (cpu1.ru_stime - cpu0.ru_stime)
    return {"busy_processes": busy, "wall_s": round(wall, 2), "cpu_s": round(cpu, 2), "returncode": proc.returncode,
            "threads": int(threads.group(1)) if threads else None, "stage_wall_s": stages,
            "loadavg_before": load_before, "loadavg_after": load_after,
            "log_tail": log[-1500:] if proc.returncode else None}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--busy", type=int, nargs="+", default=[0, 1], help="busy processes beside each run")
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--out", default=None)
    ap.add_argument("overrides", nargs="*", help="extra run.py overrides (after --)")
    args = ap.parse_args()
    runs = []
    for _ in range(args.repeats):
        for busy in args.busy:
            r = one_run(busy, args.overrides)
            print(json.dumps({k: v for k, v in r.items() if k != "log_tail"}), flush=True)
            runs.append(r)
    out = Path(args.out or ROOT / "docs" / "measurements" / f"pipeline_busy_cpu_{platform.node() or 'host'}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({
        "command": "python run.py " + " ".join(args.overrides), "cores_usable": len(os.sched_getaffinity(0)),
        "cpu_count": os.cpu_count(), "python": sys.version.split()[0], "runs": runs,
        "started_env": {k: os.environ.get(k) for k in ("OMP_NUM_THREADS", "OMP_WAIT_POLICY", "MIXPREC_PARALLEL_JOBS")},
    }, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
