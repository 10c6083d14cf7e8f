"""Random but correctly shaped LPIPS-VGG weight files, for offline tests and smoke runs.

The development machines cannot download the ImageNet VGG16, so tests write a randomly
initialised VGG16 trunk (full layer shapes, torchvision's init) and random non-negative linear
layers to disk, and load them back through :func:`prx_lpips.weights.load_lpips_vgg`, the same code
a real run uses. Only the trunk is written (``features.*``, 14.7M parameters, 59 MB in fp32), not
VGG16's 124M-parameter classifier, which LPIPS never uses and the loader ignores.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import save_file

from prx_lpips.weights import lin_shapes, vgg16_feature_shapes


def random_vgg16_state(seed: int = 0) -> dict[str, torch.Tensor]:
    """VGG16 ``features.*`` tensors initialised as torchvision does (Kaiming-normal fan-out, zero bias)."""
    generator = torch.Generator().manual_seed(seed)
    state: dict[str, torch.Tensor] = {}
    for name, shape in vgg16_feature_shapes().items():
        if name.endswith(".weight"):
            fan_out = shape[0] * shape[2] * shape[3]
            state[name] = torch.randn(shape, generator=generator) * (2.0 / fan_out) ** 0.5
        else:
            state[name] = torch.zeros(shape)
    return state


def random_lin_state(seed: int = 0) -> dict[str, torch.Tensor]:
    """Non-negative linear layers in the ``lpips`` package's layout, of the calibration's magnitude."""
    generator = torch.Generator().manual_seed(seed + 1)
    return {name: torch.rand(shape, generator=generator) * 0.2 for name, shape in lin_shapes().items()}


def write_random_weights(directory: str | Path, seed: int = 0) -> tuple[Path, Path]:
    """Write ``vgg16.safetensors`` and ``lin.safetensors`` into ``directory``; returns their paths."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    vgg_path, lin_path = directory / "vgg16.safetensors", directory / "lin.safetensors"
    save_file(random_vgg16_state(seed), str(vgg_path))
    save_file(random_lin_state(seed), str(lin_path))
    return vgg_path, lin_path


__all__ = ["random_lin_state", "random_vgg16_state", "write_random_weights"]
