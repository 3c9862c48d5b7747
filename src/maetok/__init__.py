"""maetok: masked autoencoders as tokenizers for latent diffusion."""
__version__ = "0.1.0"
