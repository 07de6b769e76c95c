"""Sensitivity sweep on tiny_random: ordering of the metric by bits, resume and shards byte-identical."""

import json

import pytest

from mixprec.runner import run_stage
from mixprec.artifacts import PER_PROMPT_CSV, PROTECTED_YAML
from mixprec.artifacts import sensitivity_table as table_name
from mixprec.shards import ShardError

OUTPUTS = [table_name(k, g) for k in ("w", "a") for g in ("content", "quality")] + [PER_PROMPT_CSV, PROTECTED_YAML]
FAST = ["model=tiny_random", "prompts.sensitivity.n=3", "stage.batch_size=3", "stage.progress=false"]
# 20 of the 85 layers, content and quality ones (40 tasks): the resume and shard checks compare runs
# over this slice, each measuring a quarter of what the whole sweep does
SLICE = [*FAST, "stage.layers=[mid_block,conv_in,conv_out]"]


def _files(ws):
    return {name: (ws / name).read_bytes() for name in OUTPUTS}


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory):
    from tests.conftest import compose
    out = tmp_path_factory.mktemp("sens_ref")
    base = [f"paths.outputs={out}", "tracking=disabled", "device=cpu"]
    run_stage(compose(base + ["model=tiny_random", "stage=calibrate"]))
    head = run_stage(compose(base + ["stage=sensitivity"] + FAST))
    return out, head, _files(out / "tiny_random")


def _calibrated_copy(reference_run, tmp_path):
    import shutil
    out, _, _ = reference_run
    ws = tmp_path / "tiny_random"
    ws.mkdir()
    for name in ("quant_params.safetensors", "layers.csv", "calibrate.json"):
        shutil.copy(out / "tiny_random" / name, ws / name)
    return ws


@pytest.fixture(scope="module")
def sliced_reference(reference_run, tmp_path_factory):
    """The unsharded, uninterrupted run over SLICE: its output files (read-only)."""
    from tests.conftest import compose
    ws = _calibrated_copy(reference_run, tmp_path_factory.mktemp("sens_slice"))
    head = run_stage(compose([f"paths.workspace={ws}", "tracking=disabled", "device=cpu", "stage=sensitivity",
                              *SLICE]))
    assert head["merged"] and head["tasks"] == 2 * 20
    return _files(ws)


def test_metric_ordered_by_bits_and_outputs_complete(reference_run):
    out, head, files = reference_run
    assert head["merged"] and head["tasks"] == 2 * 85
    for key, frac in head["monotone_fraction"].items():
        assert frac >= 0.95, key
    import yaml
    w_content = yaml.safe_load(files[table_name("w", "content")])
    assert len(w_content) == 24 and all(set(v) == {2, 4, 8} for v in w_content.values())
    # quant.weight_bits_by_group.quality = [4, 8]: no plan gives a quality layer 2 bits, so none is measured
    w_quality = yaml.safe_load(files[table_name("w", "quality")])
    assert len(w_quality) == 61 and all(set(v) == {4, 8} for v in w_quality.values())
    a_quality = yaml.safe_load(files[table_name("a", "quality")])
    assert all(set(v) == {4, 8} for v in a_quality.values())
    assert all(0 < v[8] <= 100 for v in a_quality.values())  # SQNR in dB, capped
    rows = files[PER_PROMPT_CSV].decode().splitlines()
    assert rows[0] == "kind,group,layer,bits,prompt,value"
    assert len(rows) - 1 == 3 * (24 * 3 + 61 * 2 + 85 * 2)  # prompts x (weight bits + act bits) per layer
    assert head["evals"] == {"content": 24 * (3 + 2), "quality": 61 * (2 + 2)}  # 364: no quality W2
    protected = yaml.safe_load(files[PROTECTED_YAML])
    assert protected[0] == "conv_in" and protected[-1] == "conv_out" and len(protected) == 6
    rec = json.loads((out / "tiny_random" / "sensitivity.json").read_text())
    assert rec["headline"]["seconds_per_eval"]["content"] > 0


