"""Token kinds, chat roles and tasks -> context ids: which adaptor group each token uses.

The data layout labels every position with a token kind (`Kind`); a context map (a dict from
kind name to context id) turns kinds into the integer context ids that the adaptors index.
A new way of splitting contexts (modality, role, task) is a new map, not a model change:

  kind   `context_ids(kinds_BL, {'image': 1, 'text': 0, ...})`
  role   `chat_roles(tokenizer, messages)` labels each token system/user/assistant from the
         tokenizer's chat template; `factor_contexts(roles_L, ROLES, {'user': 1, ...})`
  task   `task_contexts(task_B, length, {'caption': 0, 'qa': 1})`, one task per example
  product  `rule_contexts({'kind=image&role=user': 2, 'role=assistant': 1, '*': 0}, ...)`
  invocation  `invocations.invocation_contexts(tokens_BL, {1: [31, 7], 2: [40]})`: tokens from
         an invocation sequence onwards in that sequence's context (PEFT's activated LoRA)
  config `data.context_map`: a preset, a kind map or rules (a dict, or 'kind=image:1;*:0');
         `sequence_contexts` gives laid-out rows their ids from kinds and each row's task

Everything here is numpy (and a tokenizer for roles): the data side emits the ids.
"""

from __future__ import annotations

import enum
import itertools
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np


class Kind(enum.IntEnum):
  """What a sequence position holds; stored as small ints in `kinds_BL` arrays."""

  PAD = 0
  BOS = 1
  IMAGE = 2
  TEXT = 3  # caption tokens
  EOS = 4
  BOUNDARY = 5  # learned tokens just before and after the image segment
  PROMPT = 6  # a task's prompt (e.g. a question): context for the target, never predicted


KIND_NAMES = tuple(k.name.lower() for k in Kind)
PRESETS = ('agnostic', 'modality')


def preset(name: str, *, boundary: int | None = None) -> dict[str, int]:
  """Returns a named context map.

  'agnostic': every kind is context 0 (plain PEFT). 'modality': image 1, everything else 0;
  boundary tokens join the image context unless `boundary` gives another id.
  """
  if name == 'agnostic':
    if boundary not in (None, 0):
      raise ValueError(f"preset 'agnostic' puts every kind in context 0, got boundary={boundary}")
    return {k: 0 for k in KIND_NAMES}
  if name == 'modality':
    mapping = {k: 0 for k in KIND_NAMES}
    mapping['image'] = 1
    mapping['boundary'] = 1 if boundary is None else boundary
    return validate(mapping)
  raise ValueError(f'unknown context preset {name!r}; expected one of {list(PRESETS)}')


def validate(mapping: Mapping[str, int] | str) -> dict[str, int]:
  """Checks a context map (or resolves a preset name) and returns it as a plain dict.

  Keys must be kind names (see `KIND_NAMES`) or `Kind` members; ids non-negative ints. Kinds
  left out are allowed here; `context_ids` raises if one of them actually occurs.
  """
  if isinstance(mapping, str):
    return preset(mapping)
  out = {}
  for key, ctx in mapping.items():
    name = key.name.lower() if isinstance(key, Kind) else key
    if name not in KIND_NAMES:
      raise ValueError(f'unknown token kind {key!r} in context map; '
                       f'expected one of {list(KIND_NAMES)}')
    if isinstance(ctx, bool) or not isinstance(ctx, (int, np.integer)) or ctx < 0:
      raise ValueError(f'context id for kind {name!r} must be an int >= 0, got {ctx!r}')
    out[name] = int(ctx)
  if not out:
    raise ValueError(f'empty context map; expected ids for kinds among {list(KIND_NAMES)}')
  return out


def num_contexts(mapping: Mapping[str, int] | str) -> int:
  """Number of adaptor groups a context map needs (a preset, a kind map or rules; see
  `parse_context_map`): largest context id + 1."""
  mapping = parse_context_map(mapping)
  if is_rules(mapping):
    return num_rule_contexts(mapping)
  return max(validate(mapping).values()) + 1


