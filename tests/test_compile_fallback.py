"""CompiledOrEager: torch.compile with an eager fallback, for the training loop, frozen teachers and sampling."""
from __future__ import annotations

import copy
import pickle

import pytest
import torch

from maetok.train.compiled import CompiledOrEager


def test_a_compile_failure_falls_back_to_eager_once(failing_compile, caplog):
    layer = torch.nn.Linear(3, 2)
    wrapped = CompiledOrEager(layer, "the layer")
    x = torch.randn(4, 3)
    with caplog.at_level("WARNING"):
        assert torch.equal(wrapped(x), layer(x)) and torch.equal(wrapped(x), layer(x))
    assert len(failing_compile) == 1 and caplog.text.count("torch.compile failed for the layer") == 1
    assert not wrapped.is_compiled and wrapped.eager is layer


def test_disabled_or_unavailable_compilation_runs_eagerly(monkeypatch, caplog):
    layer = torch.nn.Linear(3, 2)
    assert not CompiledOrEager(layer, "off", enabled=False).is_compiled

    def unsupported(module, **kwargs):
        raise RuntimeError("torch.compile is not supported on this Python")

    monkeypatch.setattr(torch, "compile", unsupported)
    with caplog.at_level("WARNING"):
        wrapped = CompiledOrEager(layer, "the layer")
    assert not wrapped.is_compiled and "torch.compile unavailable for the layer" in caplog.text
    x = torch.randn(2, 3)
    assert torch.equal(wrapped(x), layer(x))


def test_attributes_come_from_the_module_and_copies_work(passthrough_compile):
    layer = torch.nn.Linear(3, 2)
    wrapped = CompiledOrEager(layer, "the layer", dynamic=False)
    assert wrapped.is_compiled and wrapped.weight is layer.weight and wrapped.training == layer.training
    assert list(wrapped.parameters()) == list(layer.parameters())
    for clone in (copy.deepcopy(wrapped), pickle.loads(pickle.dumps(wrapped))):
        assert torch.equal(clone.weight, layer.weight) and clone.is_compiled
    with pytest.raises(AttributeError):
        wrapped.no_such_attribute


def test_a_backward_that_fails_to_compile_falls_back_in_the_forward(caplog):
    """torch lowers a training graph's backward lazily, at the first backward() (outside the wrapper); the wrapper
    has it lowered during the forward, where its failure is caught."""
    from torch._dynamo.backends.common import aot_autograd

    def failing_backward(gm, example_inputs):
        raise RuntimeError("backward lowering failed (simulated compile error)")

    real_compile = torch.compile
    layer = torch.nn.Linear(3, 1)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(torch, "compile", lambda m, **kw: real_compile(
            m, backend=aot_autograd(fw_compiler=lambda gm, ex: gm.forward, bw_compiler=failing_backward)))
        wrapped = CompiledOrEager(layer, "the layer")
    torch._dynamo.reset()
    with caplog.at_level("WARNING"):
        loss = wrapped(torch.randn(4, 3)).sum()
    loss.backward()  # eager: no lowering left to fail here
    assert not wrapped.is_compiled and "torch.compile failed for the layer" in caplog.text
    assert layer.weight.grad is not None
