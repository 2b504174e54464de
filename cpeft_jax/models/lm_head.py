"""The LM head as a value: its weight in the compute dtype and the one matmul that makes logits.

The decoder's `_head` multiplies through it, and its `features` entry point hands it out beside
the final hidden states, so the loss (cpeft_jax/losses.py) can compute the logits a chunk of
tokens at a time instead of all [B, L, V] of them: one head code for both.
"""

from __future__ import annotations

import flax
import jax

from cpeft_jax import lowp


@flax.struct.dataclass
class LMHead:
  """weight: an untied head's kernel [D, V], or with `vocab_major` the tied embedding table
  [V, D] read as it is stored (no transposed copy); in the compute dtype, dequantized if the
  base is quantized. A pytree, so its gradient is an LMHead too (a trainable head)."""
  weight: jax.Array
  vocab_major: bool = flax.struct.field(pytree_node=False, default=False)

  @property
  def vocab_size(self) -> int:
    return self.weight.shape[0 if self.vocab_major else 1]

  def logits(self, x_TD) -> jax.Array:
    """Float32 logits [..., V] straight from the accumulator of a compute-dtype matmul."""
    w = self.weight.T if self.vocab_major else self.weight
    return lowp.matmul_f32(x_TD.astype(self.weight.dtype), w)
