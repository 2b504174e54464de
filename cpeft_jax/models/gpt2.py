"""GPT-2: the shared decoder (llama.py) with learned positions, LayerNorm and a GELU MLP.

Hugging Face's GPT-2 fuses q, k and v into one Conv1D `c_attn`; here they are three
projections (attn/q_proj, k_proj, v_proj), so the paper's presets can treat keys and values
apart (IA3 scales k and v), and the loader splits c_attn into them. The attention output is
attn/c_proj, the MLP mlp/c_fc -> gelu_new -> mlp/c_proj; A = q, k, v, attn/c_proj and
F = c_fc, mlp/c_proj. Embeddings are tied to the LM head as in every GPT-2 checkpoint.
Each difference from Llama is an override of a llama.Block / llama.Decoder hook.
OPT (opt.py) is this decoder with an offset position table and a few options.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import numpy as np

from cpeft_jax.models import attention, llama
from cpeft_jax.models.attention import SubLayer
from cpeft_jax.models.decoder_config import ACTIVATIONS, DTYPES, PROJECTION_NAMES, DecoderConfig


_RecomputedLayerNorm = nn.remat(nn.LayerNorm, prevent_cse=True)


def layer_norm(cfg: DecoderConfig, name: str | None = None) -> nn.Module:
  """The LayerNorm (scale, bias) of GPT-2 and OPT (a block's `make_norm`), recomputed in the
  backward pass (nn.remat, as `attention.recomputed` does for Llama's RMSNorm): the pass keeps
  x, not its float32 statistics and copy."""
  return _RecomputedLayerNorm(cfg.layer_norm_eps, dtype=DTYPES[cfg.dtype],
                              param_dtype=DTYPES[cfg.param_dtype], name=name)


class Attention(attention.Attention):
  biases = True


class DenseMlp(SubLayer):
  """GPT-2/OPT feed-forward: down(act(up(x))), with biases; names from PROJECTION_NAMES."""

  @nn.compact
  def __call__(self, x_BLD, routing):
    cfg = self.cfg
    _, up, down = PROJECTION_NAMES[cfg.arch]
    act = attention.recomputed(ACTIVATIONS[cfg.activation])
    h = act(self.dense(up, cfg.intermediate_size, True)(x_BLD, routing))
    return self.dense(down, cfg.hidden_size, True)(h, routing)


class Block(llama.Block):
  norm_names = ('ln_1', 'ln_2')
  make_norm = staticmethod(layer_norm)
  attention = Attention
  mlp = DenseMlp


class Decoder(llama.Decoder):
  """Token ids or input embeddings plus context ids in, logits out (GPT-2).

  Variables: 'params' (embed_tokens = wte, embed_positions = wpe, layers, norm = ln_f) and
  'adaptors'. Positions default to 0..L-1 (as transformers' GPT-2, whatever the padding).
  """
  arch = 'gpt2'
  block = Block
  position_offset = 0  # row of the position table that position 0 reads (OPT: 2)

  def setup(self):
    super().setup()
    cfg = self.cfg
    self.embed_positions = nn.Embed(cfg.max_positions + self.position_offset, cfg.hidden_size,
                                    embedding_init=nn.initializers.normal(0.01),
                                    param_dtype=DTYPES[cfg.param_dtype])

  def add_positions(self, x_BLD, positions_BL):
    return x_BLD + self.embed_positions(positions_BL + self.position_offset).astype(x_BLD.dtype)

  def rope(self, positions_BL):
    del positions_BL
    return None, None

  def check_positions(self, length, positions_BL):
    """A learned position table has max_positions rows: refuse what would read past it."""
    limit = self.cfg.max_positions
    top = length - 1
    if positions_BL is not None and not isinstance(positions_BL, jax.core.Tracer):
      top = int(np.max(np.asarray(positions_BL), initial=0))
    if top >= limit:
      raise ValueError(f'Position {top} is beyond the {limit} learned positions of this '
                       f'{self.cfg.arch} decoder (model.max_positions={limit}); shorten the '
                       'sequence (or the cache).')
