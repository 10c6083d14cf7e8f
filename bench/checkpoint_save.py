"""What a checkpoint save costs the training loop: synchronous vs background, and hashing while writing.

    python bench/checkpoint_save.py                 # 512 MiB of fp32 state, 3 rounds
    python bench/checkpoint_save.py --mib 2048

Three ways to save the same state (a model-like dict of fp32 tensors) into a fresh folder:

* ``write + re-read``: what prx did before: ``safetensors.save_file``, fsync, then read every file
  back to hash it for the manifest (the old ``CheckpointManager.save``);
* ``sync``: ``CheckpointManager.save``: hashes the bytes as it writes them, no re-read;
* ``background``: ``save(..., background=True)``: the caller is blocked only while the tensors are
  copied to the CPU; the write runs in a thread (``total`` is until ``wait()`` returns).

It prints the median seconds the caller is blocked, the median total, and ratios to the first row.
On a CPU the background copy is a memcpy; on a GPU it is the device-to-host copy.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import torch
from _common import header
from safetensors.torch import save_file

from prx_core.checkpoint import CheckpointManager


def old_save(folder: Path, state: dict[str, torch.Tensor]) -> None:
    folder.mkdir(parents=True)
    path = folder / "trainable.safetensors"
    save_file(state, str(path))
    with path.open("rb") as handle:
        os.fsync(handle.fileno())
    with path.open("rb") as handle:
        hashlib.file_digest(handle, "sha256").hexdigest()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mib", type=int, default=512)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    n_tensors = 64
    numel = args.mib * 2**20 // 4 // n_tensors
    state = {f"blocks.{i}.weight": torch.randn(numel) for i in range(n_tensors)}
    root = Path(tempfile.mkdtemp(prefix="prx-ckpt-bench-"))
    blocked: dict[str, list[float]] = {"write + re-read": [], "sync": [], "background": []}
    total: dict[str, list[float]] = {k: [] for k in blocked}
    try:
        for round_ in range(args.rounds):
            started = time.perf_counter()
            old_save(root / f"old-{round_}", state)
            blocked["write + re-read"].append(time.perf_counter() - started)
            total["write + re-read"].append(blocked["write + re-read"][-1])
            for name, background in (("sync", False), ("background", True)):
                manager = CheckpointManager(root / f"{name}-{round_}", keep_last=2)
                started = time.perf_counter()
                manager.save(round_, {"trainable": state}, background=background)
                blocked[name].append(time.perf_counter() - started)
                manager.wait()
                total[name].append(time.perf_counter() - started)
            shutil.rmtree(root)
            root.mkdir()
    finally:
        shutil.rmtree(root, ignore_errors=True)
    for line in header(torch.device("cpu")):
        print(line)
    print(f"state    : {args.mib} MiB fp32 in {n_tensors} tensors, median of {args.rounds} rounds, fresh folders")
    base_blocked = statistics.median(blocked["write + re-read"])
    print(f"{'save':<18}{'blocked s':>11}{'total s':>10}{'blocked vs old':>16}")
    for name in blocked:
        b, t = statistics.median(blocked[name]), statistics.median(total[name])
        print(f"{name:<18}{b:>11.3f}{t:>10.3f}{base_blocked / b:>15.1f}x")
    b_bg = statistics.median(blocked["background"])
    print(f"summary checkpoint_save: training blocked {b_bg:.3f} s instead of {base_blocked:.3f} s")


if __name__ == "__main__":
    main()
