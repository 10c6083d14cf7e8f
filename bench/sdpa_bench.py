"""SDPA forward + backward at PRX shapes: boolean text mask vs no mask vs trimmed text vs cuDNN.

    python bench/sdpa_bench.py           # bench/gpu_check.sh step 4

Per configuration (batch 32, 28 heads of 64, bf16; 256 image tokens at 256 px, 1024 in pixel
space at 1024 px), the median of CUDA-event timings of one forward + backward, and the ratio to
the boolean-mask call the denoiser makes by default:

* ``bool mask``: text padded to 256 with a ``[B, 1, 1, L]`` boolean mask (memory-efficient kernel);
* ``no mask``: the same 256 text tokens unmasked (flash), what a batch without padding can use;
* ``trimmed 64``: text cut to the batch's longest caption rounded up to 64, no mask;
* ``cudnn mask``: the boolean mask through the cuDNN attention backend, where it accepts it.
"""

from __future__ import annotations

import contextlib
import statistics

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

BATCH, HEADS, HEAD_DIM, TEXT = 32, 28, 64, 256


def time_call(image: int, text: int, masked: bool, backend: SDPBackend | None, rounds: int = 10) -> float | None:
    device = torch.device("cuda")
    q = torch.randn(BATCH, HEADS, image, HEAD_DIM, device=device, dtype=torch.bfloat16, requires_grad=True)
    k = torch.randn(BATCH, HEADS, image + text, HEAD_DIM, device=device, dtype=torch.bfloat16, requires_grad=True)
    v = torch.randn_like(k, requires_grad=True)
    grad = torch.randn_like(q)
    mask = None
    if masked:
        mask = torch.ones(BATCH, 1, 1, image + text, dtype=torch.bool, device=device)
        mask[:, :, :, text // 2 : text] = False
    context = sdpa_kernel(backend) if backend is not None else contextlib.nullcontext()
    times = []
    try:
        with context:
            for i in range(rounds + 3):
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                F.scaled_dot_product_attention(q, k, v, attn_mask=mask).backward(grad)
                end.record()
                torch.cuda.synchronize()
                if i >= 3:
                    times.append(start.elapsed_time(end))
    except RuntimeError:
        return None
    return statistics.median(times)


def main() -> None:
    if not torch.cuda.is_available():
        raise SystemExit("sdpa_bench: no CUDA device")
    summary = []
    for image in (256, 1024):
        base = time_call(image, TEXT, True, None)
        rows = {
            "bool mask": base,
            "no mask": time_call(image, TEXT, False, None),
            "trimmed 64": time_call(image, 64, False, None),
            "cudnn mask": time_call(image, TEXT, True, SDPBackend.CUDNN_ATTENTION),
        }
        print(f"\n{image} image + text tokens, batch {BATCH}, {HEADS}×{HEAD_DIM}, bf16, forward+backward")
        for name, ms in rows.items():
            ratio = f"{base / ms:.2f}× vs bool mask" if ms and base else ""
            print(f"  {name:<12} {f'{ms:.3f} ms' if ms else 'refused':>12}  {ratio}")
        best = min((n for n in rows if rows[n]), key=lambda n: rows[n] or 0.0)
        summary.append(f"{image} tok: mask {base or 0:.2f} ms, best {best} {rows[best] or 0:.2f} ms")
    print("summary sdpa: " + "; ".join(summary))


if __name__ == "__main__":
    main()
