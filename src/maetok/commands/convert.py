"""`maetok convert official-tokenizer|official-sit`: official checkpoints into maetok weights folders."""
from __future__ import annotations

import argparse
from pathlib import Path

from safetensors import SafetensorError

from ..io.convert_sit import (ConversionError, ConversionReport, _find_weights, convert_official_sit,
                               load_official_state_dict)
from ..io.hub import quiet_pickle_protocol, safetensors_refusal, weights_only_refusal
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
        print(convert_sit(args).summary())
    print(f"saved to {args.out}")
    return 0


def convert_sit(args: argparse.Namespace) -> ConversionReport:
    """`convert_official_sit`, with a weights file it cannot read reported as UnreadableFileError, one line naming
    the file: the converter's own errors for it do not name it (safetensors) or quote torch's message, a page
    for a pickle."""
    try:
        with quiet_pickle_protocol():
            return convert_official_sit(args.src, args.out, weights=args.weights, config=args.config)
    except SafetensorError as e:
        raise safetensors_refusal(sit_weights_file(args), e) from None
    except ConversionError as e:
        if e.__cause__ is not None and raised_in(e, load_official_state_dict):  # what torch.load raised
            raise weights_only_refusal(sit_weights_file(args), e.__cause__) from e
        raise


def sit_weights_file(args: argparse.Namespace) -> Path:
    """The weights file `convert_official_sit` reads for these arguments (by its own rule)."""
    src = Path(args.src)
    return _find_weights(src, args.weights) if src.is_dir() else src


def raised_in(error: BaseException, function) -> bool:
    """Whether `error` was raised by the code of `function` itself, not by a function it called."""
    tb = error.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    return tb is not None and tb.tb_frame.f_code is function.__code__
