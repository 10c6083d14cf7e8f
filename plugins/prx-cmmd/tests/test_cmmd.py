"""Tests for the ``cmmd`` metric: a tiny random CLIP vision tower saved with ``save_pretrained`` and
loaded back through the plugin's loader, preprocessing against transformers' CLIPImageProcessor,
embeddings against a direct transformers forward, the score, recipe binding and the factory."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import json
import subprocess
import sys
from pathlib import Path

import prx_cmmd
import pytest
import torch
import torch.nn.functional as F
from prx_cmmd import INFO, CmmdConfig
from prx_cmmd.clip import CLIP_MEAN, CLIP_STD, ClipLoadError, CmmdMetric, load_clip
from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModelWithProjection

from prx_core.config import RecipeError
from prx_core.context import RunContext
from prx_core.metrics_math import mmd_rbf
from prx_core.precision import Fp32
from prx_core.recipe import load
from prx_core.testing.fixtures import write_recipe

CPU = torch.device("cpu")
SIZE = 32
#: A processor config with its own normalisation, saved next to the subfolder copy.
CUSTOM_MEAN, CUSTOM_STD = [0.5, 0.4, 0.3], [0.2, 0.25, 0.3]


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(0)
    config = CLIPVisionConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        image_size=SIZE,
        patch_size=8,
        projection_dim=16,
    )
    model = CLIPVisionModelWithProjection(config).eval()
    root = tmp_path_factory.mktemp("tiny_clip")
    model.save_pretrained(root)
    model.save_pretrained(root / "image_encoder")
    CLIPImageProcessor(
        size={"shortest_edge": SIZE},
        crop_size={"height": SIZE, "width": SIZE},
        image_mean=CUSTOM_MEAN,
        image_std=CUSTOM_STD,
    ).save_pretrained(root / "image_encoder")
    return root


@pytest.fixture(scope="module")
def metric(clip_dir: Path) -> CmmdMetric:
    return CmmdMetric(load_clip(str(clip_dir), "", CPU, None))


def _images(n: int, seed: int, size: int | tuple[int, int] = 64, low: float = 0.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    hw = (size, size) if isinstance(size, int) else size
    return low + (1 - low) * torch.rand(n, 3, *hw, generator=g)


def _processor(mean: list[float] | tuple[float, ...] = CLIP_MEAN, std: list[float] | tuple[float, ...] = CLIP_STD):
    return CLIPImageProcessor(
        size={"shortest_edge": SIZE}, crop_size={"height": SIZE, "width": SIZE}, image_mean=mean, image_std=std
    )


# --------------------------------------------------------------------------- preprocessing and features


@pytest.mark.parametrize("hw", [(64, 64), (80, 64), (48, 40), (16, 16), (20, 24)])
def test_preprocessing_matches_clip_image_processor(metric: CmmdMetric, hw: tuple[int, int]) -> None:
    images = _images(2, seed=1, size=hw)
    expected = _processor()(images=list(images), do_rescale=False, return_tensors="pt").pixel_values
    # The processor works on 8-bit images in practice, where bicubic overshoot is clipped; our
    # float path clips explicitly. Compare in that clipped range.
    mean = torch.tensor(CLIP_MEAN)[:, None, None]
    std = torch.tensor(CLIP_STD)[:, None, None]
    expected = ((expected * std + mean).clamp(0, 1) - mean) / std
    torch.testing.assert_close(metric.embedder.prepare(images), expected, rtol=1e-5, atol=1e-5)


def test_features_match_a_direct_transformers_forward(metric: CmmdMetric, clip_dir: Path) -> None:
    images = _images(3, seed=2)
    reference = CLIPVisionModelWithProjection.from_pretrained(clip_dir).eval()
    pixel_values = _processor()(images=list(images), do_rescale=False, return_tensors="pt").pixel_values
    with torch.no_grad():
        expected = F.normalize(reference(pixel_values=pixel_values).image_embeds, dim=-1)
    ours = metric.features(images, ["a", "b", "c"])
    assert ours.shape == (3, 16) and ours.device == CPU
    torch.testing.assert_close(ours.norm(dim=-1), torch.ones(3))
    torch.testing.assert_close(ours, expected, rtol=1e-4, atol=1e-5)
    assert not ours.requires_grad


def test_full_clip_checkpoint_loads_its_vision_tower_and_projection(tmp_path: Path) -> None:
    from transformers import CLIPConfig, CLIPModel

    torch.manual_seed(1)
    config = CLIPConfig(
        text_config={
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 1,
            "num_attention_heads": 2,
            "vocab_size": 64,
            "max_position_embeddings": 16,
            "bos_token_id": 0,
            "eos_token_id": 1,
            "pad_token_id": 1,
        },
        vision_config={
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "image_size": SIZE,
            "patch_size": 8,
        },
        projection_dim=24,
    )
    full = CLIPModel(config).eval()
    full.save_pretrained(tmp_path / "clip")
    embedder = load_clip(str(tmp_path / "clip"), "", CPU, None)
    images = _images(2, seed=9)
    with torch.no_grad():
        out = full.get_image_features(pixel_values=embedder.prepare(images))
    expected = F.normalize(out if isinstance(out, torch.Tensor) else out.pooler_output, dim=-1)
    torch.testing.assert_close(embedder.embed(images), expected, rtol=1e-4, atol=1e-5)


def test_subfolder_and_processor_normalisation(clip_dir: Path) -> None:
    embedder = load_clip(str(clip_dir), "image_encoder", CPU, None)
    assert embedder.mean == tuple(CUSTOM_MEAN) and embedder.std == tuple(CUSTOM_STD)
    images = _images(1, seed=3)
    expected = _processor(CUSTOM_MEAN, CUSTOM_STD)(images=list(images), do_rescale=False, return_tensors="pt")
    torch.testing.assert_close(embedder.prepare(images), expected.pixel_values, rtol=1e-5, atol=1e-5)
    # Without a processor file the OpenAI CLIP constants apply.
    assert load_clip(str(clip_dir), "", CPU, None).mean == CLIP_MEAN


def test_dtype_from_the_caller_and_frozen(clip_dir: Path) -> None:
    embedder = load_clip(str(clip_dir), "", CPU, torch.float64)
    assert {p.dtype for p in embedder.network.parameters()} == {torch.float64}
    assert not any(p.requires_grad for p in embedder.network.parameters()) and not embedder.network.training
    assert embedder.embed(_images(1, seed=4)).shape == (1, 16)


def test_loading_does_not_advance_the_global_rng(clip_dir: Path) -> None:
    torch.manual_seed(7)
    expected = torch.rand(3)
    torch.manual_seed(7)
    load_clip(str(clip_dir), "", CPU, None)
    assert torch.equal(torch.rand(3), expected)


def test_bad_inputs_and_missing_model(metric: CmmdMetric, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="float images"):
        metric.features(torch.zeros(1, 3, 8, 8, dtype=torch.uint8), [""])
    with pytest.raises(ValueError, match="RGB"):
        metric.features(torch.zeros(1, 4, 8, 8), [""])
    with pytest.raises(ClipLoadError, match="local directory"):
        load_clip(str(tmp_path / "missing"), "", CPU, None)


def test_invalid_processor_normalisation_is_refused(clip_dir: Path, tmp_path: Path) -> None:
    import shutil

    target = tmp_path / "clip"
    shutil.copytree(clip_dir, target)
    (target / "preprocessor_config.json").write_text(json.dumps({"image_mean": [0.5], "image_std": [0.0]}))
    with pytest.raises(ClipLoadError, match="image_mean"):
        load_clip(str(target), "", CPU, None)


# --------------------------------------------------------------------------- score


def test_score_is_the_shared_mmd(metric: CmmdMetric) -> None:
    feats = metric.features(torch.cat([_images(4, seed=5), _images(4, seed=6, low=0.5)]), [""] * 8)
    scores = metric.score(feats[4:], feats[:4])
    assert set(scores) == {"cmmd"}
    assert scores["cmmd"] == pytest.approx(mmd_rbf(feats[4:], feats[:4], sigma=10.0, scale=1000.0).item())
    assert scores["cmmd"] > 0
    assert abs(metric.score(feats[:4], feats[:4].clone())["cmmd"]) < 1e-9
    with pytest.raises(ValueError, match="reference"):
        metric.score(feats, None)


# --------------------------------------------------------------------------- plugin wiring


def test_recipe_binds_and_factory_runs(clip_dir: Path, tmp_path: Path) -> None:
    table = {"model": str(clip_dir), "subfolder": "image_encoder"}
    recipe = load(write_recipe(tmp_path, {"metrics": {"cmmd": table}}))
    choice = recipe.metrics["cmmd"]
    assert choice.plugin == "cmmd" and choice.config == CmmdConfig(**table)
    run = RunContext(recipe=recipe, device=CPU, run_dir=tmp_path, precision=Fp32())
    built = recipe.active.registries["metric"].get("cmmd").factory(choice.config, run)
    assert built.name == "cmmd" and built.needs_reference is True
    feats = built.features(_images(4, seed=8, size=16), ["a"] * 4)
    assert feats.shape == (4, 16)
    assert built.score(feats[:2], feats[2:])["cmmd"] > 0


def test_recipe_rejects_bad_tables(tmp_path: Path) -> None:
    with pytest.raises(RecipeError, match="metrics.cmmd.models"):
        load(write_recipe(tmp_path, {"metrics": {"cmmd": {"models": "x"}}}))
    with pytest.raises(RecipeError, match="model must be"):
        load(write_recipe(tmp_path, {"metrics": {"cmmd": {"model": " "}}}))


def test_info_and_registration() -> None:
    assert INFO.name == "cmmd" and INFO.requires == () and INFO.conflicts == ()
    assert CmmdConfig().model == "openai/clip-vit-large-patch14-336"
    registered: list[tuple[str, type]] = []

    class Registrar:
        def register(self, name: str, factory: object, config: type) -> None:
            registered.append((name, config))

    prx_cmmd.prx_register_metrics(Registrar())
    assert registered == [("cmmd", CmmdConfig)]


def test_import_is_torch_free() -> None:
    code = "import sys, prx_cmmd; sys.exit('torch' in sys.modules or 'transformers' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], check=False).returncode == 0
