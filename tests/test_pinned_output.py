"""A pinned output in the diffusers style: a slice of the tiny model's fake-quantized image.

Any silent numeric change in the quantizers (rounding, scales, zero points, activation ranges,
the BOS handling) or in calibration moves these pixels and fails here. If a change is meant to
alter the numbers, rerun ``python tests/test_pinned_output.py`` and paste the new values, saying
why in the commit.
"""

import torch

from mixprec.calibration import calibrate_layers
from mixprec.generation import Sampler
from mixprec.models import ModelSpec, denoiser_of, load_pipeline
from mixprec.quantizers import quantize_, set_plan

PROMPT = "a red circle on a blue background"
# image[0, 0, -3:, -3:] (red channel, bottom-right corner), then the mean over the whole image
EXPECTED_SLICE = [0.587733, 0.402716, 0.393716, 0.609729, 0.374782, 0.346922, 0.589226, 0.404975, 0.36621]
EXPECTED_MEAN = 0.54211828


def fake_quantized_image() -> torch.Tensor:
    """The built-in tiny model, calibrated on one prompt, under a fixed mixed plan (W2/W4, A4/A8)."""
    pipe = load_pipeline(ModelSpec.from_dict({"name": "tiny", "source": "builtin"}))
    layers = quantize_(denoiser_of(pipe))
    sampler = Sampler(pipe, resolution=64, num_inference_steps=8)
    calibrate_layers(layers, lambda: sampler.generate([PROMPT], [0], decode=False), weight_bits=[2, 4, 8],
                     act_bits=[4, 8])
    names = list(layers)
    set_plan(layers, weight_bits={n: (2 if i % 3 == 0 else 4) for i, n in enumerate(names)},
             act_bits={n: (4 if i % 5 == 0 else 8) for i, n in enumerate(names)})
    return sampler.generate([PROMPT], [0]).images


def test_fake_quantized_output_is_pinned():
    image = fake_quantized_image()
    assert image.shape == (1, 3, 64, 64)
    got = image[0, 0, -3:, -3:].flatten()
    assert torch.allclose(got, torch.tensor(EXPECTED_SLICE), atol=1e-4), got.tolist()
    assert abs(float(image.double().mean()) - EXPECTED_MEAN) < 1e-5, float(image.double().mean())


if __name__ == "__main__":
    torch.set_num_threads(1)
    img = fake_quantized_image()
    print("EXPECTED_SLICE =", [round(v, 6) for v in img[0, 0, -3:, -3:].flatten().tolist()])
    print("EXPECTED_MEAN =", round(float(img.double().mean()), 8))
