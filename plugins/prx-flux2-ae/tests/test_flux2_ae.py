"""flux2_ae: FLUX.2's batch-norm normalisation, checked against diffusers' Flux2Pipeline helpers."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import math  # noqa: E402
from pathlib import Path  # noqa: E402
from types import SimpleNamespace  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402
from diffusers import AutoencoderKLFlux2  # noqa: E402
from diffusers.pipelines.flux2.pipeline_flux2 import Flux2Pipeline  # noqa: E402
from prx_flux2_ae import Flux2AEConfig, _build  # noqa: E402
from prx_flux2_ae.autoencoder import Flux2Space, patchify, unpatchify  # noqa: E402

from prx_core.cli import cmd_check  # noqa: E402
from prx_core.config import RecipeError  # noqa: E402
from prx_core.testing.fixtures import make_trainer, run_steps, tiny_recipe, write_recipe  # noqa: E402


def _space(root: Path, dtype: torch.dtype = torch.float64, **overrides: object) -> Flux2Space:
    fields = {"path": str(root), "ae_channels": 3, "ae_compression": 2, **overrides}
    config = Flux2AEConfig(**fields)  # type: ignore[arg-type]
    return _build(config, SimpleNamespace(device=torch.device("cpu"), precision=SimpleNamespace(frozen_dtype=dtype)))


def _images(side: int = 16) -> torch.Tensor:
    return torch.rand(2, 3, side, side, generator=torch.Generator().manual_seed(0), dtype=torch.float64)


def _pipeline_normalise(ae: AutoencoderKLFlux2, z: torch.Tensor) -> torch.Tensor:
    """What Flux2Pipeline._encode_vae_image does after sampling: patchify, then bn statistics."""
    mean = ae.bn.running_mean.view(1, -1, 1, 1)
    std = torch.sqrt(ae.bn.running_var.view(1, -1, 1, 1) + ae.config.batch_norm_eps)
    return (Flux2Pipeline._patchify_latents(z) - mean) / std


def test_config_shape_per_layout_without_loading() -> None:
    assert (Flux2AEConfig().channels, Flux2AEConfig().spatial_compression) == (32, 8)
    packed = Flux2AEConfig(layout="packed")
    assert (packed.channels, packed.spatial_compression) == (128, 16)
    with pytest.raises(ValueError, match="ae_compression"):
        Flux2AEConfig(ae_compression=3)


def test_patchify_matches_the_flux2_pipeline() -> None:
    z = torch.arange(2 * 3 * 4 * 6, dtype=torch.float64).reshape(2, 3, 4, 6)
    packed = patchify(z)
    assert torch.equal(packed, Flux2Pipeline._patchify_latents(z))
    # Channel c·4 + dy·2 + dx holds pixel (2i + dy, 2j + dx) of channel c.
    assert packed[1, 2 * 4 + 1 * 2 + 0, 1, 2] == z[1, 2, 3, 4]
    assert torch.equal(unpatchify(packed), z)
    assert torch.equal(unpatchify(packed), Flux2Pipeline._unpatchify_latents(packed))
    with pytest.raises(ValueError, match="2x2 patches"):
        patchify(torch.zeros(1, 3, 3, 4))


def test_loads_frozen_with_buffers_in_the_policy_dtype(tiny_dir: Path) -> None:
    space = _space(tiny_dir)
    assert not space.ae.training and not space.ae.bn.training
    assert all(p.dtype == torch.float64 and not p.requires_grad for p in space.ae.parameters())
    assert space.ae.bn.running_var.dtype == torch.float64
    with pytest.raises(ValueError, match="latent channels, compression"):
        _space(tiny_dir, ae_channels=32)


def test_encode_normalises_like_the_pipeline(tiny_dir: Path) -> None:
    raw = AutoencoderKLFlux2.from_pretrained(tiny_dir, subfolder="vae").to(torch.float64)
    assert raw.bn.running_var.std() > 0.1  # the statistics are not the identity
    posterior = raw.encode(_images() * 2 - 1).latent_dist
    expected_packed = _pipeline_normalise(raw, posterior.mean)

    packed = _space(tiny_dir, layout="packed", sample_posterior=False)
    got = packed.encode(_images(), torch.Generator().manual_seed(0))
    assert got.shape == (2, 12, 4, 4) and (packed.channels, packed.spatial_compression) == (12, 4)
    torch.testing.assert_close(got, expected_packed)

    spatial = _space(tiny_dir)  # samples, but not without a generator
    got = spatial.encode(_images(), None)
    assert got.shape == (2, 3, 8, 8) and (spatial.channels, spatial.spatial_compression) == (3, 2)
    torch.testing.assert_close(got, Flux2Pipeline._unpatchify_latents(expected_packed))

    noise = torch.randn(posterior.mean.shape, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    sampled = spatial.encode(_images(), torch.Generator().manual_seed(4))
    expected = _pipeline_normalise(raw, posterior.mean + posterior.std * noise)
    torch.testing.assert_close(sampled, Flux2Pipeline._unpatchify_latents(expected))
    assert torch.equal(sampled, spatial.encode(_images(), torch.Generator().manual_seed(4)))


def test_statistics_fitted_to_the_weights_standardise_every_patch_channel(tmp_path: Path, tiny_dir: Path) -> None:
    # Give the tiny AE batch-norm statistics measured on its own latents, as FLUX.2's were: each of
    # the 12 patchified channels must then come out with mean 0 and variance var / (var + eps).
    ae = AutoencoderKLFlux2.from_pretrained(tiny_dir, subfolder="vae").to(torch.float64)
    images = torch.rand(8, 3, 16, 16, generator=torch.Generator().manual_seed(6), dtype=torch.float64)
    packed_z = Flux2Pipeline._patchify_latents(ae.encode(images * 2 - 1).latent_dist.mean)
    var = packed_z.var(dim=(0, 2, 3), unbiased=False)
    ae.bn.running_mean.copy_(packed_z.mean(dim=(0, 2, 3)))
    ae.bn.running_var.copy_(var)
    ae.save_pretrained(tmp_path / "vae")
    latents = _space(tmp_path, layout="packed").encode(images, None)
    torch.testing.assert_close(latents.mean(dim=(0, 2, 3)), torch.zeros_like(var))
    torch.testing.assert_close(latents.var(dim=(0, 2, 3), unbiased=False), var / (var + ae.config.batch_norm_eps))


@pytest.mark.parametrize("layout", ["spatial", "packed"])
def test_decode_undoes_exactly_the_normalisation(tiny_dir: Path, layout: str) -> None:
    raw = AutoencoderKLFlux2.from_pretrained(tiny_dir, subfolder="vae").to(torch.float64)
    z = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    normalised = _pipeline_normalise(raw, z)
    if layout == "spatial":
        normalised = Flux2Pipeline._unpatchify_latents(normalised)
    decoded = _space(tiny_dir, layout=layout).decode(normalised)
    torch.testing.assert_close(decoded, ((raw.decode(z).sample + 1) / 2).clamp(0, 1))
    assert decoded.shape == (2, 3, 16, 16) and decoded.min() >= 0 and decoded.max() <= 1


def test_sizes_the_bn_patches_cannot_cover_are_refused(tiny_dir: Path) -> None:
    with pytest.raises(ValueError, match="cannot be cut into 2x2 patches"):
        _space(tiny_dir).encode(_images(side=6), None)  # 3×3 latents


def _packed_patch(root: Path, **model: int) -> dict[str, object]:
    table = {"use": "flux2_ae", "path": str(root), "ae_channels": 3, "ae_compression": 2, "layout": "packed"}
    return {"latent_space": table, "model": model}


def test_recipe_check(tmp_path: Path, tiny_dir: Path) -> None:
    packed = tiny_recipe(tmp_path / "packed", _packed_patch(tiny_dir, in_channels=12, patch_size=1))
    assert packed.slot_config("latent_space").channels == 12
    with pytest.raises(RecipeError, match="produces 12 channels"):
        tiny_recipe(tmp_path / "bad", _packed_patch(tiny_dir))
    # The the published 32-channel AE with a 3-channel model fails `prx-run check` (no weights needed).
    bad = write_recipe(tmp_path / "cli", {"latent_space": {"use": "flux2_ae"}})
    assert cmd_check([str(bad)]) == 1


def test_trains_two_steps_packed(tmp_path: Path, tiny_dir: Path) -> None:
    recipe = tiny_recipe(tmp_path / "recipe", _packed_patch(tiny_dir, in_channels=12, patch_size=1))
    trainer = make_trainer(recipe, tmp_path / "run")
    assert all(math.isfinite(loss) for loss in run_steps(trainer, 2))
    images = trainer.generate(["a red square"], steps=2, cfg=2.0, seed=0, size=16)
    assert images.shape == (1, 3, 16, 16)


@pytest.mark.parametrize("layout", ["spatial", "packed"])
def test_encode_distribution_is_the_normalised_posterior(tiny_dir: Path, layout: str) -> None:
    # The batch-norm normalisation is affine per (channel, sub-pixel): the stored mean is the mode,
    # the stored std the raw σ patchified and divided by the statistics' std.
    from prx_core.slots import DistributionLatentSpace

    space = _space(tiny_dir, layout=layout)
    assert isinstance(space, DistributionLatentSpace)
    images = _images()
    mean, std = space.encode_distribution(images)
    torch.testing.assert_close(mean, space.encode(images, None))
    ae = AutoencoderKLFlux2.from_pretrained(tiny_dir, subfolder="vae").to(torch.float64).eval()
    bn_std = torch.sqrt(ae.bn.running_var.view(1, -1, 1, 1) + ae.config.batch_norm_eps)
    expected_std = Flux2Pipeline._patchify_latents(ae.encode(images * 2 - 1).latent_dist.std) / bn_std
    torch.testing.assert_close(std, expected_std if layout == "packed" else unpatchify(expected_std))
    if layout == "spatial":  # same layout as the raw latents: encode()'s own draws reproduce its sample
        eps = torch.randn(mean.shape, generator=torch.Generator().manual_seed(4), dtype=mean.dtype)
        torch.testing.assert_close(mean + std * eps, space.encode(images, torch.Generator().manual_seed(4)))
    else:  # packed: the same distribution, checked by its moments over many draws
        draws = torch.stack([space.encode(images, torch.Generator().manual_seed(s)) for s in range(400)])
        torch.testing.assert_close(draws.mean(0), mean, atol=4 * float(std.max()) / 20, rtol=0)
        torch.testing.assert_close(draws.std(0), std, atol=0.25 * float(std.max()), rtol=0)
