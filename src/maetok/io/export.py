"""Deployable graphs: a tokenizer folder's pixel decoder, or a SiT folder's velocity model, as ONNX with a dynamic
batch axis, checked against PyTorch with onnxruntime before it is put in place.

    report = export_onnx("runs/tok/model", "decoder.onnx")  # normalized_latents (B, L, C) -> images (B, 3, H, W)
    report = export_onnx("runs/sit/model", "sit.onnx")      # x (B, L, C), t (B,), y (B,) int64 -> velocity (B, L, C)
    print(report.summary())                                   # the graph, its inputs, onnxruntime's max abs error
    session = onnx_session("decoder.onnx")                    # onnxruntime on the CPU, torch's thread count

The decoder graph takes *normalised* latents, (z - latent_mean) / latent_std, and denormalises inside: that is
what the SiT generates and what the latent caches hold, so the two exported graphs chain with no code between
them. To decode an encoder's raw z, normalise it first with the tokenizer's latent_mean and latent_std (in the
graph's doc string and metadata). Its images are what `MAETok.decode` returns: roughly [-1, 1], not clamped. An
unconditional SiT (num_classes=0) takes no y.

How it exports: `torch.onnx.export(dynamo=True)`, where torch.export traces the model and onnxscript writes the
ONNX graph. The TorchScript exporter (dynamo=False, still in torch 2.14) fails on the decoder's autograd.Function
(`layers.modulate_latents`: "RuntimeError: unordered_map::at"); torch.export traces through its forward. It also
sets `torch.compiler.is_compiling()`, so `layers.rotate_pairs` takes its real-arithmetic RoPE branch (ONNX has
no complex type): layers.py needs no change. SDPA becomes MatMul + Softmax at the default opset (20); opset 23's
Attention op ran no faster under onnxruntime 1.32 (within 5% on the cpu-64 decoder), and needs a newer runtime.
Weights stay float32; a graph over 2 GB (SiT-XL) keeps them in FILE.data beside FILE. The metadata
(`read_metadata`) records the config the model came from, as its folder's config.json holds it.

Parity, measured by `export_onnx` on every export (random inputs at batch 1 and 3; the graph is traced at batch
2): onnxruntime 1.32 against eager PyTorch on this project's 2-core Xeon, float32, max abs error
    decoders of 16 x 8 (the demo's), 32 x 12 (cpu-32) and 64 x 16 (cpu-64) latents, initial weights or random
    ones of std 0.05 / 0.1 (images up to 5 in magnitude): 7e-7 to 6e-6;
    SiT tiny / mini / LightningDiT, weights of std 0.05: 2e-8 to 1.5e-6 (0 at the zero-initialised output layer).
Float32 summation order, nothing more: tests/test_export.py asserts 2e-5 on its tiny models. An export beyond
PARITY_TOLERANCE is refused, and nothing is written.
"""
from __future__ import annotations

import importlib
import json
import os
import tempfile
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from ..config import to_dict
from ..diffusion.sit import SiT
from ..tokenizer.model import MAETok
from ..version import __version__
from .pretrained import SIT_KIND, TOKENIZER_KIND, from_pretrained

EXPORT_PACKAGES = ("onnx", "onnxscript", "onnxruntime")  # the `export` extra: writer, its translator, the check
TRACE_BATCH = 2  # torch.export specialises a dimension of size 1, so the trace runs at 2 and the axis stays free
CHECK_BATCHES = (1, 3)  # neither is the traced size: the check shows that the batch axis is really dynamic
PARITY_TOLERANCE = 1e-4  # max abs error, relative to the output's scale (at least 1); measured: at most 6e-6


class ExportError(Exception):
    """An export that cannot be made as asked (a missing package, a bad --out, a failed parity check)."""


def require_export_packages() -> None:
    """ExportError naming every missing package of the `export` extra, before any model is loaded."""
    missing = []
    for name in EXPORT_PACKAGES:
        try:
            importlib.import_module(name)
        except ImportError:
            missing.append(name)
    if missing:
        raise ExportError(f"exporting to ONNX needs {', '.join(missing)} (not installed); install the export extra: "
                          f"pip install 'maetok[export]' (or pip install {' '.join(EXPORT_PACKAGES)})")


