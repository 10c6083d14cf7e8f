from __future__ import annotations

import torch

from prx_core.throughput import count_step_flops, peak_flops, peak_memory_gb


def test_flop_counter_matches_hand_count_for_a_linear_layer() -> None:
    # y = x W^T with x [B, K], W [N, K]: forward 2·B·K·N; backward grad_x and grad_W 2·B·K·N each.
    layer = torch.nn.Linear(64, 32, bias=False)
    x = torch.randn(8, 64, requires_grad=True)
    flops = count_step_flops(lambda: layer(x).sum())
    assert flops == 6 * 8 * 64 * 32


def test_peak_flops_needs_a_known_device_or_an_override() -> None:
    assert peak_flops(torch.device("cpu"), None) is None
    assert peak_flops(torch.device("cpu"), 1.5) == 1.5e12
    assert peak_memory_gb(torch.device("cpu")) > 0
