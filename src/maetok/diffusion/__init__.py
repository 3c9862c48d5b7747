"""Latent diffusion on 1D tokens: SiT / LightningDiT, flow-matching transport, samplers (official conversion: maetok.io.convert_sit)."""
from maetok.diffusion.samplers import euler_maruyama, euler_ode, heun_ode, sample
from maetok.diffusion.sit import (SIT_SIZES, LightningDiT_XL, SiT, SiT_B, SiT_L, SiT_S, SiT_tiny, SiT_XL,
                                  sit_config)
from maetok.diffusion.transport import (interpolate, path_coefficients, sample_time, training_loss,
                                        velocity_to_eps, velocity_to_score, velocity_to_x0)

__all__ = [
    "SiT", "SIT_SIZES", "sit_config", "SiT_S", "SiT_B", "SiT_L", "SiT_XL", "SiT_tiny", "LightningDiT_XL",
    "training_loss", "interpolate", "path_coefficients", "sample_time", "velocity_to_x0", "velocity_to_eps",
    "velocity_to_score", "sample", "euler_ode", "heun_ode", "euler_maruyama",
]
