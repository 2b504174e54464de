"""The paper's fixed-length sequence layout: [BOS] image caption [EOS] [PAD], as numpy arrays.

One row (length L; N image positions; b = 1 with the optional boundary tokens, else 0):

  [BOS] ([BND]) [IMG] x N ([BND]) prompt tokens ... caption tokens ... [EOS] [PAD] ...
  the open boundary sits at position 1 and the close one at N+2; images start at 1+b.

A prompt (a task's question; empty for captioning, which is then the paper's layout) is context
for the caption, here the target: the loss covers the target tokens and the EOS only.

Targets are next tokens: the row is built with L+1 slots and `tokens` = slots [0, L),
`targets` = slots [1, L+1), so `targets[t]` is the token that follows `tokens[t]`. A caption
keeps at most `caption_budget(N, L)` = L - 1 - N - 2b tokens and its EOS is always kept: when
the caption fills the budget, the EOS exists only as the target of the last position. With the
paper's L=128, N=64 this is up to 63 caption tokens + EOS, and the loss covers exactly the last
64 positions (the last image position predicts the first caption token). A prompt is kept
whole and shares the budget: the target keeps at most budget - len(prompt) tokens.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from cpeft_jax import contexts
from cpeft_jax.contexts import Kind


def caption_budget(num_image_tokens: int, seq_len: int, boundary: bool = False) -> int:
  """The most caption tokens (EOS excluded) a row of length `seq_len` holds."""
  return seq_len - 1 - num_image_tokens - (2 if boundary else 0)


def layout_captions(
    captions: Sequence[Sequence[int]],
    *,
    num_image_tokens: int,
    seq_len: int,
    bos_id: int,
    eos_id: int,
    pad_id: int,
    boundary: bool = False,
    boundary_ids: tuple[int, int] | None = None,
    context_map: Mapping[str, int] | str | None = None,
    prompts: Sequence[Sequence[int]] | None = None,
    task_ids: Sequence[int] | None = None,
    task_names: Sequence[str] = ('caption',),
) -> dict[str, np.ndarray]:
  """Lays out a batch of tokenized captions (no BOS/EOS) into static [B, L] arrays.

  Image (and boundary) positions hold `pad_id` in `tokens`; the model splices embeddings
  there. `boundary_ids` gives real token ids for the (open, close) boundary positions instead.
  `prompts` (one per caption, may be empty) go between the image and the caption as
  `Kind.PROMPT` tokens. `task_ids` (indices into `task_names`, one per row) are the task factor
  of context rules.
  Returns a dict of numpy arrays:
    tokens [B,L] int32, targets [B,L] int32 (next token; pad_id past the EOS),
    kinds [B,L] int32 (`Kind`), target_kinds [B,L] int32 (kind of each target),
    image_mask [B,L] bool, attention_mask [B,L] bool (False on PAD),
    loss_mask [B,L] float32 (1 where the target is a caption token or the EOS),
    num_dropped [B] int32 (caption tokens cut by truncation),
    context_ids [B,L] int32 (only when `context_map` is given: a preset, a kind map or rules;
      see `contexts.sequence_contexts`).
  """
  budget = _check_sizes(num_image_tokens, seq_len, boundary)
  open_id, close_id = _check_ids(bos_id, eos_id, pad_id, boundary, boundary_ids)

  num_rows = len(captions)
  if prompts is not None and len(prompts) != num_rows:
    raise ValueError(f'{len(prompts)} prompts for {num_rows} captions; expected one per caption')
  width = seq_len + 1  # one extra slot so targets are a plain shift
  slots_BW = np.full((num_rows, width), pad_id, np.int32)
  kinds_BW = np.full((num_rows, width), Kind.PAD, np.int32)
  num_dropped_B = np.zeros(num_rows, np.int32)

  # The prefix is the same for every row.
  prefix_kinds = [Kind.BOS] + [Kind.BOUNDARY] * boundary + [Kind.IMAGE] * num_image_tokens
  prefix_kinds += [Kind.BOUNDARY] * boundary
  prefix_ids = [bos_id] + [open_id] * boundary + [pad_id] * num_image_tokens
  prefix_ids += [close_id] * boundary
  start = len(prefix_ids)
  slots_BW[:, :start] = prefix_ids
  kinds_BW[:, :start] = prefix_kinds

  for row, caption in enumerate(captions):
    caption = _check_caption(row, caption, bos_id, eos_id)
    prompt = (_check_caption(row, prompts[row], bos_id, eos_id, 'prompt')
              if prompts is not None else caption[:0])
    if len(prompt) >= budget:
      raise ValueError(f'prompt {row} has {len(prompt)} tokens; a row of seq_len={seq_len} with '
                       f'{num_image_tokens} image tokens holds at most {budget - 1} prompt tokens '
                       '(and one caption token)')
    num_dropped_B[row] = _fill_row(slots_BW[row], kinds_BW[row], start, prompt, caption,
                                   budget, eos_id)
  batch = _shifted(slots_BW, kinds_BW, num_dropped_B)
  if context_map is not None:
    batch['context_ids'] = contexts.sequence_contexts(context_map, batch['kinds'], task_ids,
                                                      task_names)
  return batch


def _check_ids(bos_id, eos_id, pad_id, boundary, boundary_ids) -> tuple[int, int]:
  """Checks the special ids; returns the (open, close) ids of the boundary positions."""
  for name, value in (('bos_id', bos_id), ('eos_id', eos_id), ('pad_id', pad_id)):
    _check_id(name, value)
  if boundary_ids is None:
    return pad_id, pad_id
  if not boundary:
    raise ValueError(f'boundary_ids={boundary_ids} given but boundary=False')
  if len(boundary_ids) != 2:
    raise ValueError(f'boundary_ids must be (open_id, close_id), got {boundary_ids}')
  for value in boundary_ids:
    _check_id('boundary_ids', value)
  return tuple(boundary_ids)


def _fill_row(slots_W, kinds_W, start: int, prompt, caption, budget: int, eos_id: int) -> int:
  """Writes prompt, caption (cut to the budget) and EOS after the prefix; returns the number
  of caption tokens cut."""
  slots_W[start:start + len(prompt)] = prompt
  kinds_W[start:start + len(prompt)] = Kind.PROMPT
  kept = caption[:budget - len(prompt)]
  begin = start + len(prompt)
  end = begin + len(kept)
  slots_W[begin:end] = kept
  kinds_W[begin:end] = Kind.TEXT
  slots_W[end] = eos_id
  kinds_W[end] = Kind.EOS
  return len(caption) - len(kept)


def _shifted(slots_BW, kinds_BW, num_dropped_B) -> dict[str, np.ndarray]:
  """The batch arrays of rows one slot longer than seq_len: inputs and next-token targets."""
  kinds_BL, target_kinds_BL = kinds_BW[:, :-1], kinds_BW[:, 1:]
  return {
      'tokens': np.ascontiguousarray(slots_BW[:, :-1]),
      'targets': np.ascontiguousarray(slots_BW[:, 1:]),
      'kinds': np.ascontiguousarray(kinds_BL),
      'target_kinds': np.ascontiguousarray(target_kinds_BL),
      'image_mask': kinds_BL == Kind.IMAGE,
      'attention_mask': kinds_BL != Kind.PAD,
      'loss_mask': np.isin(target_kinds_BL, (Kind.TEXT, Kind.EOS)).astype(np.float32),
      'num_dropped': num_dropped_B,
  }


def truncation(batch: Mapping[str, np.ndarray]) -> tuple[int, int]:
  """(captions truncated, caption tokens dropped) of a batch from `layout_captions`."""
  num_dropped_B = np.asarray(batch['num_dropped'])
  return int((num_dropped_B > 0).sum()), int(num_dropped_B.sum())


def _check_sizes(num_image_tokens: int, seq_len: int, boundary: bool) -> int:
  if num_image_tokens < 0:
    raise ValueError(f'num_image_tokens must be >= 0, got {num_image_tokens}')
  budget = caption_budget(num_image_tokens, seq_len, boundary)
  if budget < 1:
    need = seq_len - budget + 1
    raise ValueError(
        f'seq_len={seq_len} is too small for num_image_tokens={num_image_tokens}'
        f'{" with boundary tokens" if boundary else ""}: expected seq_len >= {need} '
        '(BOS, image positions, boundary tokens and at least one caption token)')
  return budget


def _check_id(name: str, value: int) -> None:
  if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 0:
    raise ValueError(f'{name} must be a token id (int >= 0), got {value!r}')


def _check_caption(row: int, caption: Sequence[int], bos_id: int, eos_id: int,
                   what: str = 'caption') -> np.ndarray:
  caption = np.asarray(caption)
  if caption.ndim != 1 or (caption.size and not np.issubdtype(caption.dtype, np.integer)):
    raise ValueError(f'{what} {row} must be a 1-D sequence of token ids, got {caption!r}')
  if caption.size and caption.min() < 0:
    raise ValueError(f'{what} {row} has negative token id {caption.min()}')
  for name, special in (('bos_id', bos_id), ('eos_id', eos_id)):
    hits = np.flatnonzero(caption == special)
    if hits.size:
      raise ValueError(f'{what} {row} contains {name}={special} at position {hits[0]}; '
                       f'tokenize {what}s without special tokens (the layout adds them)')
  return caption.astype(np.int32)
