"""`maetok push`: a model folder (tokenizer or SiT) onto the Hugging Face hub, with a model card.

    maetok push --model runs/tok/model --repo org/maetok-cifar --metrics runs/pilot/report.json
    maetok sample --model org/sit-cifar --tokenizer org/maetok-cifar --out samples    # anyone, afterwards
"""
from __future__ import annotations

import argparse

from ..io.hub_upload import push_to_hub


def cmd_push(args: argparse.Namespace) -> int:
    url = push_to_hub(args.model, args.repo, private=args.private, token=args.token, metrics=args.metrics,
                      license=args.license)
    print(f"pushed {args.model} to {url}")
    return 0
