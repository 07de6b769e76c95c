"""The selection ranking (stage.metric): auto, adherence first, PSNR robust to one outlier image."""

import pytest

from mixprec.selection import Candidate, rank, resolve_metric, sort_key


def _cand(path, mse, psnr, adherence=None, ssim=0.9):
    c = Candidate(path, {}, {})
    c.scores = {"mse": mse, "psnr_db": psnr, "ssim": ssim} | ({"adherence": adherence} if adherence is not None else {})
    return c


def test_auto_resolves_by_checker_and_bad_values_name_the_setting():
    assert resolve_metric("auto", "compose_scenes") == "adherence"
    assert resolve_metric("auto", None) == "psnr"
    assert resolve_metric("mse", None) == "mse"
    with pytest.raises(ValueError, match=r"stage.select_metric=adherence needs a model with a content checker"):
        resolve_metric("adherence", None, "stage.select_metric")
    with pytest.raises(ValueError, match=r"unknown selection metric 'lpips'; stage.metric is one of auto, adherence"):
        resolve_metric("lpips", "tiny_shapes")


def test_psnr_ranks_by_the_typical_image_where_the_mean_mse_follows_one_outlier():
    # plan a: 7 images at MSE 1e-4 and one whose object moved (MSE 0.02); plan b: all 8 at MSE 8e-4
    a_mse = [1e-4] * 7 + [0.02]
    import math
    a = _cand("a", sum(a_mse) / 8, sum(-10 * math.log10(m) for m in a_mse) / 8)
    b = _cand("b", 8e-4, -10 * math.log10(8e-4))
    assert [c.path for c in rank([a, b], "mse")] == ["b", "a"]
    assert [c.path for c in rank([a, b], "psnr")] == ["a", "b"]


def test_adherence_first_then_psnr_then_mse_and_ties_by_path():
    hi_adh = _cand("z", 5e-3, 24.0, adherence=1.0)
    lo_adh = _cand("y", 1e-3, 30.0, adherence=0.875)
    same = _cand("x", 1e-3, 30.0, adherence=0.875)
    better_psnr = _cand("w", 2e-3, 31.0, adherence=0.875)
    assert [c.path for c in rank([lo_adh, same, hi_adh, better_psnr], "adherence")] == ["z", "w", "x", "y"]
    assert sort_key(hi_adh.scores, "adherence") == (-1.0, -24.0, 5e-3)
    with pytest.raises(ValueError, match="needs a model with a content checker"):
        sort_key(_cand("v", 1e-3, 30.0).scores, "adherence")
    with pytest.raises(ValueError, match="auto is resolved first"):
        sort_key(hi_adh.scores, "auto")
