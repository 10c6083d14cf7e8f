"""`prx-run export` writes a diffusers PRXPipeline folder when every component is a standard one."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

from prx_core.testing.autoencoders import save_tiny_kl_vae  # noqa: E402
from prx_core.testing.fixtures import write_recipe  # noqa: E402

from .test_cli import prx_run  # noqa: E402

pytestmark = pytest.mark.integration

MAX_LENGTH = 12


def _save_tiny_vae(root: Path) -> Path:
    """A tiny random AutoencoderKL (2x compression, 3 latent channels), as the flux_vae tests build it."""
    save_tiny_kl_vae(root / "vae")
    return root


@pytest.fixture(scope="module")
def latent_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    pytest.importorskip("prx_flux_vae")
    t5gemma_testing = pytest.importorskip("prx_t5gemma.testing")
    root = tmp_path_factory.mktemp("pipeline_run")
    vae_dir = _save_tiny_vae(root / "tiny_vae")
    text_dir = t5gemma_testing.save_tiny_t5gemma(root / "tiny_t5gemma")
    recipe = write_recipe(
        root,
        {
            "train": {"steps": 1, "checkpoint_every": 1},
            "model": {"in_channels": 3, "patch_size": 4},
            "data": {"size": 16},
            "latent_space": {"use": "flux_vae", "path": str(vae_dir), "channels": 3, "spatial_compression": 2},
            "text_encoder": {"use": "t5gemma", "path": str(text_dir), "dim": 32, "max_length": MAX_LENGTH},
        },
    )
    prx_run(str(recipe), "--run-dir", "run", cwd=root)
    return root / "run"


def test_export_writes_a_prx_pipeline(latent_run: Path, tmp_path: Path) -> None:
    from diffusers import FlowMatchEulerDiscreteScheduler, PRXPipeline, PRXTransformer2DModel

    from prx_core.recipe import load
    from prx_core.testing.fixtures import make_trainer

    result = prx_run("export", str(latent_run), "exported", "--weights", "trained", cwd=tmp_path)
    out = tmp_path / "exported"
    assert "no PRXPipeline folder" not in result.stdout and "PRXPipeline.from_pretrained" in result.stdout

    pipeline = PRXPipeline.from_pretrained(out)
    trainer = make_trainer(load(latent_run / "recipe.toml"), latent_run, resume="auto")
    trained = trainer.run.require("trainable").model.state_dict()
    for transformer in (pipeline.transformer, PRXTransformer2DModel.from_pretrained(out / "transformer")):
        exported = transformer.state_dict()
        assert exported.keys() == trained.keys() and all(torch.equal(exported[k], trained[k]) for k in trained)

    assert isinstance(pipeline.scheduler, FlowMatchEulerDiscreteScheduler)
    assert pipeline.scheduler.config.shift == 1.0  # the flow_matching default
    # The pipeline tokenizes with the tokenizer's own defaults: they must match training's.
    assert pipeline.tokenizer.padding_side == "right" and pipeline.tokenizer.model_max_length == MAX_LENGTH
    # The pipeline decodes latents / scaling_factor + shift_factor: flux_vae's normalisation.
    assert pipeline.vae.config.scaling_factor == pytest.approx(0.3611)
    assert pipeline.vae.config.shift_factor == pytest.approx(0.1159)
    # The exported tokenizer and encoder, called as PRXPipeline calls them (its own tokenizer call,
    # with the tokenizer's defaults), reproduce the states the trainer's text encoder gives.
    from prx_t5gemma.encoder import T5GemmaTextEncoder, load_t5gemma

    cpu = torch.device("cpu")
    source = T5GemmaTextEncoder(
        *load_t5gemma(str(latent_run.parent / "tiny_t5gemma"), "", cpu, torch.float32),
        max_length=MAX_LENGTH,
        dim=32,
        device=cpu,
    )
    prompts = ["", "a red circle at the top left"]
    tokens = pipeline.tokenizer(
        prompts,
        padding="max_length",
        max_length=pipeline.tokenizer.model_max_length,
        truncation=True,
        return_tensors="pt",
    )
    mask_BL = tokens["attention_mask"].bool()
    with torch.no_grad():
        states_BLD = pipeline.text_encoder(input_ids=tokens["input_ids"], attention_mask=mask_BL)["last_hidden_state"]
    expected_BLD, expected_mask_BL = source.encode(prompts)
    assert torch.equal(mask_BL, expected_mask_BL)
    torch.testing.assert_close(states_BLD[mask_BL], expected_BLD[mask_BL])
    # ... and t5gemma itself loads the exported folder back (path = a PRXPipeline repo).
    reloaded = T5GemmaTextEncoder(
        *load_t5gemma(str(out), "text_encoder", cpu, torch.float32, tokenizer_subfolder="tokenizer"),
        max_length=MAX_LENGTH,
        dim=32,
        device=cpu,
    )
    torch.testing.assert_close(reloaded.encode(prompts)[0], expected_BLD)

    # The whole pipeline runs (from these embeddings: its prompt cleaning needs ftfy, which the
    # trainer does not use) and returns an image at the requested size.
    image = pipeline(
        prompt_embeds=states_BLD[1:],
        prompt_attention_mask=mask_BL[1:],
        negative_prompt_embeds=states_BLD[:1],
        negative_prompt_attention_mask=mask_BL[:1],
        height=16,
        width=16,
        num_inference_steps=2,
        guidance_scale=2.0,
        use_resolution_binning=False,
        output_type="pt",
        generator=torch.Generator().manual_seed(0),
    ).images
    assert image.shape == (1, 3, 16, 16) and torch.isfinite(image).all()


def test_pixel_space_exports_only_the_transformer(tmp_path: Path) -> None:
    recipe = write_recipe(tmp_path, {"train": {"steps": 1, "checkpoint_every": 1}})
    prx_run(str(recipe), "--run-dir", "run", cwd=tmp_path)
    result = prx_run("export", "run", "exported", cwd=tmp_path)
    assert "no PRXPipeline folder: latent space 'pixel'" in result.stdout
    assert sorted(p.name for p in (tmp_path / "exported").iterdir()) == ["transformer"]
