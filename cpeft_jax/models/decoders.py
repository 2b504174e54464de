"""The decoder class of a `DecoderConfig`'s architecture (cfg.arch), and its fresh adaptors."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from cpeft_jax import adaptors
from cpeft_jax.adaptors import PeftConfig
from cpeft_jax.models import gpt2, llama, opt
from cpeft_jax.models.decoder_config import DecoderConfig

CLASSES = {'llama': llama.Decoder, 'gpt2': gpt2.Decoder, 'opt': opt.Decoder}


def make_decoder(cfg: DecoderConfig, peft: PeftConfig | None = None,
                 deterministic: bool = True) -> llama.Decoder:
  """The decoder module of `cfg` (every architecture has llama.Decoder's interface)."""
  return CLASSES[cfg.arch](cfg, peft, deterministic=deterministic)


def init_adaptors(cfg: DecoderConfig, peft: PeftConfig | None, seed: int = 0) -> dict:
  """Fresh adaptor tables; only they are computed (the base's init is dead code under jit)."""
  if peft is None or not peft.methods:
    return {}
  model = make_decoder(cfg, peft)
  tokens = jnp.zeros((1, 1), jnp.int32)
  init = lambda key: model.init(key, tokens).get(adaptors.ADAPTORS, {})
  if not jax.tree.leaves(jax.eval_shape(init, jax.random.key(seed))):
    return {}
  return jax.jit(init)(jax.random.key(seed))
