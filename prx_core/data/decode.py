"""Decoding images from real data under a guard: every failure becomes a named reason.

Real image collections contain zero-byte files, truncated downloads, HTML error pages saved as
``.jpg``, CMYK and 16-bit scans, images with alpha, thumbnails and decompression bombs. None of
these may crash a run or silently train on garbage, so:

* :func:`probe` reads only the header: zero-byte, undecodable, tiny (shorter side below
  ``min_side``) and huge (more than ``max_pixels``, checked from the header before any pixel is
  decoded; Pillow's own ``DecompressionBombError`` is caught too) raise :class:`BadImage` with
  that reason. Data sources run it while indexing and exclude those files up front.
* :func:`decode` decodes fully. ``Image.LOAD_TRUNCATED_IMAGES`` stays False (a truncated file is
  an error, not a grey bottom half); the error becomes reason ``truncated``. Non-RGB modes are
  converted and the conversion is named (``cmyk``, ``rgba``, ``grayscale``, ...), so a source can
  count them. Alpha is composited on white: transparent product shots on black look wrong.
* EXIF orientation is applied (camera JPEGs store portraits as rotated landscapes), and the
  oriented size is what :func:`probe` reports, so the bucket matches the decoded image.

Only Pillow, numpy and (for the tensor) torch.
"""

from __future__ import annotations

import io
import os
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO

import numpy as np
from PIL import Image, ImageOps

from prx_core.data.buckets import cover_size, resize_and_crop

if TYPE_CHECKING:
    import torch

#: A file path, the file's bytes, or an open binary file positioned anywhere (it is rewound).
ImageSource = str | os.PathLike[str] | bytes | BinaryIO

#: Reasons an image is skipped. Header-level ones are found while indexing, the rest at decode.
SKIP_REASONS = ("zero_byte", "undecodable", "truncated", "tiny", "huge")

#: EXIF orientations that swap width and height (rotations by 90° and 270°, with or without flip).
_SWAPPING_ORIENTATIONS = frozenset({5, 6, 7, 8})
#: Formats whose EXIF Pillow parses with the header; elsewhere (PNG's eXIf may follow the pixel
#: data) reading it would decode the whole image, so orientation is ignored there.
_HEADER_EXIF_FORMATS = frozenset({"JPEG", "MPO", "WEBP", "TIFF"})

#: Pillow mode -> the name a conversion is counted under.
CONVERSIONS: dict[str, str] = {
    "CMYK": "cmyk",
    "RGBA": "rgba",
    "RGBa": "rgba",
    "RGBX": "rgbx",
    "LA": "la",
    "La": "la",
    "P": "palette",
    "PA": "palette",
    "L": "grayscale",
    "1": "grayscale",
    "I": "grayscale16",
    "I;16": "grayscale16",
    "I;16B": "grayscale16",
    "I;16L": "grayscale16",
    "I;16N": "grayscale16",
    "F": "float",
    "YCbCr": "ycbcr",
    "LAB": "lab",
    "HSV": "hsv",
}