def context_ids(kinds_BL: np.ndarray, mapping: Mapping[str, int] | str) -> np.ndarray:
  """Maps an integer array of token kinds (any shape) to int32 context ids of the same shape."""
  mapping = validate(mapping)
  kinds_BL = np.asarray(kinds_BL)
  if kinds_BL.size and not np.issubdtype(kinds_BL.dtype, np.integer):
    raise ValueError(f'token kinds must be an integer array, got dtype {kinds_BL.dtype}')
  return _lookup(kinds_BL, KIND_NAMES, mapping, 'token kind')


def _lookup(codes, names: Sequence[str], mapping: Mapping[str, int], what: str) -> np.ndarray:
  """int32 context ids of integer `codes` (indices into `names`) through a checked name -> id
  map; codes outside `names` and names the map leaves out but the data has are errors."""
  codes = np.asarray(codes)
  if codes.size and (codes.min() < 0 or codes.max() >= len(names)):
    bad = sorted(set(np.unique(codes).tolist()) - set(range(len(names))))
    raise ValueError(f'{what}s {bad} are not valid; expected ints in [0, {len(names)}) '
                     f'for {list(names)}')
  table = np.full(len(names), -1, np.int32)
  for name, ctx in mapping.items():
    table[list(names).index(name)] = ctx
  out = table[codes]
  if (out < 0).any():
    missing = sorted({names[c] for c in np.unique(codes[out < 0]).tolist()})
    raise ValueError(f'context map {dict(mapping)} has no id for {what}s {missing} present in '
                     'the data')
  return out


# ----------------------------------------------------------------------------- chat roles

# Index = role code in `roles_L` arrays; 'none' marks tokens outside every message.
ROLES = ('none', 'system', 'user', 'assistant', 'tool')
# Used when a tokenizer has no chat template of its own (e.g. the demo's word-level one).
DEFAULT_CHAT_TEMPLATE = ("{% for m in messages %}{{ m['role'] }} : {{ m['content'] }}\n"
                         "{% endfor %}{% if add_generation_prompt %}assistant : {% endif %}")


def chat_roles(tokenizer, messages: Sequence[Mapping[str, str]], *,
               chat_template: str | None = None,
               add_generation_prompt: bool = False) -> tuple[np.ndarray, np.ndarray]:
  """Token ids of a chat rendered by its template, and each token's role code (see ROLES).

  Message i owns the characters its turn adds to the rendering of messages[:i] (header and
  footer included), found by rendering each prefix of the chat; a token belongs to the message
  its first character falls in. The generation prompt (with `add_generation_prompt`) is an
  assistant turn. The template is `chat_template`, else the tokenizer's, else
  `DEFAULT_CHAT_TEMPLATE`; it must render each prefix of the chat as a prefix of the whole.
  """
  if not getattr(tokenizer, 'is_fast', False):
    raise ValueError(f'chat_roles needs a fast tokenizer (character offsets); got '
                     f'{type(tokenizer).__name__}.')
  for i, m in enumerate(messages):
    if not isinstance(m, Mapping) or m.get('role') not in ROLES[1:] or not isinstance(
        m.get('content'), str):
      raise ValueError(f'Message {i} must be a dict with a role in {list(ROLES[1:])} and a '
                       f'string content, got {m!r}.')
  template = chat_template or getattr(tokenizer, 'chat_template', None) or DEFAULT_CHAT_TEMPLATE

  def render(msgs, prompt=False):
    return tokenizer.apply_chat_template(list(msgs), chat_template=template, tokenize=False,
                                         add_generation_prompt=prompt) if msgs else ''
  ends, text = [], ''
  for i in range(len(messages)):
    nxt = render(messages[:i + 1])
    if not nxt.startswith(text):
      raise ValueError(f'The chat template does not render messages[:{i}] as a prefix of '
                       f'messages[:{i + 1}], so message spans are undefined; pass a '
                       'chat_template that renders turns one after another.')
    ends.append(len(nxt))
    text = nxt
  role_of_span = [ROLES.index(m['role']) for m in messages]
  if add_generation_prompt:
    nxt = render(messages, True)
    if not nxt.startswith(text):
      raise ValueError('The chat template with add_generation_prompt does not extend the chat.')
    ends.append(len(nxt))
    role_of_span.append(ROLES.index('assistant'))
    text = nxt
  enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
  starts_L = np.array([a for a, _ in enc['offset_mapping']], np.int64)
  span_L = np.searchsorted(np.asarray(ends, np.int64), starts_L, side='right')
  roles_L = np.asarray(role_of_span + [0], np.int32)[span_L]  # past the last span: 'none'
  return np.asarray(enc['input_ids'], np.int32), roles_L


