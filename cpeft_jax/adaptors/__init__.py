"""Context-indexed adaptors: a dense layer with a frozen base and per-context tables.

Every token carries an integer context id. Each adapted projection owns one group of adaptor
parameters per context, stored as tables with a leading context ("row") axis:

  LoRA    lora_a [R, d_in, r], lora_b [R, r, d_out]   (B is zero at init)
  IA3     ia3    [R, d_out] (keys/values) or [R, d_in] (feed-forward input), ones at init
  BitFit  bitfit [R, d_out], zeros at init
  DoRA    lora_a, lora_b as LoRA, plus dora_m [R, d_out], the magnitude (||W||_col at init)

R is the number of *adapted* contexts: a context left out of `PeftConfig.adapted_contexts` has
no row and its tokens see the frozen base only. A layer computes, per token t of context c,

  y_t = ((x_t * ia3_in[c]) @ W + b) * ia3_out[c] + bitfit[c] + scale * dropout(x_t) @ A_c @ B_c

and for a DoRA context (PyTorch PEFT's DoRA, with g_c = m_c / ||W + s_c A_c B_c||_col held
constant in the gradient) y_t = g_c * (x_t @ W + s_c x_t @ A_c @ B_c) + b + bitfit[c].

Each context may have its own methods, rank, alpha, scaling rule, init and dropout
(`PeftConfig.contexts`). The tables are then padded to the largest rank and a static per-row
mask makes the padding inert: it contributes nothing, receives exactly zero gradient, and, being
zero at init, stays zero under Adam. A row whose context lacks a method is masked to the
method's identity (IA3 ones, BitFit zeros) in the same way.

Nothing here ever materialises a per-token copy of a LoRA matrix: tokens are routed once per
forward pass (`route`), then each layer runs one grouped computation (see `LORA_STRATEGIES`).
The base weights live in the 'params' collection, the tables in the 'adaptors' collection, so
the trainable tree and the frozen tree are separate arguments of `Module.apply`.

The rooms: `config` (LoraConfig, ContextSpec, PeftConfig), `targets` (presets and patterns ->
projections), `routing` (context ids -> groups, the one-hot / grouped / ragged LoRA math) and
`dense` (ContextDense, DoRA). Low-precision matmuls live apart, in `cpeft_jax.lowp`.
"""

from cpeft_jax.adaptors.config import (ADAPTORS, LORA_INITS, LORA_STRATEGIES, METHODS,
                                       ContextSpec, LoraConfig, PeftConfig)
from cpeft_jax.adaptors.dense import ContextDense, column_norms, init_dora_magnitudes
from cpeft_jax.adaptors.routing import (BATCH_AXES, Routing, batch_split, check_context_ids,
                                        lora_delta, pick_strategy, route, select,
                                        shard_batch)
from cpeft_jax.adaptors.targets import PRESETS, LayerAdaptor, Projection, resolve_targets
from cpeft_jax.lowp import matmul, matmul_f32

__all__ = [
    'ADAPTORS', 'BATCH_AXES', 'LORA_INITS', 'LORA_STRATEGIES', 'METHODS', 'PRESETS', 'ContextDense',
    'ContextSpec', 'LayerAdaptor', 'LoraConfig', 'PeftConfig', 'Projection', 'Routing',
    'batch_split', 'check_context_ids', 'column_norms', 'init_dora_magnitudes', 'lora_delta', 'matmul',
    'matmul_f32', 'pick_strategy', 'resolve_targets', 'route', 'select',
    'shard_batch',
]
