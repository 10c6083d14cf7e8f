"""Tiny randomly initialised autoencoders saved the way the latent-space plugins load them.

Pretrained autoencoders cannot be downloaded on the development machines, so every test of a
latent space builds one of these from its config, saves it with ``save_pretrained`` and loads it
back through the plugin's real loading code.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch


def save_tiny_kl_vae(folder: Path, seed: int = 0, **config: Any) -> Path:
    """A random ``AutoencoderKL`` with 3 latent channels at 2× compression, saved in ``folder``.

    A 16-px image becomes 3×8×8 latents, which the tiny recipe's model (``in_channels`` 3, patch 4)
    takes as it is. ``config`` adds or overrides ``AutoencoderKL`` arguments (e.g. ``scaling_factor``).
    The global RNG is left as it was. Returns ``folder``.
    """
    from diffusers import AutoencoderKL

    arguments: dict[str, Any] = {
        "down_block_types": ("DownEncoderBlock2D",) * 2,
        "up_block_types": ("UpDecoderBlock2D",) * 2,
        "block_out_channels": (8, 16),
        "layers_per_block": 1,
        "latent_channels": 3,
        "norm_num_groups": 4,
        **config,
    }
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        vae = AutoencoderKL(**arguments)
    vae.save_pretrained(folder)
    return folder
