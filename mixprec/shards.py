"""A sensitivity sweep split into shards: each shard's header and records, their locks, the merge.

Shard ``i`` of ``n`` keeps ``sensitivity/shard<i>of<n>.json`` (its identity: fingerprints, prompts,
tasks) and ``sensitivity/shard<i>of<n>.jsonl`` (one record per finished task). A sweep is merged
when every shard's header has the same identity and its records cover exactly its tasks. Used by
the sensitivity stage and by the sweep callbacks (which read the shards without a model).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from mixprec.quant.options import option_order
from mixprec import artifacts
from mixprec import sensitivity as sens
from mixprec.artifacts import SENSITIVITY_RECORDS_DIR
from mixprec.workspace import Workspace, fingerprint

log = logging.getLogger("mixprec")


class ShardError(ValueError):
    pass


def shard_paths(i: int, n: int) -> tuple[str, str]:
    """(header, records) of shard ``i`` of ``n``, relative to the workspace."""
    return f"{SENSITIVITY_RECORDS_DIR}/shard{i}of{n}.json", f"{SENSITIVITY_RECORDS_DIR}/shard{i}of{n}.jsonl"


def shard_lock(i: int, n: int) -> str:
    return f"{SENSITIVITY_RECORDS_DIR}/shard{i}of{n}.lock"


MERGE_LOCK = f"{SENSITIVITY_RECORDS_DIR}/merge.lock"


@contextlib.contextmanager
def flock(path: Path, wait: bool, busy: str) -> Iterator[None]:
    """An exclusive advisory lock on ``path`` (flock; NFS v4 maps it to a POSIX lock).

    Shard jobs of a sweep may run at once: the per-shard lock keeps a shard launched twice from
    appending to one records file from two processes, and the merge lock keeps two shards that
    finish together from writing the merged outputs at the same time.
    """
    import fcntl

    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except BlockingIOError:
            raise ShardError(busy) from None
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def identity(ws: Workspace, pairs, tasks: Sequence[sens.Task], num_shards: int, cap: float) -> dict[str, Any]:
    return {"fingerprints": ws.fingerprints, "prompts": [list(p) for p in pairs], "num_shards": num_shards,
            "sqnr_cap_db": cap, "tasks": fingerprint([[t.kind, t.layer, t.group, list(t.bits)] for t in tasks]),
            "num_tasks": len(tasks)}


def check_header(ws: Workspace, i: int, identity: Mapping[str, Any], restart: bool, force: bool = False,
                 tasks: Sequence[sens.Task] = ()) -> None:
    """Refuse (or, with ``restart``, discard) records made with other settings; ``tasks`` (this shard's)
    lets records of a sweep that measured more options of the same layers be kept (:func:`_covered`)."""
    header, records = shard_paths(i, identity["num_shards"])
    if force and ws.exists(records):
        # stage.force: measure again, whatever the stored records were made with.
        log.info("sensitivity: stage.force discards the %s stored records of shard %d", records, i)
        ws.path(records).unlink()
    elif ws.exists(header):
        old = ws.read_json(header, "sensitivity")
        changed = old.get("identity") != identity
        if changed and not _covered(old.get("identity") or {}, identity, ws.path(records), tasks):
            if not restart:
                raise ShardError(
                    f"{ws.path(records)} holds records of a sensitivity sweep with other settings (prompts, bits, "
                    f"layers or fingerprints differ). Rerun with stage.restart=true to discard them, or use another "
                    f"paths.workspace.")
            ws.path(records).unlink(missing_ok=True)
    ws.write_json(header, {"shard": i, "identity": identity})


def _covered(old: Mapping[str, Any], new: Mapping[str, Any], records: Path, tasks: Sequence[sens.Task]) -> bool:
    """Whether records made under ``old`` serve the tasks of ``new`` as they are: the same settings
    but for the task list, and every stored record is one of ``tasks`` holding at least its options
    (a sweep made before options that no plan can use were skipped measured them too)."""
    same = [k for k in set(old) | set(new) if k not in ("tasks", "num_tasks")]
    if any(old.get(k) != new.get(k) for k in same):
        return False
    by_key = {t.key: {str(b) for b in t.bits} for t in tasks}
    found = sens.RecordFile(records).load(repair=False)
    return all(k in by_key and by_key[k] <= set(rec["values"]) for k, rec in found.items())


def merge(ws: Workspace, tasks: Sequence[sens.Task], identity: Mapping[str, Any], strict: bool) -> list[dict] | None:
    """All records in task order, or None (strict=False) / ShardError (strict=True) when a shard is not ready."""
    n = identity["num_shards"]
    problems, by_key = [], {}
    for i in range(n):
        header, records = shard_paths(i, n)
        if not ws.exists(header):
            problems.append(f"shard {i} has not run (run stage.shard={i} stage.num_shards={n})")
            continue
        if ws.read_json(header, "sensitivity").get("identity") != identity:
            problems.append(f"shard {i} was run with other settings (prompts, bits, layers or model differ); "
                            f"rerun it with stage.shard={i} stage.num_shards={n} stage.restart=true")
            continue
        record_file = sens.RecordFile(ws.path(records))
        found = record_file.load(repair=False)
        expected = sens.shard_tasks(tasks, i, n)
        missing = [t.key for t in expected if t.key not in found]
        stray = set(found) - {t.key for t in expected}
        if record_file.lines > len(found):
            problems.append(f"shard {i} holds {record_file.lines - len(found)} duplicated records (was it run twice "
                            f"at once?); rerun it with stage.shard={i} stage.num_shards={n} stage.restart=true")
        if stray:
            problems.append(f"shard {i} holds {len(stray)} records that belong to no task of shard {i}/{n}")
        if missing:
            problems.append(f"shard {i} is incomplete ({len(expected) - len(missing)}/{len(expected)} tasks); "
                            f"rerun stage.shard={i} stage.num_shards={n} to resume it")
        by_key.update({k: v for k, v in found.items() if k not in stray})
    if problems:
        if strict:
            raise ShardError("cannot merge the sensitivity shards: " + "; ".join(problems))
        log.info("sensitivity not merged yet: %s", "; ".join(problems))
        return None
    # Only each task's options: records kept from a sweep that measured more (:func:`_covered`) are cut down.
    out = []
    for t in tasks:
        rec, wanted = by_key[t.key], {str(b) for b in t.bits}
        out.append({**rec, "values": {b: v for b, v in rec["values"].items() if b in wanted}})
    return out


def write_merged(ws: Workspace, records: list[dict], census_order: Sequence[str], counts: Mapping[str, int],
                 always_protect: Sequence[str], act_bits_for_protection: int) -> dict[str, Any]:
    """The merged sweep's artifacts: mean tables, the per-prompt table, protected layers, plots."""
    tables = {(k, g): sens.mean_table(records, k, g) for k in sens.KINDS for g in ("content", "quality")}
    for (k, g), table in tables.items():
        artifacts.write_sensitivity_table(ws, k, g, table)
    artifacts.write_per_prompt(ws, sens.per_prompt_rows(records))
    protected = {}
    if any(tables[("a", g)] for g in ("content", "quality")):
        protected = sens.choose_protected({g: tables[("a", g)] for g in ("content", "quality")}, counts,
                                          always_protect, bits=act_bits_for_protection)
        protected = {n: protected[n] for n in census_order if n in protected}
    artifacts.write_protected(ws, list(protected))
    plot_paths = _plots(ws, tables, census_order)
    return {"tables": tables, "protected": protected, "plots": plot_paths}


def _plots(ws: Workspace, tables, census_order: Sequence[str]) -> list[str]:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    depth = {n: i for i, n in enumerate(census_order)}
    paths = []
    for (kind, group), table in tables.items():
        if not table:
            continue
        fig, ax = plt.subplots(figsize=(10, 3.2))
        names = sorted(table, key=depth.get)
        for b in sorted({b for v in table.values() for b in v}, key=option_order):
            have = [n for n in names if b in table[n]]  # grouped options exist only for wide layers
            ax.plot([depth[n] for n in have], [table[n][b] for n in have], marker=".", lw=0.8,
                    label=f"{'W' if kind == 'w' else 'A'}{b}")
        ax.set_xlabel("layer depth (module order)")
        ax.set_ylabel("SSIM" if group == "content" else "SQNR (dB)")
        ax.set_title(f"{'weight' if kind == 'w' else 'activation'} sensitivity, {group} layers")
        ax.legend(loc="lower right", fontsize=8)
        fig.tight_layout()
        name = f"{artifacts.SENSITIVITY_PLOTS_DIR}/sens_{kind}_{group}.png"
        with ws.atomic_path(name) as tmp:
            fig.savefig(tmp, dpi=110, format="png")
        plt.close(fig)
        paths.append(name)
    return paths


def shard_status(root: str | os.PathLike, num_shards: int) -> list[dict[str, Any]]:
    """What the records of each shard of an n-shard sensitivity sweep say, without loading the model.

    ``state`` is ``not run``, ``other settings`` (its header differs from shard 0's), ``incomplete``
    or ``complete``. The stage's own merge makes the full check (every record belongs to its shard).
    """
    root = Path(root)
    out, first = [], None
    for i in range(num_shards):
        header, records_name = shard_paths(i, num_shards)
        row: dict[str, Any] = {"shard": i, "state": "not run", "done": 0, "expected": None}
        if (root / header).exists():
            ident = json.loads((root / header).read_text()).get("identity", {})
            first = ident if first is None else first
            records = sens.RecordFile(root / records_name)
            row["done"] = len(records.load(repair=False))
            row["expected"] = len(range(i, int(ident.get("num_tasks", 0)), num_shards))
            row["duplicates"] = records.lines - row["done"]
            if ident != first:
                row["state"] = "other settings"
            else:
                row["state"] = "complete" if row["done"] >= row["expected"] and not row["duplicates"] else "incomplete"
        out.append(row)
    return out
