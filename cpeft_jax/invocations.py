"""Invocation sequences -> context ids: PEFT's activated LoRA, for many adaptors at once.

An invocation map {context id: token-id sequence} switches a row to a context where one of the
sequences occurs (`invocation_contexts`); a token's context depends only on earlier tokens, so
the keys and values before a batch's first invocation are the base context's
(`reusable_prefix`). The other ways of giving tokens contexts (kind, role, task, rules) are in
`contexts`. Everything here is numpy: the data side and evaluation emit the ids.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np


def check_invocations(invocations: Mapping[int, Sequence[int]], base_context: int = 0,
                      num_contexts: int | None = None) -> dict[int, tuple[int, ...]]:
  """Checks an invocation map {context id: token-id sequence} and returns it with tuples."""
  if isinstance(base_context, bool) or not isinstance(base_context, (int, np.integer)) or (
      base_context < 0):
    raise ValueError(f'base_context must be an int >= 0, got {base_context!r}')
  if not isinstance(invocations, Mapping) or not invocations:
    raise ValueError('invocations must be a non-empty dict {context id: token-id sequence}, got '
                     f'{invocations!r}')
  out, owner = {}, {}
  for ctx, seq in invocations.items():
    if isinstance(ctx, bool) or not isinstance(ctx, (int, np.integer)) or ctx < 0:
      raise ValueError(f'invocation context id must be an int >= 0, got {ctx!r}')
    if num_contexts is not None and ctx >= num_contexts:
      raise ValueError(f'invocation context {ctx} is out of range for num_contexts='
                       f'{num_contexts} (valid ids are 0..{num_contexts - 1})')
    if ctx == base_context:
      raise ValueError(f'invocation context {ctx} is the base context; an invocation must switch '
                       'to another context')
    seq = np.asarray(seq)
    if seq.ndim != 1 or seq.size == 0 or not np.issubdtype(seq.dtype, np.integer) or (
        seq.min() < 0):
      raise ValueError(f'the invocation sequence of context {ctx} must be a non-empty 1-D '
                       f'sequence of token ids >= 0, got {invocations[ctx]!r}')
    seq = tuple(int(t) for t in seq)
    if seq in owner:
      raise ValueError(f'contexts {owner[seq]} and {ctx} share the invocation sequence {list(seq)}')
    owner[seq] = int(ctx)
    out[int(ctx)] = seq
  if num_contexts is not None and not 0 <= base_context < num_contexts:
    raise ValueError(f'base_context={base_context} is out of range for num_contexts='
                     f'{num_contexts}')
  return out


def invocation_contexts(tokens_BL: np.ndarray, invocations: Mapping[int, Sequence[int]],
                        base_context: int = 0, *, attention_mask_BL: np.ndarray | None = None,
                        num_contexts: int | None = None) -> np.ndarray:
  """[B, L] context ids: each row switches context where an invocation sequence starts.

  `invocations` maps a context id to its token-id sequence. A row's tokens before the first
  occurrence of any sequence keep `base_context`; from the start of an occurrence (the
  invocation tokens included, as PEFT's activated LoRA) the row is in that sequence's context,
  until an occurrence of another sequence starts, which switches again (a repeat of the current
  sequence changes nothing). Two sequences starting at the same position: the longer one wins.
  Only occurrences lying wholly in non-padding tokens count (`attention_mask_BL`, True = token);
  padding stays `base_context`. With `num_contexts`, ids must lie in [0, num_contexts).
  Since a token's context depends only on earlier tokens, the keys and values before a row's
  first invocation are the base context's: a cache the base model computed stays valid.
  """
  invocations = check_invocations(invocations, base_context, num_contexts)
  tokens_BL = np.asarray(tokens_BL)
  if tokens_BL.ndim != 2 or (tokens_BL.size and not np.issubdtype(tokens_BL.dtype, np.integer)):
    raise ValueError(f'tokens_BL must be a 2-D integer array, got shape {tokens_BL.shape} and '
                     f'dtype {tokens_BL.dtype}')
  B, L = tokens_BL.shape
  valid_BL = (np.ones((B, L), bool) if attention_mask_BL is None
              else np.asarray(attention_mask_BL, bool))
  if valid_BL.shape != (B, L):
    raise ValueError(f'attention_mask_BL has shape {valid_BL.shape}; expected the token shape '
                     f'{(B, L)}')
  start_BL = np.full((B, L), -1, np.int64)  # context of the occurrence starting at each position
  for ctx, seq in sorted(invocations.items(), key=lambda kv: len(kv[1])):  # longer ones last
    n = len(seq)
    if n > L:
      continue
    windows_BWN = np.lib.stride_tricks.sliding_window_view(np.where(valid_BL, tokens_BL, -1),
                                                           n, axis=1)
    hit_BW = (windows_BWN == np.asarray(seq)).all(-1)
    start_BL[:, :L - n + 1][hit_BW] = ctx
  # Forward-fill: each position takes the context of the latest occurrence starting at or before it.
  last_BL = np.maximum.accumulate(np.where(start_BL >= 0, np.arange(L), -1), axis=1)
  ctx_BL = np.where(last_BL >= 0, np.take_along_axis(start_BL, np.maximum(last_BL, 0), 1),
                    base_context)
  return np.where(valid_BL, ctx_BL, base_context).astype(np.int32)


def reusable_prefix(context_ids_BL: np.ndarray, base_context: int = 0) -> int:
  """Length of the leading positions that are `base_context` in every row (all of L if none
  leaves it): the prefix whose keys and values a base-model cache already holds."""
  away_BL = np.asarray(context_ids_BL) != base_context
  firsts = np.where(away_BL.any(1), away_BL.argmax(1), away_BL.shape[1])
  return int(firsts.min(initial=away_BL.shape[1]))
