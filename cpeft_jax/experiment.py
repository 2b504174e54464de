"""What a config builds: the objects an experiment's ConfigDict describes (PEFT, decoder)."""

from __future__ import annotations

import ml_collections

from cpeft_jax.adaptors import PeftConfig
from cpeft_jax.models.llama import DecoderConfig


def peft_config(config: ml_collections.ConfigDict) -> PeftConfig:
  """config.peft as a PeftConfig; peft.plugins (plug-in directories that train/loop.py loads
  into the tables) is not one of its fields."""
  d = config.peft.to_dict() if hasattr(config.peft, 'to_dict') else dict(config.peft)
  return PeftConfig.from_dict({k: v for k, v in d.items() if k != 'plugins'})


def decoder_config(config: ml_collections.ConfigDict) -> DecoderConfig:
  return DecoderConfig.from_dict(config.model)
