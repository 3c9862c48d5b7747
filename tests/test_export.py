"""`maetok export`: a tokenizer's pixel decoder and a SiT as ONNX graphs with a dynamic batch axis, equal to PyTorch
under onnxruntime, and every bad input refused with one line.

Tolerance: 2e-5 max abs error. Measured on these tiny random models (float32, one thread, this project's CPU): up to
4.2e-7 for the decoder (images of scale 0.8) and 1.1e-7 for the SiT; maetok.io.export's docstring gives larger
models' (up to 6e-6 for a cpu-64 decoder): the tolerance leaves room for other CPUs' kernels.
"""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from maetok.config import SiTConfig, TokenizerConfig, from_dict
from maetok.diffusion.sit import SiT
from maetok.io import export
from maetok.io.export import export_onnx, onnx_session, read_metadata
from maetok.io.pretrained import load_sit, load_tokenizer, save_pretrained
from maetok.tokenizer import MAETok
from test_cli_errors import refused, run

# The export extra; maetok.io.export imports them only where it uses them, so the imports above need none.
SKIP_WHY = "{} is not installed (pip install 'maetok[export]')"
pytest.importorskip("onnxruntime", reason=SKIP_WHY.format("onnxruntime"))
pytest.importorskip("onnxscript", reason=SKIP_WHY.format("onnxscript"))
onnx = pytest.importorskip("onnx", reason=SKIP_WHY.format("onnx"))

TOLERANCE = 2e-5


def _randomised(model: torch.nn.Module) -> torch.nn.Module:
    """Every weight drawn at std 0.05: the zero-initialised adaLN layers would otherwise hide the latent's
    modulation (and a SiT's output layer starts at zero, which any graph matches)."""
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(std=0.05)
    return model


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("models")
    torch.manual_seed(0)
    tokenizer = MAETok(TokenizerConfig(variant="ae", image_size=16, patch_size=4, latent_tokens=4, latent_dim=4,
                                       enc_width=32, enc_heads=2, enc_depth=1, dec_width=32, dec_heads=2,
                                       dec_depth=2, aux_targets=[], latent_mean=0.25, latent_std=1.5))
    save_pretrained(_randomised(tokenizer), root / "tok")
    save_pretrained(_randomised(SiT(SiTConfig(in_channels=4, num_tokens=4, hidden=32, depth=2, heads=2,
                                              num_classes=10))), root / "sit")
    # LightningDiT rotates with RoPE (the real-arithmetic branch under export); unconditional: no y input.
    save_pretrained(_randomised(SiT(SiTConfig(in_channels=4, num_tokens=4, hidden=32, depth=2, heads=2,
                                              num_classes=0, variant="lightningdit"))), root / "ldit")
    # A shortcut student (maetok diffusion distill) takes its step size d as one more input.
    save_pretrained(_randomised(SiT(SiTConfig(in_channels=4, num_tokens=4, hidden=32, depth=2, heads=2,
                                              num_classes=10, shortcut_steps=8, shortcut_cfg_scale=1.5))),
                    root / "student")
    return {"tok": root / "tok", "sit": root / "sit", "ldit": root / "ldit", "student": root / "student",
            "root": root}


def _input_shapes(session) -> dict[str, list]:
    return {i.name: i.shape for i in session.get_inputs()}


# --------------------------------------------------------------------------------------------------------------
# The graphs equal PyTorch at two batch sizes, neither of them the traced one
# --------------------------------------------------------------------------------------------------------------
def test_decoder_graph_takes_normalised_latents_and_equals_pytorch(models, tmp_path):
    report = export_onnx(models["tok"], tmp_path / "decoder.onnx")
    assert report.files == [tmp_path / "decoder.onnx"] and max(report.max_abs_error.values()) < TOLERANCE
    tok = load_tokenizer(models["tok"])
    session = onnx_session(tmp_path / "decoder.onnx", threads=1)
    assert _input_shapes(session) == {"normalized_latents": ["batch", 4, 4]}
    for batch in (1, 5):
        normalized = torch.randn(batch, 4, 4)
        with torch.inference_mode():
            want = tok.decode(tok.denormalize(normalized))
        (got,) = session.run(None, {"normalized_latents": normalized.numpy()})
        assert got.shape == (batch, 3, 16, 16)
        assert (torch.from_numpy(got) - want).abs().max() < TOLERANCE
    meta = read_metadata(tmp_path / "decoder.onnx")
    assert meta["maetok_graph"] == "decoder" and meta["maetok_source"] == str(models["tok"])
    assert from_dict(TokenizerConfig, meta["maetok_config"]["config"]) == tok.config


@pytest.mark.parametrize("name, inputs", [("sit", ["x", "t", "y"]), ("ldit", ["x", "t"]),
                                          ("student", ["x", "t", "y", "d"])])
