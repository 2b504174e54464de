"""Generation after an invocation sequence, reusing the base model's key/value cache.

PEFT's activated LoRA switches one adaptor on from an invocation sequence onwards, so the keys
and values of the earlier tokens are the base model's and a cache the base computed (e.g. of a
shared conversation) is reused as it is. Here every row may invoke its own adaptor
(`invocations.invocation_contexts`): the base context (0 by default) must have no adaptor rows
(`PeftConfig.adapted_contexts` leaves it out, or its per-context spec is {'methods': 'none'}).

  cache = prefill_base(base_or_adapted_decoder, variables, prefix_BP, max_len=...)
  out_BT = generate_from_cache(decoder, variables, cache, rest_BS, context_ids_BS, ...)

`generate_invoked` does both for whole prompts: it splits them at the earliest invocation of
the batch (`invocations.reusable_prefix`), so only the rest is run with the adaptors. Generated
tokens stay in the context of their row's last prompt token (its invocation's, or the base's).
"""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from cpeft_jax import invocations as invocations_lib
from cpeft_jax.evaluation import generate as gen
from cpeft_jax.models.attention import KVCache
from cpeft_jax.models.llama import Decoder


def check_base_context(model: Decoder, base_context: int):
  """Raises unless `base_context` is a context of `model` that has no adaptor rows."""
  if model.peft is None:
    if base_context != 0:
      raise ValueError(f'base_context={base_context}: a decoder without PEFT has context 0 only.')
    return
  if not 0 <= base_context < model.peft.num_contexts:
    raise ValueError(f'base_context={base_context} is not a context of the model (valid ids are '
                     f'0..{model.peft.num_contexts - 1}).')
  if model.peft.methods and base_context in model.peft.rows:
    raise ValueError(f'base context {base_context} has adaptor rows, so its keys and values are '
                     "not the base model's; leave it out of peft.adapted_contexts or give it "
                     "{'methods': 'none'} in peft.contexts.")


def _left_padded(mask, shape, name, last_true):
  mask = np.ones(shape, bool) if mask is None else np.asarray(mask, bool)
  if mask.shape != tuple(shape) or np.any(mask[:, 1:] < mask[:, :-1]) or (
      last_true and not np.all(mask[:, -1])):
    raise ValueError(f'{name} must have the token shape {tuple(shape)} and pad on the left only '
                     f'(each row False..False True..True); got\n{mask}')
  return mask


def prefill_base(model: Decoder, variables, tokens_BP, *, max_len: int,
                 attention_mask_BP=None, base_context: int = 0) -> KVCache:
  """The base model's cache [.., max_len, ..] of left-padded prompts, all in `base_context`.

  `model` is the adapted decoder or a plain one (peft=None) on the same params: both give the
  same keys and values, since the base context has no adaptor.
  """
  tokens_BP = np.asarray(tokens_BP)
  check_base_context(model, base_context)
  mask_BP = _left_padded(attention_mask_BP, tokens_BP.shape, 'attention_mask_BP', False)
  if not isinstance(max_len, int) or max_len < tokens_BP.shape[1]:
    raise ValueError(f'max_len={max_len!r} must be an int >= the prompt length '
                     f'{tokens_BP.shape[1]}.')
  cache = KVCache.create(model.cfg, tokens_BP.shape[0], max_len)
  if tokens_BP.shape[1] == 0:
    return cache
  return _prefiller(model, base_context)(variables, jnp.asarray(tokens_BP, jnp.int32),
                                         jnp.asarray(mask_BP), cache)


def generate_from_cache(model: Decoder, variables, cache: KVCache, tokens_BS, context_ids_BS, *,
                        max_new_tokens: int, eos_id: int, attention_mask_BS=None,
                        pad_id: int = 0, num_beams: int = 1,
                        length_penalty: float = 1.0) -> jax.Array:
  """Continuations [B, max_new_tokens] of cached prompts extended by tokens_BS.

  The S tokens (e.g. the invocation and what follows it) run with their context ids into the
  cache after its filled slots; then greedy (num_beams=1) or beam search, each generated token
  in the context of its row's last prompt token. A row may still be left padding in tokens_BS
  (attention_mask_BS) if its cached part is all padding. The cache's keys and values are read,
  never recomputed. The cache needs room for S + max_new_tokens - 1 more slots.
  """
  tokens_BS = np.asarray(tokens_BS)
  ctx_BS = np.asarray(context_ids_BS)
  B, S = tokens_BS.shape
  if S == 0 or ctx_BS.shape != (B, S):
    raise ValueError(f'tokens_BS (shape {tokens_BS.shape}) must hold at least one token per row '
                     f'and context_ids_BS (shape {ctx_BS.shape}) the same shape.')
  mask_BS = _left_padded(attention_mask_BS, (B, S), 'attention_mask_BS', True)
  gen.check_request(model.cfg.vocab_size, model.peft, max_new_tokens, eos_id, pad_id, 0, num_beams)
  num_contexts = model.peft.num_contexts if model.peft is not None else 1
  contexts_ok = ctx_BS.size == 0 or (np.issubdtype(ctx_BS.dtype, np.integer) and
                                     ctx_BS.min() >= 0 and ctx_BS.max() < num_contexts)
  if not contexts_ok:
    raise ValueError(f'context_ids_BS must be ints in [0, {num_contexts}) (num_contexts), got '
                     f'values {sorted(set(ctx_BS.ravel().tolist()))}.')
  used = int(cache.index)
  if cache.valid_BM.shape[0] != B:
    raise ValueError(f'The cache holds {cache.valid_BM.shape[0]} rows; tokens_BS has {B}.')
  if used + S + max_new_tokens - 1 > cache.max_len:
    raise ValueError(f'The cache (max_len={cache.max_len}, {used} slots filled) has no room for '
                     f'{S} prompt tokens and {max_new_tokens} new tokens; it needs max_len >= '
                     f'{used + S + max_new_tokens - 1}.')
  run = _continuer(model, max_new_tokens, eos_id, pad_id, num_beams, float(length_penalty))
  return run(variables, cache, jnp.asarray(tokens_BS, jnp.int32), jnp.asarray(ctx_BS, jnp.int32),
             jnp.asarray(mask_BS))


