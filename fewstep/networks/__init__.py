"""Networks `F(x / sigma_d, t, labels)`: a UNet for images and an MLP for vectors."""

from fewstep.networks.mlp import MLP
from fewstep.networks.unet import UNet

__all__ = ["MLP", "UNet"]
