"""FSDP2 on two gloo ranks: the mixed-precision policy, and an evaluation that cannot hang."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import pytest
import torch.multiprocessing as mp

from prx_core.testing.distributed_scenarios import free_port, fsdp_eval_scenarios

pytestmark = pytest.mark.integration


def test_fsdp2_gathers_bf16_weights_and_uneven_evaluation_finishes(tmp_path: Path) -> None:
    context = mp.spawn(fsdp_eval_scenarios, args=(2, free_port(), str(tmp_path), "fsdp2"), nprocs=2, join=False)
    deadline = time.monotonic() + 240  # a collective left unmatched hangs; fail instead of waiting 30 min
    while not context.join(timeout=5):
        if time.monotonic() > deadline:
            for process in context.processes:
                process.kill()
            pytest.fail("the 2-rank FSDP2 evaluation hung (ranks ran different numbers of forwards?)")
    results = [json.loads((tmp_path / f"fsdp_eval_{r}.json").read_text()) for r in range(2)]
    for r, result in enumerate(results):
        assert "error" not in result, f"rank {r}:\n{result['error']}"
        assert result["mp_param_dtype"] == "torch.bfloat16" and result["mp_reduce_dtype"] == "torch.float32"
        assert result["weight_dtype_in_forward"] == "torch.bfloat16"  # unsharded for compute in bf16
        assert result["stored_dtypes"] == ["torch.float32"] and result["grad_dtypes"] == ["torch.float32"]
        assert math.isfinite(result["eval_loss"])
    assert results[0]["eval_loss"] == results[1]["eval_loss"]  # all-reduced: one value on every rank
