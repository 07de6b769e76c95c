"""LoRA and export on the built-in tiny model (CPU): the issue-20 measurements that need no GPU.

Needs two finished pipeline workspaces of the tiny model with a W4A8 final plan, one plain and one
with the colour-swapping adapter fused (``model.lora``), e.g.::

    python benchmarks/lora_tiny.py --make-adapter outputs/lora/red_blue_swap
    A8="stage.allocate_act.target=[8] stage.select.act_target=8 tracking=disabled device=cpu"
    python run.py $A8 paths.workspace=outputs/tiny_w4a8
    python run.py $A8 paths.workspace=outputs/tiny_swap_w4a8 'model.lora=[{path: outputs/lora/red_blue_swap}]'
    python benchmarks/lora_tiny.py --adapter outputs/lora/red_blue_swap --base-ws outputs/tiny_w4a8 \
        --fused-ws outputs/tiny_swap_w4a8 --out docs/measurements/lora_export_tiny_cpu.json

Records:
- ``adherence``: the adapter (``mixprec.tiny.lora``: draws blue for "red" and red for "blue") loaded
  at inference beside full precision and beside the final W4A8 plan (fake quant, and kernel modules
  on CPU): adherence to the original and to the swapped captions, with and without the adapter,
  and the change it makes in each, in points;
- ``fused``: the plans and images of the fused-then-searched workspace against the plain one, and
  the refusal of the plain calibration for a run with ``model.lora``;
- ``torchao``: the final plan exported to torchao configs and applied with torchao's ``quantize_``:
  each exported layer's bit-widths read back from the torchao tensors against the plan.
"""

from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import env_info, write_json  # noqa: E402
from mixprec import lora, search  # noqa: E402
from mixprec.tiny.adherence import check_batch  # noqa: E402
from mixprec.tiny.lora import swap_words  # noqa: E402
from mixprec.tiny.shapes import iter_captions  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def compose(overrides: list[str]):
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return hydra_compose(config_name="config", overrides=["tracking=disabled", "device=cpu", *overrides])


def make_adapter(folder: str) -> None:
    from mixprec.models import ModelSpec, load_pipeline
    from mixprec.tiny.lora import colour_swap_lora

    pipe = load_pipeline(ModelSpec.from_dict({"name": "tiny", "source": "builtin"}))
    type(pipe).save_lora_weights(folder, unet_lora_layers=colour_swap_lora(pipe, prefix=""))


def rates(images, captions, swapped) -> dict:
    return {"original": check_batch(images, captions)["all"], "swapped": check_batch(images, swapped)["all"]}


def adherence(args) -> dict:
    from mixprec.kernels import BackendConfig, convert_
    from mixprec.quantizers import set_plan
    from mixprec.context import load_calibrated, workspace

    cfg = compose([f"paths.workspace={args.base_ws}"])
    bundle = load_calibrated(cfg, workspace(cfg), batch_size=16)
    captions = [c for c in iter_captions("all") if {"red", "blue"} & set(c.split())]
    swapped = [swap_words(c, "red", "blue") for c in captions]
    seeds = list(range(len(captions)))

    def measure() -> dict:
        plain = bundle.sampler.generate(captions, seeds).images
        lora.load_lora(bundle.pipe, args.adapter, "swap")
        with_lora = bundle.sampler.generate(captions, seeds).images
        lora.unload_lora(bundle.pipe)
        again = bundle.sampler.generate(captions, seeds).images
        out = {"without": rates(plain, captions, swapped), "with": rates(with_lora, captions, swapped),
               "unload_bit_identical": bool(torch.equal(plain, again))}
        out["change_points"] = {k: 100 * (out["with"][k] - out["without"][k]) for k in ("original", "swapped")}
        return out, (plain, with_lora)

    result = {"prompts": len(captions), "split": "all captions with red or blue, one seed each"}
    result["full_precision"], _ = measure()
    w = search.read_plan(Path(args.base_ws) / "final_weight_mp.yaml")
    a = search.read_plan(Path(args.base_ws) / "final_act_mp.yaml")
    set_plan(bundle.layers, w.bits, a.bits)
    result["plan"] = {"weight_mean_bits": w.header.get("achieved_mean_bits"),
                      "act_mean_bits": a.header.get("achieved_mean_bits")}
    result["w4a8_fake"], fake_images = measure()
    convert_(bundle.denoiser, BackendConfig(bos="exact"))
    result["w4a8_kernels_cpu"], kernel_images = measure()
    # the kernel layers' reference path against fake quant (bos=exact): the same arithmetic, though
    # on CPU oneDNN may pick other kernels for the freshly dequantized weights at larger batches
    result["w4a8_kernels_cpu_vs_fake"] = {
        f"{tag}_lora": {"images_differing": int((f != k).flatten(1).any(1).sum()),
                        "max_abs_pixel_diff": float((f - k).abs().max())}
        for tag, f, k in (("without", fake_images[0], kernel_images[0]), ("with", fake_images[1], kernel_images[1]))}
    result["fp_vs_w4a8_change_gap_points"] = {
        k: abs(result["full_precision"]["change_points"][k] - result["w4a8_fake"]["change_points"][k])
        for k in ("original", "swapped")}
    return result


