"""GPT-2: the shared decoder (llama.py) with learned positions, LayerNorm and a GELU MLP.

Hugging Face's GPT-2 fuses q, k and v into one Conv1D `c_attn`; here they are three
projections (attn/q_proj, k_proj, v_proj), so the paper's presets can treat keys and values
apart (IA3 scales k and v), and the loader splits c_attn into them. The attention output is
attn/c_proj, the MLP mlp/c_fc -> gelu_new -> mlp/c_proj; A = q, k, v, attn/c_proj and
F = c_fc, mlp/c_proj. Embeddings are tied to the LM head as in every GPT-2 checkpoint.
OPT (opt.py) is this decoder with an offset position table and a few options.
"""

from __future__ import annotations

import flax.linen as nn

from cpeft_jax.models import llama
from cpeft_jax.models.llama import DTYPES


class Block(llama.Block):
  norm_names = ('ln_1', 'ln_2')


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