def generate_invoked(model: Decoder, variables, tokens_BP,
                     invocations: Mapping[int, Sequence[int]], *, max_new_tokens: int,
                     eos_id: int, attention_mask_BP=None, base_context: int = 0,
                     base_model: Decoder | None = None, pad_id: int = 0, num_beams: int = 1,
                     length_penalty: float = 1.0) -> jax.Array:
  """Continuations [B, max_new_tokens] of left-padded prompts with invocation-triggered contexts.

  The prompts' leading positions before the batch's earliest invocation are prefilled by
  `base_model` (default: `model` itself, in the unadapted base context); the rest runs with the
  invocation contexts. The same tokens come out as prefilling everything with those contexts.
  """
  tokens_BP = np.asarray(tokens_BP)
  if tokens_BP.ndim != 2 or tokens_BP.shape[1] == 0:
    raise ValueError(f'tokens_BP must be [batch, prompt length >= 1], got shape {tokens_BP.shape}.')
  mask_BP = _left_padded(attention_mask_BP, tokens_BP.shape, 'attention_mask_BP', True)
  num_contexts = model.peft.num_contexts if model.peft is not None else 1
  ctx_BP = invocations_lib.invocation_contexts(tokens_BP, invocations, base_context,
                                               attention_mask_BL=mask_BP,
                                               num_contexts=num_contexts)
  check_base_context(model, base_context)
  P = tokens_BP.shape[1]
  # The rest holds >= 1 token.
  P0 = min(invocations_lib.reusable_prefix(ctx_BP, base_context), P - 1)
  cache = prefill_base(base_model or model, variables, tokens_BP[:, :P0],
                       max_len=P + max_new_tokens - 1, attention_mask_BP=mask_BP[:, :P0],
                       base_context=base_context if base_model is None else 0)
  return generate_from_cache(model, variables, cache, tokens_BP[:, P0:], ctx_BP[:, P0:],
                             attention_mask_BS=mask_BP[:, P0:], max_new_tokens=max_new_tokens,
                             eos_id=eos_id, pad_id=pad_id, num_beams=num_beams,
                             length_penalty=length_penalty)


@functools.lru_cache(maxsize=16)
def _prefiller(model, base_context):
  @jax.jit
  def run(variables, tokens_BP, mask_BP, cache):
    positions_BP = jnp.maximum(jnp.cumsum(mask_BP, 1) - 1, 0).astype(jnp.int32)
    ctx_BP = None if model.peft is None else jnp.full_like(tokens_BP, base_context)
    _, cache = model.apply(variables, tokens_BP, context_ids_BL=ctx_BP,
                           attention_mask_BL=mask_BP, positions_BL=positions_BP, cache=cache)
    return cache
  return run


@functools.lru_cache(maxsize=16)
def _continuer(model, max_new_tokens, eos_id, pad_id, num_beams, length_penalty):
  model = model.clone(cfg=gen.unrolled(model.cfg))

  @jax.jit
  def run(variables, cache, tokens_BS, ctx_BS, mask_BS):
    B = tokens_BS.shape[0]
    # Positions count non-padding tokens only (as generate_text with left padding).
    seen_B = jnp.sum(cache.valid_BM, 1, dtype=jnp.int32)
    positions_BS = seen_B[:, None] + jnp.maximum(jnp.cumsum(mask_BS, 1) - 1, 0).astype(jnp.int32)
    apply = gen.stepper(model.apply, gen.layout(model, variables))
    logits_B1V, cache = apply(tokens_BS, context_ids_BL=ctx_BS, attention_mask_BL=mask_BS,
                              positions_BL=positions_BS, cache=cache, logits_to_keep=1)
    gen_ctx_B = ctx_BS[:, -1]

    def step(tokens_N, positions_N, cache):  # N = B * beams, rows ordered (b, beam)
      ctx_N = jnp.repeat(gen_ctx_B, tokens_N.shape[0] // B)
      logits, cache = apply(tokens_N[:, None], context_ids_BL=ctx_N[:, None],
                            positions_BL=positions_N[:, None], cache=cache)
      return logits[:, 0], cache
    return gen.search(step, logits_B1V[:, -1], cache, positions_BS[:, -1] + 1, max_new_tokens,
                       eos_id, pad_id, num_beams, length_penalty)
  return run
