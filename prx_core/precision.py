"""Precision policies and the dtype guard.

Three policies (reference.md §4, "Precision policy"):

* ``bf16_mixed`` (default): bf16 autocast; weights, gradients, optimizer state and EMA in fp32.
* ``fp32``: everything in fp32, no autocast.
* ``bf16_weights``: the ablation. Weights (and so gradients) are *stored* in bf16; optimizer
  state and EMA stay fp32. It degrades results (reference.md §5: FID 21.87 against 18.20), so it
  carries a :attr:`warning` that the trainer logs at WARNING level and records in the tracker.

The guard (:meth:`check`, run at start and after every resume) compares what the modules and
the optimizer actually hold with what the policy promises, in both directions: bf16 weights
under ``bf16_mixed`` (something cast the model: the silent bug this project exists to prevent)
and fp32 weights under ``bf16_weights`` (the reference's "bf16 weights" recipe never reached the
model and silently trained in fp32, reference.md §7.1) are both refused.

Optimizer state and ``bf16_weights``
------------------------------------
``torch.optim`` optimizers (AdamW included) create their state with ``zeros_like(param)``, so
with bf16 weights their moments would be bf16 too, which is not what this policy promises.
An optimizer honours ``state_dtype`` by exposing a ``state_dtype`` attribute equal to it. Both
shipped optimizers do: the builtin ``adamw`` switches to :class:`prx_core.optim.StateDtypeAdamW`
(fp32 moments, the update formed in fp32 and rounded once into the bf16 weight, no master copy)
when weights are stored narrower than ``state_dtype``, and the ``muon`` plugin keeps its
momentum buffers and AdamW moments in ``state_dtype``. The guard predicts the dtype of state
that does not exist yet (``state_dtype`` if the optimizer declares one, else the parameter's
dtype), so a third-party optimizer that would keep bf16 state is refused *at start*, not after
the first resume.

Declared storage exceptions
---------------------------
A plugin may store one of its own trainable modules in another dtype than ``param_dtype`` when that
is the point (REPA's projector is kept in bf16 by the reference, reference.md §8). It does so only
through :func:`declare_storage_dtype` (plugins call ``run.store_weights_in``), which casts the
module, marks it with a :class:`StorageDeclaration` naming the plugin and the reason, and is
logged. The guard then expects that module's parameters and gradients in the declared dtype, and
refuses them in any other, ``param_dtype`` included; everything undeclared is checked as before,
and optimizer state is ``state_dtype`` for every parameter, declared or not.
"""

from __future__ import annotations

import contextlib
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Any

import torch


class PrecisionError(RuntimeError):
    """Weights, gradients or optimizer state are not in the dtype the policy promises."""


#: The attribute :func:`declare_storage_dtype` sets on a module (read by :func:`declared_storage`).
STORAGE_ATTRIBUTE = "prx_storage_declaration"


@dataclass(frozen=True)
class StorageDeclaration:
    """A module whose weights are deliberately stored in ``dtype``, not the policy's ``param_dtype``."""

    dtype: torch.dtype
    #: The plugin that declared it (named in the guard's messages).
    owner: str
    #: Why, in a few words (logged, and named in the guard's messages).
    reason: str


def declare_storage_dtype(
    module: torch.nn.Module, dtype: torch.dtype, *, owner: str, reason: str
) -> StorageDeclaration:
    """Cast ``module``'s floating-point parameters and buffers to ``dtype`` and mark it as declared.

    The mark travels with the module (a deep copy keeps it, a ``state_dict`` does not carry it), so
    the guard finds it wherever the module ends up in the trainable set.
    """
    if not dtype.is_floating_point:
        raise ValueError(f"{owner}: a storage dtype must be a floating-point dtype, got {dtype}")
    if not owner.strip() or not reason.strip():
        raise ValueError("a storage declaration needs the declaring plugin's name and a reason")
    declaration = StorageDeclaration(dtype=dtype, owner=owner, reason=reason)
    module.to(dtype=dtype)
    setattr(module, STORAGE_ATTRIBUTE, declaration)
    return declaration


def declared_storage(modules: torch.nn.Module) -> dict[str, StorageDeclaration]:
    """Every declared submodule of ``modules`` by its qualified name ("" for ``modules`` itself)."""
    found: dict[str, StorageDeclaration] = {}
    for name, module in modules.named_modules():
        declaration = getattr(module, STORAGE_ATTRIBUTE, None)
        if isinstance(declaration, StorageDeclaration):
            found[name] = declaration
    return found


