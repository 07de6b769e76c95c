"""What the compose data (scenes), builder (build) and training config (train_config) agree on, in a
torch-free leaf module: the training scenes' layouts and the sampler's step count. Leaf, so that the
training config can import the builder on use without closing an import cycle."""

from __future__ import annotations

from typing import Literal, get_args

# Layouts of the training scenes (drawn by mixprec.compose.scenes, which explains them).
Layout = Literal["random", "centred"]
LAYOUTS: tuple[str, ...] = get_args(Layout)
# The centred layout's largest jitter (pixels per coordinate): wider could break the gap and
# dominance guarantees between two large objects.
MAX_LAYOUT_JITTER = 4
# The sampler's step count the model is built and trained for (its few-step schedule).
NUM_INFERENCE_STEPS = 4
