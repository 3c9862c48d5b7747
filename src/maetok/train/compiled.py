"""How a model runs: through torch.compile with an eager fallback, and under bf16 autocast where asked.

Used by the training loop, the tokenizer's frozen teachers and sampling.
"""
from __future__ import annotations

import contextlib
import importlib
import logging

import torch
import torch.nn as nn

try:
    from torch._functorch import config as aot_autograd_config
except ImportError:  # pragma: no cover - torch without AOT autograd
    aot_autograd_config = None

log = logging.getLogger("maetok.train")


def uses_bf16(device: torch.device, precision: str) -> bool:
    return precision == "bf16" or (precision == "auto" and device.type == "cuda")


def autocast_for(device: torch.device, precision: str):
    if uses_bf16(device, precision):
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return torch.autocast(device.type, enabled=False)


def can_compile() -> bool:
    try:
        # Optional: torch._dynamo does not import where torch.compile is unsupported (some Python versions).
        importlib.import_module("torch._dynamo")
        return True
    except Exception:  # pragma: no cover
        log.warning("torch.compile unavailable; running eagerly")
        return False


def is_compile_error(e: Exception) -> bool:
    """Whether `e` came from torch.compile (backend, lowering, unsupported op) rather than from the model."""
    module = type(e).__module__
    return "dynamo" in module or "inductor" in module or "compile" in str(e).lower()


class CompiledOrEager:
    """Calls a module through torch.compile, or eagerly where compilation is off, unavailable or fails.

    torch.compile compiles at the first call (and at each new input shape), so that is where a missing C compiler
    or an unsupported operator shows: the first such error is logged once and the eager module runs from then on.
    The backward graph is lowered during that forward call too (torch otherwise lowers it at the first backward,
    outside this wrapper, where a failure would end the run). Errors of the module itself propagate.
    Attributes not defined here (parameters, config, training, null_label) are read from the module; calls that
    change it (eval, to) go to the module and return the bare module, so set those up before wrapping.
    compile_options go to torch.compile (e.g. dynamic=False)."""

    def __init__(self, module: nn.Module, name: str, enabled: bool = True, **compile_options):
        self._module, self._name, self._compiled = module, name, None
        if enabled and can_compile():
            try:
                self._compiled = torch.compile(module, **compile_options)
            except Exception as e:  # e.g. a Python version torch.compile does not support yet
                log.warning("torch.compile unavailable for %s (%s: %s); running it eagerly", name,
                            type(e).__name__, str(e)[:200])

    @property
    def eager(self) -> nn.Module:
        return self._module

    @property
    def is_compiled(self) -> bool:
        return self._compiled is not None

    def __getattr__(self, name: str):
        if name.startswith("_"):  # own attributes not set yet (copying, unpickling): no recursion
            raise AttributeError(name)
        return getattr(self._module, name)

    def __call__(self, *args, **kwargs):
        if self._compiled is not None:
            try:
                with _backward_lowered_in_forward():
                    return self._compiled(*args, **kwargs)
            except Exception as e:  # torch.compile raises many types (backend, lowering, unsupported ops)
                if not is_compile_error(e):
                    raise
                log.warning("torch.compile failed for %s (%s: %s); running it eagerly", self._name,
                            type(e).__name__, str(e)[:200])
                self._compiled = None
        return self._module(*args, **kwargs)


def _backward_lowered_in_forward():
    """A context in which torch.compile lowers a training graph's backward with its forward (a private switch
    of torch's AOT autograd; a no-op on versions without it)."""
    if aot_autograd_config is None:  # pragma: no cover - torch without AOT autograd
        return contextlib.nullcontext()
    if "force_non_lazy_backward_lowering" in getattr(aot_autograd_config, "_config", {}):
        return aot_autograd_config.patch(force_non_lazy_backward_lowering=True)
    return contextlib.nullcontext()
