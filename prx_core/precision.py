"""Precision policies and the dtype guard."""

from __future__ import annotations

import contextlib
from contextlib import AbstractContextManager
from typing import Any

import torch


class PrecisionError(RuntimeError):
    """Weights, gradients or optimizer state are not in the dtype the policy promises."""


def check_fp32_state(modules: torch.nn.Module, optimizer: torch.optim.Optimizer | None, policy: str, when: str) -> None:
    """Raise naming the first parameter, gradient or optimizer tensor that is not fp32."""
    names = {id(p): n for n, p in modules.named_parameters()}
    for name, param in modules.named_parameters():
        if param.dtype != torch.float32:
            raise PrecisionError(
                f"{when}: parameter '{name}' is {param.dtype} but precision policy '{policy}' keeps weights in "
                "float32; something cast the model (this is the silent bf16-weights bug the guard exists for)"
            )
        if param.grad is not None and param.grad.dtype != torch.float32:
            raise PrecisionError(f"{when}: gradient of '{name}' is {param.grad.dtype}, expected float32 ({policy})")
    if optimizer is None:
        return
    for group in optimizer.param_groups:
        for param in group["params"]:
            for key, value in optimizer.state.get(param, {}).items():
                if isinstance(value, torch.Tensor) and value.is_floating_point() and value.dtype != torch.float32:
                    raise PrecisionError(
                        f"{when}: optimizer state '{key}' of '{names.get(id(param), '?')}' is {value.dtype}, "
                        f"expected float32 ({policy})"
                    )


class Bf16Mixed:
    """Autocast to bf16 where the device supports it; weights, grads, optimizer state in fp32."""

    name = "bf16_mixed"
    param_dtype = torch.float32
    state_dtype = torch.float32

    def __init__(self, device: torch.device, autocast_cpu: bool = True) -> None:
        self.device = device
        if device.type == "cuda":
            self.enabled = torch.cuda.is_bf16_supported()
        else:
            self.enabled = device.type == "cpu" and autocast_cpu
        # Frozen towers (text encoder, VAE, teachers) compute in the autocast dtype anyway.
        self.frozen_dtype = torch.bfloat16 if self.enabled else torch.float32

    def autocast(self, device: torch.device) -> AbstractContextManager[Any]:
        if not self.enabled:
            return contextlib.nullcontext()
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)

    def check(self, modules: torch.nn.Module, optimizer: torch.optim.Optimizer | None, when: str) -> None:
        check_fp32_state(modules, optimizer, self.name, when)


class Fp32:
    name = "fp32"
    param_dtype = torch.float32
    frozen_dtype = torch.float32
    state_dtype = torch.float32

    def autocast(self, device: torch.device) -> AbstractContextManager[Any]:
        return contextlib.nullcontext()

    def check(self, modules: torch.nn.Module, optimizer: torch.optim.Optimizer | None, when: str) -> None:
        check_fp32_state(modules, optimizer, self.name, when)
