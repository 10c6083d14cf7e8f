"""Tests for the ``t5gemma`` text encoder, on a tiny random T5Gemma saved to disk and loaded back."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import json
import math
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import prx_t5gemma
import pytest
import torch
from prx_t5gemma import INFO, T5GemmaEncoderConfig, _build
from prx_t5gemma.encoder import T5GemmaTextEncoder, load_t5gemma
from prx_t5gemma.testing import save_tiny_t5gemma
from safetensors.torch import load_file, save_file
from transformers import AutoTokenizer, T5GemmaEncoderModel, T5GemmaForConditionalGeneration
from transformers.models.t5gemma.modeling_t5gemma import T5GemmaEncoder

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


def _config(path: Path, **kwargs: object) -> T5GemmaEncoderConfig:
    return T5GemmaEncoderConfig(**{"path": str(path), "dim": 32, "max_length": 16, **kwargs})  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The hub layout (encoder-decoder) at the root and, identically, in ``text_encoder/``."""
    root = tmp_path_factory.mktemp("tiny_t5gemma")
    save_tiny_t5gemma(root)
    save_tiny_t5gemma(root, "text_encoder")
    return root


@pytest.fixture(scope="module")
def encoder(tiny_dir: Path) -> T5GemmaTextEncoder:
    return _build(_config(tiny_dir), _run())


# --------------------------------------------------------------------------- encoding


def test_shapes_mask_counts_and_zero_padding(encoder: T5GemmaTextEncoder, tiny_dir: Path) -> None:
    states_BLD, mask_BL = encoder.encode(PROMPTS)
    assert states_BLD.shape == (3, 16, 32) and states_BLD.dtype == torch.float32
    assert mask_BL.shape == (3, 16) and mask_BL.dtype == torch.bool

    # Independent count: the saved tokenizer alone, unpadded, special tokens included.
    tokenizer = AutoTokenizer.from_pretrained(tiny_dir)
    counts = [len(tokenizer(p)["input_ids"]) for p in PROMPTS]
    assert counts == [4, 15, 1]  # <bos> + words; none truncated at 16
    assert mask_BL.sum(dim=1).tolist() == counts
    for i, n in enumerate(counts):
        # Right-padded although the tokenizer (like Gemma's) defaults to left padding.
        assert mask_BL[i, :n].all() and not mask_BL[i, n:].any()
        assert torch.count_nonzero(states_BLD[i, n:]) == 0
        assert torch.count_nonzero(states_BLD[i, :n].abs().sum(-1)) == n


def test_matches_an_independent_forward_of_the_full_model(encoder: T5GemmaTextEncoder, tiny_dir: Path) -> None:
    """Each prompt alone, unpadded, through the encoder of the whole saved encoder-decoder."""
    reference = T5GemmaForConditionalGeneration.from_pretrained(tiny_dir).eval().get_encoder()
    tokenizer = AutoTokenizer.from_pretrained(tiny_dir)
    states_BLD, _ = encoder.encode(PROMPTS)
    for i, prompt in enumerate(PROMPTS):
        ids_1N = tokenizer(prompt, return_tensors="pt")["input_ids"]
        with torch.no_grad():
            expected_1ND = reference(input_ids=ids_1N).last_hidden_state
        n = ids_1N.shape[1]
        torch.testing.assert_close(states_BLD[i, :n], expected_1ND[0], atol=1e-5, rtol=1e-5)


def test_prompts_differ_and_empty_is_cached(encoder: T5GemmaTextEncoder) -> None:
    states_BLD, _ = encoder.encode(["a red circle", "a blue square"])
    assert not torch.allclose(states_BLD[0, :4], states_BLD[1, :4])

    first = encoder.empty()
    assert encoder.empty() is first
    empty_1LD, empty_mask_1L = first
    assert empty_1LD.shape == (1, 16, 32) and empty_mask_1L.shape == (1, 16)
    expected_1LD, expected_mask_1L = encoder.encode([""])
    torch.testing.assert_close(empty_1LD, expected_1LD, atol=0, rtol=0)
    assert torch.equal(empty_mask_1L, expected_mask_1L)
    assert int(empty_mask_1L.sum()) == 1  # <bos>


def test_truncation_and_batch_edge_cases(encoder: T5GemmaTextEncoder) -> None:
    states_BLD, mask_BL = encoder.encode([" ".join(["circle"] * 40)])
    assert states_BLD.shape == (1, 16, 32) and mask_BL.all()

    states_0LD, mask_0L = encoder.encode([])
    assert states_0LD.shape == (0, 16, 32) and mask_0L.shape == (0, 16)
    with pytest.raises(TypeError, match="list of prompts"):
        encoder.encode("a red circle")  # type: ignore[arg-type]


def test_frozen(encoder: T5GemmaTextEncoder) -> None:
    assert not encoder.model.training
    assert not any(p.requires_grad for p in encoder.model.parameters())
    assert not encoder.encode(["a red circle"])[0].requires_grad


# --------------------------------------------------------------------------- loading


def test_only_the_encoder_is_built(encoder: T5GemmaTextEncoder) -> None:
    # The class diffusers' PRXPipeline takes as its text_encoder.
    assert isinstance(encoder.model, T5GemmaEncoder)
    assert not any("decoder" in name for name, _ in encoder.model.named_parameters())


def test_dtype_comes_from_precision_policy(tiny_dir: Path) -> None:
    encoder = _build(_config(tiny_dir), _run(torch.bfloat16))
    assert all(p.dtype == torch.bfloat16 for p in encoder.model.parameters())
    # Cast at load time, so the RoPE frequencies keep their full precision.
    assert all(b.dtype == torch.float32 for n, b in encoder.model.named_buffers() if "inv_freq" in n)
    assert encoder.encode(["a red circle"])[0].dtype == torch.bfloat16


