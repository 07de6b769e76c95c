"""The workspace: one folder that the stages of a run share.

Every artifact is written atomically (temporary name in the same folder, then ``os.replace``)
so an interrupted stage never leaves a half-written file that looks like a result. Artifacts that
later stages depend on carry a fingerprint of the model and of the quantization recipe; reading
one produced for another model or recipe fails with a message naming the stage to rerun.
"""

from __future__ import annotations

import contextlib
import csv
import hashlib
import io
import json
import os
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml


_UMASK = os.umask(0)
os.umask(_UMASK)


class MissingArtifactError(FileNotFoundError):
    """An input artifact is missing: the message names the stage that produces it."""


class FingerprintMismatchError(ValueError):
    """An artifact was produced for another model or quantization recipe."""


def fingerprint(obj: Any) -> str:
    """Short stable hash of a JSON-serialisable object (key order does not matter)."""
    text = json.dumps(obj, sort_keys=True, default=str, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _to_builtin(obj: Any) -> Any:
    """Convert numpy/torch scalars and tuples to plain Python so YAML/JSON stay readable."""
    if isinstance(obj, Mapping):
        return {(_to_builtin(k) if not isinstance(k, str) else k): _to_builtin(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_to_builtin(v) for v in obj]
    if isinstance(obj, Path):
        return str(obj)
    if hasattr(obj, "item") and callable(obj.item) and getattr(obj, "ndim", 1) == 0:
        return obj.item()
    return obj


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success it is renamed to ``path``, on error removed."""
    final = Path(path)
    final.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{final.name}.", suffix=".tmp", dir=final.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    os.chmod(tmp_path, 0o666 & ~_UMASK)
    try:
        yield tmp_path
        # again: writers that replace the file (safetensors creates it 0600) must not narrow its mode
        os.chmod(tmp_path, 0o666 & ~_UMASK)
        os.replace(tmp_path, final)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_text(text)
    return Path(path)


class UnreadableArtifactError(ValueError):
    """A file that exists but cannot be read back (truncated, damaged, not what its name says)."""


def safetensors_problem(path: str | os.PathLike) -> str | None:
    """Why ``path`` is not a complete safetensors file, or None; reads the header only (no tensors)."""
    path = Path(path)
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                return f"{size} bytes, shorter than a safetensors header"
            n = int.from_bytes(head, "little")
            if n > size - 8:
                return f"its header claims {n} bytes but the file has {size}: truncated"
            header = json.loads(f.read(n))
    except OSError as exc:
        return f"cannot be read ({exc.strerror or exc})"
    except (UnicodeDecodeError, json.JSONDecodeError):
        return "its header is not JSON: damaged or not a safetensors file"
    if not isinstance(header, dict):
        return "its header is not a mapping: damaged or not a safetensors file"
    end = max([int((v.get("data_offsets") or [0, 0])[1]) for k, v in header.items()
               if k != "__metadata__" and isinstance(v, dict)] or [0])
    if 8 + n + end > size:
        return f"its tensors need {8 + n + end} bytes but the file has {size}: truncated"
    return None


def check_safetensors(path: str | os.PathLike, rewrite: str) -> Path:
    """Refuse a truncated or damaged safetensors file, naming it, the cause and what writes it again."""
    problem = safetensors_problem(path)
    if problem:
        raise UnreadableArtifactError(f"{path} is unreadable: {problem}. It is written by {rewrite}: run that "
                                      f"again to replace it (the other artifacts are kept).")
    return Path(path)


class Workspace:
    """A folder of artifacts with atomic writes and fingerprint checks."""

    def __init__(self, root: str | os.PathLike, fingerprints: Mapping[str, str] | None = None):
        self.root = Path(root).resolve()
        try:
            self.root.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise self._not_writable(exc) from None
        # {"model": ..., "quant": ...}: what artifacts of this run must have been produced for.
        self.fingerprints = dict(fingerprints or {})

    def __repr__(self) -> str:
        return f"Workspace({str(self.root)!r})"

    def path(self, name: str | os.PathLike) -> Path:
        return self.root / name

    def _not_writable(self, exc: OSError) -> PermissionError:
        return PermissionError(f"the workspace {self.root} is not writable ({exc.strerror or exc}): point "
                               f"paths.workspace (or paths.outputs) at a folder you can write, or fix its permissions")

    def check_writable(self) -> "Workspace":
        """Fail now, not when the first artifact is written after minutes of work."""
        try:
            fd, probe = tempfile.mkstemp(prefix=".write_check.", dir=self.root)
            os.close(fd)
            os.unlink(probe)
        except OSError as exc:
            raise self._not_writable(exc) from None
        return self

    def exists(self, name: str | os.PathLike) -> bool:
        return self.path(name).exists()

    # ------------------------------------------------------------------ writing
    def atomic_path(self, name: str | os.PathLike):
        """Context manager: a temporary path renamed to ``name`` on success, removed on error."""
        return atomic_path(self.path(name))

    def write_bytes(self, name: str | os.PathLike, data: bytes) -> Path:
        with self.atomic_path(name) as tmp:
            tmp.write_bytes(data)
        return self.path(name)

    def write_text(self, name: str | os.PathLike, text: str) -> Path:
        return self.write_bytes(name, text.encode())

    def write_json(self, name: str | os.PathLike, obj: Any) -> Path:
        return self.write_text(name, json.dumps(_to_builtin(obj), indent=2, sort_keys=False) + "\n")

    def write_yaml(self, name: str | os.PathLike, obj: Any) -> Path:
        return self.write_text(name, yaml.safe_dump(_to_builtin(obj), sort_keys=False, width=120))

    def write_csv(self, name: str | os.PathLike, rows: Sequence[Mapping[str, Any]], columns: Sequence[str]) -> Path:
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=list(columns), lineterminator="\n")
        writer.writeheader()
        for row in rows:
            writer.writerow({c: _to_builtin(row.get(c)) for c in columns})
        return self.write_text(name, buf.getvalue())

    # ------------------------------------------------------------------ reading
    def require(self, name: str | os.PathLike, producer: str) -> Path:
        """Path of an input artifact, or a clear error naming the stage that writes it."""
        p = self.path(name)
        if not p.exists():
            raise MissingArtifactError(
                f"{name} is missing from the workspace {self.root}. "
                f"It is written by the '{producer}' stage: run `python run.py stage={producer}` "
                f"with the same model/quant/paths options first (or `stage=pipeline` to run everything)."
            )
        return p

    def read_json(self, name: str | os.PathLike, producer: str) -> Any:
        return json.loads(self.require(name, producer).read_text())

    def read_yaml(self, name: str | os.PathLike, producer: str) -> Any:
        return yaml.safe_load(self.require(name, producer).read_text())

    def read_csv(self, name: str | os.PathLike, producer: str) -> list[dict[str, str]]:
        with open(self.require(name, producer), newline="") as f:
            return list(csv.DictReader(f))

    # ------------------------------------------------------------------ fingerprints
    def check_fingerprints(self, found: Mapping[str, Any] | None, artifact: str, producer: str,
                           keys: Sequence[str] = ("model", "quant")) -> None:
        """Raise when an artifact's fingerprints differ from this run's."""
        found = found or {}
        for key in keys:
            expected = self.fingerprints.get(key)
            got = found.get(key)
            if expected is None:
                continue
            if got != expected:
                what = "model" if key == "model" else "quantization recipe" if key == "quant" else key
                raise FingerprintMismatchError(
                    f"{artifact} in {self.root} was produced for another {what} "
                    f"(fingerprint {got!r}, this run expects {expected!r}). Rerun "
                    f"`python run.py stage={producer}` with this run's options, or point paths.workspace "
                    f"at a fresh folder."
                )

    def record_stage(self, stage: str, config: Mapping[str, Any], wall_time_s: float,
                     headline: Mapping[str, Any]) -> Path:
        """Write ``<stage>.json``: resolved config, wall time and the stage's headline numbers."""
        return self.write_json(f"{stage}.json", {
            "stage": stage,
            "fingerprints": self.fingerprints,
            "wall_time_s": round(float(wall_time_s), 3),
            "headline": headline,
            "config": config,
        })
