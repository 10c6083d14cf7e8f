"""flux_vae against the tiny random AutoencoderKL saved to disk and loaded back through the plugin."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import math  # noqa: E402
from pathlib import Path  # noqa: E402
from types import SimpleNamespace  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402
from diffusers import AutoencoderKL  # noqa: E402
from prx_flux_vae import FluxVAEConfig, _build  # noqa: E402
from prx_flux_vae.autoencoder import FluxVAESpace  # noqa: E402

from prx_core.cli import cmd_check  # noqa: E402
from prx_core.config import RecipeError  # noqa: E402
from prx_core.testing.fixtures import make_trainer, run_steps, tiny_recipe, write_recipe  # noqa: E402


def _space(root: Path, dtype: torch.dtype = torch.float64, **overrides: object) -> FluxVAESpace:
    config = FluxVAEConfig(path=str(root), **{"channels": 3, "spatial_compression": 2, **overrides})  # type: ignore[arg-type]
    run = SimpleNamespace(device=torch.device("cpu"), precision=SimpleNamespace(frozen_dtype=dtype))
    return _build(config, run)


def _raw(root: Path) -> AutoencoderKL:
    return AutoencoderKL.from_pretrained(root, subfolder="vae").to(torch.float64).eval()


def _images(n: int = 2) -> torch.Tensor:
    return torch.rand(n, 3, 16, 16, generator=torch.Generator().manual_seed(1), dtype=torch.float64)


def test_config_tells_shape_without_loading() -> None:
    config = FluxVAEConfig()
    assert (config.channels, config.spatial_compression) == (16, 8)
    assert (config.path, config.subfolder) == ("black-forest-labs/FLUX.1-dev", "vae")
    assert (config.scaling_factor, config.shift_factor) == (0.3611, 0.1159)


@pytest.mark.parametrize(
    ("field", "value"), [("scaling_factor", 0.0), ("channels", 0), ("spatial_compression", 6), ("path", "")]
)
def test_config_rejects_bad_values(field: str, value: object) -> None:
    with pytest.raises(ValueError, match=field if field != "path" else "hub id"):
        FluxVAEConfig(**{field: value})  # type: ignore[arg-type]


def test_loads_frozen_in_the_policy_dtype(tiny_dir: Path) -> None:
    space = _space(tiny_dir, torch.float64)
    vae = space.vae
    assert not vae.training
    assert all(p.dtype == torch.float64 and not p.requires_grad for p in vae.parameters())
    assert (space.channels, space.spatial_compression) == (3, 2)


def test_shapes_and_ranges(tiny_dir: Path) -> None:
    space = _space(tiny_dir)
    latents = space.encode(_images(3), torch.Generator().manual_seed(0))
    assert latents.shape == (3, 3, 8, 8)
    decoded = space.decode(latents)
    assert decoded.shape == (3, 3, 16, 16)
    assert decoded.min() >= 0 and decoded.max() <= 1


def test_mode_is_the_shifted_and_scaled_posterior_mean(tiny_dir: Path) -> None:
    space = _space(tiny_dir, sample_posterior=False)
    images = _images()
    mean = _raw(tiny_dir).encode(images * 2 - 1).latent_dist.mean
    expected = (mean - 0.1159) * 0.3611
    torch.testing.assert_close(space.encode(images, torch.Generator()), expected)


def test_sample_draws_from_the_posterior_with_the_given_generator(tiny_dir: Path) -> None:
    space = _space(tiny_dir, sample_posterior=True)
    images = _images()
    posterior = _raw(tiny_dir).encode(images * 2 - 1).latent_dist
    noise = torch.randn(posterior.mean.shape, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    expected = (posterior.mean + posterior.std * noise - 0.1159) * 0.3611
    got = space.encode(images, torch.Generator().manual_seed(5))
    torch.testing.assert_close(got, expected)
    again = space.encode(images, torch.Generator().manual_seed(5))
    assert torch.equal(got, again)
    assert not torch.equal(got, space.encode(images, torch.Generator().manual_seed(6)))
    # Without a generator (validation loss) the encoding is the repeatable posterior mean.
    torch.testing.assert_close(space.encode(images, None), (posterior.mean - 0.1159) * 0.3611)


def test_factors_fitted_to_the_weights_standardise_the_latents(tiny_dir: Path) -> None:
    # What scale and shift are for: with shift = mean(z) and scale = 1 / std(z), the denoiser sees
    # zero-mean, unit-variance latents (FLUX.1's 0.1159 / 0.3611 are those of its training data).
    images = torch.rand(8, 3, 16, 16, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    z = _raw(tiny_dir).encode(images * 2 - 1).latent_dist.mean
    shift, scale = z.mean().item(), 1 / z.std().item()
    space = _space(tiny_dir, sample_posterior=False, shift_factor=shift, scaling_factor=scale)
    latents = space.encode(images, None)
    assert abs(latents.mean().item()) < 1e-9 and abs(latents.std().item() - 1) < 1e-9


def test_decode_inverts_exactly_the_normalisation(tiny_dir: Path) -> None:
    space = _space(tiny_dir)
    z = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    expected = ((_raw(tiny_dir).decode(z).sample + 1) / 2).clamp(0, 1)
    torch.testing.assert_close(space.decode((z - 0.1159) * 0.3611), expected)


def test_latents_are_in_the_frozen_dtype_and_decoding_accepts_others(tiny_dir: Path) -> None:
    space = _space(tiny_dir, torch.float64)
    latents = space.encode(_images().float(), None)
    assert latents.dtype == torch.float64
    assert space.decode(latents.float()).dtype == torch.float64


def test_shape_mismatch_with_the_weights_is_refused_on_load(tiny_dir: Path) -> None:
    with pytest.raises(ValueError, match="3 channels at 2x"):
        _space(tiny_dir, channels=16, spatial_compression=8)


def test_missing_weights_give_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(OSError, match="flux_vae: cannot load an AutoencoderKL from"):
        _space(tmp_path / "nowhere")


def _patch(root: Path, **model: int) -> dict[str, object]:
    return {
        "latent_space": {"use": "flux_vae", "path": str(root), "channels": 3, "spatial_compression": 2},
        "model": model,
    }


def test_recipe_validates_and_channel_mismatch_fails_check(tmp_path: Path, tiny_dir: Path) -> None:
    recipe = tiny_recipe(tmp_path / "ok", _patch(tiny_dir))
    assert recipe.slot_config("latent_space").channels == 3
    with pytest.raises(RecipeError, match="in_channels.*produces 3 channels"):
        tiny_recipe(tmp_path / "bad", _patch(tiny_dir, in_channels=4))
    with pytest.raises(RecipeError, match="not divisible by latent compression"):
        tiny_recipe(tmp_path / "size", _patch(tiny_dir, patch_size=16))
    # The check: the default 16-channel FLUX VAE with a 3-channel model fails `prx-run check`
    # (no weights needed: the default hub id is never fetched).
    bad = write_recipe(tmp_path / "cli", {"latent_space": {"use": "flux_vae"}, "model": {"in_channels": 3}})
    assert cmd_check([str(bad)]) == 1


def test_trains_two_steps_and_samples(tmp_path: Path, tiny_dir: Path) -> None:
    trainer = make_trainer(tiny_recipe(tmp_path / "recipe", _patch(tiny_dir)), tmp_path / "run")
    assert all(math.isfinite(loss) for loss in run_steps(trainer, 2))
    images = trainer.generate(["a red square", "a blue circle"], steps=2, cfg=2.0, seed=0, size=16)
    assert images.shape == (2, 3, 16, 16)
    assert images.min() >= 0 and images.max() <= 1


def test_encode_distribution_is_the_normalised_posterior(tiny_dir: Path) -> None:
    # What prx-run precompute stores: its mean is the mode encode() gives without a generator, and
    # mean + std·ε with the ε encode() draws from a generator is that sample (same draws, same shape).
    from prx_core.slots import DistributionLatentSpace

    space = _space(tiny_dir, sample_posterior=True)
    assert isinstance(space, DistributionLatentSpace)
    images = _images()
    mean, std = space.encode_distribution(images)
    torch.testing.assert_close(mean, space.encode(images, None))
    posterior = _raw(tiny_dir).encode(images * 2 - 1).latent_dist
    torch.testing.assert_close(std, posterior.std * 0.3611)
    eps = torch.randn(mean.shape, generator=torch.Generator().manual_seed(9), dtype=mean.dtype)
    torch.testing.assert_close(mean + std * eps, space.encode(images, torch.Generator().manual_seed(9)))