# ----------------------------------------------------------------------------- factors


def factor_contexts(codes: np.ndarray, names: Sequence[str], mapping: Mapping[str, int],
                    what: str = 'value') -> np.ndarray:
  """Context ids from integer codes (indices into `names`) through a name -> id map.

  E.g. roles: factor_contexts(roles_L, ROLES, {'system': 0, 'user': 1, 'assistant': 2}).
  A name absent from the map is an error only if it occurs.
  """
  for name, ctx in mapping.items():
    if name not in names:
      raise ValueError(f'unknown {what} {name!r} in context map; expected one of {list(names)}')
    if isinstance(ctx, bool) or not isinstance(ctx, (int, np.integer)) or ctx < 0:
      raise ValueError(f'context id for {what} {name!r} must be an int >= 0, got {ctx!r}')
  return _lookup(codes, names, mapping, what)


def task_contexts(task_B: Sequence[Any], length: int,
                  mapping: Mapping[Any, int] | None = None) -> np.ndarray:
  """[B, length] context ids: every token of example b in its task's context.

  `task_B` holds task names (then `mapping` gives each name's id) or integer ids (used as they
  are when `mapping` is None). A mixed batch of tasks routes each example to its plug-in.
  """
  if mapping is None:
    ids_B = np.asarray(task_B)
    if ids_B.size and (not np.issubdtype(ids_B.dtype, np.integer) or ids_B.min() < 0):
      raise ValueError(f'task ids must be ints >= 0 without a task map, got {list(task_B)}')
  else:
    unknown = sorted({str(t) for t in task_B if t not in mapping})
    if unknown:
      raise ValueError(f'tasks {unknown} have no context in the task map {dict(mapping)}')
    ids_B = np.array([mapping[t] for t in task_B])
  return np.broadcast_to(ids_B.astype(np.int32)[:, None], (len(ids_B), length)).copy()


# ----------------------------------------------------------------------------- products

FACTORS = {'kind': KIND_NAMES, 'role': ROLES}  # 'task' names come from the caller


