"""generate / generate_to_dir: sampling through torch.compile, and its eager fallback."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from maetok.config import SampleConfig, TokenizerRunConfig, load_config
from maetok.diffusion import SiT, sit_config
from maetok.diffusion.generate import generate, generate_to_dir
from maetok.tokenizer import MAETok

CFG = SampleConfig("euler", steps=3, cfg_scale=1.5, cfg_interval=(0.0, 0.7), seed=3)


def _models() -> tuple[SiT, MAETok]:
    torch.manual_seed(0)
    tok = MAETok(load_config(TokenizerRunConfig, "cpu-32").model).eval()
    sit = SiT(sit_config("tiny", num_tokens=tok.config.latent_tokens, in_channels=tok.config.latent_dim,
                         num_classes=10)).eval()
    with torch.no_grad():  # out of the zero-initialised start, so that the model's output matters
        for p in sit.parameters():
            p.add_(0.02 * torch.randn_like(p))
    return sit, tok


def test_sampling_whose_compilation_fails_runs_eagerly_with_the_same_images(monkeypatch, caplog, tmp_path):
    sit, tok = _models()
    labels = torch.arange(5) % 10
    _, eager = generate(sit, tok, 5, CFG, labels, batch_size=2, progress=False)

    class BackendCompilerFailed(RuntimeError):
        pass

    BackendCompilerFailed.__module__ = "torch._dynamo.exc"  # where torch.compile's own errors come from
    calls = []

    def failing_compile(module, **kwargs):
        def compiled(*args, **kw):
            calls.append(1)
            raise BackendCompilerFailed("no C compiler")
        return compiled

    monkeypatch.setattr(torch, "compile", failing_compile)
    with caplog.at_level("WARNING"):
        _, fallback = generate(sit, tok, 5, CFG, labels, batch_size=2, progress=False, compile=True)
    assert "torch.compile failed for the diffusion model" in caplog.text and len(calls) == 1  # tried once
    np.testing.assert_array_equal(fallback, eager)
    path = generate_to_dir(sit, tok, 3, CFG, tmp_path, batch_size=2, progress=False, compile=True)
    assert json.loads(path.with_name("sampling.json").read_text())["compile"] is True


def test_an_error_of_the_model_itself_is_not_taken_for_a_compiler_failure(monkeypatch):
    sit, tok = _models()
    monkeypatch.setattr(torch, "compile", lambda module, **kw: module)  # "compiled" = the module itself
    with pytest.raises(ValueError, match="labels must lie in"):  # class 99 of a 10-class model: SiT refuses it
        generate(sit, tok, 4, CFG, torch.full((4,), 99), batch_size=4, progress=False, compile=True)


@pytest.mark.slow
def test_compiled_sampling_gives_the_eager_images():
    sit, tok = _models()
    labels = torch.arange(6) % 10
    _, eager = generate(sit, tok, 6, CFG, labels, batch_size=4, progress=False)
    _, compiled = generate(sit, tok, 6, CFG, labels, batch_size=4, progress=False, compile=True)
    diff = np.abs(eager.astype(int) - compiled.astype(int))
    assert diff.max() <= 2 and (diff > 0).mean() < 0.01, (diff.max(), (diff > 0).mean())