def test_interrupted_then_resumed_is_byte_identical(reference_run, sliced_reference, make_cfg, tmp_path):
    expected = sliced_reference
    ws = _calibrated_copy(reference_run, tmp_path)
    head = run_stage(make_cfg("stage=sensitivity", "stage.max_tasks=15", *SLICE))
    assert not head["merged"] and head["shard_tasks_done"] == 15
    assert not (ws / table_name("w", "content")).exists()
    # A crash in the middle of writing a record leaves a cut line: it is dropped and redone.
    with open(ws / "sensitivity" / "shard0of1.jsonl", "a") as f:
        f.write('{"layer": "half')
    head = run_stage(make_cfg("stage=sensitivity", *SLICE))
    assert head["merged"]
    assert _files(ws) == expected


def test_three_shards_merge_to_the_same_files(reference_run, sliced_reference, make_cfg, tmp_path):
    expected = sliced_reference
    ws = _calibrated_copy(reference_run, tmp_path)
    for i in (0, 2):
        head = run_stage(make_cfg("stage=sensitivity", f"stage.shard={i}", "stage.num_shards=3", *SLICE))
        assert not head["merged"]
    with pytest.raises(ShardError, match=r"shard 1 has not run \(run stage.shard=1 stage.num_shards=3\)"):
        run_stage(make_cfg("stage=sensitivity", "stage.merge_only=true", "stage.num_shards=3", *SLICE))
    head = run_stage(make_cfg("stage=sensitivity", "stage.shard=1", "stage.num_shards=3", *SLICE))
    assert head["merged"]
    assert _files(ws) == expected


def test_records_from_other_settings_are_refused(reference_run, make_cfg, tmp_path):
    _calibrated_copy(reference_run, tmp_path)
    run_stage(make_cfg("stage=sensitivity", "stage.max_tasks=1", *FAST))
    with pytest.raises(ShardError, match="stage.restart=true"):
        run_stage(make_cfg("stage=sensitivity", "stage.max_tasks=1", "stage.sqnr_cap_db=50", *FAST))
    with pytest.raises(ShardError, match="shard must be in"):
        run_stage(make_cfg("stage=sensitivity", "stage.shard=3", "stage.num_shards=3", *FAST))


def test_rerun_of_a_finished_shard_does_not_load_the_model(reference_run, make_cfg, tmp_path, monkeypatch):
    _calibrated_copy(reference_run, tmp_path)
    args = ("stage=sensitivity", "stage.shard=0", "stage.num_shards=3", *SLICE)
    first = run_stage(make_cfg(*args))
    assert first["shard_tasks_done"] == first["shard_tasks"] and not first["merged"]
    import mixprec.stages.sensitivity as stage

    def no_model(*a, **k):
        raise AssertionError("the model was loaded for a shard with nothing left to do")
    monkeypatch.setattr(stage, "load_calibrated", no_model)
    again = run_stage(make_cfg(*args))
    assert again["shard_tasks_done"] == first["shard_tasks_done"] and not again["merged"]
    with pytest.raises(AssertionError, match="the model was loaded"):  # shard 1 has work: it needs the model
        run_stage(make_cfg("stage=sensitivity", "stage.shard=1", "stage.num_shards=3", *SLICE))


def test_calibration_listing_layers_in_another_order_is_refused(reference_run, make_cfg, tmp_path, monkeypatch):
    _calibrated_copy(reference_run, tmp_path)
    import mixprec.stages.sensitivity as stage
    from mixprec.context import Calibration

    real = stage.read_calibration

    def reversed_calibration(cfg, ws):
        c = real(cfg, ws)
        return Calibration(c.path, dict(reversed(list(c.params.items()))), c.meta)
    monkeypatch.setattr(stage, "read_calibration", reversed_calibration)
    with pytest.raises(ValueError, match="lists the quantizable layers in another order .* rerun stage=calibrate"):
        run_stage(make_cfg("stage=sensitivity", "stage.max_tasks=1", *FAST))


