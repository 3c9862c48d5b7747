"""maetok: masked autoencoders as tokenizers for latent diffusion.

    from maetok import MAETok, SiT
"""
__version__ = "0.1.0"

from .diffusion.sit import SiT  # noqa: E402
from .tokenizer.model import MAETok  # noqa: E402

__all__ = ["MAETok", "SiT", "__version__"]
