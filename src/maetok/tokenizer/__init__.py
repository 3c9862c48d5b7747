"""The MAETok tokenizer: encoder, masking, decoders, auxiliary targets, losses and the official converter."""
from .model import MAETok, TokenizerOutput

__all__ = ["MAETok", "TokenizerOutput"]
