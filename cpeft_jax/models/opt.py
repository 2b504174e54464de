"""OPT: GPT-2's decoder (gpt2.py) with OPT's names, position offset and options.

Differences from GPT-2: the learned position table starts at row 2; q/k/v/out_proj and
fc1 -> relu -> fc2 (A = q, k, v, out_proj; F = fc1, fc2); `pre_norm=False`
(do_layer_norm_before=false, OPT-350m) puts each LayerNorm after its residual add and drops
the final one; `embed_dim` (word_embed_proj_dim) != hidden_size adds project_in/project_out
around the layers. `embed` returns embeddings after project_in, in hidden_size, so image
embeddings spliced into them need no projection of their own.
"""

from __future__ import annotations

import flax.linen as nn

from cpeft_jax.models import gpt2
from cpeft_jax.models.decoder_config import DTYPES


class Block(gpt2.Block):
  norm_names = ('self_attn_layer_norm', 'final_layer_norm')


class Decoder(gpt2.Decoder):
  """Token ids or input embeddings plus context ids in, logits out (OPT).

  Positions default to 0..L-1; transformers' OPT counts only non-padding tokens, which is the
  same for right padding (pass positions_BL for left padding).
  """
  arch = 'opt'
  block = Block
  position_offset = 2

  def setup(self):
    super().setup()
    cfg = self.cfg
    if cfg.embed_dim is not None and cfg.embed_dim != cfg.hidden_size:
      dense = lambda features: nn.Dense(features, use_bias=False, dtype=DTYPES[cfg.dtype],
                                        param_dtype=DTYPES[cfg.param_dtype])
      self.project_in = dense(cfg.hidden_size)
      self.project_out = dense(cfg.embed_dim)
    else:
      self.project_in = self.project_out = None

  def embed(self, tokens_BL):
    x = super().embed(tokens_BL)
    return x if self.project_in is None else self.project_in(x)

  def final_hidden(self, x_BLD):
    x_BLD = super().final_hidden(x_BLD)
    return x_BLD if self.project_out is None else self.project_out(x_BLD)
