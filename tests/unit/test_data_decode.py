"""Guarded decoding: every kind of bad image gets its reason, every odd mode its conversion."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageFile

from prx_core.data.decode import BadImage, ImageLimits, decode, image_to_tensor, probe, to_rgb
from prx_core.testing.image_data import CORRUPTIONS, read_manifest, write_image_folder
from prx_core.transfer import images_to_float

LIMITS = ImageLimits()


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_image_folder(tmp_path_factory.mktemp("images"), n=40, corrupt=True, seed=3)


def _outcome(path: Path) -> str:
    try:
        probe(path, LIMITS)
    except BadImage as err:
        return f"index:{err.reason}"
    try:
        decoded = decode(path, (64, 96), LIMITS)
    except BadImage as err:
        return f"decode:{err.reason}"
    assert decoded.image_CHW.shape == (3, 64, 96) and decoded.image_CHW.dtype == torch.uint8
    return f"converted/{decoded.converted}" if decoded.converted else "clean"


def test_every_corruption_gets_its_reason(folder: Path) -> None:
    manifest = read_manifest(folder)
    seen = set()
    for name, item in manifest["items"].items():
        outcome = _outcome(folder / name)
        expect = item["expect"]
        if expect is None or expect.startswith("caption/") or expect == "skipped/no_caption":
            assert outcome == "clean", (name, item["kind"], outcome)  # a caption problem, not an image one
        elif expect in ("skipped/truncated",):
            assert outcome == "decode:truncated", (name, outcome)
        elif expect.startswith("skipped/"):
            # Header-level problems show without decoding, so sources exclude them while indexing.
            assert outcome == f"index:{expect.removeprefix('skipped/')}", (name, outcome)
        else:
            assert outcome == expect, (name, outcome)
        seen.add(item["kind"])
    assert seen >= set(CORRUPTIONS), "the generator must write every corruption kind"


def test_truncated_images_stay_errors(folder: Path) -> None:
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False
    manifest = read_manifest(folder)
    name = next(n for n, item in manifest["items"].items() if item["kind"] == "truncated_jpeg")
    with pytest.raises(BadImage) as err:
        decode(folder / name, (64, 64), LIMITS)
    assert err.value.reason == "truncated" and "truncated" in str(err.value)
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False


def _png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    return buffer.getvalue()


def test_sources_can_be_bytes_paths_or_files(tmp_path: Path) -> None:
    data = _png(Image.new("RGB", (80, 100), (10, 20, 30)))
    path = tmp_path / "a.png"
    path.write_bytes(data)
    fh = io.BytesIO(data)
    fh.seek(17)  # a file anywhere: it is rewound
    assert probe(data, LIMITS) == probe(path, LIMITS) == probe(fh, LIMITS) == (100, 80)
    for source in (b"", io.BytesIO(b""), tmp_path / "empty.jpg"):
        if isinstance(source, Path):
            source.write_bytes(b"")
        with pytest.raises(BadImage, match="zero_byte"):
            probe(source, LIMITS)


def test_size_limits_come_from_the_header() -> None:
    assert probe(_png(Image.new("RGB", (64, 200))), LIMITS) == (200, 64)  # min_side is inclusive
    with pytest.raises(BadImage, match="tiny"):
        probe(_png(Image.new("RGB", (63, 200))), LIMITS)
    with pytest.raises(BadImage, match="huge"):
        probe(_png(Image.new("RGB", (100, 100))), ImageLimits(min_side=1, max_pixels=9_999))
    with pytest.raises(ValueError):
        ImageLimits(min_side=0)


def test_alpha_is_composited_on_white() -> None:
    rgba = Image.new("RGBA", (2, 1), (255, 0, 0, 255))
    rgba.putpixel((1, 0), (255, 0, 0, 0))  # fully transparent red
    rgb, kind = to_rgb(rgba)
    assert kind == "rgba"
    assert rgb.getpixel((0, 0)) == (255, 0, 0)
    assert rgb.getpixel((1, 0)) == (255, 255, 255)
    half = Image.new("LA", (1, 1), (0, 128))
    rgb, kind = to_rgb(half)
    assert kind == "la" and abs(rgb.getpixel((0, 0))[0] - 127) <= 1  # half black over white


def test_16_bit_grayscale_keeps_its_range() -> None:
    values = np.array([[0, 257 * 128, 65535]], dtype=np.uint16)
    image = Image.fromarray(values)
    assert image.mode == "I;16"
    rgb, kind = to_rgb(image)
    assert kind == "grayscale16"
    assert [rgb.getpixel((x, 0)) for x in range(3)] == [(0, 0, 0), (128, 128, 128), (255, 255, 255)]


def test_cmyk_palette_and_grayscale_convert() -> None:
    assert to_rgb(Image.new("CMYK", (1, 1), (0, 0, 0, 0)))[0].getpixel((0, 0)) == (255, 255, 255)
    assert to_rgb(Image.new("CMYK", (1, 1)))[1] == "cmyk"
    assert to_rgb(Image.new("L", (1, 1), 77))[0].getpixel((0, 0)) == (77, 77, 77)
    palette = Image.new("RGB", (1, 1), (0, 200, 0)).convert("P", palette=Image.Palette.ADAPTIVE)
    rgb, kind = to_rgb(palette)
    assert kind == "palette" and rgb.getpixel((0, 0)) == (0, 200, 0)
    same = Image.new("RGB", (1, 1))
    assert to_rgb(same) == (same, None)


def test_exif_orientation_is_applied_to_size_and_pixels() -> None:
    # Stored 80 wide x 40 high with a red left column; orientation 6 means "rotate 90° clockwise
    # to display", so it shows 40 wide x 80 high with the red column on top.
    stored = Image.new("RGB", (80, 40), (0, 0, 255))
    stored.paste((255, 0, 0), (0, 0, 20, 40))
    exif = Image.Exif()
    exif[0x0112] = 6
    buffer = io.BytesIO()
    stored.save(buffer, "JPEG", exif=exif.tobytes(), quality=95)
    data = buffer.getvalue()
    limits = ImageLimits(min_side=8)
    assert probe(data, limits) == (80, 40)
    image_CHW = decode(data, (80, 40), limits).image_CHW
    assert image_CHW.shape == (3, 80, 40)
    top, bottom = image_CHW[:, 5, 20], image_CHW[:, 75, 20]
    assert top[0] > 204 and top[2] < 51, top  # 0.8 and 0.2 of 255
    assert bottom[2] > 204 and bottom[0] < 51, bottom


def test_decode_resizes_and_crops_to_the_target() -> None:
    # 100 x 200: left half white, right half black; a 50 x 50 target keeps the middle 100 px.
    image = Image.new("RGB", (200, 100), (0, 0, 0))
    image.paste((255, 255, 255), (0, 0, 100, 100))
    image_CHW = decode(_png(image), (50, 50), LIMITS).image_CHW
    assert image_CHW.shape == (3, 50, 50)
    assert image_CHW[:, :, :20].min() > 242 and image_CHW[:, :, 30:].max() < 13  # 0.95 and 0.05 of 255


def test_image_to_tensor_keeps_uint8_pixels_and_converts_like_the_decoder_did() -> None:
    tensor = image_to_tensor(Image.new("RGB", (3, 2), (255, 0, 51)))
    assert tensor.shape == (3, 2, 3) and tensor.dtype == torch.uint8 and tensor.is_contiguous()
    assert tensor[:, 0, 0].tolist() == [255, 0, 51]
    # On the device it becomes [0, 1] floats: 51 / 255 = 0.2, the exact quotient rounded to fp32
    # (float64 division, then one rounding, which for these operands is the correctly rounded fp32).
    as_float = images_to_float(tensor)
    assert as_float.dtype == torch.float32
    assert as_float[:, 0, 0].tolist() == [1.0, 0.0, float(np.float32(51 / 255))]


def test_garbage_is_undecodable() -> None:
    with pytest.raises(BadImage, match="undecodable"):
        probe(b"<html>not an image</html>", LIMITS)