def _declaration_for(parameter: str, declared: dict[str, StorageDeclaration]) -> tuple[str, StorageDeclaration] | None:
    """The innermost declared module that holds ``parameter`` (a dotted name), if any."""
    best: tuple[str, StorageDeclaration] | None = None
    for prefix, declaration in declared.items():
        if prefix == "" or parameter.startswith(prefix + "."):
            if best is None or len(prefix) > len(best[0]):
                best = (prefix, declaration)
    return best


def _weight_hint(policy: str, found: torch.dtype, expected: torch.dtype) -> str:
    if expected == torch.float32 and found != torch.float32:
        return "something cast the model (this is the silent bf16-weights bug the guard exists for)"
    if found == torch.float32:
        return (
            "the weights were never cast, so the run would silently train in fp32 (the reference "
            "'bf16 weights' recipe failed this way); build the model in the policy's param_dtype"
        )
    return f"build every trainable module in precision.param_dtype ({expected})"


def check_dtypes(
    modules: torch.nn.Module,
    optimizer: torch.optim.Optimizer | None,
    *,
    policy: str,
    param_dtype: torch.dtype,
    state_dtype: torch.dtype,
    when: str,
) -> None:
    """Raise :class:`PrecisionError` naming the first parameter, gradient or optimizer tensor whose
    dtype is not the one the policy promises.

    Parameters and gradients must be ``param_dtype``, except inside a module declared with
    :func:`declare_storage_dtype`, where they must be the declared dtype. Floating-point optimizer
    state must be ``state_dtype``; for parameters that have no state yet, the dtype the optimizer
    *will* use is predicted from its ``state_dtype`` attribute (falling back to the parameter
    dtype, which is what ``torch.optim`` optimizers do).
    """
    names = {id(p): n for n, p in modules.named_parameters()}
    storage = declared_storage(modules)
    for name, param in modules.named_parameters():
        match = _declaration_for(name, storage)
        if match is None:
            expected = param_dtype
            if param.dtype != expected:
                raise PrecisionError(
                    f"{when}: parameter '{name}' is {param.dtype} but precision policy '{policy}' keeps weights in "
                    f"{param_dtype}; {_weight_hint(policy, param.dtype, param_dtype)}"
                )
        else:
            prefix, declaration = match
            expected = declaration.dtype
            if param.dtype != expected:
                raise PrecisionError(
                    f"{when}: parameter '{name}' is {param.dtype} but plugin '{declaration.owner}' declared module "
                    f"'{prefix}' stored in {expected} ({declaration.reason}); something cast it after the declaration"
                )
        if param.grad is not None and param.grad.dtype != expected:
            raise PrecisionError(f"{when}: gradient of '{name}' is {param.grad.dtype}, expected {expected} ({policy})")
    if optimizer is None:
        return
    declared: torch.dtype | None = getattr(optimizer, "state_dtype", None)
    for group in optimizer.param_groups:
        for param in group["params"]:
            name = names.get(id(param), "?")
            state = optimizer.state.get(param, {})
            for key, value in state.items():
                if isinstance(value, torch.Tensor) and value.is_floating_point() and value.dtype != state_dtype:
                    raise PrecisionError(
                        f"{when}: optimizer state '{key}' of '{name}' is {value.dtype}, "
                        f"expected {state_dtype} ({policy})"
                    )
            if not state and param.is_floating_point():
                future = declared if declared is not None else param.dtype
                if future != state_dtype:
                    raise PrecisionError(
                        f"{when}: optimizer {type(optimizer).__name__} would keep the state of '{name}' in "
                        f"{future}, but precision policy '{policy}' promises {state_dtype} optimizer state "
                        "(torch.optim optimizers keep state in the parameter dtype); use an optimizer that "
                        "honours precision.state_dtype (the builtin 'adamw' and 'muon' both do)"
                    )


def check_fp32_state(modules: torch.nn.Module, optimizer: torch.optim.Optimizer | None, policy: str, when: str) -> None:
    """Raise naming the first parameter, gradient or optimizer tensor that is not fp32 (or, inside a
    module declared with :func:`declare_storage_dtype`, not its declared dtype)."""
    check_dtypes(modules, optimizer, policy=policy, param_dtype=torch.float32, state_dtype=torch.float32, when=when)


