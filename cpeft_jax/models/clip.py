"""CLIP's vision tower (transformers' CLIPVisionModel) as a `ViT` config.

CLIP puts a class token ahead of the patches, has no patch bias, normalises the embeddings
(pre_layrnorm) and returns its last hidden state un-normalised: its post_layernorm only serves
the pooled class token, which the encoder does not compute. A full CLIPModel checkpoint carries
the tower's shape in config.json's vision_config.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from cpeft_jax.models.vision import ViTConfig, vit_config_from_hf

MODEL_TYPES = ('clip', 'clip_vision_model')
# transformers' CLIPVisionConfig defaults, for keys a config.json may omit.
DEFAULTS = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                num_attention_heads=12, num_channels=3, image_size=224, patch_size=32,
                hidden_act='quick_gelu', layer_norm_eps=1e-5)
ARCH = dict(class_token=True, patch_bias=False, pre_norm=True, final_norm=False)


def config_from_hf(hf: Mapping[str, Any], **overrides) -> ViTConfig:
  """The `ViTConfig` of a CLIP config.json dict; `overrides` set feature_layer, dtype, ..."""
  return vit_config_from_hf(hf, name='CLIP', model_types=MODEL_TYPES, defaults=DEFAULTS,
                            arch=ARCH, **overrides)
