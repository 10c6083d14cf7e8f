"""Route maths for token routers (TREAD, SPRINT): which image tokens stay visible, and moving
tokens and RoPE rows in and out. Core owns it so every router shares one tested implementation.

Pure functions on tensors, no plugin state. Shapes: B samples, N (or L) image tokens, K visible
tokens, H hidden width. Indices are always sorted per sample, so the visible tokens keep their
relative order and the RoPE rows gathered with them keep each token's 2-D position.
"""

from __future__ import annotations

import torch

from prx_core.config import RecipeError


def visible_count(length: int, ratio: float) -> int:
    """How many of N tokens run through the routed span: N − clamp(round(p·N), 1, N − 1) for p > 0.

    This is the public code's count (reference.md §8): ``round`` is Python's, which rounds halves
    to even, so N = 255 at p = 0.5 routes round(127.5) = 128 tokens and keeps 127, while N = 5 at
    p = 0.5 routes round(2.5) = 2 and keeps 3. For p > 0 at least one token is routed and at least
    one stays visible; p = 0 keeps all N. The product p·N is taken as it comes out in floating
    point, like the public code does (0.29·100 = 28.999… still rounds to 29).
    """
    if length < 1:
        raise ValueError(f"length must be >= 1, got {length}")
    if not 0.0 <= ratio < 1.0:
        raise ValueError(f"ratio must be in [0, 1), got {ratio}")
    if ratio == 0.0:
        return length
    routed = min(max(round(length * ratio), 1), length - 1)
    return length - routed


def choose_visible(batch: int, length: int, ratio: float, generator: torch.Generator) -> torch.Tensor:
    """Per sample, a uniformly random subset of :func:`visible_count` token indices, sorted: [B, K] int64.

    The draw happens on the generator's device. In training the core hands routers a generator
    keyed by seed, step, micro-step and rank on the tokens' device (a device generator on a GPU,
    so no index crosses from the host mid-forward; the CPU one on a CPU); other callers move the
    result to the tokens' device afterwards.
    """
    keep = visible_count(length, ratio)
    if keep == length:
        return torch.arange(length, device=generator.device).expand(batch, length).clone()
    scores_BN = torch.rand(batch, length, generator=generator, device=generator.device)
    # A stable sort makes the (vanishingly rare) ties between equal scores deterministic too.
    chosen_BK = torch.argsort(scores_BN, dim=1, stable=True)[:, :keep]
    return torch.sort(chosen_BK, dim=1).values


def gather_tokens(tokens_BNH: torch.Tensor, index_BK: torch.Tensor) -> torch.Tensor:
    """``tokens_BNH[b, index_BK[b, k]]`` for every b, k: [B, K, H]."""
    index_BKH = index_BK.to(device=tokens_BNH.device, dtype=torch.long)[:, :, None]
    return torch.gather(tokens_BNH, 1, index_BKH.expand(-1, -1, tokens_BNH.shape[-1]))


def gather_rope(rope: torch.Tensor, index_BK: torch.Tensor) -> torch.Tensor:
    """The RoPE rows of the visible tokens.

    ``rope`` is PRX's ``pe_embedder`` output, [B, 1, N, head_dim/2, 2, 2] (a leading 1 is
    broadcast to B); the rows are gathered along dim 2, per sample, giving [B, 1, K, …].
    """
    if rope.dim() < 3:
        raise ValueError(f"rope must be [B, 1, N, ...], got shape {tuple(rope.shape)}")
    batch, keep = index_BK.shape
    if rope.shape[0] not in (1, batch):
        raise ValueError(f"rope has batch {rope.shape[0]} but the route has {batch} samples")
    rope = rope.expand(batch, *rope.shape[1:])
    trailing = rope.shape[3:]
    index = index_BK.to(device=rope.device, dtype=torch.long).view(batch, 1, keep, *([1] * len(trailing)))
    return torch.gather(rope, 2, index.expand(batch, rope.shape[1], keep, *trailing))


def scatter_tokens(full_BNH: torch.Tensor, visible_BKH: torch.Tensor, index_BK: torch.Tensor) -> torch.Tensor:
    """``full_BNH`` with the rows at ``index_BK`` replaced by ``visible_BKH`` (out of place).

    Rows not in the index come back bit for bit. Both inputs are brought to their promoted dtype
    (under autocast the span may return a different dtype than it received), which never rounds.
    """
    dtype = torch.promote_types(full_BNH.dtype, visible_BKH.dtype)
    index_BKH = index_BK.to(device=full_BNH.device, dtype=torch.long)[:, :, None].expand(-1, -1, full_BNH.shape[-1])
    return torch.scatter(full_BNH.to(dtype), 1, index_BKH, visible_BKH.to(dtype))


def check_span(start: int, end: int, depth: int) -> None:
    """The span must lie inside the model; the recipe's ``[router]`` table is named in the error."""
    if end >= depth:
        raise RecipeError(
            f"router.end is {end}, but the model has blocks 0..{depth - 1} (model.depth = {depth}); "
            f"the routed span start..end is inclusive, so end must be < depth"
        )
    if start > end:  # also checked by the config; repeated here for routers built by hand
        raise RecipeError(f"router.start ({start}) must be <= router.end ({end})")