def _bf16_supported(device: torch.device) -> bool:
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    # PyTorch runs bf16 kernels on every CPU (emulated where there are no native bf16 units).
    return device.type == "cpu"


class Bf16Mixed:
    """Autocast to bf16 where the device supports it; weights, grads, optimizer state in fp32."""

    name = "bf16_mixed"
    param_dtype = torch.float32
    state_dtype = torch.float32
    warning: str | None = None

    def __init__(self, device: torch.device, autocast_cpu: bool = True) -> None:
        self.device = device
        if device.type == "cuda":
            self.enabled = torch.cuda.is_bf16_supported()
        else:
            self.enabled = device.type == "cpu" and autocast_cpu
        # Frozen towers (text encoder, VAE, teachers) compute in the autocast dtype anyway.
        self.frozen_dtype = torch.bfloat16 if self.enabled else torch.float32
        #: The dtype matmuls run in (FSDP2 all-gathers weights in it); None without autocast.
        self.compute_dtype: torch.dtype | None = torch.bfloat16 if self.enabled else None

    def autocast(self, device: torch.device) -> AbstractContextManager[Any]:
        if not self.enabled:
            return contextlib.nullcontext()
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)

    def check(self, modules: torch.nn.Module, optimizer: torch.optim.Optimizer | None, when: str) -> None:
        check_fp32_state(modules, optimizer, self.name, when)


class Fp32:
    """Everything in fp32. On CUDA, matmuls may use TF32 tensor cores (``tf32 = true``, the default):
    10-bit mantissa products with fp32 accumulation, ~8× the fp32 rate on A100/H100."""

    name = "fp32"
    param_dtype = torch.float32
    frozen_dtype = torch.float32
    state_dtype = torch.float32
    compute_dtype: torch.dtype | None = None
    warning: str | None = None

    def __init__(self, device: torch.device | None = None, tf32: bool = True) -> None:
        self.tf32 = tf32
        if device is not None and device.type == "cuda":
            # "high": fp32 matmuls may run as TF32 (convolutions follow the cuDNN flag).
            torch.backends.cuda.matmul.allow_tf32 = tf32
            torch.backends.cudnn.allow_tf32 = tf32

    def autocast(self, device: torch.device) -> AbstractContextManager[Any]:
        return contextlib.nullcontext()

    def check(self, modules: torch.nn.Module, optimizer: torch.optim.Optimizer | None, when: str) -> None:
        check_fp32_state(modules, optimizer, self.name, when)


BF16_WEIGHTS_WARNING = (
    "precision policy 'bf16_weights': trainable weights are STORED in bfloat16 (8-bit mantissa). "
    "This is an ablation, not a training setup: an update smaller than 1/512 to 1/256 of a weight's "
    "magnitude is rounded away (at lr 1e-4, norm and modulation scales near 1.0 never move), and "
    "PRX's ablation measured FID 21.87 against 18.20 for bf16_mixed. Optimizer state and "
    "EMA stay float32. Use precision 'bf16_mixed' unless you are reproducing that ablation."
)


class Bf16Weights:
    """The "bf16 weights" ablation: weights and gradients stored in bf16, state and EMA in fp32.

    Autocast stays on so the ops autocast keeps in fp32 (softmax, norms, losses) still run in
    fp32. The trainer builds the model in :attr:`param_dtype`; the guard refuses fp32 weights, so
    the ablation can never silently train in fp32 as the reference did (reference.md §7.1).
    """

    name = "bf16_weights"
    param_dtype = torch.bfloat16
    frozen_dtype = torch.bfloat16
    state_dtype = torch.float32
    warning: str | None = BF16_WEIGHTS_WARNING

    def __init__(self, device: torch.device, autocast: bool = True) -> None:
        if not _bf16_supported(device):
            raise ValueError(f"precision 'bf16_weights' needs bfloat16 support, which device {device} lacks")
        self.device = device
        self.enabled = autocast
        self.compute_dtype: torch.dtype | None = torch.bfloat16 if autocast else None

    def autocast(self, device: torch.device) -> AbstractContextManager[Any]:
        if not self.enabled:
            return contextlib.nullcontext()
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)

    def check(self, modules: torch.nn.Module, optimizer: torch.optim.Optimizer | None, when: str) -> None:
        check_dtypes(
            modules,
            optimizer,
            policy=self.name,
            param_dtype=self.param_dtype,
            state_dtype=self.state_dtype,
            when=when,
        )
