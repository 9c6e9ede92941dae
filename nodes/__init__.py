"""ComfyUI nodes of the RCOD extension (classic node API). Each node is a thin wrapper over rcod_core."""

from .common import install_example_image, register_rcod_folder
from .loader import RCODModelLoader
from .metric import RCODLatentMetric
from .stages import RCODDecode, RCODDenoise, RCODEncode, RCODVisualPrompt
from .upscale import RCODRealismSweep, RCODUpscale

register_rcod_folder()
install_example_image()

NODE_CLASS_MAPPINGS = {
    "RCODModelLoader": RCODModelLoader,
    "RCODVisualPrompt": RCODVisualPrompt,
    "RCODLatentMetric": RCODLatentMetric,
    "RCODEncode": RCODEncode,
    "RCODDenoise": RCODDenoise,
    "RCODDecode": RCODDecode,
    "RCODUpscale": RCODUpscale,
    "RCODRealismSweep": RCODRealismSweep,
}

NODE_DISPLAY_NAME_MAPPINGS = {
    "RCODModelLoader": "RCOD Model Loader",
    "RCODVisualPrompt": "RCOD Visual Prompt (VPIM)",
    "RCODLatentMetric": "RCOD Latent Metric",
    "RCODEncode": "RCOD Encode",
    "RCODDenoise": "RCOD One-Step Denoise",
    "RCODDecode": "RCOD Decode",
    "RCODUpscale": "RCOD Upscale",
    "RCODRealismSweep": "RCOD Realism Sweep",
}