def test_only_options_a_plan_can_use_are_evaluated(reference_run, make_cfg, tmp_path, monkeypatch):
    """The default recipe never gives a quality layer 2-bit weights: the sweep makes no such generation."""
    import mixprec.sensitivity as sens
    ws = _calibrated_copy(reference_run, tmp_path)
    calls = {"content": 0, "quality": 0}
    real_score = sens.score

    def counted(sampler, group, *args, **kwargs):
        calls[group] += 1
        return real_score(sampler, group, *args, **kwargs)
    monkeypatch.setattr(sens, "score", counted)
    head = run_stage(make_cfg("stage=sensitivity", *SLICE))  # 3 prompts per batch: one generation per evaluation
    assert head["merged"]
    records = [json.loads(line) for line in (ws / "sensitivity" / "shard0of1.jsonl").read_text().splitlines()]
    options = {(r["kind"], r["group"]): set() for r in records}
    for r in records:
        options[r["kind"], r["group"]].add(frozenset(r["values"]))
    assert options == {("w", "content"): {frozenset({"2", "4", "8"})}, ("w", "quality"): {frozenset({"4", "8"})},
                       ("a", "content"): {frozenset({"4", "8"})}, ("a", "quality"): {frozenset({"4", "8"})}}
    quality = sum(r["kind"] == "w" and r["group"] == "quality" for r in records)
    content = sum(r["kind"] == "w" and r["group"] == "content" for r in records)
    assert quality and content and quality + content == 20
    assert calls == {"content": content * 5, "quality": quality * 4}  # W2/4/8 + A4/8; W4/8 + A4/8
    assert head["evals"] == {"content": 24 * 5, "quality": 61 * 4}  # the whole sweep's (all 85 layers)


def test_records_with_more_options_are_kept_and_cut_to_the_sweep(reference_run, sliced_reference, make_cfg, tmp_path):
    """A sweep begun before unusable options were skipped (its records also hold quality W2) resumes
    without measuring again, and merges to the files a fresh sweep writes."""
    ws = _calibrated_copy(reference_run, tmp_path)
    run_stage(make_cfg("stage=sensitivity", "stage.max_tasks=15", *SLICE))
    records = ws / "sensitivity" / "shard0of1.jsonl"
    old = [json.loads(line) for line in records.read_text().splitlines()]
    for r in old:
        if r["kind"] == "w" and r["group"] == "quality":
            r["values"]["2"] = [1.0, 2.0, 3.0]
    assert any("2" in r["values"] and r["group"] == "quality" for r in old)
    records.write_text("".join(json.dumps(r, sort_keys=True) + "\n" for r in old))
    header = ws / "sensitivity" / "shard0of1.json"
    h = json.loads(header.read_text())
    h["identity"]["tasks"], h["identity"]["num_tasks"] = "an older task list", 40
    header.write_text(json.dumps(h))
    head = run_stage(make_cfg("stage=sensitivity", *SLICE))
    assert head["merged"]
    assert _files(ws) == sliced_reference
    # Other settings are still refused: a record missing an option the sweep needs.
    h["identity"]["sqnr_cap_db"] = 50.0
    header.write_text(json.dumps(h))
    with pytest.raises(ShardError, match="stage.restart=true"):
        run_stage(make_cfg("stage=sensitivity", *SLICE))


def test_measured_widths_follow_the_recipe():
    import mixprec.sensitivity as sens
    from mixprec.recipe import QuantRecipe
    from mixprec.stages.sensitivity import measured_widths
    q = QuantRecipe.from_dict({"weight_bits": [2, 4, 8], "act_bits": [4, 8],
                               "weight_bits_by_group": {"content": [2, 4, 8], "quality": [8]},
                               "act_bits_by_group": {"content": [4, 8], "quality": [4]},
                               "protect_act": {"content": 2, "quality": 1}})
    # Quality activations are ranked at A8 for protection: 8 is measured although no plan uses it.
    assert measured_widths(q, 8) == {"w": {"content": [2, 4, 8], "quality": [8]},
                                     "a": {"content": [4, 8], "quality": [4, 8]}}
    no_protect = QuantRecipe.from_dict({**q.to_dict(), "protect_act": {"content": 0, "quality": 0}})
    assert measured_widths(no_protect, 8)["a"]["quality"] == [4]
    tasks = sens.make_tasks({"a": "content", "b": "quality"}, [2, 4], [4, 8], weight_groups={"b": [64]},
                            allowed={"w": {"quality": [2]}, "a": {"content": [16]}})
    # Content weights: no restriction given; quality weights: 2 bits, also per group; content
    # activations: no calibrated width is allowed, so no task.
    assert [(t.key, t.bits) for t in tasks] == [("w:a", (2, 4)), ("w:b", (2, "2g64")), ("a:b", (4, 8))]
