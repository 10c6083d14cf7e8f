"""dc_ae: deterministic scaled latents on a tiny AutoencoderDC loaded through the plugin."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import json  # noqa: E402
import math  # noqa: E402
import shutil  # noqa: E402
from pathlib import Path  # noqa: E402
from types import SimpleNamespace  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402
from diffusers import AutoencoderDC  # noqa: E402
from prx_dc_ae import DCAEConfig, _build  # noqa: E402
from prx_dc_ae.autoencoder import DCAESpace, stated_scale  # noqa: E402

from prx_core.config import RecipeError  # noqa: E402
from prx_core.testing.fixtures import make_trainer, run_steps, tiny_recipe  # noqa: E402

SCALE = 0.4  # as saved by conftest.tiny_dir


def _space(root: Path, dtype: torch.dtype = torch.float64, **overrides: object) -> DCAESpace:
    fields = {"path": str(root), "channels": 3, "spatial_compression": 2, **overrides}
    config = DCAEConfig(**fields)  # type: ignore[arg-type]
    return _build(config, SimpleNamespace(device=torch.device("cpu"), precision=SimpleNamespace(frozen_dtype=dtype)))


def test_config_defaults_and_no_posterior() -> None:
    config = DCAEConfig()
    assert (config.channels, config.spatial_compression) == (32, 32)
    assert config.path == "mit-han-lab/dc-ae-f32c32-sana-1.1-diffusers"
    with pytest.raises(ValueError, match="deterministic"):
        DCAEConfig(sample_posterior=True)


def test_sample_posterior_true_is_a_recipe_error(tmp_path: Path) -> None:
    with pytest.raises(RecipeError, match="no posterior to sample"):
        tiny_recipe(
            tmp_path, {"latent_space": {"use": "dc_ae", "sample_posterior": True}, "model": {"in_channels": 32}}
        )


def test_stated_scale() -> None:
    assert stated_scale({"scaling_factor": 0.41407}) == 0.41407
    assert stated_scale({"scaling_factor": 1.0, "_use_default_values": ["scaling_factor"]}) is None


def test_loads_frozen_in_the_policy_dtype(tiny_dir: Path) -> None:
    space = _space(tiny_dir)
    assert space.scale == SCALE and not space.ae.training
    assert all(p.dtype == torch.float64 and not p.requires_grad for p in space.ae.parameters())
    with pytest.raises(ValueError, match="3 channels at 2x"):
        _space(tiny_dir, channels=32, spatial_compression=32)


def test_encode_decode_against_the_raw_autoencoder(tiny_dir: Path) -> None:
    raw = AutoencoderDC.from_pretrained(tiny_dir).to(torch.float64)
    images = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    space = _space(tiny_dir)
    latents = space.encode(images, torch.Generator().manual_seed(1))
    assert latents.shape == (2, 3, 8, 8)
    torch.testing.assert_close(latents, raw.encode(images * 2 - 1).latent * SCALE)
    # Deterministic: the generator changes nothing.
    assert torch.equal(latents, space.encode(images, torch.Generator().manual_seed(2)))
    assert torch.equal(latents, space.encode(images, None))
    z = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    decoded = space.decode(z * SCALE)
    torch.testing.assert_close(decoded, ((raw.decode(z).sample + 1) / 2).clamp(0, 1))
    assert decoded.shape == (2, 3, 16, 16) and decoded.min() >= 0 and decoded.max() <= 1
    # A recipe scale overrides the checkpoint's.
    torch.testing.assert_close(_space(tiny_dir, scaling_factor=2.0).encode(images, None), latents / SCALE * 2.0)


def test_a_checkpoint_without_a_scale_needs_one_in_the_recipe(tmp_path: Path, tiny_dir: Path) -> None:
    shutil.copytree(tiny_dir, tmp_path / "ae")
    config = json.loads((tmp_path / "ae" / "config.json").read_text())
    del config["scaling_factor"]
    (tmp_path / "ae" / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="states no scaling_factor"):
        _space(tmp_path / "ae")
    assert _space(tmp_path / "ae", scaling_factor=0.5).scale == 0.5


def test_recipe_check_and_two_training_steps(tmp_path: Path, tiny_dir: Path) -> None:
    with pytest.raises(RecipeError, match="produces 32 channels"):
        tiny_recipe(tmp_path / "default", {"latent_space": {"use": "dc_ae"}})
    with pytest.raises(RecipeError, match="divisible by latent compression × patch size = 64"):
        # reference.md §4: DC-AE is used with patch 1; patch 2 at 32x needs images divisible by 64.
        tiny_recipe(
            tmp_path / "size", {"latent_space": {"use": "dc_ae"}, "model": {"in_channels": 32, "patch_size": 2}}
        )
    table = {"use": "dc_ae", "path": str(tiny_dir), "channels": 3, "spatial_compression": 2}
    trainer = make_trainer(tiny_recipe(tmp_path / "ok", {"latent_space": table}), tmp_path / "run")
    assert all(math.isfinite(loss) for loss in run_steps(trainer, 2))


def test_deterministic_space_offers_no_posterior(tiny_dir: Path) -> None:
    # prx-run precompute stores encode(images, None) for a space without encode_distribution.
    from prx_core.slots import DistributionLatentSpace

    assert not isinstance(_space(tiny_dir), DistributionLatentSpace)
