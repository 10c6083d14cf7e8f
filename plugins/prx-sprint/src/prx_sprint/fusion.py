"""SPRINT's sparse–dense fusion: a learnable mask token and a Linear 2H → H with a bias."""

from __future__ import annotations

from typing import Literal

import torch

from prx_core.routing import scatter_tokens

#: How the fusion Linear starts: PyTorch's default (the public code's) or [0 | I] with a zero bias.
FusionInit = Literal["pytorch", "identity"]
FUSION_INITS: tuple[str, ...] = ("pytorch", "identity")


class SprintFusion(torch.nn.Module):
    """out = fuse([dense ; sparse filled with the mask token at routed positions]).

    ``dense_BNH`` is the input of block ``start`` (all N tokens), ``sparse_BKH`` the output of
    block ``end`` for the K visible tokens. The sparse output is scattered back to length N and
    the routed positions hold :attr:`mask_token`; both halves are concatenated along the channels
    and projected by :attr:`fuse`, a ``Linear(2H → H)`` with a bias, as in the public code
    (reference.md §8).

    Initialisation (``init``):

    * ``"pytorch"`` (default, the public code's): ``nn.Linear``'s own init, weight and bias
      uniform in ±1/√(2H), drawn from the global generator (which the core seeds from the recipe
      seed and the plugin name around ``prx_build_modules``). The fused output at init is then
      *not* the span output: a fresh SPRINT model is not the plain PRX model.
    * ``"identity"``: weight ``[0 | I]`` (zero on the dense half, identity on the sparse half),
      zero bias. Without routing the fused output is exactly the span output, so a pretrained PRX
      can be fine-tuned with SPRINT without a jump; the dense half still learns from the first step.

    The mask token starts at zero in both.
    """

    def __init__(
        self,
        hidden_size: int,
        *,
        init: FusionInit = "pytorch",
        dtype: torch.dtype | None = None,
        device: torch.device | None = None,
    ):
        super().__init__()
        if hidden_size < 1:
            raise ValueError(f"hidden_size must be >= 1, got {hidden_size}")
        if init not in FUSION_INITS:
            raise ValueError(f"init must be one of {FUSION_INITS}, got {init!r}")
        self.hidden_size = hidden_size
        # Drawn in fp32 and then cast, so a bf16 policy starts from the rounded fp32 values, not
        # from a different random stream.
        self.fuse = torch.nn.Linear(2 * hidden_size, hidden_size, bias=True, device=device)
        self.fuse.to(dtype=dtype)
        self.mask_token = torch.nn.Parameter(torch.zeros(hidden_size, dtype=dtype, device=device))
        if init == "identity":
            with torch.no_grad():
                self.fuse.weight.zero_()
                self.fuse.weight[:, hidden_size:].copy_(torch.eye(hidden_size))
                self.fuse.bias.zero_()

    def fill(self, sparse_BKH: torch.Tensor, visible_idx_BK: torch.Tensor | None, length: int) -> torch.Tensor:
        """The span output at full length N: visible rows from ``sparse_BKH``, the mask token elsewhere."""
        if visible_idx_BK is None:
            return sparse_BKH  # nothing was routed: K == N in the original order
        batch, _, hidden = sparse_BKH.shape
        base_BNH = self.mask_token.to(sparse_BKH.dtype).expand(batch, length, hidden)
        return scatter_tokens(base_BNH, sparse_BKH, visible_idx_BK)

    def forward(
        self, dense_BNH: torch.Tensor, sparse_BKH: torch.Tensor, visible_idx_BK: torch.Tensor | None
    ) -> torch.Tensor:
        filled_BNH = self.fill(sparse_BKH, visible_idx_BK, dense_BNH.shape[1])
        dtype = torch.promote_types(dense_BNH.dtype, filled_BNH.dtype)
        both_BN2H = torch.cat([dense_BNH.to(dtype), filled_BNH.to(dtype)], dim=-1)
        if not torch.is_autocast_enabled(both_BN2H.device.type):
            # Without autocast a linear needs matching dtypes; the weights' dtype is the policy's.
            both_BN2H = both_BN2H.to(self.fuse.weight.dtype)
        return self.fuse(both_BN2H)
