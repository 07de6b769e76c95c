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