def parse_rules(rules: Mapping[str, int],
                names: Mapping[str, Sequence[str]] | None = None) -> list[tuple[dict, int]]:
  """Checks context rules and returns them as [(conditions {factor: code}, context id)].

  A rule is 'factor=value&factor=value' -> id ('*' matches every token). The most specific
  matching rule (most conditions) decides a token's context; two equally specific rules that
  can match the same token with different ids are an error here, not a silent precedence,
  unless a more specific rule decides every token they share.
  Factors are 'kind' (Kind names), 'role' (ROLES) and any in `names` (e.g. {'task': (...)});
  a factor without names takes integer values ('task=1').
  """
  names = {**FACTORS, **(names or {})}
  parsed = []
  for rule, ctx in rules.items():
    if isinstance(ctx, bool) or not isinstance(ctx, (int, np.integer)) or ctx < 0:
      raise ValueError(f'context id of rule {rule!r} must be an int >= 0, got {ctx!r}')
    conditions, text = {}, {}
    for part in ([] if rule.strip() == '*' else rule.split('&')):
      factor, sep, value = (x.strip() for x in part.partition('='))
      if not sep or not factor or not value:
        raise ValueError(f'rule {rule!r}: {part!r} is not factor=value (e.g. '
                         "'kind=image&role=user', or '*' for every token)")
      text[factor] = value
      if factor in conditions:
        raise ValueError(f'rule {rule!r} names factor {factor!r} twice')
      if factor in names:
        if value not in names[factor]:
          raise ValueError(f'rule {rule!r}: {factor} {value!r} is not one of '
                           f'{list(names[factor])}')
        conditions[factor] = list(names[factor]).index(value)
      elif value.isdigit():
        conditions[factor] = int(value)
      else:
        raise ValueError(f'rule {rule!r}: factor {factor!r} has no names, so its value must be '
                         f'an int, got {value!r}')
    parsed.append((conditions, int(ctx), text))
  if not parsed:
    raise ValueError('empty context rules')
  for (a, ca, ta), (b, cb, tb) in itertools.combinations(parsed, 2):
    both = {**a, **b}  # the tokens both rules match, unless a factor's values clash
    if len(a) == len(b) and ca != cb and all(a[f] == b[f] for f in set(a) & set(b)) and not any(
        len(r) > len(a) and all(both.get(f) == v for f, v in r.items()) for r, _, _ in parsed):
      raise ValueError(f"context rules '{_show(ta)}' -> {ca} and '{_show(tb)}' -> {cb} can match "
                       f"the same token; add a more specific rule ('{_show({**ta, **tb})}') to "
                       'decide')
  return [(cond, ctx) for cond, ctx, _ in sorted(parsed, key=lambda r: -len(r[0]))]


def _show(text: Mapping[str, str]) -> str:
  return '&'.join(f'{f}={v}' for f, v in sorted(text.items())) or '*'


def rule_contexts(rules: Mapping[str, int], factors: Mapping[str, np.ndarray],
                  names: Mapping[str, Sequence[str]] | None = None) -> np.ndarray:
  """Context ids by the most specific rule that matches each token (see `parse_rules`).

  `factors` maps factor names to integer code arrays of one shape (e.g. {'kind': kinds_BL,
  'role': roles_BL, 'task': task_BL}). A token that no rule matches is an error.
  """
  parsed = parse_rules(rules, names)
  needed = sorted({f for cond, _ in parsed for f in cond} - set(factors))
  if needed:
    raise ValueError(f'context rules use factors {needed}, which the data does not provide '
                     f'(given: {sorted(factors)})')
  arrays = {f: np.asarray(v) for f, v in factors.items()}
  shapes = {f: a.shape for f, a in arrays.items()}
  if len(set(shapes.values())) > 1:
    raise ValueError(f'factor arrays must share one shape, got {shapes}')
  shape = next(iter(shapes.values()))
  out = np.full(shape, -1, np.int32)
  for cond, ctx in parsed:  # most specific first; a token keeps its first match
    match = out < 0
    for f, v in cond.items():
      match &= arrays[f] == v
    out[match] = ctx
  if (out < 0).any():
    first = tuple(int(i) for i in np.argwhere(out < 0)[0])
    known = {**FACTORS, **(names or {})}
    at = {f: known[f][a[first]] if f in known else int(a[first]) for f, a in arrays.items()}
    raise ValueError(f'no context rule matches the token at {first} ({at}); add a default '
                     "rule '*'")
  return out


def num_rule_contexts(rules: Mapping[str, int]) -> int:
  """Number of adaptor groups the rules need: largest id + 1."""
  return max(rules.values()) + 1


# ----------------------------------------------------------------------------- config values


def is_rules(mapping) -> bool:
  """Whether a context map is rules ('kind=image&task=qa' keys, '*') rather than a kind map."""
  return isinstance(mapping, Mapping) and any(
      isinstance(k, str) and ('=' in k or k.strip() == '*') for k in mapping)