# --------------------------------------------------------------------------------------------------------------
# The graphs: what each exported file computes, as PyTorch modules
# --------------------------------------------------------------------------------------------------------------
class DecoderGraph(nn.Module):
    """normalized_latents (B, L, C) -> images (B, 3, H, W): `MAETok.decode` of the denormalised latents."""
    name = "decoder"
    input_names = ("normalized_latents",)
    output_names = ("images",)

    def __init__(self, tokenizer: MAETok):
        super().__init__()
        self.tokenizer = tokenizer

    def forward(self, normalized_latents: torch.Tensor) -> torch.Tensor:
        return self.tokenizer.decode(self.tokenizer.denormalize(normalized_latents))

    def example_inputs(self, batch: int, generator: torch.Generator) -> dict[str, torch.Tensor]:
        cfg = self.tokenizer.config
        return {"normalized_latents": torch.randn(batch, cfg.latent_tokens, cfg.latent_dim, generator=generator)}

    def description(self) -> str:
        cfg = self.tokenizer.config
        return (f"maetok pixel decoder: normalized_latents (batch, {cfg.latent_tokens}, {cfg.latent_dim}) float32, "
                f"(z - {cfg.latent_mean}) / {cfg.latent_std} -> images (batch, {cfg.in_channels}, {cfg.image_size}, "
                f"{cfg.image_size}) float32, roughly [-1, 1], not clamped")


class VelocityGraph(nn.Module):
    """x (B, L, C), t (B,), y (B,) -> the SiT's velocity (B, L, C); without y for an unconditional model, and with
    the step size d (B,) for a shortcut student (its sampler: x <- x - d * v, from t = 1 down to 0)."""
    name = "velocity"
    output_names = ("velocity",)

    def __init__(self, sit: SiT):
        super().__init__()
        self.sit = sit
        self.input_names = ("x", "t") + (("y",) if sit.config.num_classes else ()) \
            + (("d",) if sit.config.shortcut_steps else ())

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None,
                d: torch.Tensor | None = None) -> torch.Tensor:
        return self.sit(x, t, y, d)

    def example_inputs(self, batch: int, generator: torch.Generator) -> dict[str, torch.Tensor]:
        cfg = self.sit.config
        inputs = {"x": torch.randn(batch, cfg.num_tokens, cfg.in_channels, generator=generator),
                  "t": torch.rand(batch, generator=generator)}
        if cfg.num_classes:  # the null label (num_classes, CFG's unconditional branch) included
            inputs["y"] = torch.randint(0, cfg.num_classes + 1, (batch,), generator=generator)
        if cfg.shortcut_steps:  # the step sizes it was distilled for: 1, 1/2, ..., 1/shortcut_steps
            exponents = torch.randint(0, cfg.shortcut_steps.bit_length(), (batch,), generator=generator)
            inputs["d"] = 2.0 ** -exponents.float()
        return inputs

    def description(self) -> str:
        cfg = self.sit.config
        labels = f", y (batch,) int64 in [0, {cfg.num_classes}] ({cfg.num_classes} = no class)" \
            if cfg.num_classes else ""
        step = f", d (batch,) float32 step size in {{1, 1/2, ..., 1/{cfg.shortcut_steps}}} (a shortcut student, " \
            f"guidance {cfg.shortcut_cfg_scale:g} folded in)" if cfg.shortcut_steps else ""
        return (f"maetok SiT velocity: x (batch, {cfg.num_tokens}, {cfg.in_channels}) float32, t (batch,) float32 "
                f"in [0, 1] (0 = data, 1 = noise){labels}{step} -> velocity (batch, {cfg.num_tokens}, "
                f"{cfg.in_channels})")


def graph_for(model: MAETok | SiT) -> DecoderGraph | VelocityGraph:
    return DecoderGraph(model) if isinstance(model, MAETok) else VelocityGraph(model)


def source_config(model: MAETok | SiT) -> dict[str, Any]:
    """The config.json a save_pretrained folder of `model` holds, less the version (metadata of its own)."""
    if isinstance(model, MAETok):
        return {"kind": TOKENIZER_KIND, "config": to_dict(model.config)}
    return {"kind": SIT_KIND, "transport_path": model.transport_path, **to_dict(model.config)}


# --------------------------------------------------------------------------------------------------------------
# Export
# --------------------------------------------------------------------------------------------------------------
@dataclass
class ExportReport:
    path: Path
    graph: str                                            # "decoder" or "velocity"
    description: str                                      # inputs and outputs, as the file's doc string says
    max_abs_error: dict[int, float]                       # batch size -> onnxruntime against PyTorch
    files: list[Path] = field(default_factory=list)       # the .onnx, and its .data for a graph over 2 GB

    def summary(self) -> str:
        errors = ", ".join(f"{e:.1e} at batch {b}" for b, e in self.max_abs_error.items())
        return (f"exported the {self.graph} graph (dynamic batch) to {', '.join(map(str, self.files))}\n"
                f"  {self.description}\n  onnxruntime vs PyTorch, max abs error: {errors}")