def test_sit_graph_equals_pytorch(models, tmp_path, name, inputs):
    report = export_onnx(models[name], tmp_path / "sit.onnx")
    assert max(report.max_abs_error.values()) < TOLERANCE
    sit = load_sit(models[name])
    session = onnx_session(tmp_path / "sit.onnx", threads=1)
    assert list(_input_shapes(session)) == inputs and _input_shapes(session)["t"] == ["batch"]
    for batch in (1, 6):  # 6: a CFG batch (conditional and null labels) is twice the sample batch
        x, t = torch.randn(batch, 4, 4), torch.rand(batch)
        y = torch.arange(batch) % 11 if "y" in inputs else None  # 10: the null label
        d = 2.0 ** -(torch.arange(batch) % 4).float() if "d" in inputs else None  # step sizes 1 .. 1/8
        with torch.inference_mode():
            want = sit(x, t, y, d)
        feeds = {"x": x.numpy(), "t": t.numpy(), **({"y": y.numpy()} if y is not None else {}),
                 **({"d": d.numpy()} if d is not None else {})}
        (got,) = session.run(None, feeds)
        assert (torch.from_numpy(got) - want).abs().max() < TOLERANCE
    config = dict(read_metadata(tmp_path / "sit.onnx")["maetok_config"])
    assert config.pop("kind") == "sit" and config.pop("transport_path") == "linear"
    assert from_dict(SiTConfig, config) == sit.config


def test_weights_beside_the_graph_move_with_it_and_a_later_export_removes_them(models, tmp_path, monkeypatch):
    save = torch.onnx.ONNXProgram.save
    # What a graph over protobuf's 2 GB limit (SiT-XL) gets: its weights in FILE.data, referred to by that name.
    monkeypatch.setattr(torch.onnx.ONNXProgram, "save", lambda self, path: save(self, path, external_data=True))
    out = tmp_path / "decoder.onnx"
    assert export_onnx(models["tok"], out).files == [tmp_path / "decoder.onnx.data", out]
    assert sorted(tmp_path.iterdir()) == [out, tmp_path / "decoder.onnx.data"]
    normalized = torch.randn(2, 4, 4)
    (got,) = onnx_session(out, threads=1).run(None, {"normalized_latents": normalized.numpy()})
    tok = load_tokenizer(models["tok"])
    with torch.inference_mode():
        assert (torch.from_numpy(got) - tok.decode(tok.denormalize(normalized))).abs().max() < TOLERANCE
    monkeypatch.undo()
    export_onnx(models["tok"], out)  # small enough for one file: the old weights file would only mislead
    assert sorted(tmp_path.iterdir()) == [out]


def test_a_failed_parity_check_writes_nothing(models, tmp_path, monkeypatch):
    monkeypatch.setattr(export, "PARITY_TOLERANCE", -1.0)  # no error is small enough
    with pytest.raises(export.ExportError, match="differs from PyTorch by .* not written"):
        export_onnx(models["tok"], tmp_path / "decoder.onnx")
    assert list(tmp_path.iterdir()) == []  # neither the graph nor its staging folder


# --------------------------------------------------------------------------------------------------------------
# The command line
# --------------------------------------------------------------------------------------------------------------
def test_cli_round_trip_and_force(models, tmp_path):
    out = tmp_path / "deploy" / "decoder.onnx"
    code, stdout, err = run("export", "--model", models["tok"], "--format", "onnx", "--out", out)
    assert code == 0, err
    assert f"exported the decoder graph (dynamic batch) to {out}" in stdout and "max abs error" in stdout
    assert read_metadata(out)["maetok_graph"] == "decoder"
    assert "already exists; pass --force" in refused("export", "--model", models["sit"], "--out", out)
    code, stdout, err = run("export", "--model", models["sit"], "--out", out, "--force")
    assert code == 0, err
    assert read_metadata(out)["maetok_graph"] == "velocity" and sorted(out.parent.iterdir()) == [out]


def test_missing_onnxruntime_is_one_line(models, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # `import onnxruntime` now raises ImportError
    line = refused("export", "--model", models["tok"], "--out", tmp_path / "decoder.onnx")
    assert "needs onnxruntime (not installed)" in line and "pip install 'maetok[export]'" in line
    assert not (tmp_path / "decoder.onnx").exists()


def test_a_folder_with_no_model_is_one_line(tmp_path):
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "readme.txt").write_text("not a model")
    assert "has no config.json" in refused("export", "--model", tmp_path / "notes", "--out", tmp_path / "x.onnx")
    assert "no such folder" in refused("export", "--model", tmp_path / "missing", "--out", tmp_path / "x.onnx")


def test_an_out_that_is_a_folder_or_under_a_file_is_one_line(models, tmp_path):
    line = refused("export", "--model", models["tok"], "--out", tmp_path)
    assert f"{tmp_path} is a folder; give the path of the ONNX file to write" in line
    (tmp_path / "notes.txt").write_text("")
    line = refused("export", "--model", models["tok"], "--out", tmp_path / "notes.txt" / "decoder.onnx")
    assert f"{tmp_path / 'notes.txt'} is a file, so no folder can be made for the graph" in line


def test_only_onnx_is_offered(models, tmp_path):
    assert "invalid choice: 'tflite'" in refused("export", "--model", models["tok"], "--format", "tflite",
                                                 "--out", tmp_path / "x")


def test_metadata_of_another_onnx_file_is_refused(tmp_path):
    graph = onnx.helper.make_graph([onnx.helper.make_node("Identity", ["a"], ["b"])], "g",
                                   [onnx.helper.make_tensor_value_info("a", onnx.TensorProto.FLOAT, [1])],
                                   [onnx.helper.make_tensor_value_info("b", onnx.TensorProto.FLOAT, [1])])
    onnx.save(onnx.helper.make_model(graph), tmp_path / "other.onnx")
    with pytest.raises(export.ExportError, match="not a graph exported by maetok"):
        read_metadata(tmp_path / "other.onnx")
