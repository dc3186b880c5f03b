"""sdengine's own network definitions (plain torch); state_dict keys equal diffusers' / transformers'."""

from .clip import CLIPTextModel
from .controlnet import ControlNetModel
from .layers import EAGER_OPS, Ops, set_ops
from .unet import UNet2DConditionModel
from .vae import AutoencoderKL

__all__ = ["CLIPTextModel", "ControlNetModel", "UNet2DConditionModel", "AutoencoderKL", "Ops", "EAGER_OPS", "set_ops"]
