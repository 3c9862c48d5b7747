"""`maetok convert official-tokenizer|official-sit`: official checkpoints into maetok weights folders."""
from __future__ import annotations

import argparse

from ..io.convert_sit import convert_official_sit
from ..io.pretrained import convert_official_tokenizer
from .common import CLIError, out_folder


def cmd_convert(args: argparse.Namespace) -> int:
    out = out_folder(args.out, "converted weights")
    if out.is_dir() and any(out.iterdir()) and not args.force:
        raise CLIError(f"--out {out} already exists and is not empty; pass --force to overwrite its files or "
                       f"choose another --out")
    if args.what == "official-tokenizer":
        report = convert_official_tokenizer(args.src, args.out, args.weights, args.config)
        print(report.summary())
    else:
        print(convert_official_sit(args.src, args.out, weights=args.weights, config=args.config).summary())
    print(f"saved to {args.out}")
    return 0
