"""ctprep_train.model: the 3D anatomy-aware CT vision encoder, the text tower and CTCLIP.

Public API: ``create_model``, ``list_models``, ``save_pretrained``, ``load_pretrained``, ``CTCLIP``
and the parts named in docs/architecture.md.
"""

from .anatomical_encoder import AnatomicalStructureEncoder, patch_region_fraction
from .block import TokenContext, TransformerBlock
from .clip import CTCLIP
from .config import CTCLIPConfig, TextConfig, VisionConfig
from .factory import create_model, get_model_config, list_models, load_pretrained, save_pretrained
from .input_norm import HUWindow
from .patch_embed import SinusoidalPositionalEmbedding3D, ThreeDPatchEmbedding, num_tokens
from .region_attention import HybridAttention, RegionAwareAttention
from .slice_attention import SliceAwareAttention
from .text_encoder import TextEncoder
from .vision_encoder import VisionEncoder3D

__all__ = [
    "AnatomicalStructureEncoder", "CTCLIP", "CTCLIPConfig", "HUWindow", "HybridAttention",
    "RegionAwareAttention", "SinusoidalPositionalEmbedding3D", "SliceAwareAttention", "TextConfig",
    "TextEncoder", "ThreeDPatchEmbedding", "TokenContext", "TransformerBlock", "VisionConfig",
    "VisionEncoder3D", "create_model", "get_model_config", "list_models", "load_pretrained",
    "num_tokens", "patch_region_fraction", "save_pretrained",
]
