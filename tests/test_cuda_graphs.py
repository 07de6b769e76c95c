"""CUDA-graph replay of a module's forward inside an unchanged caller (mixprec.kernels.cuda_graphs)
and the benchmark stage's end-to-end use of it. The call-signature rules and the settings check run
anywhere; capture and replay are marked ``gpu``."""

import pytest
import torch
import torch.nn as nn

from mixprec.kernels.cuda_graphs import GraphedForward, graphed_forwards
from mixprec.stages.benchmark import end_to_end_graph_components
from mixprec.runner import run_stage


def _key(*args, device_type="cpu", **kwargs):
    import torch.utils._pytree as pytree

    return GraphedForward.signature(*pytree.tree_flatten((args, kwargs)), device_type=device_type)


def test_call_signature_separates_shapes_and_values_and_says_why_a_call_stays_eager():
    x = torch.zeros(2, 3)  # keys computed as if the CPU were the graph device
    assert _key(x, scale=2.0) == _key(torch.ones(2, 3), scale=2.0)  # values of tensors do not matter
    assert _key(x, scale=2.0) != _key(torch.zeros(3, 3), scale=2.0)
    assert _key(x, scale=2.0) != _key(x, scale=3.0)  # python values do
    assert _key(x, scale=2.0) != _key(x.t().contiguous().t(), scale=2.0)  # so do strides
    assert _key(x, extra={"a": None}) != _key(x, extra={"b": None})  # and the argument tree
    # a tensor off the graph device: the call cannot be replayed from a graph
    assert _key(x, device_type="cuda") == "an input tensor is on cpu"
    assert _key(3, opts={1, 2}) == "an argument of type set is not hashable"


def test_end_to_end_graph_components_are_checked_and_ignored_without_cuda():
    assert end_to_end_graph_components(["denoiser", "vae_decode"], cuda=True) == ["denoiser", "vae_decode"]
    assert end_to_end_graph_components(["denoiser"], cuda=False) == []
    assert end_to_end_graph_components([], cuda=True) == []
    with pytest.raises(ValueError, match=r"end_to_end_cuda_graphs: unknown component 'vae'.*vae_decode"):
        end_to_end_graph_components(["denoiser", "vae"], cuda=True)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message without CUDA")
def test_graphed_forwards_without_cuda_says_why():
    with pytest.raises(RuntimeError, match="CUDA graphs need a CUDA device"):
        with graphed_forwards({"lin": nn.Linear(2, 2)}):
            pass
    with graphed_forwards({}) as graphs:  # nothing to graph: nothing needed
        assert graphs == {}


def test_a_typo_in_the_graph_components_stops_the_benchmark_before_any_model_loads(make_cfg):
    with pytest.raises(ValueError, match="unknown component 'unet'"):
        run_stage(make_cfg("model=tiny_random", "stage=benchmark", "stage.calibration=random",
                           "stage.end_to_end_cuda_graphs=[unet]"))


class _Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(16, 16)

    def forward(self, x, t, cond=None, scale: float = 1.0):
        h = self.lin(x) * t.to(x.device)[:, None] * scale  # t may come from the host
        if cond is not None:
            h = h + cond["bias"]
        return (h.relu(), {"sum": h.sum(dim=-1)})


@pytest.mark.gpu
def test_graphed_forward_replays_what_eager_computes_and_restores_the_forward():
    torch.manual_seed(0)
    block = _Block().cuda()
    seen = []
    block.register_forward_hook(lambda m, a, o: seen.append(o[0].shape))
    x, t = torch.randn(4, 16, device="cuda"), torch.rand(4, device="cuda")
    bias = torch.randn(16, device="cuda")
    with torch.no_grad():
        expected = block(x, t, cond={"bias": bias}, scale=0.5)
        with graphed_forwards({"block": block}) as graphs:
            first = block(x, t, cond={"bias": bias}, scale=0.5)
            held = first[0].clone()
            second = block(x * 2, t, cond={"bias": bias}, scale=0.5)  # same signature: a replay
            other = block(torch.randn(8, 16, device="cuda"), torch.rand(8, device="cuda"))  # a second graph
            summary = graphs["block"].summary()
        assert "forward" not in block.__dict__  # the class's forward again
        after = block(x, t, cond={"bias": bias}, scale=0.5)
    torch.testing.assert_close(first[0], expected[0], rtol=0, atol=0)
    torch.testing.assert_close(first[1]["sum"], expected[1]["sum"], rtol=0, atol=0)
    torch.testing.assert_close(first[0], held, rtol=0, atol=0)  # a later replay did not overwrite it
    torch.testing.assert_close(second[0], block(x * 2, t, cond={"bias": bias}, scale=0.5)[0].detach())
    assert other[0].shape == (8, 16)
    torch.testing.assert_close(after[0], expected[0], rtol=0, atol=0)
    assert summary == {"graphs": 2, "replays": 3, "eager_calls": {}}
    assert len(seen) == 6  # forward hooks still run around every graphed call


@pytest.mark.gpu
def test_a_call_with_a_cpu_tensor_runs_eagerly_and_says_so():
    block = _Block().cuda()
    with torch.no_grad(), graphed_forwards({"block": block}) as graphs:
        out = block(torch.randn(2, 16, device="cuda"), torch.rand(2))  # t on the CPU: not replayable
    assert out[0].shape == (2, 16)
    assert graphs["block"].summary()["eager_calls"] == {"an input tensor is on cpu": 1}


@pytest.mark.gpu
def test_end_to_end_benchmark_replays_the_pipeline_components_from_graphs(make_cfg):
    head = run_stage(make_cfg("model=tiny_random", "device=cuda", "prompts.inference.n=1", "stage=benchmark",
                              "stage.calibration=random", "stage.shapes=[32x1]", "stage.compile=none",
                              "stage.iters=3", "stage.warmup=1", "stage.end_to_end_repeats=2",
                              "stage.plans=[uniform:w8a8:int8]"))
    for name in ("bf16", "uniform:w8a8:int8"):
        e2e = head["plans"][name]["end_to_end"]
        graphs = e2e["cuda_graphs"]
        assert set(graphs) == {"text_encoder", "text_encoder_2", "denoiser", "vae_decode"}
        # one warm-up and two timed runs of a 2-step sampler: 6 denoiser calls, all replayed
        assert graphs["denoiser"]["replays"] == 3 * e2e["steps"] and graphs["denoiser"]["eager_calls"] == {}
        assert graphs["vae_decode"]["replays"] == 3 and graphs["text_encoder"]["graphs"] >= 1