class BadImage(Exception):
    """An image that cannot be used; ``reason`` is one of :data:`SKIP_REASONS`."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


@dataclass(frozen=True)
class ImageLimits:
    """Which images are too small or too large to train on."""

    #: Shorter side below this (px) is skipped as ``tiny``: upscaling a thumbnail teaches blur.
    min_side: int = 64
    #: More pixels than this (width × height, from the header) is skipped as ``huge``.
    max_pixels: int = 4096 * 4096 * 4

    def __post_init__(self) -> None:
        if self.min_side < 1:
            raise ValueError(f"min_side must be >= 1, got {self.min_side}")
        if self.max_pixels < 1:
            raise ValueError(f"max_pixels must be >= 1, got {self.max_pixels}")


@dataclass(frozen=True)
class Decoded:
    """A decoded image, resized and cropped to the requested size."""

    #: uint8 pixels: 4× fewer bytes than fp32 to hold, stack and copy; converted to float32 in
    #: [0, 1] on the device (:func:`prx_core.transfer.images_to_float`).
    image_CHW: torch.Tensor
    #: Name of the mode conversion applied (a value of :data:`CONVERSIONS`), None for plain RGB.
    converted: str | None


def _open_binary(source: ImageSource) -> tuple[BinaryIO, bool]:
    """A seekable binary file for ``source`` and whether the caller must close it."""
    if isinstance(source, bytes | bytearray | memoryview):
        return io.BytesIO(bytes(source)), True
    if isinstance(source, str | os.PathLike):
        return open(Path(source), "rb"), True  # noqa: SIM115 - closed by the caller
    source.seek(0)
    return source, False


def _byte_size(fh: BinaryIO) -> int:
    fh.seek(0, io.SEEK_END)
    size = fh.tell()
    fh.seek(0)
    return size


def _orientation(image: Image.Image) -> int:
    if image.format not in _HEADER_EXIF_FORMATS:
        return 1
    try:
        value = image.getexif().get(0x0112, 1)
    except Exception:  # a malformed EXIF block must not reject an otherwise good image
        return 1
    return int(value) if isinstance(value, int) and 1 <= value <= 8 else 1


def _check_header(image: Image.Image, limits: ImageLimits) -> tuple[int, int]:
    """Oriented ``(height, width)`` from the header, or BadImage(tiny/huge)."""
    width, height = image.size
    if width < 1 or height < 1:
        raise BadImage("undecodable", f"header gives an empty size {width}x{height}")
    if width * height > limits.max_pixels:
        raise BadImage("huge", f"{width}x{height} = {width * height} pixels > max_pixels {limits.max_pixels}")
    if min(width, height) < limits.min_side:
        raise BadImage("tiny", f"{width}x{height}: shorter side < min_side {limits.min_side}")
    if _orientation(image) in _SWAPPING_ORIENTATIONS:
        width, height = height, width
    return height, width


def _open_image(fh: BinaryIO) -> Image.Image:
    if _byte_size(fh) == 0:
        raise BadImage("zero_byte", "file is empty")
    try:
        return Image.open(fh)
    except Image.DecompressionBombError as err:
        raise BadImage("huge", str(err)) from None
    except (OSError, SyntaxError, ValueError, EOFError, zlib.error) as err:
        # UnidentifiedImageError is an OSError: not an image at all, or an unreadable header.
        raise BadImage("undecodable", f"{type(err).__name__}: {err}") from None


def probe(source: ImageSource, limits: ImageLimits) -> tuple[int, int]:
    """Oriented ``(height, width)`` read from the header only; raises :class:`BadImage`."""
    fh, owned = _open_binary(source)
    try:
        with _open_image(fh) as image:
            return _check_header(image, limits)
    finally:
        if owned:
            fh.close()


def to_rgb(image: Image.Image) -> tuple[Image.Image, str | None]:
    """The image in RGB, and the name of the conversion (None when it already was RGB)."""
    mode = image.mode
    if mode == "RGB":
        return image, None
    kind = CONVERSIONS.get(mode, mode.lower())
    if mode.startswith("I"):
        # 16-bit (or 32-bit) grayscale: Pillow's convert would clip at 255 and turn scans white,
        # so scale the full 16-bit range down to 8 bits instead.
        values = np.asarray(image, dtype=np.float64)
        eight_bit = np.clip(np.rint(values / 257.0), 0, 255).astype(np.uint8)
        return Image.fromarray(eight_bit).convert("RGB"), kind
    has_alpha = mode in ("RGBA", "RGBa", "LA", "La", "PA") or (mode == "P" and "transparency" in image.info)
    if has_alpha:
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB"), kind
    return image.convert("RGB"), kind


def image_to_tensor(image: Image.Image) -> torch.Tensor:
    """An RGB PIL image as a uint8 ``[3, H, W]`` tensor (``images_to_float`` makes it [0, 1] floats)."""
    import torch

    array_CHW = np.ascontiguousarray(np.asarray(image, dtype=np.uint8).transpose(2, 0, 1))
    return torch.from_numpy(array_CHW)


def decode(source: ImageSource, target_hw: tuple[int, int], limits: ImageLimits) -> Decoded:
    """Decode, convert to RGB, apply EXIF orientation, resize to cover ``target_hw`` and crop.

    Raises :class:`BadImage` for every header problem :func:`probe` finds and for ``truncated``
    or ``undecodable`` pixel data.
    """
    target_h, target_w = target_hw
    fh, owned = _open_binary(source)
    try:
        with _open_image(fh) as image:
            height, width = _check_header(image, limits)
            orientation = _orientation(image)
            # JPEG can decode at 1/2, 1/4 or 1/8 scale for almost nothing (DCT scaling); ask for
            # the smallest scale that still covers the target, in the file's own (unrotated) axes.
            need_h, need_w = cover_size(height, width, target_h, target_w)
            if orientation in _SWAPPING_ORIENTATIONS:
                need_h, need_w = need_w, need_h
            try:
                image.draft(None, (need_w, need_h))
                image.load()
            except Image.DecompressionBombError as err:
                raise BadImage("huge", str(err)) from None
            except (OSError, SyntaxError, ValueError, EOFError, zlib.error, IndexError) as err:
                text = str(err)
                reason = "truncated" if "truncat" in text.lower() or isinstance(err, EOFError) else "undecodable"
                raise BadImage(reason, f"{type(err).__name__}: {text}") from None
            if orientation != 1:
                image = ImageOps.exif_transpose(image)
            rgb, converted = to_rgb(image)
            fitted = resize_and_crop(rgb, target_h, target_w)
            return Decoded(image_CHW=image_to_tensor(fitted), converted=converted)
    finally:
        if owned:
            fh.close()