def parse_context_map(value) -> str | dict:
  """A config's `data.context_map` as a preset name, a kind map or a rules dict.

  Accepts a preset name ('agnostic', 'modality'), a dict (a kind map {'image': 1, 'text': 0}
  or rules {'kind=image': 1, 'task=qa': 2, '*': 0}; an ml_collections ConfigDict too), or
  rules as one string 'kind=image:1;task=qa:2;*:0' (so that a command-line flag can set them).
  """
  if hasattr(value, 'items') and not isinstance(value, Mapping):  # ml_collections ConfigDict
    value = dict(value.items())
  if isinstance(value, Mapping):
    return dict(value)
  if not isinstance(value, str):
    raise ValueError(f'context_map must be a preset name {list(PRESETS)}, a dict or a rules '
                     f"string like 'kind=image:1;*:0', got {value!r}")
  if value in PRESETS:
    return value
  if ':' not in value:
    raise ValueError(f'unknown context preset {value!r}; expected one of {list(PRESETS)} or '
                     "rules like 'kind=image:1;task=qa:2;*:0'")
  rules = {}
  for part in filter(None, (p.strip() for p in value.split(';'))):
    rule, sep, ctx = part.rpartition(':')
    if not sep or not rule.strip() or not ctx.strip().isdigit():
      raise ValueError(f'context rules {value!r}: {part!r} is not rule:id (e.g. '
                       "'kind=image&task=qa:2', '*:0')")
    if rule.strip() in rules:
      raise ValueError(f'context rules {value!r} give rule {rule.strip()!r} twice')
    rules[rule.strip()] = int(ctx)
  return rules


def check_context_map(value, tasks: Sequence[str] = ('caption',),
                      factors: Sequence[str] = ('kind', 'task')) -> str | dict:
  """Parses and checks a context map where a dataset's config enters, so that errors name the
  config value and not a batch: rules may only use the factors the data provides (`factors`)
  and task names among `tasks`."""
  mapping = parse_context_map(value)
  if not is_rules(mapping):
    validate(mapping)
    return mapping
  parse_rules(mapping, {'task': tuple(tasks)})
  used = sorted({part.partition('=')[0].strip() for rule in mapping if rule.strip() != '*'
                 for part in rule.split('&')} - set(factors))
  if used:
    raise ValueError(f'context rules {mapping} use factors {used}, which this data does not '
                     f'provide; it provides {list(factors)}')
  return mapping


def context_of(mapping, kind: str = 'text', task: str = 'caption',
               tasks: Sequence[str] = ('caption',)) -> int:
  """The context id a token of `kind` in an example of `task` gets (e.g. the context that
  generated caption tokens run in), under a preset, a kind map or rules."""
  if kind not in KIND_NAMES:
    raise ValueError(f'unknown token kind {kind!r}; expected one of {list(KIND_NAMES)}')
  if task not in tasks:
    raise ValueError(f'task {task!r} is not one of {list(tasks)}')
  kinds_BL = np.array([[KIND_NAMES.index(kind)]], np.int32)
  return int(sequence_contexts(mapping, kinds_BL, np.array([list(tasks).index(task)]), tasks)[0, 0])


def sequence_contexts(mapping, kinds_BL: np.ndarray, task_B: np.ndarray | None = None,
                      tasks: Sequence[str] = ('caption',)) -> np.ndarray:
  """[B, L] context ids of laid-out rows: a preset or kind map looks at each token's kind;
  rules also see each row's task (`task_B`: indices into `tasks`, broadcast over the row)."""
  mapping = parse_context_map(mapping)
  if not is_rules(mapping):
    return context_ids(kinds_BL, mapping)
  kinds_BL = np.asarray(kinds_BL)
  task_B = np.zeros(kinds_BL.shape[0], np.int32) if task_B is None else np.asarray(task_B)
  task_BL = np.broadcast_to(task_B[:, None], kinds_BL.shape)
  return rule_contexts(mapping, {'kind': kinds_BL, 'task': task_BL}, {'task': tuple(tasks)})

