"""A synthetic SDXL-sized allocation instance, without torch or checkpoints.

The census is derived from SDXL's UNet config (``mixprec/reference/sdxl_unet_config.json``) by
walking the block structure the way diffusers builds it, so names, groups, parameter counts and
activation sizes match the real model (794 Linear/Conv2d layers, 743 Linear, 51 Conv2d,
2,566,875,524 parameters in those layers, 2,567,463,684 in the whole UNet). Sensitivities are
random but shaped like real ones: SSIM that drops more at 2 bits than at 4, SQNR that grows about
6 dB per bit, bigger layers slightly more sensitive. Tests and sweep timings use it so that the
solver sees the real size distribution, which is what makes a knapsack hard or easy.
"""

from __future__ import annotations

import csv
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

CONTENT_PATTERNS = ("attn2", "ff")
REFERENCE_CONFIG = Path(__file__).resolve().parent.parent / "reference" / "sdxl_unet_config.json"


@dataclass(frozen=True)
class CensusRow:
    name: str
    type: str  # "Linear" | "Conv2d"
    group: str  # "content" | "quality"
    params: int  # weight + bias elements
    act_elems: int  # input-activation elements per image
    out_channels: int
    in_features: int = 0  # Linear in_features, or Conv2d in_channels * kh * kw
    kernel: str = ""

    @property
    def block(self) -> str:
        parts = self.name.split(".")
        return f"{parts[0]}.{parts[1]}" if parts[0] in ("down_blocks", "up_blocks") else parts[0]


def _group(name: str) -> str:
    parts = name.split(".")
    return "content" if any(p in CONTENT_PATTERNS for p in parts) else "quality"


class _SdxlCensus:
    """Appends SDXL UNet layers to ``rows`` in diffusers' module order, with one image's sizes."""

    def __init__(self, cfg: dict, text_tokens: int) -> None:
        self.cfg, self.text_tokens = cfg, text_tokens
        self.ctx = int(cfg["cross_attention_dim"])
        self.temb = list(cfg["block_out_channels"])[0] * 4
        self.rows: list[CensusRow] = []

    def lin(self, name: str, fin: int, fout: int, tokens: int, bias: bool = True) -> None:
        self.rows.append(CensusRow(name, "Linear", _group(name), fin * fout + (fout if bias else 0), tokens * fin,
                                   fout, fin))

    def conv(self, name: str, cin: int, cout: int, k: int, side: int) -> None:
        self.rows.append(CensusRow(name, "Conv2d", _group(name), cin * cout * k * k + cout, cin * side * side, cout,
                                   cin * k * k, f"{k}x{k}"))

    def resnet(self, prefix: str, cin: int, cout: int, side: int) -> None:
        self.conv(f"{prefix}.conv1", cin, cout, 3, side)
        self.lin(f"{prefix}.time_emb_proj", self.temb, cout, 1)
        self.conv(f"{prefix}.conv2", cout, cout, 3, side)
        if cin != cout:
            self.conv(f"{prefix}.conv_shortcut", cin, cout, 1, side)

    def transformer(self, prefix: str, c: int, n: int, side: int) -> None:
        t = side * side
        self.lin(f"{prefix}.proj_in", c, c, t)
        for i in range(n):
            b = f"{prefix}.transformer_blocks.{i}"
            for a in ("attn1", "attn2"):
                self.lin(f"{b}.{a}.to_q", c, c, t, bias=False)
                kv_in, kv_t = (c, t) if a == "attn1" else (self.ctx, self.text_tokens)
                self.lin(f"{b}.{a}.to_k", kv_in, c, kv_t, bias=False)
                self.lin(f"{b}.{a}.to_v", kv_in, c, kv_t, bias=False)
                self.lin(f"{b}.{a}.to_out.0", c, c, t)
            self.lin(f"{b}.ff.net.0.proj", c, 8 * c, t)  # GEGLU: value and gate in one projection
            self.lin(f"{b}.ff.net.2", 4 * c, c, t)
        self.lin(f"{prefix}.proj_out", c, c, t)

    def down_path(self, side: int) -> tuple[int, list[int]]:
        """The down blocks; returns the side they end at and the skip channels, in push order."""
        cfg = self.cfg
        ch, depth, per_block = list(cfg["block_out_channels"]), list(cfg["transformer_layers_per_block"]), \
            int(cfg["layers_per_block"])
        skips = [ch[0]]
        cin = ch[0]
        for bi, btype in enumerate(cfg["down_block_types"]):
            cout = ch[bi]
            # diffusers registers a block's attentions before its resnets: keep module order
            if btype.startswith("CrossAttn"):
                for j in range(per_block):
                    self.transformer(f"down_blocks.{bi}.attentions.{j}", cout, depth[bi], side)
            for j in range(per_block):
                self.resnet(f"down_blocks.{bi}.resnets.{j}", cin if j == 0 else cout, cout, side)
                skips.append(cout)
            if bi < len(ch) - 1:
                self.conv(f"down_blocks.{bi}.downsamplers.0.conv", cout, cout, 3, side)
                side //= 2
                skips.append(cout)
            cin = cout
        return side, skips

    def up_path(self, side: int, skips: list[int]) -> None:
        cfg = self.cfg
        ch, per_block = list(cfg["block_out_channels"]), int(cfg["layers_per_block"])
        rch, rdepth = ch[::-1], list(cfg["transformer_layers_per_block"])[::-1]
        prev = rch[0]
        for bi, btype in enumerate(cfg["up_block_types"]):
            cout = rch[bi]
            if btype.startswith("CrossAttn"):
                for j in range(per_block + 1):
                    self.transformer(f"up_blocks.{bi}.attentions.{j}", cout, rdepth[bi], side)
            for j in range(per_block + 1):
                skip = skips.pop()
                self.resnet(f"up_blocks.{bi}.resnets.{j}", (prev if j == 0 else cout) + skip, cout, side)
            if bi < len(ch) - 1:
                side *= 2
                self.conv(f"up_blocks.{bi}.upsamplers.0.conv", cout, cout, 3, side)
            prev = cout


