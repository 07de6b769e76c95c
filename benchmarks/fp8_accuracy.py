"""Where fp8 W8A8 loses accuracy: SQNR of the denoiser output vs 16-bit for fp8 plans against int8.

Runs the SDXL UNet architecture (full size on a GPU, ``--width-div`` narrower on a CPU) with random
weights, calibrated on random inputs, and compares every variant's *fake-quant reference* (the
KernelLayer reference path: exact function of the stored codes) and, on CUDA, its real kernels,
against the unquantized model. Variants: int8 W8A8; fp8 with per-tensor or per-output-channel weight
scales, static (calibrated, per tensor) or per-token activation scales, on all layers / Linear layers
only / convolutions only.

    python benchmarks/fp8_accuracy.py --width-div 4 --res 256 --dtype float32   # CPU, a few minutes
    python benchmarks/fp8_accuracy.py --out $OUT/fp8_accuracy.json              # GPU, full size, bf16
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mixprec.kernels import BackendConfig, convert_, reference_path  # noqa: E402
from mixprec.kernels.probing import calibrate_random, denoiser_inputs, sqnr_db  # noqa: E402
from mixprec.models.spec import REFERENCE_DIR  # noqa: E402
from mixprec.models.toy import build_unet  # noqa: E402
from mixprec.kernels.timing import env_info, write_json  # noqa: E402
from mixprec.quantizers import quant_layers, set_plan  # noqa: E402

# (name, backend options, which layers: all | linear | conv)
VARIANTS = {
    "int8": ({"w8a8": "int8"}, "all"),
    "fp8_tensor": ({"w8a8": "fp8", "fp8_weight": "tensor", "fp8_act": "tensor"}, "all"),
    "fp8_channel": ({"w8a8": "fp8", "fp8_weight": "channel", "fp8_act": "tensor"}, "all"),
    "fp8_channel_fastacc": ({"w8a8": "fp8", "fp8_weight": "channel", "fp8_act": "tensor", "fp8_fast_accum": True},
                            "all"),
    "fp8_tensor_linear": ({"w8a8": "fp8", "fp8_weight": "tensor", "fp8_act": "tensor"}, "linear"),
    "fp8_channel_linear": ({"w8a8": "fp8", "fp8_weight": "channel", "fp8_act": "tensor"}, "linear"),
    "fp8_channel_conv": ({"w8a8": "fp8", "fp8_weight": "channel", "fp8_act": "tensor"}, "conv"),
    # per-token activation scales (Linear layers; convs keep the static scale) with channel weight scales
    "fp8_token_linear": ({"w8a8": "fp8", "fp8_weight": "channel", "fp8_act": "token"}, "linear"),
    "fp8_token_all": ({"w8a8": "fp8", "fp8_weight": "channel", "fp8_act": "token"}, "all"),
}


def narrow_config(div: int) -> dict:
    cfg = json.loads((REFERENCE_DIR / "sdxl_unet_config.json").read_text())
    if div > 1:
        cfg["block_out_channels"] = [c // div for c in cfg["block_out_channels"]]
        cfg["cross_attention_dim"] //= div
        cfg["addition_time_embed_dim"] //= div
        cfg["projection_class_embeddings_input_dim"] = cfg["cross_attention_dim"] + 6 * cfg["addition_time_embed_dim"]
    return cfg


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--width-div", type=int, default=1)
    ap.add_argument("--res", type=int, default=512)
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    cuda = torch.cuda.is_available()
    dev = "cuda" if cuda else "cpu"
    dtype = getattr(torch, args.dtype)
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    unet = build_unet(narrow_config(args.width_div), device=dev, dtype=dtype)
    lat = args.res // 8
    calib = [denoiser_inputs(unet, 1, lat, seed=100 + i) for i in range(2)]
    layers = calibrate_random(unet, lambda: [unet(**c) for c in calib], weight_bits=(8,), act_bits=(8,))
    conv = {n for n, l in layers.items() if isinstance(l.inner, torch.nn.Conv2d)}
    x0 = denoiser_inputs(unet, 1, lat, seed=7)
    result = {"env": env_info(), "args": vars(args), "layers": len(layers), "conv_layers": len(conv), "variants": {}}
    with torch.no_grad():
        set_plan(layers, {}, {})
        fp = unet(**x0).sample.float()
    for name in args.variants.split(","):
        opts, scope = VARIANTS[name]
        opts = dict(opts)
        chosen = [n for n in layers if scope == "all" or (scope == "conv") == (n in conv)]
        t = time.time()
        rec = {"options": opts, "scope": scope, "layers": len(chosen)}
        model = copy.deepcopy(unet)
        ml = quant_layers(model)
        set_plan(ml, {n: 8 for n in chosen}, {n: 8 for n in chosen})
        convert_(model, BackendConfig.from_mapping({**opts, "bos": "exact"}))
        with torch.no_grad(), reference_path(model):
            ref = model(**x0).sample.float()
        rec["reference_vs_16bit_db"] = sqnr_db(fp, ref)
        if cuda:
            with torch.no_grad():
                out = model(**x0).sample.float()
            rec["real_vs_16bit_db"] = sqnr_db(fp, out)
            rec["real_vs_reference_db"] = sqnr_db(ref, out)
        del model
        rec["seconds"] = time.time() - t
        result["variants"][name] = rec
        print(name, {k: (round(v, 2) if isinstance(v, float) else v) for k, v in rec.items()}, flush=True)
        write_json(args.out, result)


if __name__ == "__main__":
    main()
