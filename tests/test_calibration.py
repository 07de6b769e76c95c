import pytest
import torch

from mixprec.calibration import load_params
from mixprec.metrics import sqnr_db
from mixprec.quantizers import fake_quant_weight
from mixprec.runner import run_stage
from mixprec.context import load_calibrated


@pytest.fixture(scope="module")
def calibrated(tmp_path_factory):
    from tests.conftest import compose
    out = tmp_path_factory.mktemp("calib")
    cfg = compose([f"paths.outputs={out}", "tracking=disabled", "device=cpu", "model=tiny_random", "stage=calibrate"])
    run_stage(cfg)
    return cfg, out


def test_calibration_file_round_trips_and_repeats_exactly(calibrated, tmp_path):
    from tests.conftest import compose
    cfg, out = calibrated
    path = out / "tiny_random" / "quant_params.safetensors"
    params, meta = load_params(path)
    assert meta["weight_bits"] == [2, 4, 8] and meta["act_bits"] == [4, 8]
    assert meta["fingerprints"]["model"] and len(params) == 85
    cfg2 = compose([f"paths.outputs={tmp_path}", "tracking=disabled", "device=cpu", "model=tiny_random", "stage=calibrate"])
    run_stage(cfg2)
    params2, _ = load_params(tmp_path / "tiny_random" / "quant_params.safetensors")
    for name, p in params.items():
        q = params2[name]
        assert p.act_range == q.act_range and p.act_params == q.act_params
        for b in (2, 4, 8):
            assert torch.equal(p.weight_scales[b], q.weight_scales[b])


def test_weight_sqnr_of_every_layer_increases_with_bits(calibrated):
    cfg, _ = calibrated
    from mixprec.workspace import Workspace
    from mixprec.context import fingerprints
    ws = Workspace(cfg.paths.workspace, fingerprints(cfg))
    bundle = load_calibrated(cfg, ws)
    for name, layer in bundle.layers.items():
        w = layer.inner.weight
        s = [sqnr_db(w, fake_quant_weight(w, layer.params.weight_scales[b], b)) for b in (2, 4, 8)]
        assert s[0] < s[1] < s[2], name


def test_cross_attention_kv_ranges_exclude_bos(calibrated):
    cfg, out = calibrated
    params, _ = load_params(out / "tiny_random" / "quant_params.safetensors")
    kv = [n for n in params if n.endswith(("attn2.to_k", "attn2.to_v"))]
    assert kv
    # Recompute the full range over the same calibration with the BOS token included: it is wider.
    from mixprec.workspace import Workspace
    from mixprec.context import fingerprints, prompt_set
    bundle = load_calibrated(cfg, Workspace(cfg.paths.workspace, fingerprints(cfg)))
    seen = {}
    hooks = [bundle.layers[n].register_forward_pre_hook(
        lambda m, a, n=n: seen.setdefault(n, []).append(a[0][:, 0].abs().max().item())) for n in kv]
    pairs = prompt_set(cfg, "calibration")
    bundle.sampler.generate([p for p, _ in pairs], [s for _, s in pairs], decode=False)
    for h in hooks:
        h.remove()
    for n in kv:
        lo, hi = params[n].act_range
        assert max(seen[n]) > max(abs(lo), abs(hi)), n


def test_missing_bits_and_other_models_are_refused(calibrated, tmp_path):
    from tests.conftest import compose
    from mixprec.workspace import FingerprintMismatchError, Workspace
    from mixprec.context import fingerprints
    cfg, out = calibrated
    more_bits = compose([f"paths.outputs={out}", "tracking=disabled", "device=cpu", "model=tiny_random",
                         "quant.weight_bits=[2,3,4,8]"])
    with pytest.raises(FingerprintMismatchError, match="quantization recipe"):
        load_calibrated(more_bits, Workspace(more_bits.paths.workspace, fingerprints(more_bits)))
    other_seed = compose([f"paths.outputs={out}", "tracking=disabled", "device=cpu", "model=tiny_random", "model.seed=1"])
    with pytest.raises(FingerprintMismatchError, match="another model"):
        load_calibrated(other_seed, Workspace(other_seed.paths.workspace, fingerprints(other_seed)))
