"""`maetok export --model DIR --format onnx --out FILE`: a tokenizer's pixel decoder, or a SiT's velocity model, as
an ONNX graph with a dynamic batch axis (see maetok.io.export for what each graph takes and gives)."""
from __future__ import annotations

import argparse
from pathlib import Path

from ..io.export import export_onnx
from .common import CLIError


def cmd_export(args: argparse.Namespace) -> int:
    out = Path(args.out)
    if out.is_file() and not args.force:
        raise CLIError(f"--out {out} already exists; pass --force to replace it or choose another --out")
    report = export_onnx(args.model, out)  # an ExportError is one line with exit code 2 (commands.common)
    print(report.summary())
    return 0
