"""Tests for the ``dino_mmd`` metric: a tiny random DINOv2-reg written by ``prx_core.vision`` and loaded
back through the plugin's factory, CLS features against a direct timm forward, the score, recipe
binding (including ``encoder_overrides``) and configuration errors."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import prx_dino_mmd
import pytest
import torch
import torch.nn.functional as F
from prx_dino_mmd import INFO, DinoMmdConfig, _build
from prx_dino_mmd.metric import DinoMmdMetric

from prx_core.config import RecipeError
from prx_core.context import RunContext
from prx_core.metrics_math import mmd_rbf
from prx_core.precision import Fp32
from prx_core.recipe import load
from prx_core.testing.fixtures import write_recipe
from prx_core.vision import TEACHERS, load_frozen_encoder, write_random_weights

timm = pytest.importorskip("timm")

CPU = torch.device("cpu")
TINY = {"embed_dim": 32, "depth": 2, "num_heads": 2}
#: A small multiple of the patch size keeps most tests fast; one test runs at the published 518.
RES = 56


@pytest.fixture(scope="module")
def weights(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_random_weights(
        "dinov2_vitl14_reg", tmp_path_factory.mktemp("dino") / "tiny.safetensors", overrides=TINY
    )


def _run(dtype: torch.dtype = torch.float32) -> SimpleNamespace:
    return SimpleNamespace(device=CPU, precision=SimpleNamespace(frozen_dtype=dtype))


@pytest.fixture(scope="module")
def metric(weights: Path) -> DinoMmdMetric:
    return _build(DinoMmdConfig(weights=str(weights), resolution=RES, encoder_overrides=TINY), _run())


def _images(n: int, seed: int, size: int = 32, low: float = 0.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return low + (1 - low) * torch.rand(n, 3, size, size, generator=g)


def test_features_are_the_normalised_cls_token_of_a_direct_timm_forward(metric: DinoMmdMetric, weights: Path) -> None:
    from safetensors.torch import load_file

    model = timm.create_model(TEACHERS["dinov2_vitl14_reg"], pretrained=False, dynamic_img_size=True, **TINY)
    model.load_state_dict(load_file(str(weights)))
    model.eval()
    images = _images(3, seed=1)
    mean = torch.tensor(model.pretrained_cfg["mean"])[:, None, None]
    std = torch.tensor(model.pretrained_cfg["std"])[:, None, None]
    x = F.interpolate((images - mean) / std, size=(RES, RES), mode="bilinear", align_corners=False, antialias=True)
    with torch.no_grad():
        tokens = model.forward_features(x)
    assert tokens.shape[1] == 1 + 4 + (RES // 14) ** 2  # CLS, 4 registers, patches: CLS is row 0
    expected = F.normalize(tokens[:, 0], dim=-1)
    ours = metric.features(images, ["a", "b", "c"])
    assert ours.shape == (3, 32) and ours.device == CPU
    torch.testing.assert_close(ours, expected, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(ours.norm(dim=-1), torch.ones(3))


def test_spec_resolution_518(weights: Path) -> None:
    metric = _build(DinoMmdConfig(weights=str(weights), encoder_overrides=TINY), _run())
    assert metric.resolution == 518
    feats = metric.features(_images(2, seed=2, size=16), ["", ""])
    assert feats.shape == (2, 32) and torch.isfinite(feats).all()


def test_dtype_comes_from_the_precision_policy(weights: Path) -> None:
    metric = _build(DinoMmdConfig(weights=str(weights), resolution=RES, encoder_overrides=TINY), _run(torch.float64))
    assert metric.encoder.dtype == torch.float64
    assert metric.features(_images(1, seed=3), [""]).shape == (1, 32)


def test_score_is_the_shared_mmd(metric: DinoMmdMetric) -> None:
    feats = metric.features(torch.cat([_images(4, seed=4), _images(4, seed=5, low=0.6)]), [""] * 8)
    scores = metric.score(feats[4:], feats[:4])
    assert set(scores) == {"dino_mmd"}
    assert scores["dino_mmd"] == pytest.approx(mmd_rbf(feats[4:], feats[:4], sigma=10.0, scale=1000.0).item())
    assert scores["dino_mmd"] > 0
    assert abs(metric.score(feats[:4], feats[:4].clone())["dino_mmd"]) < 1e-9
    with pytest.raises(ValueError, match="reference"):
        metric.score(feats, None)


def test_bad_resolution_and_inputs(weights: Path, metric: DinoMmdMetric) -> None:
    with pytest.raises(ValueError, match="multiple of the encoder's patch size 14"):
        _build(DinoMmdConfig(weights=str(weights), resolution=50, encoder_overrides=TINY), _run())
    with pytest.raises(ValueError, match="float images"):
        metric.features(torch.zeros(1, 3, 8, 8, dtype=torch.uint8), [""])
    with pytest.raises(ValueError, match="RGB"):
        metric.features(torch.zeros(1, 1, 8, 8), [""])


def test_encoder_without_cls_token_is_refused(weights: Path) -> None:
    encoder = load_frozen_encoder("dinov2_vitl14_reg", str(weights), overrides=TINY)
    encoder.has_cls_token = False
    with pytest.raises(ValueError, match="no CLS token"):
        DinoMmdMetric(encoder, RES)


def test_recipe_binds_and_factory_runs(weights: Path, tmp_path: Path) -> None:
    table = {"weights": str(weights), "resolution": RES, "encoder_overrides": TINY}
    recipe = load(write_recipe(tmp_path, {"metrics": {"dino_mmd": table}}))
    choice = recipe.metrics["dino_mmd"]
    assert choice.plugin == "dino_mmd" and choice.config == DinoMmdConfig(**table)
    run = RunContext(recipe=recipe, device=CPU, run_dir=tmp_path, precision=Fp32())
    built = recipe.active.registries["metric"].get("dino_mmd").factory(choice.config, run)
    assert built.name == "dino_mmd" and built.needs_reference is True
    feats = built.features(_images(4, seed=6, size=16), ["a"] * 4)
    assert built.score(feats[:2], feats[2:])["dino_mmd"] > 0
    # The resolved recipe (with its dict-valued overrides) reloads to the same config.
    from prx_core.recipe import dump_toml

    (tmp_path / "resolved.toml").write_text(dump_toml(recipe.resolved()))
    assert load(tmp_path / "resolved.toml").metrics["dino_mmd"].config == choice.config


def test_recipe_rejects_bad_tables(tmp_path: Path) -> None:
    with pytest.raises(RecipeError, match="metrics.dino_mmd.resolutoin"):
        load(write_recipe(tmp_path, {"metrics": {"dino_mmd": {"resolutoin": 518}}}))
    with pytest.raises(RecipeError, match="resolution must be"):
        load(write_recipe(tmp_path, {"metrics": {"dino_mmd": {"resolution": 0}}}))
    with pytest.raises(RecipeError, match="encoder_overrides"):
        load(write_recipe(tmp_path, {"metrics": {"dino_mmd": {"encoder_overrides": {"depth": "two"}}}}))


def test_info_and_registration() -> None:
    assert INFO.name == "dino_mmd" and INFO.requires == () and INFO.conflicts == ()
    default = DinoMmdConfig()
    assert (default.encoder, default.resolution, default.weights) == ("dinov2_vitl14_reg", 518, "")
    registered: list[tuple[str, type]] = []

    class Registrar:
        def register(self, name: str, factory: object, config: type) -> None:
            registered.append((name, config))

    prx_dino_mmd.prx_register_metrics(Registrar())
    assert registered == [("dino_mmd", DinoMmdConfig)]


def test_import_is_torch_free() -> None:
    code = "import sys, prx_dino_mmd; sys.exit('torch' in sys.modules or 'timm' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], check=False).returncode == 0