def test_subfolder(tiny_dir: Path) -> None:
    encoder = _build(_config(tiny_dir, subfolder="text_encoder", max_length=8), _run())
    states_BLD, mask_BL = encoder.encode(["a red circle"])
    assert states_BLD.shape == (1, 8, 32) and int(mask_BL.sum()) == 4


def test_encoder_model_checkpoint(tmp_path: Path) -> None:
    path = save_tiny_t5gemma(tmp_path, layout="encoder_model", seed=1)
    model, tokenizer = load_t5gemma(str(path), "", CPU, torch.float32)
    reference = T5GemmaEncoderModel.from_pretrained(path).eval()
    ids_1N = tokenizer("a red circle", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids_1N)[0], reference(input_ids=ids_1N)[0])


def test_prx_pipeline_layout(tmp_path: Path, encoder: T5GemmaTextEncoder) -> None:
    """A bare T5GemmaEncoder in ``text_encoder/`` with the tokenizer in ``tokenizer/``, as PRXPipeline saves it.

    Same seed as ``tiny_dir``'s encoder-decoder, so the encoder weights, and the states, must match.
    """
    save_tiny_t5gemma(tmp_path, "text_encoder", layout="encoder", tokenizer_subfolder="tokenizer")
    assert not (tmp_path / "text_encoder" / "tokenizer.json").exists()
    prx = _build(_config(tmp_path, subfolder="text_encoder", tokenizer_subfolder="tokenizer"), _run())
    states_BLD, mask_BL = prx.encode(PROMPTS)
    expected_BLD, expected_mask_BL = encoder.encode(PROMPTS)
    torch.testing.assert_close(states_BLD, expected_BLD, atol=0, rtol=0)
    assert torch.equal(mask_BL, expected_mask_BL)


def test_dim_mismatch_names_both_widths(tiny_dir: Path) -> None:
    with pytest.raises(ValueError, match=r"dim is 2304.*hidden_size is 32"):
        _build(_config(tiny_dir, dim=2304), _run())
    model, tokenizer = load_t5gemma(str(tiny_dir), "", CPU, torch.float32)
    with pytest.raises(ValueError, match=r"dim is 64.*hidden_size is 32"):
        T5GemmaTextEncoder(model, tokenizer, max_length=16, dim=64, device=CPU)


def test_max_length_beyond_trained_positions(tiny_dir: Path) -> None:
    with pytest.raises(ValueError, match="exceeds the model's 64"):
        _build(_config(tiny_dir, max_length=65), _run())


def test_missing_weights_are_an_error_not_random_layers(tiny_dir: Path, tmp_path: Path) -> None:
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        (tmp_path / name).write_bytes((tiny_dir / name).read_bytes())
    tensors = load_file(tiny_dir / "model.safetensors")
    save_file({k: v for k, v in tensors.items() if "encoder.layers.1." not in k}, tmp_path / "model.safetensors")
    with pytest.raises(ValueError, match="no weights for .* encoder tensors"):
        load_t5gemma(str(tmp_path), "", CPU, torch.float32)


def test_foreign_or_missing_checkpoint_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(OSError, match="t5gemma: cannot load"):
        load_t5gemma(str(tmp_path / "nope"), "", CPU, torch.float32)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert"}), encoding="utf-8")
    with pytest.raises(ValueError, match="'bert' model, not a T5Gemma"):
        load_t5gemma(str(tmp_path), "", CPU, torch.float32)


# --------------------------------------------------------------------------- config and plugin surface


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [({"max_length": 0}, "max_length"), ({"dim": 0}, "dim"), ({"path": ""}, "path")],
)
def test_config_validation(kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        T5GemmaEncoderConfig(**kwargs)  # type: ignore[arg-type]


def test_config_defaults_are_the_spec_values() -> None:
    config = T5GemmaEncoderConfig()
    assert (config.path, config.max_length, config.dim) == ("google/t5gemma-2b-2b-ul2", 256, 2304)
    assert config.subfolder == config.tokenizer_subfolder == ""
    with pytest.raises(AttributeError):
        config.dim = 3  # type: ignore[misc]


def test_registers_entry() -> None:
    from prx_core.registry import SlotRegistry

    slot = SlotRegistry("text_encoder")
    prx_t5gemma.prx_register_text_encoders(slot.for_plugin(INFO.name))
    entry = slot.get("t5gemma")
    assert entry.config is T5GemmaEncoderConfig and entry.factory is _build and entry.plugin == "t5gemma"


def test_import_is_torch_free() -> None:
    import prx_core

    paths = [str(Path(prx_core.__file__).parents[1]), str(Path(prx_t5gemma.__file__).parents[1])]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(paths)}
    code = "import sys, prx_t5gemma; sys.exit('torch' in sys.modules or 'transformers' in sys.modules)"
    subprocess.run([sys.executable, "-c", code], env=env, check=True)  # noqa: S603


# --------------------------------------------------------------------------- end to end


def test_tiny_recipe_trains_with_context_width_from_dim(tiny_dir: Path, tmp_path: Path) -> None:
    patch = {"text_encoder": {"use": "t5gemma", "path": str(tiny_dir), "dim": 32, "max_length": 16}}
    trainer = make_trainer(tiny_recipe(tmp_path / "recipe", patch), tmp_path / "run")
    assert trainer.run.require("trainable").model.config.context_in_dim == 32
    assert isinstance(trainer.run.require("text_encoder").encoder, T5GemmaTextEncoder)
    losses = run_steps(trainer, 2)
    assert len(losses) == 2 and all(math.isfinite(x) for x in losses)
