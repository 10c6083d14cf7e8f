"""Versions (torch, CUDA, cuDNN, NCCL, GPU) and which SDPA kernels accept PRX-shaped inputs.

    python bench/gpu_versions.py         # bench/gpu_check.sh step 1

PRX attention is image queries against text + image keys, with the text padding as a boolean mask
broadcast as ``[B, 1, 1, L_txt + L_img]`` (prx_core/denoiser.py). Each SDPA backend is asked for a
bf16 forward and backward at those shapes (batch 32, 28 heads of 64, 256 image + 256 text tokens),
with the mask and without: a backend that refuses is printed with the reason PyTorch gives.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

BATCH, HEADS, HEAD_DIM, IMAGE, TEXT = 32, 28, 64, 256, 256


def try_backend(backend: SDPBackend, masked: bool) -> str:
    device = torch.device("cuda")
    q = torch.randn(BATCH, HEADS, IMAGE, HEAD_DIM, device=device, dtype=torch.bfloat16, requires_grad=True)
    k = torch.randn(BATCH, HEADS, IMAGE + TEXT, HEAD_DIM, device=device, dtype=torch.bfloat16, requires_grad=True)
    v = torch.randn_like(k, requires_grad=True)
    mask = None
    if masked:
        mask = torch.ones(BATCH, 1, 1, IMAGE + TEXT, dtype=torch.bool, device=device)
        mask[:, :, :, TEXT // 2 : TEXT] = False  # padded text positions
    try:
        with sdpa_kernel(backend):
            F.scaled_dot_product_attention(q, k, v, attn_mask=mask).sum().backward()
        torch.cuda.synchronize()
        return "ok"
    except RuntimeError as err:
        first = next((line for line in str(err).splitlines() if line.strip()), "error")
        return f"refused ({first[:140]})"


def main() -> None:
    if not torch.cuda.is_available():
        raise SystemExit("gpu_versions: no CUDA device")
    props = torch.cuda.get_device_properties(0)
    cudnn = torch.backends.cudnn.version()
    raw_nccl = torch.cuda.nccl.version() if hasattr(torch.cuda, "nccl") else "n/a"
    nccl = ".".join(map(str, raw_nccl)) if isinstance(raw_nccl, tuple) else str(raw_nccl)
    print(f"gpu     : {props.name}, {props.total_memory / 2**30:.0f} GiB, sm_{props.major}{props.minor}")
    print(
        f"torch   : {torch.__version__}, CUDA {torch.version.cuda}, cuDNN {torch.backends.cudnn.version()}, NCCL {nccl}"
    )
    accepted: dict[bool, list[str]] = {True: [], False: []}
    for masked in (True, False):
        for backend in (SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.CUDNN_ATTENTION):
            verdict = try_backend(backend, masked)
            print(f"sdpa    : {backend.name:<20} {'bool mask' if masked else 'no mask':<10} {verdict}")
            if verdict == "ok":
                accepted[masked].append(backend.name.split("_")[0].lower())
    print(
        f"summary versions: {props.name}, torch {torch.__version__}, CUDA {torch.version.cuda}, "
        f"cuDNN {cudnn}, NCCL {nccl}; masked SDPA: {'+'.join(accepted[True]) or 'none'}; "
        f"unmasked: {'+'.join(accepted[False]) or 'none'}"
    )


if __name__ == "__main__":
    main()