def sdxl_census(config_path: str | os.PathLike = REFERENCE_CONFIG, resolution: int = 512,
                text_tokens: int = 77) -> list[CensusRow]:
    """Every Linear/Conv2d of SDXL's UNet, in module order, with sizes for one image (SDXL-Turbo's 512 px)."""
    cfg = json.loads(Path(config_path).read_text())
    ch = list(cfg["block_out_channels"])
    res = resolution // 8  # VAE latent side
    b = _SdxlCensus(cfg, text_tokens)
    b.conv("conv_in", cfg["in_channels"], ch[0], 3, res)
    b.lin("time_embedding.linear_1", ch[0], b.temb, 1)
    b.lin("time_embedding.linear_2", b.temb, b.temb, 1)
    b.lin("add_embedding.linear_1", cfg["projection_class_embeddings_input_dim"], b.temb, 1)
    b.lin("add_embedding.linear_2", b.temb, b.temb, 1)
    mid_side, skips = b.down_path(res)
    b.up_path(mid_side, skips)
    # diffusers assigns mid_block after the up_blocks list exists, so it comes later in module order
    c = ch[-1]
    b.transformer("mid_block.attentions.0", c, list(cfg["transformer_layers_per_block"])[-1], mid_side)
    b.resnet("mid_block.resnets.0", c, c, mid_side)
    b.resnet("mid_block.resnets.1", c, c, mid_side)
    b.conv("conv_out", ch[0], cfg["out_channels"], 3, res)
    return b.rows


