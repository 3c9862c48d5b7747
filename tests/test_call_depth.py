"""How deep the code is: from `maetok pilot`'s handler down to the attention of the tokenizer being trained.

Measured on the live stack of a real smoke pilot: the first call of `Attention.forward` records the frames of
maetok's own source files between the CLI handler `cmd_pilot` and itself (both counted). PyTorch's module-call
machinery (`Module.__call__` and friends) is not ours and not counted, nor are frames of other libraries.
"""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

import maetok
from maetok.cli import main
from maetok.layers import Attention

PACKAGE_DIR = Path(maetok.__file__).resolve().parent
MAX_DEPTH = 10


class _Reached(Exception):
    pass


def maetok_frames_from(handler: str) -> list[str]:
    """Our frames from the caller up to the handler, outermost first, as "module.function"."""
    frames = []
    frame = sys._getframe(1)
    while frame is not None:
        path = Path(frame.f_code.co_filename).resolve()
        if path.is_relative_to(PACKAGE_DIR):
            frames.append(f"{path.relative_to(PACKAGE_DIR).with_suffix('')}.{frame.f_code.co_qualname}")
            if frame.f_code.co_name == handler:
                return frames[::-1]
        frame = frame.f_back
    raise AssertionError(f"{handler} is not on the stack: {frames[::-1]}")


def test_pilot_handler_to_attention_is_at_most_ten_frames(tmp_path: Path, monkeypatch):
    seen: list[list[str]] = []
    original = Attention.forward

    def recording_forward(self, *args, **kwargs):
        if not seen:
            seen.append(maetok_frames_from("cmd_pilot"))
            raise _Reached
        return original(self, *args, **kwargs)

    recording_forward.__code__ = recording_forward.__code__.replace(
        co_filename=original.__code__.co_filename, co_name="forward", co_qualname="Attention.forward")
    monkeypatch.setattr(Attention, "forward", recording_forward)
    with pytest.raises(_Reached):
        main(["pilot", "--data", "shapes", "--variants", "maetok", "--budget", "smoke", "--out",
              str(tmp_path / "pilot")])
    chain = seen[0]
    print("\n -> ".join(chain))
    assert chain[0].endswith("cmd_pilot") and chain[-1] == "layers.Attention.forward"
    assert len(chain) <= MAX_DEPTH, chain
