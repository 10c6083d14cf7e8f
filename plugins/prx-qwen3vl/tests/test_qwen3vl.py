"""Tests for the ``qwen3vl`` text encoder, on a tiny random Qwen3-VL saved to disk and loaded back."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import json
import math
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import prx_qwen3vl
import pytest
import torch
from prx_qwen3vl import INFO, Qwen3VLEncoderConfig, _build
from prx_qwen3vl.encoder import Qwen3VLTextEncoder, load_qwen3vl
from prx_qwen3vl.testing import save_tiny_qwen3vl
from safetensors.torch import load_file, save_file
from transformers import AutoTokenizer, Qwen3VLForConditionalGeneration, Qwen3VLModel, Qwen3VLTextModel

from prx_core.testing.fixtures import make_trainer, run_steps, tiny_recipe

CPU = torch.device("cpu")
PROMPTS = [
    "a red circle",
    "a small green triangle in the top right , on a brown background .",
    "",
]


def _run(dtype: torch.dtype = torch.float32) -> SimpleNamespace:
    """The two things the factory reads from a RunContext."""
    return SimpleNamespace(device=CPU, precision=SimpleNamespace(frozen_dtype=dtype))


def _config(path: Path, **kwargs: object) -> Qwen3VLEncoderConfig:
    return Qwen3VLEncoderConfig(**{"path": str(path), "dim": 32, "max_length": 16, **kwargs})  # type: ignore[arg-type]


def _ids(tokenizer: object, prompt: str, limit: int = 16) -> torch.Tensor:
    """The tokenizer's own ids for one prompt, unpadded, cut at ``limit``: [1, N]."""
    return torch.tensor([tokenizer(prompt)["input_ids"][:limit]])  # type: ignore[operator]


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The hub layout (full vision-language model) at the root and, identically, in ``text_encoder/``."""
    root = tmp_path_factory.mktemp("tiny_qwen3vl")
    save_tiny_qwen3vl(root)
    save_tiny_qwen3vl(root, "text_encoder")
    return root


@pytest.fixture(scope="module")
def tokenizer(tiny_dir: Path) -> object:
    return AutoTokenizer.from_pretrained(tiny_dir)


@pytest.fixture(scope="module")
def reference(tiny_dir: Path) -> Qwen3VLModel:
    """The whole saved vision-language model, loaded by transformers alone."""
    return Qwen3VLForConditionalGeneration.from_pretrained(tiny_dir).eval().model


@pytest.fixture(scope="module")
def encoder(tiny_dir: Path) -> Qwen3VLTextEncoder:
    return _build(_config(tiny_dir), _run())


# --------------------------------------------------------------------------- encoding


def test_shapes_mask_counts_and_zero_padding(encoder: Qwen3VLTextEncoder, tokenizer: object) -> None:
    states_BLD, mask_BL = encoder.encode(PROMPTS)
    assert states_BLD.shape == (3, 16, 32) and states_BLD.dtype == torch.float32
    assert mask_BL.shape == (3, 16) and mask_BL.dtype == torch.bool

    # Independent count: the saved tokenizer alone, unpadded (like Qwen's, it adds no special token).
    counts = [len(tokenizer(p)["input_ids"]) for p in PROMPTS]  # type: ignore[operator]
    assert counts == [3, 14, 0]
    assert mask_BL.sum(dim=1).tolist() == counts
    for i, n in enumerate(counts):
        # Right-padded although the tokenizer defaults to left padding.
        assert mask_BL[i, :n].all() and not mask_BL[i, n:].any()
        assert torch.count_nonzero(states_BLD[i, n:]) == 0
        assert torch.count_nonzero(states_BLD[i, :n].abs().sum(-1)) == n
    assert torch.isfinite(states_BLD).all()  # the empty prompt's row attends to nothing at all


def test_matches_an_independent_forward_of_the_full_model(
    encoder: Qwen3VLTextEncoder, tokenizer: object, reference: Qwen3VLModel
) -> None:
    """Each prompt alone, unpadded, through the whole saved VL model (its own text-only RoPE indexing)."""
    states_BLD, _ = encoder.encode(PROMPTS)
    for i, prompt in enumerate(PROMPTS[:2]):  # the empty prompt has no token to run
        ids_1N = _ids(tokenizer, prompt)
        with torch.no_grad():
            expected_1ND = reference(input_ids=ids_1N, use_cache=False).last_hidden_state
        n = ids_1N.shape[1]
        torch.testing.assert_close(states_BLD[i, :n], expected_1ND[0], atol=1e-5, rtol=1e-5)


def test_truncation_matches_the_first_max_length_tokens(
    encoder: Qwen3VLTextEncoder, tokenizer: object, reference: Qwen3VLModel
) -> None:
    prompt = " ".join(["circle"] * 40)
    states_BLD, mask_BL = encoder.encode([prompt])
    assert states_BLD.shape == (1, 16, 32) and mask_BL.all()
    with torch.no_grad():
        expected_1LD = reference(input_ids=_ids(tokenizer, prompt), use_cache=False).last_hidden_state
    torch.testing.assert_close(states_BLD, expected_1LD, atol=1e-5, rtol=1e-5)


def test_prompts_differ_and_empty_is_cached(encoder: Qwen3VLTextEncoder) -> None:
    states_BLD, _ = encoder.encode(["a red circle", "a blue square"])
    assert not torch.allclose(states_BLD[0, :4], states_BLD[1, :4])

    first = encoder.empty()
    assert encoder.empty() is first
    empty_1LD, empty_mask_1L = first
    assert empty_1LD.shape == (1, 16, 32) and empty_mask_1L.shape == (1, 16)
    expected_1LD, expected_mask_1L = encoder.encode([""])
    torch.testing.assert_close(empty_1LD, expected_1LD, atol=0, rtol=0)
    assert torch.equal(empty_mask_1L, expected_mask_1L)
    # No real token, as in diffusers' PRXPixelPipeline; the denoiser still attends to image tokens.
    assert not empty_mask_1L.any() and torch.count_nonzero(empty_1LD) == 0


def test_batch_edge_cases(encoder: Qwen3VLTextEncoder) -> None:
    states_0LD, mask_0L = encoder.encode([])
    assert states_0LD.shape == (0, 16, 32) and mask_0L.shape == (0, 16)
    with pytest.raises(TypeError, match="list of prompts"):
        encoder.encode("a red circle")  # type: ignore[arg-type]


def test_frozen(encoder: Qwen3VLTextEncoder) -> None:
    assert not encoder.model.training
    assert not any(p.requires_grad for p in encoder.model.parameters())
    assert not encoder.encode(["a red circle"])[0].requires_grad


# --------------------------------------------------------------------------- loading


def test_only_the_language_model_is_built(encoder: Qwen3VLTextEncoder) -> None:
    assert isinstance(encoder.model, Qwen3VLTextModel)
    assert not any("visual" in name or "lm_head" in name for name, _ in encoder.model.named_parameters())


def test_qwen3vl_model_checkpoint(tmp_path: Path) -> None:
    path = save_tiny_qwen3vl(tmp_path, layout="model", seed=1)
    model, tokenizer = load_qwen3vl(str(path), "", CPU, torch.float32)
    reference = Qwen3VLModel.from_pretrained(path).eval()
    ids_1N = _ids(tokenizer, "a red circle")
    with torch.no_grad():
        expected_1ND = reference(input_ids=ids_1N, use_cache=False).last_hidden_state
        torch.testing.assert_close(model(input_ids=ids_1N, use_cache=False).last_hidden_state, expected_1ND)


def test_prx_pixel_pipeline_layout(tmp_path: Path, encoder: Qwen3VLTextEncoder) -> None:
    """A bare Qwen3VLTextModel in ``text_encoder/``, the tokenizer in ``tokenizer/``, as PRXPixelPipeline saves it.

    Same seed as ``tiny_dir``'s full model, so the language-model weights, and the states, must match.
    """
    save_tiny_qwen3vl(tmp_path, "text_encoder", layout="text", tokenizer_subfolder="tokenizer")
    assert not (tmp_path / "text_encoder" / "tokenizer.json").exists()
    pixel = _build(_config(tmp_path, subfolder="text_encoder", tokenizer_subfolder="tokenizer"), _run())
    states_BLD, mask_BL = pixel.encode(PROMPTS)
    expected_BLD, expected_mask_BL = encoder.encode(PROMPTS)
    torch.testing.assert_close(states_BLD, expected_BLD, atol=0, rtol=0)
    assert torch.equal(mask_BL, expected_mask_BL)


def test_dtype_comes_from_precision_policy(tiny_dir: Path) -> None:
    encoder = _build(_config(tiny_dir), _run(torch.bfloat16))
    assert all(p.dtype == torch.bfloat16 for p in encoder.model.parameters())
    # Cast at load time, so the RoPE frequencies keep their full precision.
    assert all(b.dtype == torch.float32 for n, b in encoder.model.named_buffers() if "inv_freq" in n)
    assert encoder.encode(["a red circle"])[0].dtype == torch.bfloat16


def test_subfolder(tiny_dir: Path) -> None:
    encoder = _build(_config(tiny_dir, subfolder="text_encoder", max_length=8), _run())
    states_BLD, mask_BL = encoder.encode(["a red circle"])
    assert states_BLD.shape == (1, 8, 32) and int(mask_BL.sum()) == 3


def test_dim_mismatch_names_both_widths(tiny_dir: Path) -> None:
    with pytest.raises(ValueError, match=r"dim is 2048.*hidden_size is 32"):
        _build(_config(tiny_dir, dim=2048), _run())
    model, tokenizer = load_qwen3vl(str(tiny_dir), "", CPU, torch.float32)
    with pytest.raises(ValueError, match=r"dim is 64.*hidden_size is 32"):
        Qwen3VLTextEncoder(model, tokenizer, max_length=16, dim=64, device=CPU)


def test_max_length_beyond_positions(tiny_dir: Path) -> None:
    with pytest.raises(ValueError, match="exceeds the model's 64"):
        _build(_config(tiny_dir, max_length=65), _run())


def test_missing_weights_are_an_error_not_random_layers(tiny_dir: Path, tmp_path: Path) -> None:
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        (tmp_path / name).write_bytes((tiny_dir / name).read_bytes())
    tensors = load_file(tiny_dir / "model.safetensors")
    save_file({k: v for k, v in tensors.items() if "language_model.layers.1." not in k}, tmp_path / "model.safetensors")
    with pytest.raises(ValueError, match="no weights for .* language-model tensors"):
        load_qwen3vl(str(tmp_path), "", CPU, torch.float32)


def test_foreign_or_missing_checkpoint_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(OSError, match="qwen3vl: cannot load"):
        load_qwen3vl(str(tmp_path / "nope"), "", CPU, torch.float32)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert"}), encoding="utf-8")
    with pytest.raises(ValueError, match="'bert' model, not a Qwen3-VL"):
        load_qwen3vl(str(tmp_path), "", CPU, torch.float32)


# --------------------------------------------------------------------------- config and plugin surface


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [({"max_length": 0}, "max_length"), ({"dim": 0}, "dim"), ({"path": ""}, "path")],
)
def test_config_validation(kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        Qwen3VLEncoderConfig(**kwargs)  # type: ignore[arg-type]


def test_config_defaults_are_the_spec_values() -> None:
    config = Qwen3VLEncoderConfig()
    assert (config.path, config.subfolder, config.max_length, config.dim) == (
        "Qwen/Qwen3-VL-Embedding-2B",
        "",
        256,
        2048,
    )
    with pytest.raises(AttributeError):
        config.dim = 3  # type: ignore[misc]


def test_registers_entry() -> None:
    from prx_core.registry import SlotRegistry

    slot = SlotRegistry("text_encoder")
    prx_qwen3vl.prx_register_text_encoders(slot.for_plugin(INFO.name))
    entry = slot.get("qwen3vl")
    assert entry.config is Qwen3VLEncoderConfig and entry.factory is _build and entry.plugin == "qwen3vl"


def test_import_is_torch_free() -> None:
    import prx_core

    paths = [str(Path(prx_core.__file__).parents[1]), str(Path(prx_qwen3vl.__file__).parents[1])]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(paths)}
    code = "import sys, prx_qwen3vl; sys.exit('torch' in sys.modules or 'transformers' in sys.modules)"
    subprocess.run([sys.executable, "-c", code], env=env, check=True)  # noqa: S603


# --------------------------------------------------------------------------- end to end


def test_tiny_recipe_trains_with_context_width_from_dim(tiny_dir: Path, tmp_path: Path) -> None:
    patch = {"text_encoder": {"use": "qwen3vl", "path": str(tiny_dir), "dim": 32, "max_length": 16}}
    trainer = make_trainer(tiny_recipe(tmp_path / "recipe", patch), tmp_path / "run")
    assert trainer.run.require("trainable").model.config.context_in_dim == 32
    assert isinstance(trainer.run.require("text_encoder").encoder, Qwen3VLTextEncoder)
    losses = run_steps(trainer, 2)
    assert len(losses) == 2 and all(math.isfinite(x) for x in losses)
