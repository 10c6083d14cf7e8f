"""Image files: sample grids as PNG."""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np
import torch
from PIL import Image


def to_uint8(images_BCHW: torch.Tensor) -> np.ndarray:
    """[0, 1] floats to uint8 HWC arrays, rounding rather than truncating."""
    array = (images_BCHW.detach().float().clamp(0, 1) * 255.0).round().to(torch.uint8)
    return array.permute(0, 2, 3, 1).cpu().numpy()


def save_grid(
    images_BCHW: torch.Tensor, path: Path, columns: int | None = None, pad: int = 2, min_tile: int = 128
) -> Path:
    """Tile images in [0, 1] into one PNG (written atomically), near-square by default.

    Small images are enlarged by an integer factor (nearest neighbour, so no pixel is invented)
    until a tile is at least ``min_tile`` pixels wide: a 32-px sample is unreadable at 1:1.
    """
    scale = max(1, -(-min_tile // images_BCHW.shape[-1]))
    if scale > 1:
        images_BCHW = images_BCHW.repeat_interleave(scale, dim=-2).repeat_interleave(scale, dim=-1)
    count, _, height, width = images_BCHW.shape
    columns = columns or math.ceil(math.sqrt(count))
    rows = math.ceil(count / columns)
    canvas = np.full((rows * (height + pad) + pad, columns * (width + pad) + pad, 3), 255, dtype=np.uint8)
    for i, tile in enumerate(to_uint8(images_BCHW)):
        r, c = divmod(i, columns)
        top, left = pad + r * (height + pad), pad + c * (width + pad)
        canvas[top : top + height, left : left + width] = tile
    tmp = path.with_name(f".{path.name}.tmp")
    Image.fromarray(canvas).save(tmp, format="PNG")
    os.replace(tmp, path)
    return path