def synthetic_per_prompt(census: list[CensusRow], kind: str, bits_by_group: dict[str, list[int]],
                         n_prompts: int = 8, seed: int = 0) -> dict[str, dict[str, dict[int, list[float]]]]:
    """Per-prompt sensitivities {group: {layer: {bits: [value per prompt]}}}.

    Content: SSIM in (0, 1], higher at more bits. Quality: SQNR dB, ~6 dB per bit plus a
    layer offset; an occasional lossless layer gets +inf at 8 bits, as real tables do.
    """
    rng = np.random.default_rng(seed)
    out: dict[str, dict[str, dict[int, list[float]]]] = {"content": {}, "quality": {}}
    sizes = np.array([r.params if kind == "weight" else r.act_elems for r in census], dtype=float)
    logsz = (np.log(sizes) - np.log(sizes).mean()) / (np.log(sizes).std() + 1e-12)
    for r, z in zip(census, logsz):
        bits = sorted(bits_by_group[r.group])
        layer_sens = float(np.exp(rng.normal(0.3 * z, 0.8)))
        prompt_noise = rng.normal(0.0, 1.0, size=(len(bits), n_prompts))
        table: dict[int, list[float]] = {}
        if r.group == "content":
            for i, b in enumerate(bits):
                # drop roughly quarters with every bit removed; prompts disagree by ~20 %
                drop = 0.02 * layer_sens * 4.0 ** ((8 - b) / 2) / 4.0
                vals = 1.0 - drop * np.exp(0.2 * prompt_noise[i])
                table[b] = [float(v) for v in np.clip(vals, -1.0, 1.0)]
        else:
            offset = rng.normal(0.0, 4.0) - 6.0 * math.log2(layer_sens)
            for i, b in enumerate(bits):
                vals = 6.02 * b + offset + 1.5 * prompt_noise[i]
                table[b] = [float(v) for v in vals]
            if b == 8 and rng.random() < 0.01:
                table[8] = [math.inf] * n_prompts
        out[r.group][r.name] = table
    return out


def write_synthetic_workspace(root: str | os.PathLike, n_prompts: int = 8, seed: int = 0,
                              n_protected: int = 6) -> Path:
    """Write ``layers.csv``, ``sensitivity_per_prompt.csv`` and ``protected_layers.yaml``.

    The files have the layout the census and sensitivity stages write, so the allocate stage
    and its sweeps can be timed on an SDXL-sized problem without a GPU.
    """
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    census = sdxl_census()
    # first/last conv plus the most activation-heavy layers of each group, standing in for the
    # sensitivity stage's choice (which uses 8-bit activation sensitivity)
    protected = ["conv_in", "conv_out"]
    for g in ("content", "quality"):
        cands = sorted((r for r in census if r.group == g and r.name not in protected),
                       key=lambda r: (-r.act_elems, r.name))
        protected += [r.name for r in cands[: max(0, (n_protected - 2) // 2)]]
    with open(root / "layers.csv", "w", newline="") as f:
        w = csv.writer(f, lineterminator="\n")
        # the census stage's columns (mixprec.models.CENSUS_COLUMNS), booleans as Python writes them
        w.writerow(["name", "type", "group", "params", "out_channels", "in_features", "kernel", "act_elems", "block",
                    "excluded", "protected"])
        for r in census:
            w.writerow([r.name, r.type, r.group, r.params, r.out_channels, r.in_features, r.kernel, r.act_elems,
                        r.block, False, r.name in protected])
    bit_sets = {"weight": {"content": [2, 4, 8], "quality": [4, 8]},
                "act": {"content": [4, 8], "quality": [4, 8]}}
    with open(root / "sensitivity_per_prompt.csv", "w", newline="") as f:
        w = csv.writer(f, lineterminator="\n")
        w.writerow(["kind", "group", "layer", "bits", "prompt", "value"])
        for kind, code in (("weight", "w"), ("act", "a")):
            tables = synthetic_per_prompt(census, kind, bit_sets[kind], n_prompts, seed + (kind == "act"))
            for group, per_layer in tables.items():
                for layer, per_bits in per_layer.items():
                    for b, vals in per_bits.items():
                        for p, v in enumerate(vals):
                            w.writerow([code, group, layer, b, p, repr(v)])
    (root / "protected_layers.yaml").write_text("".join(f"- {n}\n" for n in protected))
    return root
