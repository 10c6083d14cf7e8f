from __future__ import annotations

import pytest
import torch

from prx_core.throughput import count_step_flops, peak_bf16_flops, peak_flops, peak_memory_gb, peak_memory_reserved_gb


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


# Device names as torch.cuda.get_device_name() reports them; peaks are NVIDIA's dense bf16
# datasheet figures (half the with-sparsity numbers): H100 SXM 1979/2, PCIe 1513/2, NVL 1671/2,
# B200 4.5 PFLOP/s sparse / 2.
@pytest.mark.parametrize(
    ("name", "tflops"),
    [
        ("NVIDIA H100 80GB HBM3", 989.4),
        ("NVIDIA H100 PCIe", 756.0),
        ("NVIDIA H100 NVL", 835.0),
        ("NVIDIA H200", 989.4),
        ("NVIDIA H200 NVL", 835.0),
        ("NVIDIA GH200 480GB", 989.4),
        ("NVIDIA B200", 2250.0),
        ("NVIDIA A100-SXM4-80GB", 312.0),
        ("NVIDIA A100 80GB PCIe", 312.0),
        ("NVIDIA L40S", 362.0),
        ("NVIDIA L4", 121.0),
        ("NVIDIA GeForce RTX 4090", None),
    ],
)
def test_peak_table_tells_gpu_variants_apart(name: str, tflops: float | None) -> None:
    peak = peak_bf16_flops(name)
    assert (peak / 1e12 if peak is not None else None) == (pytest.approx(tflops) if tflops is not None else None)


def test_reserved_peak_is_only_reported_on_cuda() -> None:
    assert peak_memory_reserved_gb(torch.device("cpu")) is None
