import pytest

from mixprec.workspace import FingerprintMismatchError, MissingArtifactError, Workspace, fingerprint


def test_atomic_write_leaves_nothing_on_failure(tmp_path):
    ws = Workspace(tmp_path)
    ws.write_text("a.txt", "old")
    with pytest.raises(RuntimeError):
        with ws.atomic_path("a.txt") as tmp:
            tmp.write_text("half-written")
            raise RuntimeError("interrupted")
    assert ws.path("a.txt").read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.txt"]


def test_round_trips(tmp_path):
    ws = Workspace(tmp_path)
    ws.write_yaml("x/plan.yaml", {"b": {2: 0.5}, "a": [1, 2]})
    assert ws.read_yaml("x/plan.yaml", "allocate") == {"b": {2: 0.5}, "a": [1, 2]}
    ws.write_csv("t.csv", [{"k": 1, "v": "x"}], ["k", "v"])
    assert ws.read_csv("t.csv", "inspect") == [{"k": "1", "v": "x"}]


def test_missing_artifact_names_the_stage(tmp_path):
    ws = Workspace(tmp_path)
    with pytest.raises(MissingArtifactError, match=r"stage=calibrate"):
        ws.require("quant_params.safetensors", "calibrate")


def test_fingerprint_mismatch_is_refused(tmp_path):
    ws = Workspace(tmp_path, {"model": "aaa", "quant": "bbb"})
    ws.check_fingerprints({"model": "aaa", "quant": "bbb"}, "x", "calibrate")
    with pytest.raises(FingerprintMismatchError, match=r"another model .*stage=calibrate"):
        ws.check_fingerprints({"model": "zzz", "quant": "bbb"}, "x", "calibrate")
    with pytest.raises(FingerprintMismatchError, match=r"quantization recipe"):
        ws.check_fingerprints({"model": "aaa", "quant": "zzz"}, "x", "calibrate")


def test_fingerprint_ignores_key_order():
    assert fingerprint({"a": 1, "b": [1, 2]}) == fingerprint({"b": [1, 2], "a": 1})
    assert fingerprint({"a": 1}) != fingerprint({"a": 2})


def test_retrained_builtin_weights_of_the_same_size_change_the_model_fingerprint(tmp_path):
    """A built-in model retrained in place keeps its files' names and sizes: the fingerprint must still
    change, or a workspace calibrated for the old weights would be reused for the new ones."""
    import os

    from mixprec.models import ModelSpec

    folder = tmp_path / "compose" / "unet"
    folder.mkdir(parents=True)
    weights = folder / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(b"\x00" * 64)
    spec = ModelSpec.from_dict({"name": "compose", "source": "builtin", "path": str(tmp_path / "compose")})
    before = fingerprint(spec.fingerprint_data())
    assert fingerprint(spec.fingerprint_data()) == before  # deterministic
    weights.write_bytes(b"\x01" * 64)  # same size, other weights
    os.utime(weights, ns=(1, 1))  # even with an old timestamp
    assert fingerprint(spec.fingerprint_data()) != before
