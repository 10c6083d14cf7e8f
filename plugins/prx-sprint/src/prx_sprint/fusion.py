"""SPRINT's sparse–dense fusion: a learnable mask token and a Linear 2H → H."""

from __future__ import annotations

import torch

from prx_core.routing import scatter_tokens


class SprintFusion(torch.nn.Module):
    """out = fuse([dense ; sparse filled with the mask token at routed positions]).

    ``dense_BNH`` is the input of block ``start`` (all N tokens), ``sparse_BKH`` the output of
    block ``end`` for the K visible tokens. The sparse output is scattered back to length N and
    the routed positions hold :attr:`mask_token`; both halves are concatenated along the channels
    and projected by :attr:`fuse`.

    Initialisation: ``fuse.weight = [0 | I]`` (zero on the dense half, identity on the sparse half)
    and a zero mask token. Without routing (every token visible, as at evaluation) the fused
    output is then exactly the span's output, so a SPRINT model at init computes the same function
    as the plain PRX model, and a pretrained PRX can be fine-tuned with SPRINT without a jump.
    The dense half still learns from the first step: its gradient is the dense input times the
    output gradient, which is not zero. No bias, like every other linear in the PRX blocks.
    """

    def __init__(self, hidden_size: int, *, dtype: torch.dtype | None = None, device: torch.device | None = None):
        super().__init__()
        if hidden_size < 1:
            raise ValueError(f"hidden_size must be >= 1, got {hidden_size}")
        self.hidden_size = hidden_size
        self.fuse = torch.nn.Linear(2 * hidden_size, hidden_size, bias=False, dtype=dtype, device=device)
        self.mask_token = torch.nn.Parameter(torch.zeros(hidden_size, dtype=dtype, device=device))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        with torch.no_grad():
            self.fuse.weight.zero_()
            self.fuse.weight[:, self.hidden_size :].copy_(torch.eye(self.hidden_size))
            self.mask_token.zero_()

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
