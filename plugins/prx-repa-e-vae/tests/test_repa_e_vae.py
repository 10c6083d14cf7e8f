"""repa_e_vae: where shift and scale come from, and the latent maths on a tiny saved autoencoder."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import math  # noqa: E402
from pathlib import Path  # noqa: E402
from types import SimpleNamespace  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402
from diffusers import AutoencoderKL  # noqa: E402
from prx_repa_e_vae import RepaEVAEConfig, _build  # noqa: E402
from prx_repa_e_vae.autoencoder import RepaEVAESpace, resolve_normalisation  # noqa: E402

from prx_core.config import RecipeError  # noqa: E402
from prx_core.testing.fixtures import make_trainer, run_steps, tiny_recipe  # noqa: E402

SCALE, SHIFT = 0.5, 0.25  # as saved by conftest.tiny_dir


def _space(root: Path, dtype: torch.dtype = torch.float64, **overrides: object) -> RepaEVAESpace:
    config = RepaEVAEConfig(path=str(root), channels=3, spatial_compression=2, **overrides)  # type: ignore[arg-type]
    return _build(config, SimpleNamespace(device=torch.device("cpu"), precision=SimpleNamespace(frozen_dtype=dtype)))


def test_config_defaults_name_the_repa_e_weights() -> None:
    config = RepaEVAEConfig()
    assert (config.path, config.subfolder) == ("REPA-E/e2e-flux-vae", "")
    assert (config.channels, config.spatial_compression) == (16, 8)
    assert config.scaling_factor is None and config.shift_factor is None
    with pytest.raises(ValueError, match="scaling_factor"):
        RepaEVAEConfig(scaling_factor=-1.0)


@pytest.mark.parametrize(
    ("recipe", "weights", "expected"),
    [
        ({}, {"scaling_factor": 0.4, "shift_factor": 0.1}, (0.4, 0.1)),
        ({"scaling_factor": 2.0}, {"scaling_factor": 0.4, "shift_factor": 0.1}, (2.0, 0.1)),
        ({"shift_factor": -0.5}, {"scaling_factor": 0.4, "shift_factor": 0.1}, (0.4, -0.5)),
        ({}, {"scaling_factor": 0.4, "shift_factor": None}, (0.4, 0.0)),
        ({"scaling_factor": 1.5, "shift_factor": 0.0}, {"_use_default_values": ["scaling_factor"]}, (1.5, 0.0)),
    ],
)
def test_recipe_values_win_over_the_checkpoint_config(
    recipe: dict[str, float], weights: dict[str, object], expected: tuple[float, float]
) -> None:
    assert resolve_normalisation(RepaEVAEConfig(**recipe), weights) == expected


def test_a_scale_the_file_does_not_state_is_an_error() -> None:
    # diffusers fills a missing key with SD's 0.18215 and records that it did.
    weights = {"scaling_factor": 0.18215, "shift_factor": None, "_use_default_values": ["scaling_factor"]}
    with pytest.raises(ValueError, match="states no scaling_factor"):
        resolve_normalisation(RepaEVAEConfig(), weights)


def test_factors_are_read_from_the_saved_config(tiny_dir: Path, unscaled_dir: Path) -> None:
    space = _space(tiny_dir)
    assert (space.scale, space.shift) == (SCALE, SHIFT)
    assert not space.vae.training
    assert all(p.dtype == torch.float64 and not p.requires_grad for p in space.vae.parameters())
    with pytest.raises(ValueError, match="states no scaling_factor"):
        _space(unscaled_dir)
    assert (_space(unscaled_dir, scaling_factor=0.7).scale, _space(unscaled_dir, scaling_factor=0.7).shift) == (0.7, 0)


def test_encode_decode_against_the_raw_autoencoder(tiny_dir: Path) -> None:
    raw = AutoencoderKL.from_pretrained(tiny_dir).to(torch.float64)
    images = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    posterior = raw.encode(images * 2 - 1).latent_dist
    space = _space(tiny_dir)
    torch.testing.assert_close(space.encode(images, None), (posterior.mean - SHIFT) * SCALE)
    noise = torch.randn(posterior.mean.shape, generator=torch.Generator().manual_seed(9), dtype=torch.float64)
    sampled = space.encode(images, torch.Generator().manual_seed(9))
    torch.testing.assert_close(sampled, (posterior.mean + posterior.std * noise - SHIFT) * SCALE)
    assert torch.equal(sampled, space.encode(images, torch.Generator().manual_seed(9)))
    mode = _space(tiny_dir, sample_posterior=False).encode(images, torch.Generator().manual_seed(9))
    torch.testing.assert_close(mode, (posterior.mean - SHIFT) * SCALE)
    z = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    decoded = space.decode((z - SHIFT) * SCALE)
    torch.testing.assert_close(decoded, ((raw.decode(z).sample + 1) / 2).clamp(0, 1))
    assert decoded.shape == (2, 3, 16, 16) and decoded.min() >= 0 and decoded.max() <= 1


def test_recipe_check_and_two_training_steps(tmp_path: Path, tiny_dir: Path) -> None:
    table = {"use": "repa_e_vae", "path": str(tiny_dir), "channels": 3, "spatial_compression": 2}
    with pytest.raises(RecipeError, match="produces 3 channels"):
        tiny_recipe(tmp_path / "bad", {"latent_space": table, "model": {"in_channels": 16}})
    with pytest.raises(RecipeError, match="produces 16 channels"):  # reference.md §7.4: REPA-E VAE + pixel model
        tiny_recipe(tmp_path / "default", {"latent_space": {"use": "repa_e_vae"}})
    trainer = make_trainer(tiny_recipe(tmp_path / "ok", {"latent_space": table}), tmp_path / "run")
    assert all(math.isfinite(loss) for loss in run_steps(trainer, 2))


def test_encode_distribution_is_the_normalised_posterior(tiny_dir: Path) -> None:
    from prx_core.slots import DistributionLatentSpace

    space = _space(tiny_dir)
    assert isinstance(space, DistributionLatentSpace)
    images = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    mean, std = space.encode_distribution(images)
    torch.testing.assert_close(mean, space.encode(images, None))
    raw = AutoencoderKL.from_pretrained(tiny_dir).to(torch.float64).eval()
    torch.testing.assert_close(std, raw.encode(images * 2 - 1).latent_dist.std * SCALE)
    eps = torch.randn(mean.shape, generator=torch.Generator().manual_seed(4), dtype=mean.dtype)
    torch.testing.assert_close(mean + std * eps, space.encode(images, torch.Generator().manual_seed(4)))
