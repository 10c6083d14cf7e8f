"""Resolution embedders and the conditioning seam that applies them.

H and W are the latent's spatial size in latent pixels (``x_t.shape[-2:]``), exactly what
diffusers' ``PRXTransformer2DModel`` feeds its ``resolution_embedder``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal

import torch
from diffusers.models.embeddings import get_timestep_embedding

if TYPE_CHECKING:
    from prx_core.context import ForwardContext

#: Width of the sinusoidal embedding of one axis (H or W), as in diffusers' PRXResolutionEmbedder.
AXIS_DIM = 128


def axis_sinusoid(values_B: torch.Tensor, max_period: int) -> torch.Tensor:
    """[B] → [B, 128]: cos then sin of value·max_period^(−i/64), i = 0..63 (diffusers' convention)."""
    return get_timestep_embedding(
        timesteps=values_B,
        embedding_dim=AXIS_DIM,
        max_period=max_period,
        scale=1.0,
        flip_sin_to_cos=True,
        downscale_freq_shift=0.0,
    )


class MLP(torch.nn.Module):
    """Linear → SiLU → Linear. Names match diffusers' ``MLPEmbedder`` so weights transfer."""

    def __init__(self, in_dim: int, hidden: int) -> None:
        super().__init__()
        self.in_layer = torch.nn.Linear(in_dim, hidden, bias=True)
        self.silu = torch.nn.SiLU()
        self.out_layer = torch.nn.Linear(hidden, hidden, bias=True)
        # Zero-initialised output: the embedder contributes exactly 0 until it learns to.
        torch.nn.init.zeros_(self.out_layer.weight)
        torch.nn.init.zeros_(self.out_layer.bias)

    def forward(self, x_BI: torch.Tensor) -> torch.Tensor:
        # Inputs in the weights' dtype; autocast (if on) still decides the compute dtype.
        return self.out_layer(self.silu(self.in_layer(x_BI.to(self.in_layer.weight.dtype))))


class ResolutionVector(torch.nn.Module):
    """Mode "vec": MLP([sin(H); sin(W)]) → [B, hidden], added to the time embedding.

    Same maths and state-dict keys (``mlp.in_layer.*``, ``mlp.out_layer.*``) as diffusers'
    ``PRXResolutionEmbedder``, so trained weights can be copied into a PRX model built with
    ``resolution_embeds=True``.
    """

    def __init__(self, hidden: int, max_period: int = 10000) -> None:
        super().__init__()
        self.max_period = max_period
        self.mlp = MLP(2 * AXIS_DIM, hidden)

    def forward(self, height_B: torch.Tensor, width_B: torch.Tensor) -> torch.Tensor:
        hw_B2A = torch.cat([axis_sinusoid(height_B, self.max_period), axis_sinusoid(width_B, self.max_period)], dim=-1)
        return self.mlp(hw_B2A)


class ResolutionTokens(torch.nn.Module):
    """Mode "token": [MLP_h(sin(H)), MLP_w(sin(W))] → [B, 2, hidden], prepended to the text tokens.

    Two separate MLPs, not one shared: text keys carry no position, so with a shared MLP the
    pair for (H, W) = (16, 32) would be the same *set* of keys as for (32, 16), and attention
    could not tell portrait from landscape.
    """

    def __init__(self, hidden: int, max_period: int = 10000) -> None:
        super().__init__()
        self.max_period = max_period
        self.height = MLP(AXIS_DIM, hidden)
        self.width = MLP(AXIS_DIM, hidden)

    def forward(self, height_B: torch.Tensor, width_B: torch.Tensor) -> torch.Tensor:
        h_BH = self.height(axis_sinusoid(height_B, self.max_period))
        w_BH = self.width(axis_sinusoid(width_B, self.max_period))
        return torch.stack([h_BH, w_BH], dim=1)


def build_embedder(mode: Literal["token", "vec"], hidden: int, max_period: int) -> torch.nn.Module:
    """The module for ``mode``, with PyTorch's default init (zero last layers).

    Drawn from the global generator, which core seeds from (recipe seed, plugin name) around each
    plugin's ``prx_build_modules``: the weights do not depend on plugin order, and building them
    does not shift any other plugin's.
    """
    if mode == "vec":
        return ResolutionVector(hidden, max_period)
    if mode == "token":
        return ResolutionTokens(hidden, max_period)
    raise ValueError(f"unknown resolution_aware mode {mode!r}; expected 'token' or 'vec'")


class ResolutionSeam:
    """Core conditioning seam: applies the embedder of the weights being run (``ctx.extras``)."""

    def __init__(self, mode: Literal["token", "vec"], name: str = "resolution_aware") -> None:
        if mode not in ("token", "vec"):
            raise ValueError(f"unknown resolution_aware mode {mode!r}; expected 'token' or 'vec'")
        self.mode = mode
        self.name = name

    def condition(
        self,
        txt_BTH: torch.Tensor,
        mask_BT: torch.Tensor | None,
        vec_BH: torch.Tensor,
        x_t_BCHW: torch.Tensor,
        ctx: ForwardContext,
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
        try:
            module = ctx.extras[self.name]
        except KeyError:
            raise RuntimeError(
                f"resolution_aware: the weights being run have no extra module '{self.name}' "
                "(the sampling model must be built from run.trainable, extras included)"
            ) from None
        batch, _, height, width = x_t_BCHW.shape
        # Torch's default float dtype (fp32) holds any image size exactly; the sinusoid is computed
        # in fp32 whatever this is, as in diffusers.
        height_B = torch.full((batch,), float(height), device=x_t_BCHW.device)
        width_B = torch.full((batch,), float(width), device=x_t_BCHW.device)
        if self.mode == "vec":
            return txt_BTH, mask_BT, vec_BH + module(height_B, width_B).to(vec_BH.dtype)
        tokens_B2H = module(height_B, width_B).to(txt_BTH.dtype)
        txt_BTH = torch.cat([tokens_B2H, txt_BTH], dim=1)
        if mask_BT is not None:
            mask_BT = torch.cat([mask_BT.new_ones((batch, tokens_B2H.shape[1])), mask_BT], dim=1)
        return txt_BTH, mask_BT, vec_BH