def export_onnx(model_dir: str | Path, out: str | Path) -> ExportReport:
    """Export the model of `model_dir` (a tokenizer: its pixel decoder; a SiT: its velocity model) to the ONNX file
    `out`, replacing it. The graph is checked with onnxruntime before it is moved into place."""
    require_export_packages()
    out = Path(out)
    if out.is_dir():
        raise ExportError(f"{out} is a folder; give the path of the ONNX file to write, e.g. {out / 'model.onnx'}")
    nearest = next(p for p in out.parents if p.exists())  # `exists` is False through a file
    if not nearest.is_dir():
        raise ExportError(f"{out}: {nearest} is a file, so no folder can be made for the graph; choose another path")
    model = from_pretrained(model_dir)
    graph = graph_for(model).eval()
    meta = {"maetok_graph": graph.name, "maetok_version": __version__, "maetok_source": str(model_dir),
            "maetok_config": json.dumps(source_config(model))}
    program = _trace(graph)
    program.model.doc_string = graph.description()
    program.model.metadata_props.update(meta)
    out.parent.mkdir(parents=True, exist_ok=True)
    # Written and checked in a folder beside `out`, then moved: a failed check leaves `out` as it was, and the
    # weights file keeps the name the graph refers to.
    with tempfile.TemporaryDirectory(dir=out.parent, prefix=f".{out.name}.tmp-") as tmp:
        staged = Path(tmp) / out.name
        program.save(staged)  # one file; weights in a .data file beside it only over protobuf's 2 GB limit
        errors = check_parity(graph, staged)
        written = sorted(Path(tmp).iterdir(), key=lambda p: p == staged)  # the graph last, after its weights
        for path in written:
            os.replace(path, out.parent / path.name)
    stale = out.with_name(out.name + ".data")
    if stale.exists() and all(p.name != stale.name for p in written):
        stale.unlink()  # an earlier, larger export's weights: the new graph does not read them
    return ExportReport(out, graph.name, graph.description(), errors, [out.parent / p.name for p in written])


def _trace(graph: DecoderGraph | VelocityGraph) -> torch.onnx.ONNXProgram:
    batch = torch.export.Dim("batch", min=1)
    example = graph.example_inputs(TRACE_BATCH, torch.Generator().manual_seed(0))
    with torch.no_grad(), warnings.catch_warnings():
        # x, t and y share one batch Dim, so torch.onnx warns that it names their common axis once: it is "batch".
        warnings.filterwarnings("ignore", message="# The axis name", category=UserWarning)
        return torch.onnx.export(graph, (), kwargs=example, dynamo=True, verbose=False,
                                 dynamic_shapes={name: {0: batch} for name in example},
                                 input_names=list(graph.input_names), output_names=list(graph.output_names))


def check_parity(graph: DecoderGraph | VelocityGraph, path: Path,
                 batches: tuple[int, ...] = CHECK_BATCHES) -> dict[int, float]:
    """Max abs error of the ONNX file at `path` under onnxruntime against `graph` in PyTorch, per batch size, on
    random inputs; ExportError beyond PARITY_TOLERANCE (relative to the output's scale, at least 1)."""
    session = onnx_session(path)
    generator = torch.Generator().manual_seed(1)
    errors = {}
    for batch in batches:
        inputs = graph.example_inputs(batch, generator)
        with torch.inference_mode():
            want = graph(**inputs)
        got = torch.from_numpy(session.run(None, {k: v.numpy() for k, v in inputs.items()})[0])
        if got.shape != want.shape:
            raise ExportError(f"the exported {graph.name} graph gives shape {tuple(got.shape)} at batch {batch}, "
                              f"PyTorch {tuple(want.shape)}; not written (please report this)")
        errors[batch] = float((got - want).abs().max())
        limit = PARITY_TOLERANCE * max(1.0, float(want.abs().max()))
        if not errors[batch] <= limit:
            raise ExportError(f"the exported {graph.name} graph differs from PyTorch by {errors[batch]:.2e} at batch "
                              f"{batch} (limit {limit:.1e}); not written (please report this)")
    return errors


# --------------------------------------------------------------------------------------------------------------
# Reading an exported graph
# --------------------------------------------------------------------------------------------------------------
def onnx_session(path: str | Path, threads: int | None = None):
    """An onnxruntime session on the CPU with `threads` intra-op threads (default: torch's thread count, so that
    OMP_NUM_THREADS bounds both runtimes alike)."""
    require_export_packages()
    # Optional dependency (the export extra): imported where it is used.
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = threads or torch.get_num_threads()
    options.inter_op_num_threads = 1
    options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_ENABLE_ALL
    return onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def read_metadata(path: str | Path) -> dict[str, Any]:
    """The maetok metadata of an exported graph: graph, version, source, and the source's config (a dict)."""
    require_export_packages()
    # Optional dependency (the export extra): imported where it is used.
    import onnx

    props = {p.key: p.value for p in onnx.load(str(path), load_external_data=False).metadata_props}
    if "maetok_graph" not in props:
        raise ExportError(f"{path}: not a graph exported by maetok (no maetok_graph in its metadata)")
    return {**props, "maetok_config": json.loads(props["maetok_config"])}
