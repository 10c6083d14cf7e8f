"""Random towers at full size and the PRX-1.2B recipes the device checks train (``bench/gpu_check.sh``).

The device machine has no network, so T5-Gemma-2B and the FLUX.1 VAE cannot be downloaded. They
are built here from their published shapes with random weights and saved where the plugins load
them from (``path = <folder>``), so the step pays their real cost: a 2.6B-parameter encoder
forward over 256 tokens per caption and a VAE encode per image. Random weights change the
numbers the towers produce, not the time or memory they take.

``--tiny`` everywhere builds two-layer towers and a tiny denoiser on the CPU instead, to check
the scripts themselves on a machine without a GPU.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch

#: T5Gemma-2B (google/t5gemma-2b-2b-ul2), encoder side: Gemma-2-2B's shapes.
T5GEMMA_2B = {
    "vocab_size": 256_000,
    "hidden_size": 2304,
    "intermediate_size": 9216,
    "num_hidden_layers": 26,
    "num_attention_heads": 8,
    "num_key_value_heads": 4,
    "head_dim": 256,
    "query_pre_attn_scalar": 256,
    "sliding_window": 4096,
    "max_position_embeddings": 8192,
}
#: The FLUX.1 VAE (black-forest-labs/FLUX.1-dev, subfolder vae).
FLUX_VAE = {
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
    "block_out_channels": [128, 256, 512, 512],
    "layers_per_block": 2,
    "latent_channels": 16,
    "scaling_factor": 0.3611,
    "shift_factor": 0.1159,
    "use_quant_conv": False,
    "use_post_quant_conv": False,
}
TINY_T5 = {**T5GEMMA_2B, "vocab_size": 64, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2}
TINY_T5.update({"num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 16, "query_pre_attn_scalar": 16})
TINY_VAE = {**FLUX_VAE, "block_out_channels": [8, 8, 8, 8], "layers_per_block": 1, "norm_num_groups": 4}


def build_towers(folder: Path, tiny: bool) -> tuple[Path, Path]:
    """Save a random T5Gemma encoder and FLUX VAE under ``folder`` (once); returns their folders."""
    text_dir, vae_dir = folder / "t5gemma", folder / "vae"
    if (text_dir / "config.json").is_file() and (vae_dir / "config.json").is_file():
        return text_dir, vae_dir
    from diffusers import AutoencoderKL
    from prx_t5gemma.testing import tiny_tokenizer
    from transformers import T5GemmaConfig, T5GemmaEncoderModel

    started = time.perf_counter()
    device = "cuda" if torch.cuda.is_available() and not tiny else "cpu"
    module = TINY_T5 if tiny else T5GEMMA_2B
    config = T5GemmaConfig(encoder=module, decoder=module, vocab_size=module["vocab_size"])
    config.is_encoder_decoder = False
    with torch.device(device):  # random init on the GPU: seconds, not minutes
        encoder = T5GemmaEncoderModel(config).to(torch.bfloat16)
    encoder.save_pretrained(text_dir)
    tiny_tokenizer().save_pretrained(text_dir)
    del encoder
    with torch.device(device):
        vae = AutoencoderKL(**(TINY_VAE if tiny else FLUX_VAE))
    vae.save_pretrained(vae_dir)
    del vae
    if device == "cuda":
        torch.cuda.empty_cache()
    print(f"random towers saved under {folder} in {time.perf_counter() - started:.1f} s")
    return text_dir, vae_dir


def recipe_text(text_dir: Path, vae_dir: Path, tiny: bool, pixel: bool = False, **train: Any) -> str:
    """A PRX-1.2B recipe (the model defaults) on random towers and synthetic data, one GPU."""
    settings = {
        "steps": 60,
        "global_batch": 32,
        "log_every": 10,
        "checkpoint_every": 40,
        "sample_every": 0,
        "device": "cpu" if tiny else "cuda",
        **train,
    }
    model = "hidden_size = 64\nnum_heads = 2\naxes_dim = [16, 16]\ndepth = 2\n" if tiny else ""
    if pixel:
        model += "in_channels = 3\npatch_size = 32\nbottleneck_size = 256\n"
        latent = '[latent_space]\nuse = "pixel"\n\n[objective]\nuse = "x_prediction"\nshift = 3.0\n'
        size = 64 if tiny else 1024
    else:
        latent = f'[latent_space]\nuse = "flux_vae"\npath = "{vae_dir}"\nsubfolder = ""\n\n'
        latent += '[objective]\nuse = "flow_matching"\n'
        size = 32 if tiny else 256
    lines = "\n".join(f"{k} = {_toml(v)}" for k, v in settings.items())
    dim = TINY_T5["hidden_size"] if tiny else T5GEMMA_2B["hidden_size"]
    return f"""name = "gpu_check"
seed = 0

[model]
{model}
[train]
{lines}

[schedule]
warmup_steps = 10

[optimizer]
use = "adamw"
lr = 1e-4

[precision]
use = "{"fp32" if tiny else "bf16_mixed"}"

{latent}
[text_encoder]
use = "t5gemma"
path = "{text_dir}"
dim = {dim}
max_length = 256

[data]
use = "synthetic_shapes"
size = {size}

[sampling]
num_prompts = 8
steps = 10
cfg = 3.5

[eval]
every = 0
at_end = false

[tracker]
use = "console"
"""


def _toml(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return f'"{value}"'
    return str(value)


def write_recipe(folder: Path, name: str, tiny: bool, pixel: bool = False, **train: Any) -> Path:
    text_dir, vae_dir = build_towers(folder / "towers", tiny)
    path = folder / f"{name}.toml"
    path.write_text(recipe_text(text_dir, vae_dir, tiny, pixel, **train), encoding="utf-8")
    return path


def make_trainer(recipe_path: Path, run_dir: Path, overrides: list[str] | None = None) -> Any:
    """A set-up :class:`prx_core.trainer.Trainer` of the recipe (in this process)."""
    from prx_core.recipe import load
    from prx_core.trainer import Trainer

    trainer = Trainer(load(recipe_path, overrides or []), run_dir)
    trainer.setup()
    return trainer


def default_folder() -> Path:
    return Path("/tmp/prx-gpu-check")
