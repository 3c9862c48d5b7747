"""maetok: masked autoencoders as tokenizers for latent diffusion.

    from maetok import MAETok, SiT, load_tokenizer, load_sit, save_pretrained, push_to_hub
"""
from .diffusion.sit import SiT
from .io import teachers as _teachers  # registers the pretrained auxiliary targets (dinov2, siglip, ...)
from .io.hub_upload import push_to_hub
from .io.pretrained import from_pretrained, load_sit, load_tokenizer, save_pretrained
from .tokenizer.model import MAETok
from .version import __version__

__all__ = ["MAETok", "SiT", "from_pretrained", "load_sit", "load_tokenizer", "push_to_hub", "save_pretrained",
           "__version__"]
