"""SigLIP's vision tower (transformers' SiglipVisionModel) as a `ViT` config.

SigLIP has no class token, a patch bias and a post_layernorm on the last hidden state; its
attention-pooling head (one pooled vector per image) is not part of the encoder. A full
SiglipModel checkpoint carries the tower's shape in config.json's vision_config.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from cpeft_jax.models.vision import ViTConfig, vit_config_from_hf

MODEL_TYPES = ('siglip', 'siglip_vision_model')
# transformers' SiglipVisionConfig defaults, for keys a config.json may omit.
DEFAULTS = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                num_attention_heads=12, num_channels=3, image_size=224, patch_size=16,
                hidden_act='gelu_pytorch_tanh', layer_norm_eps=1e-6)
ARCH = dict(class_token=False, patch_bias=True, pre_norm=False, final_norm=True)


def config_from_hf(hf: Mapping[str, Any], **overrides) -> ViTConfig:
  """The `ViTConfig` of a SigLIP config.json dict; `overrides` set feature_layer, dtype, ..."""
  return vit_config_from_hf(hf, name='SigLIP', model_types=MODEL_TYPES, defaults=DEFAULTS,
                            arch=ARCH, **overrides)
