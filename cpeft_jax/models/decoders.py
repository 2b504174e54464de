"""The decoder class of a `DecoderConfig`'s architecture (cfg.arch)."""

from __future__ import annotations

from cpeft_jax.adaptors import PeftConfig
from cpeft_jax.models import gpt2, llama, opt
from cpeft_jax.models.decoder_config import DecoderConfig

CLASSES = {'llama': llama.Decoder, 'gpt2': gpt2.Decoder, 'opt': opt.Decoder}


def make_decoder(cfg: DecoderConfig, peft: PeftConfig | None = None,
                 deterministic: bool = True) -> llama.Decoder:
  """The decoder module of `cfg` (every architecture has llama.Decoder's interface)."""
  return CLASSES[cfg.arch](cfg, peft, deterministic=deterministic)
