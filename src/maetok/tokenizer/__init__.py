"""The MAETok tokenizer: encoder, masking, decoders, auxiliary targets, losses and the official converter."""
from .domain_targets import FrequencyTarget, TextureTarget  # also registers `texture` and `frequency`
from .model import MAETok, TokenizerOutput

__all__ = ["MAETok", "TokenizerOutput", "TextureTarget", "FrequencyTarget"]
