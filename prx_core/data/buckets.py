"""Aspect-ratio buckets (reference.md §3) and the resize-and-crop that puts an image into one.

PRX trains on images of many aspect ratios without padding: every image goes to the bucket whose
aspect ratio is closest to its own, and every micro-batch is drawn from a single bucket, so a
batch is one tensor. Each bucket holds about ``(size / unit)²`` patches of ``unit`` px (32 in the
reference.md §3), so every bucket costs about as many tokens as the square ``size × size`` image, with the
aspect ratio w/h in [0.5, 2].

The rule: with ``n = (size / unit)²``, for every width ``w`` (in units) take ``h = round(n / w)``
(halves round up) and keep ``(h, w)`` when ``0.5 <= w / h <= 2``; add the transposes; dedupe.
That gives exactly 7 buckets at 256 px and 27 at 1024 px, the counts reference.md §3 states.

Pure Python plus Pillow; no torch.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import numpy as np
    from PIL import Image

#: reference.md §3: buckets are counted in patches of 32 px.
BUCKET_UNIT = 32
MIN_ASPECT = 0.5
MAX_ASPECT = 2.0


def _round_half_up(x: float) -> int:
    # Python's round() is round-half-to-even; spell the rule out so it cannot depend on that.
    return math.floor(x + 0.5)


def aspect_buckets(size: int, unit: int = BUCKET_UNIT) -> tuple[tuple[int, int], ...]:
    """All buckets for a nominal square ``size``, as ``(height_px, width_px)``, widest last.

    ``size`` must be a positive multiple of ``unit``. Sorted by aspect ratio w/h ascending (ties,
    which the rule does not produce, by height), so bucket ids are stable.
    """
    if isinstance(unit, bool) or not isinstance(unit, int) or unit < 1:
        raise ValueError(f"bucket unit must be a positive int, got {unit!r}")
    if isinstance(size, bool) or not isinstance(size, int) or size < unit or size % unit:
        raise ValueError(f"bucket size must be a positive multiple of {unit} px, got {size!r}")
    n = (size // unit) ** 2
    found: set[tuple[int, int]] = set()
    for w in range(1, n + 1):
        h = _round_half_up(n / w)
        if h >= 1 and MIN_ASPECT <= w / h <= MAX_ASPECT:
            found.add((h, w))
            found.add((w, h))
    ordered = sorted(found, key=lambda hw: (hw[1] / hw[0], hw[0]))
    return tuple((h * unit, w * unit) for h, w in ordered)


def closest_bucket(height: int, width: int, buckets: Sequence[tuple[int, int]]) -> int:
    """Index of the bucket whose log aspect ratio is closest to the image's.

    Log aspect makes 1:2 and 2:1 equally far from square. Ties go to the lower index (the
    narrower bucket), so the choice is deterministic.
    """
    if height < 1 or width < 1:
        raise ValueError(f"image size must be positive, got {height}x{width}")
    if not buckets:
        raise ValueError("no buckets to choose from")
    target = math.log(width / height)
    best, best_distance = 0, math.inf
    for i, (bh, bw) in enumerate(buckets):
        distance = abs(math.log(bw / bh) - target)
        if distance < best_distance - 1e-12:
            best, best_distance = i, distance
    return best


class Buckets:
    """The bucket set of a data source: aspect buckets, or one square ``size`` bucket.

    ``enabled = False`` is the square-crop mode: every image is resized to cover ``size × size``
    and center-cropped, as in a plain square-image recipe.
    """

    def __init__(self, size: int, enabled: bool = True, unit: int = BUCKET_UNIT) -> None:
        if isinstance(size, bool) or not isinstance(size, int) or size < 1:
            raise ValueError(f"size must be a positive int, got {size!r}")
        self.size = size
        self.enabled = enabled
        self.sizes: tuple[tuple[int, int], ...] = aspect_buckets(size, unit) if enabled else ((size, size),)

    def __len__(self) -> int:
        return len(self.sizes)

    def bucket_for(self, height: int, width: int) -> int:
        """Bucket id for an image of ``height × width`` px."""
        return closest_bucket(height, width, self.sizes)

    def assign(self, heights: Sequence[int] | np.ndarray, widths: Sequence[int] | np.ndarray) -> np.ndarray:
        """Bucket ids for many images at once (vectorised :meth:`bucket_for`, same ties)."""
        import numpy as np

        h_N = np.asarray(heights, dtype=np.float64).reshape(-1)
        w_N = np.asarray(widths, dtype=np.float64).reshape(-1)
        if h_N.shape != w_N.shape:
            raise ValueError(f"{h_N.size} heights but {w_N.size} widths")
        if h_N.size and (h_N.min() < 1 or w_N.min() < 1):
            raise ValueError("image sizes must be positive")
        bucket_B = np.array([math.log(w / h) for h, w in self.sizes])
        distance_NB = np.abs(np.log(w_N / h_N)[:, None] - bucket_B[None, :])
        return np.argmin(distance_NB, axis=1).astype(np.int64)  # first minimum: the lower index

    def size_of(self, bucket: int) -> tuple[int, int]:
        """``(height_px, width_px)`` of bucket ``bucket``."""
        return self.sizes[bucket]


def cover_size(height: int, width: int, target_h: int, target_w: int) -> tuple[int, int]:
    """The ``(height, width)`` an image is resized to so it just covers ``target_h × target_w``.

    One scale for both axes (no distortion): the larger of the two ratios, so the shorter side
    (relative to the target's aspect) fits exactly and the other overhangs and is cropped.
    """
    scale = max(target_h / height, target_w / width)
    return max(target_h, _round_half_up(height * scale)), max(target_w, _round_half_up(width * scale))


def resize_and_crop(image: Image.Image, target_h: int, target_w: int) -> Image.Image:
    """Resize ``image`` (antialiased) to cover the target, then center-crop to exactly it.

    Pillow's BICUBIC resize filters with a kernel widened by the downscale factor, which is the
    antialiasing: a plain strided downscale would alias fine texture into moiré.
    """
    from PIL import Image as PILImage

    width, height = image.size
    new_h, new_w = cover_size(height, width, target_h, target_w)
    if (new_h, new_w) != (height, width):
        image = image.resize((new_w, new_h), PILImage.Resampling.BICUBIC, reducing_gap=None)
    left = (new_w - target_w) // 2
    top = (new_h - target_h) // 2
    if (left, top, new_w, new_h) != (0, 0, target_w, target_h):
        image = image.crop((left, top, left + target_w, top + target_h))
    return image
