"""The tiny model's data: generator, held-out split, adherence checker, tokenizer."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import ndimage

from mixprec.tiny import adherence, shapes
from mixprec.tiny.tokenizer import build_tokenizer, load_tokenizer, verify_tokenizer


def test_generator_is_deterministic_and_in_range():
    a, caps_a, specs_a = shapes.sample_batch(16, seed=5)
    b, caps_b, specs_b = shapes.sample_batch(16, seed=5)
    c, _, _ = shapes.sample_batch(16, seed=6)
    assert torch.equal(a, b) and caps_a == caps_b and specs_a == specs_b
    assert not torch.equal(a, c)
    assert a.shape == (16, 3, 64, 64) and a.dtype == torch.float32
    assert float(a.min()) >= 0.0 and float(a.max()) <= 1.0
    img = shapes.render_pil(specs_a[0])
    assert img.size == (64, 64) and img.mode == "RGB"
    assert np.array_equal(np.asarray(img), shapes.render(specs_a[0]))
    for s in specs_a:
        assert s.shape_colour != s.background
        assert shapes.MARGIN <= s.x0 and s.x0 + s.size <= 64 - shapes.MARGIN
        assert s.caption == f"a {s.shape_colour} {s.shape} on a {s.background} background"


def test_vocabulary_sizes():
    assert len(shapes.COLOUR_NAMES) >= 6 and len(shapes.SHAPES) >= 4
    pal = np.asarray(list(shapes.COLOURS.values()), dtype=float)
    d = np.linalg.norm(pal[:, None] - pal[None], axis=-1) + np.eye(len(pal)) * 1e9
    assert d.min() > 150  # well separated: a blurry pixel still lands on its own colour


def test_heldout_split_is_fixed_disjoint_and_covers_every_pair():
    train, held = shapes.split_combos()
    assert shapes.split_combos() == (train, held)
    assert set(train).isdisjoint(held)
    assert set(train) | set(held) == set(shapes.all_combos())
    assert 0.12 <= len(held) / len(shapes.all_combos()) <= 0.2
    # Every colour/shape and every pair of attributes of a held-out combination is seen in training.
    for c, s, b in held:
        assert any(t[0] == c and t[1] == s for t in train)
        assert any(t[0] == c and t[2] == b for t in train)
        assert any(t[1] == s and t[2] == b for t in train)
    # Training batches never show a held-out combination; evaluation prompts do.
    _, caps, specs = shapes.sample_batch(200, seed=1, split="train")
    assert not {s.combo for s in specs} & set(held)
    ev = shapes.eval_prompts(64, split="heldout")
    assert len(ev) == 64 and len({s for _, s in ev}) == 64
    assert {adherence.parse_caption(c)["shape"] for c, _ in ev} == set(shapes.SHAPES)
    held_caps = {shapes.caption(*h) for h in held}
    assert {c for c, _ in ev} <= held_caps


def test_parse_caption():
    assert adherence.parse_caption("a red circle on a blue background") == {
        "shape_colour": "red", "shape": "circle", "background": "blue"}
    with pytest.raises(ValueError):
        adherence.parse_caption("a purple circle on a blue background")
    with pytest.raises(ValueError):
        adherence.parse_caption("a photo of a cat")


def test_checker_on_generator_images():
    specs = shapes.sample_specs(500, seed=123, split="all")
    imgs = [shapes.render(s) for s in specs]
    caps = [s.caption for s in specs]
    res = adherence.check_batch(imgs, caps)
    assert res["all"] >= 0.99, res
    # The same images, blurred and noisy like a generated image, are still read correctly.
    rng = np.random.default_rng(0)
    noisy = [np.clip(ndimage.gaussian_filter(im / 255.0, (1.0, 1.0, 0)) + rng.normal(0, 0.06, im.shape), 0, 1)
             for im in imgs[:200]]
    assert adherence.check_batch(noisy, caps[:200])["all"] >= 0.97
    # Wrong captions are rejected attribute by attribute.
    nxt = {s: shapes.SHAPES[(i + 1) % len(shapes.SHAPES)] for i, s in enumerate(shapes.SHAPES)}
    wrong_shape = [shapes.caption(s.shape_colour, nxt[s.shape], s.background) for s in specs[:100]]
    r = adherence.check_batch(imgs[:100], wrong_shape)
    assert r["shape"] <= 0.01 and r["shape_colour"] >= 0.99 and r["all"] <= 0.01
    swapped = [shapes.caption(s.background, s.shape, s.shape_colour) for s in specs[:100]]
    r = adherence.check_batch(imgs[:100], swapped)
    assert r["background"] == 0.0 and r["shape_colour"] == 0.0


def test_checker_inputs_and_empty_image():
    spec = shapes.sample_specs(1, seed=3)[0]
    cap = spec.caption
    for im in (shapes.render(spec), shapes.render_pil(spec), shapes.render_tensor(spec),
               shapes.render_tensor(spec).permute(1, 2, 0).numpy()):
        assert adherence.check(im, cap)["all"]
    blank = np.full((64, 64, 3), shapes.COLOURS[spec.background], dtype=np.uint8)
    r = adherence.check(blank, cap)
    assert r["background"] and not r["shape"] and not r["shape_colour"] and not r["all"]


def test_tokenizer_really_tokenizes(tmp_path):
    tok = build_tokenizer()
    assert tok.model_max_length == 16
    ids_seen = set()
    for cap in shapes.iter_captions("all"):
        enc = tok(cap)["input_ids"]
        assert enc[0] == tok.bos_token_id and enc[-1] == tok.eos_token_id
        body = enc[1:-1]
        assert len(body) == len(cap.split())  # one token per word
        assert tok.unk_token_id not in enc
        assert tok.decode(enc, skip_special_tokens=True) == cap
        ids_seen.update(body)
    word_ids = {w: tok(w, add_special_tokens=False)["input_ids"] for w in shapes.VOCABULARY}
    assert all(len(v) == 1 for v in word_ids.values())
    assert len({v[0] for v in word_ids.values()}) == len(shapes.VOCABULARY)
    padded = tok("a red circle on a blue background", padding="max_length", max_length=16)["input_ids"]
    assert len(padded) == 16
    # Saved and reloaded (the pipeline's path), it tokenizes identically.
    tok.save_pretrained(tmp_path / "tok")
    tok2 = load_tokenizer(tmp_path / "tok")
    assert tok2("a cyan cross on a black background")["input_ids"] == tok("a cyan cross on a black background")["input_ids"]


def test_tokenizer_load_refuses_missing_or_empty_folder(tmp_path):
    with pytest.raises(FileNotFoundError):
        load_tokenizer(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError):
        load_tokenizer(tmp_path / "empty")
    # The trap itself: transformers loads an empty folder without complaint, verify_tokenizer does not.
    from transformers import CLIPTokenizer

    useless = CLIPTokenizer.from_pretrained(str(tmp_path / "empty"))
    with pytest.raises(ValueError):
        verify_tokenizer(useless)
