"""Aspect-ratio buckets (reference.md §3): counts, membership, choice and the resize-and-crop."""

from __future__ import annotations

import math

import numpy as np
import pytest
from PIL import Image

from prx_core.data.buckets import Buckets, aspect_buckets, closest_bucket, cover_size, resize_and_crop


def test_seven_buckets_at_256_px_and_27_at_1024_px() -> None:
    assert len(aspect_buckets(256)) == 7
    assert len(aspect_buckets(1024)) == 27


def test_256_px_buckets_by_hand() -> None:
    # n = 64 patches; w = 6..11 give h = round(64 / w) = 11, 9, 8, 7, 6, 6; transposes add (10, 6).
    expected_units = [(11, 6), (10, 6), (9, 7), (8, 8), (7, 9), (6, 10), (6, 11)]
    assert aspect_buckets(256) == tuple((h * 32, w * 32) for h, w in expected_units)


@pytest.mark.parametrize("size", [256, 512, 1024])
def test_buckets_hold_the_square_and_stay_in_aspect_range(size: int) -> None:
    buckets = aspect_buckets(size)
    assert (size, size) in buckets
    assert len(set(buckets)) == len(buckets)
    patches = (size // 32) ** 2
    for h, w in buckets:
        assert h % 32 == 0 and w % 32 == 0
        assert 0.5 <= w / h <= 2.0
        assert (w, h) in buckets, "the set is closed under transposition"
        assert abs((h // 32) * (w // 32) - patches) / patches < 0.1, "about the square's token count"
    aspects = [w / h for h, w in buckets]
    assert aspects == sorted(aspects)


def test_bucket_size_must_be_a_multiple_of_the_unit() -> None:
    with pytest.raises(ValueError, match="multiple of 32"):
        aspect_buckets(100)
    with pytest.raises(ValueError, match="multiple of 32"):
        aspect_buckets(0)


def test_closest_bucket_uses_log_aspect() -> None:
    buckets = aspect_buckets(256)
    assert buckets[closest_bucket(500, 500, buckets)] == (256, 256)
    assert buckets[closest_bucket(100, 400, buckets)] == (192, 352)  # 4:1 clamps to the widest
    assert buckets[closest_bucket(400, 100, buckets)] == (352, 192)
    # 3:2 landscape (log 0.405): 320x192 (log 0.511) beats 288x224 (log 0.251), by 0.106 vs 0.154.
    assert buckets[closest_bucket(200, 300, buckets)] == (192, 320)


def test_closest_bucket_ties_go_to_the_lower_index() -> None:
    # 1:2 and 2:1 are equally far from a square image in log aspect.
    buckets = [(64, 32), (32, 64)]
    assert closest_bucket(50, 50, buckets) == 0
    with pytest.raises(ValueError):
        closest_bucket(0, 10, buckets)


def test_square_mode_has_one_bucket() -> None:
    square = Buckets(96, enabled=False)
    assert square.sizes == ((96, 96),)
    assert square.bucket_for(100, 400) == 0
    assert len(Buckets(256)) == 7 and Buckets(256).size_of(Buckets(256).bucket_for(10, 10)) == (256, 256)


def test_cover_size_fits_the_shorter_side() -> None:
    # 100x200 (h x w) into 64x64: scale = max(0.64, 0.32) = 0.64 -> 64 x 128.
    assert cover_size(100, 200, 64, 64) == (64, 128)
    # 300x100 into 96x192 (wide target from a tall image): scale = max(0.32, 1.92) -> 576 x 192.
    assert cover_size(300, 100, 96, 192) == (576, 192)
    assert cover_size(64, 64, 64, 64) == (64, 64)


def test_resize_and_crop_takes_the_center() -> None:
    # 50 x 100: red | blue | green stripes of 25, 50, 25 px. The square center crop is all blue.
    image = Image.new("RGB", (100, 50), (0, 0, 255))
    image.paste((255, 0, 0), (0, 0, 25, 50))
    image.paste((0, 255, 0), (75, 0, 100, 50))
    out = resize_and_crop(image, 50, 50)
    assert out.size == (50, 50)
    assert (np.asarray(out) == np.array([0, 0, 255], dtype=np.uint8)).all()
    # Downscaled to 20 x 20 the crop is still blue in the middle, and exactly the target size.
    small = resize_and_crop(image, 20, 20)
    assert small.size == (20, 20) and small.getpixel((10, 10)) == (0, 0, 255)


def test_resize_is_antialiased() -> None:
    # A 1-px checkerboard downscaled 4x must average to grey, not alias to black or white.
    y_HW, x_HW = np.mgrid[0:64, 0:64]
    image = Image.fromarray((255 * ((x_HW + y_HW) % 2)).astype(np.uint8)).convert("RGB")
    values = np.asarray(resize_and_crop(image, 16, 16), dtype=np.float64)[..., 0]
    assert np.abs(values - 127.5).max() < 20, (values.min(), values.max())
    assert math.isclose(values.mean(), 127.5, abs_tol=5)


def test_assign_matches_one_by_one_choice() -> None:
    buckets = Buckets(1024)
    rng = np.random.default_rng(0)
    heights = rng.integers(16, 5000, size=500)
    widths = rng.integers(16, 5000, size=500)
    heights[:3], widths[:3] = (100, 100, 200), (100, 200, 100)  # square and the two 2:1 ties of 512 px
    expected = [buckets.bucket_for(int(h), int(w)) for h, w in zip(heights, widths, strict=True)]
    assert buckets.assign(heights, widths).tolist() == expected
    assert buckets.assign([], []).tolist() == []
