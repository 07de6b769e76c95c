"""A colour-swapping LoRA for the built-in tiny model, constructed in closed form (no training).

The text reaches the tiny SDXL-structured UNet through two kinds of layers only: the
cross-attention key/value projections (``attn2.to_k``/``to_v``, fed the text encoders' hidden
states) and ``add_embedding.linear_1`` (fed the pooled text embedding). An adapter that makes the
model draw ``blue`` where the caption says ``red`` (and the reverse) must make these layers answer
a caption as they answer the caption with the two words swapped. For each such layer with weight
``W`` and the inputs ``X`` it sees for every caption of the tiny vocabulary, and ``Y`` for the same
captions with the words swapped, the update solves the ridge regression
``min ||X dW^T - (Y - X) W^T||^2 + lam ||dW||^2`` (captions without either word ask for no change)
and keeps its best rank-``r`` part (SVD): a standard LoRA, written in diffusers' PEFT key format.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from .shapes import iter_captions

TEXT_LAYERS = ("attn2.to_k", "attn2.to_v", "add_embedding.linear_1")


def swap_words(caption: str, a: str, b: str) -> str:
    return " ".join(b if w == a else a if w == b else w for w in caption.split(" "))


@torch.no_grad()
def text_layer_inputs(pipe, captions: list[str], layers: dict[str, nn.Module]) -> dict[str, torch.Tensor]:
    """Rows of the input each layer sees for ``captions`` (one denoiser call; these inputs depend only
    on the text and the fixed size conditioning, not on the latents or the timestep)."""
    seen: dict[str, list[torch.Tensor]] = {n: [] for n in layers}
    hooks = [m.register_forward_pre_hook(lambda _m, args, n=n: seen[n].append(args[0].reshape(-1, args[0].shape[-1])))
             for n, m in layers.items()]
    try:
        pipe(captions, num_inference_steps=1, guidance_scale=0.0, height=64, width=64, output_type="latent",
             generator=torch.Generator().manual_seed(0))
    finally:
        for h in hooks:
            h.remove()
    return {n: torch.cat(v).double() for n, v in seen.items()}


def colour_swap_lora(pipe, a: str = "red", b: str = "blue", rank: int = 8, ridge: float = 1e-4,
                     prefix: str = "unet") -> dict[str, torch.Tensor]:
    """The adapter's state dict (``<prefix>.<layer>.lora_A.weight`` / ``lora_B.weight``, scaling 1;
    ``prefix=""`` for diffusers' ``save_lora_weights(unet_lora_layers=...)``, which adds ``unet.``)."""
    unet = pipe.unet
    layers = {n: m for n, m in unet.named_modules() if isinstance(m, nn.Linear) and n.endswith(TEXT_LAYERS)}
    if not layers:
        raise ValueError(f"the denoiser has no plain Linear layer named *{TEXT_LAYERS}: build the adapter on the "
                         f"unquantized model")
    captions = list(iter_captions("all"))
    x = text_layer_inputs(pipe, captions, layers)
    y = text_layer_inputs(pipe, [swap_words(c, a, b) for c in captions], layers)
    state: dict[str, torch.Tensor] = {}
    for name, layer in layers.items():
        w = layer.weight.double()
        xi, target = x[name], (y[name] - x[name]) @ w.t()          # [N, in], [N, out]
        gram = xi.t() @ xi
        lam = ridge * gram.diagonal().mean()
        delta_t = torch.linalg.solve(gram + lam * torch.eye(gram.shape[0], dtype=gram.dtype), xi.t() @ target)
        u, s, vh = torch.linalg.svd(delta_t.t(), full_matrices=False)  # dW = u s vh, [out, in]
        r = min(rank, s.numel())
        root = s[:r].sqrt()
        key = f"{prefix}.{name}" if prefix else name
        state[f"{key}.lora_A.weight"] = (root[:, None] * vh[:r]).to(layer.weight.dtype).contiguous()
        state[f"{key}.lora_B.weight"] = (u[:, :r] * root[None, :]).to(layer.weight.dtype).contiguous()
    return state