def fused(args) -> dict:
    from mixprec.context import read_calibration, workspace
    from mixprec.workspace import FingerprintMismatchError

    base, fz = Path(args.base_ws), Path(args.fused_ws)
    out: dict = {}
    for kind in ("weight", "act"):
        p, q = (search.read_plan(d / f"final_{kind}_mp.yaml") for d in (base, fz))
        differ = [n for n in p.bits if p.bits[n] != q.bits.get(n)]
        out[f"{kind}_plan"] = {"layers": len(p.bits), "layers_with_other_bits": len(differ),
                               "mean_bits": [p.header.get("achieved_mean_bits"), q.header.get("achieved_mean_bits")]}
    images = sorted((base / "generated_images").glob("*.png"))
    same = 0
    for img in images:
        same += (fz / "generated_images" / img.name).read_bytes() == img.read_bytes()
    out["infer_images"] = {"count": len(images), "byte_identical": same}
    import json

    heads = [json.loads((d / "infer.json").read_text())["headline"] for d in (base, fz)]
    out["infer_adherence"] = {"plain": heads[0].get("adherence"), "fused": heads[1].get("adherence"),
                              "note": "fused model scored against the original captions (it draws them swapped)"}
    cfg = compose([f"paths.workspace={args.base_ws}", f"model.lora=[{{path: '{args.adapter}', scale: 1.0}}]"])
    try:
        read_calibration(cfg, workspace(cfg))
        out["refusal"] = None
    except FingerprintMismatchError as exc:
        out["refusal"] = str(exc)
    return out


def torchao_check(args) -> dict:
    from mixprec.export import apply_torchao, torchao_bits
    from mixprec.models import ModelSpec, load_pipeline
    from mixprec.runner import run_stage

    head = run_stage(compose([f"paths.workspace={args.base_ws}", "stage=export"]))
    unet = copy.deepcopy(load_pipeline(ModelSpec.from_dict({"name": "tiny", "source": "builtin"})).unet)
    apply_torchao(unet, head["path"])
    got = torchao_bits(unet)
    import json

    plan = json.loads(Path(head["path"]).read_text())
    exported = [n for n in plan["config"]["_data"]["fqn_to_config"]]
    exact = sum(got[n]["w"] == plan["plan"][n]["w"] for n in exported)
    return {"weight_only_images_psnr_db": weight_only_psnr(args), **{k: head[k] for k in ("layers", "exported", "full_precision", "unsupported", "configs",
                                    "unsupported_reasons")},
            "weight_bits_exact": f"{exact}/{len(exported)}",
            "activation_8bit_dynamic": sum(got[n]["a"] == 8 for n in exported)}


def weight_only_psnr(args) -> dict:
    """The final weight plan, weight-only (16-bit activations), through torchao and through mixprec's
    fake quantization: PSNR of 16 images against full precision (same prompts and seeds)."""
    from mixprec.calibration import attach_params, load_params
    from mixprec.export import apply_torchao, layer_kinds, torchao_export
    from mixprec.metrics import psnr_db
    from mixprec.models import ModelSpec, load_pipeline
    from mixprec.quantizers import quantize_, set_plan

    pipe = load_pipeline(ModelSpec.from_dict({"name": "tiny", "source": "builtin"}))
    full = pipe.unet
    bits = search.read_plan(Path(args.base_ws) / "final_weight_mp.yaml").bits
    captions = list(iter_captions("heldout"))[:16]

    def images(unet):
        pipe.unet = unet
        return pipe(captions, num_inference_steps=8, guidance_scale=0.0, height=64, width=64, output_type="pt",
                    generator=[torch.Generator().manual_seed(i) for i in range(len(captions))]).images

    ao = apply_torchao(copy.deepcopy(full), torchao_export(bits, None, layer_kinds(full)))
    fake = copy.deepcopy(full)
    layers = quantize_(fake)
    attach_params(layers, load_params(Path(args.base_ws) / "quant_params.safetensors")[0])
    set_plan(layers, bits, None)
    reference, via_torchao, via_mixprec = images(full), images(ao), images(fake)
    return {"images": len(captions), "torchao_vs_full_precision": psnr_db(reference, via_torchao),
            "mixprec_fake_quant_vs_full_precision": psnr_db(reference, via_mixprec),
            "adherence": {"full_precision": check_batch(reference, captions)["all"],
                          "torchao": check_batch(via_torchao, captions)["all"],
                          "mixprec": check_batch(via_mixprec, captions)["all"]}}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--make-adapter", default=None, help="write the colour-swap adapter to this folder and exit")
    p.add_argument("--adapter", default="outputs/lora/red_blue_swap")
    p.add_argument("--base-ws", default="outputs/tiny_w4a8")
    p.add_argument("--fused-ws", default="outputs/tiny_swap_w4a8")
    p.add_argument("--out", default=None)
    args = p.parse_args()
    torch.set_num_threads(1)
    if args.make_adapter:
        make_adapter(args.make_adapter)
        return
    result = {"env": env_info(), "args": vars(args), "adherence": adherence(args), "fused": fused(args),
              "torchao": torchao_check(args)}
    print(result)
    write_json(args.out, result)


if __name__ == "__main__":
    main()
