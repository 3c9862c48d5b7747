"""generate / generate_to_dir: sampling through torch.compile, and its eager fallback."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from maetok.config import ConfigError, SampleConfig, TokenizerRunConfig, load_config
from maetok.diffusion import SiT, sit_config
from maetok.eval.generate import generate, generate_to_dir
from maetok.tokenizer import MAETok
from maetok.io.pretrained import load_sit, save_pretrained

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


def test_sampling_whose_compilation_fails_runs_eagerly_with_the_same_images(failing_compile, caplog, tmp_path):
    sit, tok = _models()
    labels = torch.arange(5) % 10
    _, eager = generate(sit, tok, 5, CFG, labels, batch_size=2, progress=False)  # compile off: never compiled
    with caplog.at_level("WARNING"):
        _, fallback = generate(sit, tok, 5, CFG, labels, batch_size=2, progress=False, compile=True)
    assert "torch.compile failed for the diffusion model" in caplog.text
    assert len(failing_compile) == 1  # tried once, then eager for every later call
    np.testing.assert_array_equal(fallback, eager)
    path = generate_to_dir(sit, tok, 3, CFG, tmp_path, batch_size=2, progress=False, compile=True)
    assert json.loads(path.with_name("sampling.json").read_text())["compile"] is True


def test_an_error_of_the_model_itself_is_not_taken_for_a_compiler_failure(passthrough_compile, monkeypatch,
                                                                          caplog):
    sit, tok = _models()

    def broken(*args, **kwargs):
        raise ValueError("a bug in the model")

    monkeypatch.setattr(sit.t_embedder, "forward", broken)
    with caplog.at_level("WARNING"), pytest.raises(ValueError, match="a bug in the model"):
        generate(sit, tok, 4, CFG, torch.arange(4), batch_size=4, progress=False, compile=True)
    assert "torch.compile failed" not in caplog.text


def test_labels_out_of_range_are_refused_once_before_sampling():
    sit, tok = _models()
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 10\]"):  # the sampler checks: SiT checks shapes only
        generate(sit, tok, 4, CFG, torch.full((4,), 99), batch_size=4, progress=False)


@pytest.mark.slow
def test_compiled_sampling_gives_the_eager_images():
    sit, tok = _models()
    labels = torch.arange(6) % 10
    _, eager = generate(sit, tok, 6, CFG, labels, batch_size=4, progress=False)
    _, compiled = generate(sit, tok, 6, CFG, labels, batch_size=4, progress=False, compile=True)
    diff = np.abs(eager.astype(int) - compiled.astype(int))
    assert diff.max() <= 2 and (diff > 0).mean() < 0.01, (diff.max(), (diff > 0).mean())


def test_the_sde_converts_velocity_to_score_on_the_path_the_model_was_trained_on(tmp_path, monkeypatch):
    """The score the SDE needs depends on the interpolant; the model folder records it and sampling uses it."""
    import maetok.eval.generate as gen_module

    sit, tok = _models()
    sit.transport_path = "cosine"
    save_pretrained(sit, tmp_path / "sit")
    loaded = load_sit(tmp_path / "sit")
    assert loaded.transport_path == "cosine"
    assert json.loads((tmp_path / "sit" / "config.json").read_text())["transport_path"] == "cosine"
    from maetok.io.convert_sit import convert_official_sit

    convert_official_sit(tmp_path / "sit", tmp_path / "again")  # a conversion of a maetok folder keeps it too
    assert load_sit(tmp_path / "again").transport_path == "cosine"
    paths = []
    real_sample = gen_module.sample
    monkeypatch.setattr(gen_module, "sample", lambda *a, **kw: paths.append(kw["path"]) or real_sample(*a, **kw))
    generate(loaded, tok, 2, SampleConfig("sde", steps=3, seed=1), torch.arange(2), progress=False)
    assert paths == ["cosine"]


def test_a_model_folder_without_a_recorded_path_is_read_as_linear(tmp_path):
    sit, _ = _models()
    save_pretrained(sit, tmp_path / "sit")
    config = json.loads((tmp_path / "sit" / "config.json").read_text())
    del config["transport_path"]  # as saved before the path was recorded
    (tmp_path / "sit" / "config.json").write_text(json.dumps(config))
    assert load_sit(tmp_path / "sit").transport_path == "linear"
    config["transport_path"] = "vp"
    (tmp_path / "sit" / "config.json").write_text(json.dumps(config))
    with pytest.raises(ConfigError, match=r"transport_path='vp' is not one of \['linear', 'cosine'\]"):
        load_sit(tmp_path / "sit")
