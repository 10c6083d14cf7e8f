"""Frozen timm vision encoders: the real loading path on tiny random DINOv2/DINOv3-shaped models."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

os.environ.setdefault("HF_HUB_OFFLINE", "1")

timm = pytest.importorskip("timm")

from safetensors.torch import save_file  # noqa: E402

from prx_core.keys import RoutePlan  # noqa: E402
from prx_core.vision import (  # noqa: E402
    TEACHERS,
    EncoderLoadError,
    FrozenEncoder,
    gather_tokens,
    load_frozen_encoder,
    mean_cosine_similarity,
    route_covers,
    token_grid,
    visible_targets,
    write_random_weights,
)

TINY = {"embed_dim": 32, "depth": 2, "num_heads": 2}
#: One DINOv2-with-registers (VisionTransformer, learned position table) and one DINOv3 (Eva, RoPE).
FAMILIES = ["dinov2_vitl14_reg", "dinov3_vitl16"]


def _original(name: str, seed: int = 0, **overrides: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = timm.create_model(TEACHERS[name], pretrained=False, dynamic_img_size=True, **{**TINY, **overrides})
    return model.eval()


def _save(model: torch.nn.Module, path: Path) -> Path:
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return path


def _images(b: int = 2, h: int = 20, w: int = 30, seed: int = 1) -> torch.Tensor:
    return torch.rand(b, 3, h, w, generator=torch.Generator().manual_seed(seed))


def test_teacher_names_are_pretrained_timm_models() -> None:
    pretrained = set(timm.list_models(pretrained=True))
    for short, timm_id in TEACHERS.items():
        assert timm_id in pretrained, (short, timm_id)


@pytest.mark.parametrize("name", FAMILIES)
def test_local_weights_round_trip_bitwise(name: str, tmp_path: Path) -> None:
    original = _original(name)
    weights = _save(original, tmp_path / "tiny.safetensors")
    encoder = load_frozen_encoder(name, str(weights), overrides=TINY)
    assert isinstance(encoder, FrozenEncoder)
    assert encoder.timm_id == TEACHERS[name]
    assert encoder.embed_dim == 32
    assert not encoder.model.training
    x = torch.randn(2, 3, 3 * encoder.patch_size, 4 * encoder.patch_size)
    with torch.no_grad():
        assert torch.equal(encoder.model.forward_features(x), original.forward_features(x))


@pytest.mark.parametrize(("name", "patch"), [("dinov2_vitl14_reg", 14), ("dinov3_vitl16", 16)])
def test_patch_tokens_normalise_resize_and_drop_prefix(name: str, patch: int, tmp_path: Path) -> None:
    original = _original(name)
    encoder = load_frozen_encoder(name, str(_save(original, tmp_path / "w.safetensors")), overrides=TINY)
    assert encoder.patch_size == patch
    assert encoder.num_prefix_tokens == 5  # CLS + 4 registers
    assert encoder.mean == pytest.approx((0.485, 0.456, 0.406))
    assert encoder.std == pytest.approx((0.229, 0.224, 0.225))
    images = _images()
    with torch.no_grad():
        tokens_BNE = encoder.patch_tokens(images, (3, 5), resize="antialias")
        # Independent computation: ImageNet normalisation, antialiased bilinear resize to the grid
        # times the patch size, the original model, and everything after the 5 prefix tokens.
        mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
        std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
        x = F.interpolate((images - mean) / std, size=(3 * patch, 5 * patch), mode="bilinear", antialias=True)
        expected = original.forward_features(x)[:, 5:]
    assert tokens_BNE.shape == (2, 15, 32)
    torch.testing.assert_close(tokens_BNE, expected, rtol=1e-5, atol=1e-5)
    assert encoder.prepare(images, (3 * patch, 5 * patch)).shape == (2, 3, 3 * patch, 5 * patch)


@pytest.mark.parametrize(("name", "patch"), [("dinov2_vitl14_reg", 14), ("dinov3_vitl16", 16)])
def test_patch_tokens_default_to_the_references_nearest_resize(name: str, patch: int, tmp_path: Path) -> None:
    """reference.md §8: the teacher input is F.interpolate(scale_factor=patch/√(H·W/N)), nearest.

    Written out as index selection: at 32 × 48 px with a 2 × 3 token grid (16-px tokens) the
    factor is patch/16, and output pixel i takes input pixel floor(i · 16/patch), i.e. i·16 // patch
    (exact: the factor's float rounding only nudges those quotients up, never across an integer).
    """
    original = _original(name)
    encoder = load_frozen_encoder(name, str(_save(original, tmp_path / "w.safetensors")), overrides=TINY)
    images = _images(h=32, w=48, seed=4)
    rows = torch.tensor([i * 16 // patch for i in range(2 * patch)])
    cols = torch.tensor([j * 16 // patch for j in range(3 * patch)])
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    selected = ((images - mean) / std)[:, :, rows][:, :, :, cols]
    prepared = encoder.prepare(images, (2 * patch, 3 * patch), resize="nearest")
    torch.testing.assert_close(prepared, selected, rtol=0, atol=1e-6)
    with torch.no_grad():
        tokens_BNE = encoder.patch_tokens(images, (2, 3))  # the default resize
        expected = original.forward_features(selected)[:, 5:]
    torch.testing.assert_close(tokens_BNE, expected, rtol=1e-5, atol=1e-5)
    # Not what an antialiased bilinear resize gives (the 14-px teacher downscales 32 → 28 here).
    if patch == 14:
        blended = encoder.prepare(images, (2 * patch, 3 * patch), resize="antialias")
        assert not torch.allclose(blended, selected, atol=1e-3)
    # The reference's formula only reaches the target when the aspect ratios agree.
    with pytest.raises(ValueError, match="aspect ratio"):
        encoder.patch_tokens(_images(h=20, w=30), (3, 3))
    with pytest.raises(ValueError, match="unknown resize mode"):
        encoder.prepare(images, (2 * patch, 3 * patch), resize="bicubic")  # type: ignore[arg-type]


@pytest.mark.parametrize("name", FAMILIES)
def test_cls_token_is_the_first_output_token(name: str, tmp_path: Path) -> None:
    original = _original(name)
    encoder = load_frozen_encoder(name, str(_save(original, tmp_path / "w.safetensors")), overrides=TINY)
    images = _images()
    size = 2 * encoder.patch_size
    with torch.no_grad():
        cls_BE = encoder.cls_token(images, size)
        all_BTE = encoder.features(images, (size, size))
    assert cls_BE.shape == (2, 32)
    assert torch.equal(cls_BE, all_BTE[:, 0])


@pytest.mark.parametrize("name", FAMILIES)
def test_gradients_reach_the_input_but_not_the_weights(name: str, tmp_path: Path) -> None:
    encoder = load_frozen_encoder(name, str(_save(_original(name), tmp_path / "w.safetensors")), overrides=TINY)
    images = _images().requires_grad_(True)
    encoder.patch_tokens(images, (2, 2), resize="antialias").square().sum().backward()
    assert images.grad is not None and images.grad.abs().sum() > 0
    assert all(not p.requires_grad and p.grad is None for p in encoder.model.parameters())


def test_dtype_and_device_come_from_the_caller(tmp_path: Path) -> None:
    weights = _save(_original("dinov2_vitl14_reg"), tmp_path / "w.safetensors")
    encoder = load_frozen_encoder("dinov2_vitl14_reg", str(weights), "cpu", torch.bfloat16, overrides=TINY)
    assert {p.dtype for p in encoder.model.parameters()} == {torch.bfloat16}
    assert encoder.patch_tokens(_images(h=28, w=28), (2, 2)).dtype == torch.bfloat16


def test_low_precision_images_are_resized_and_keep_their_gradient(tmp_path: Path) -> None:
    """A bf16 x̂0 (an autocast output) must go through the antialiased resize, which has no bf16 CPU kernel."""
    weights = _save(_original("dinov2_vitl14_reg"), tmp_path / "w.safetensors")
    encoder = load_frozen_encoder("dinov2_vitl14_reg", str(weights), overrides=TINY)
    images = _images().to(torch.bfloat16).requires_grad_(True)
    tokens = encoder.patch_tokens(images, (3, 3), resize="antialias")
    assert tokens.dtype == torch.float32  # the encoder's dtype, not the input's
    tokens.sum().backward()
    assert images.grad is not None and images.grad.dtype == torch.bfloat16 and images.grad.abs().sum() > 0


def test_pth_weights_load_with_weights_only(tmp_path: Path) -> None:
    original = _original("dinov2_vitl14_reg")
    path = tmp_path / "w.pth"
    torch.save({"model": original.state_dict()}, path)  # wrapped, as training checkpoints often are
    encoder = load_frozen_encoder("dinov2_vitl14_reg", str(path), overrides=TINY)
    x = torch.randn(1, 3, 28, 28)
    with torch.no_grad():
        assert torch.equal(encoder.model.forward_features(x), original.forward_features(x))


def test_write_random_weights_is_seeded_and_loads_back(tmp_path: Path) -> None:
    path = write_random_weights("dinov3_vitl16", tmp_path / "a.safetensors", overrides=TINY, seed=3)
    encoder = load_frozen_encoder("dinov3_vitl16", str(path), overrides=TINY)
    original = _original("dinov3_vitl16", seed=3)
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(encoder.model.forward_features(x), original.forward_features(x))


def test_loading_does_not_advance_the_global_rng(tmp_path: Path) -> None:
    weights = _save(_original("dinov2_vitl14_reg"), tmp_path / "w.safetensors")
    torch.manual_seed(123)
    expected = torch.rand(4)
    torch.manual_seed(123)
    load_frozen_encoder("dinov2_vitl14_reg", str(weights), overrides=TINY)
    assert torch.equal(torch.rand(4), expected)


def test_strict_loading_names_shape_mismatches(tmp_path: Path) -> None:
    weights = _save(_original("dinov2_vitl14_reg"), tmp_path / "w.safetensors")
    with pytest.raises(EncoderLoadError, match="shape mismatches") as info:
        load_frozen_encoder("dinov2_vitl14_reg", str(weights), overrides={**TINY, "embed_dim": 48})
    assert "w.safetensors" in str(info.value) and "vit_large_patch14_reg4_dinov2" in str(info.value)


def test_strict_loading_names_missing_and_unexpected_keys(tmp_path: Path) -> None:
    state = dict(_original("dinov2_vitl14_reg").state_dict())
    state.pop("blocks.1.mlp.fc2.weight")
    state["extra.weight"] = torch.zeros(1)
    path = tmp_path / "w.safetensors"
    save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    with pytest.raises(EncoderLoadError, match=r"missing keys blocks\.1\.mlp\.fc2\.weight.*unexpected keys extra"):
        load_frozen_encoder("dinov2_vitl14_reg", str(path), overrides=TINY)


def test_errors_for_missing_files_unknown_names_and_offline_download(tmp_path: Path) -> None:
    with pytest.raises(EncoderLoadError, match="not found"):
        load_frozen_encoder("dinov2_vitl14_reg", str(tmp_path / "nope.safetensors"))
    with pytest.raises(EncoderLoadError, match="did you mean 'dinov2_vitl14_reg'"):
        load_frozen_encoder("dinov2_vitl14_rg", str(tmp_path / "nope.safetensors"))
    (tmp_path / "w.npz").write_bytes(b"")
    with pytest.raises(EncoderLoadError, match="unsupported file type"):
        load_frozen_encoder("dinov2_vitl14_reg", str(tmp_path / "w.npz"))
    if os.environ.get("HF_HUB_OFFLINE") == "1":
        with pytest.raises(EncoderLoadError, match="pass its local path as `weights`"):
            load_frozen_encoder("dinov2_vitb14_reg", "")


# --------------------------------------------------------------------------- shared maths


def test_token_grid() -> None:
    assert token_grid(torch.zeros(2, 3, 16, 24), 4) == (4, 6)
    with pytest.raises(ValueError, match="not divisible"):
        token_grid(torch.Size([2, 3, 18, 24]), 4)


def test_gather_and_visible_targets_follow_the_route_plan() -> None:
    targets_BNE = torch.arange(2 * 6 * 3, dtype=torch.float32).view(2, 6, 3)
    idx_BK = torch.tensor([[0, 2, 5], [1, 3, 4]])
    plan = RoutePlan(visible_idx_BK=idx_BK, full_length=6, start=1, end=3)
    expected = torch.stack([torch.stack([targets_BNE[b, int(i)] for i in idx_BK[b]]) for b in range(2)])
    assert torch.equal(gather_tokens(targets_BNE, idx_BK), expected)
    for layer, covered in [(0, False), (1, True), (3, True), (4, False)]:
        assert route_covers(plan, layer) is covered
        out = visible_targets(targets_BNE, plan, layer)
        assert torch.equal(out, expected if covered else targets_BNE)
    assert visible_targets(targets_BNE, None, 2) is targets_BNE
    bad = RoutePlan(visible_idx_BK=idx_BK, full_length=8, start=1, end=3)
    with pytest.raises(ValueError, match="route plan covers 8 tokens"):
        visible_targets(targets_BNE, bad, 2)


def test_mean_cosine_similarity_against_a_loop() -> None:
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(3, 5, 4, generator=g), torch.randn(3, 5, 4, generator=g)
    total = 0.0
    for i in range(3):
        for k in range(5):
            u, v = a[i, k], b[i, k]
            total += float(u @ v) / (float(u.norm()) * float(v.norm()))
    assert mean_cosine_similarity(a, b).item() == pytest.approx(total / 15, abs=1e-6)
    assert mean_cosine_similarity(a, 2.5 * a).item() == pytest.approx(1.0, abs=1e-6)
    # bf16 tokens (a bf16 projector, a bf16 teacher) are compared in fp32, even under CPU autocast,
    # which would otherwise keep the cosine in bf16 (1 − cos near 1 in steps of 2⁻⁸).
    a16, b16 = a.bfloat16(), b.bfloat16()
    exact = mean_cosine_similarity(a16.double(), b16.double())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        value = mean_cosine_similarity(a16, b16)
    assert value.dtype == torch.float32
    assert value.item() == pytest.approx(exact.item(), abs=1e-6)
    with pytest.raises(ValueError, match="shapes"):
        mean_cosine_similarity(a, b[:, :4])
