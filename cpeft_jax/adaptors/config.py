"""What an adaptor config says: methods, LoRA hyper-parameters, contexts and their table rows.

`PeftConfig` is the one description every layer, plug-in and export reads: which methods adapt
which projections (`targets`), for how many contexts, which of them own a table row
(`adapted_contexts`), and each context's own `ContextSpec` when they differ.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any

from cpeft_jax.configlib import config_from_dict

ADAPTORS = 'adaptors'  # the variable collection holding every trainable table
METHODS = ('lora', 'ia3', 'bitfit', 'dora')
LORA_INITS = ('kaiming_uniform', 'gaussian')
# onehot: the paper's einsum with a one-hot selector; cost grows with the number of rows R.
# grouped: tokens sorted by context into tiles, one batched matmul with A/B gathered per tile;
#   cost ~ (tokens + R * tile) regardless of R.
# ragged: tokens sorted by context, jax.lax.ragged_dot (grouped kernels on GPU/TPU; tokamax's
#   where installed).
# auto: dense LoRA for one row; on CPU onehot for two, grouped beyond (measured in bench/); on
#   GPU/TPU onehot while rows x rank <= 128, ragged beyond (routing.pick_strategy).
LORA_STRATEGIES = ('auto', 'onehot', 'grouped', 'ragged')


@dataclasses.dataclass(frozen=True)
class LoraConfig:
  """LoRA hyper-parameters shared by every adapted projection and context."""
  rank: int = 8
  alpha: float = 16.0
  rslora: bool = False  # scale alpha / sqrt(rank) (rsLoRA) instead of alpha / rank
  init: str = 'kaiming_uniform'  # A's init: 'kaiming_uniform' (as PEFT) or 'gaussian' (std 1/r)
  dropout: float = 0.0  # dropout on the LoRA branch's input, as PEFT's lora_dropout

  @property
  def scale(self) -> float:
    return self.alpha / (math.sqrt(self.rank) if self.rslora else self.rank)


@dataclasses.dataclass(frozen=True)
class ContextSpec:
  """One context's adaptor: its methods and LoRA hyper-parameters; None inherits peft's own.

  methods: a tuple of names, or a string such as 'lora+bitfit' or 'none'. The LoRA fields
  apply to 'lora' and 'dora'. After `PeftConfig` resolves it, every field is set.
  """
  methods: tuple[str, ...] | str | None = None
  rank: int | None = None
  alpha: float | None = None
  rslora: bool | None = None
  init: str | None = None
  dropout: float | None = None

  @property
  def lora(self) -> LoraConfig:
    return LoraConfig(rank=self.rank, alpha=self.alpha, rslora=self.rslora, init=self.init,
                      dropout=self.dropout)

  @property
  def low_rank(self) -> bool:
    """Whether this context uses the LoRA tables (as 'lora' or as 'dora')."""
    return 'lora' in self.methods or 'dora' in self.methods


_LORA_FIELDS = ('rank', 'alpha', 'rslora', 'init', 'dropout')


def _parse_methods(methods, where: str) -> tuple[str, ...]:
  if isinstance(methods, str):
    methods = () if methods.strip() in ('', 'none') else tuple(
        m.strip() for m in methods.split('+'))
  methods = tuple(methods)
  for m in methods:
    if m not in METHODS:
      raise ValueError(f'Unknown PEFT method {m!r} in {where}; expected some of {METHODS} '
                       "(or 'none').")
  if len(set(methods)) != len(methods):
    raise ValueError(f'{where}={methods} lists a method twice.')
  if 'lora' in methods and 'dora' in methods:
    raise ValueError(f"{where}={methods}: 'lora' and 'dora' share the LoRA tables; give one.")
  return methods


def _check_lora(lo, where: str):
  if not isinstance(lo.rank, int) or isinstance(lo.rank, bool) or lo.rank < 1:
    raise ValueError(f'{where}.rank must be an integer >= 1, got {lo.rank!r}.')
  if not lo.alpha > 0:
    raise ValueError(f'{where}.alpha must be > 0, got {lo.alpha!r}.')
  if lo.init not in LORA_INITS:
    raise ValueError(f'{where}.init={lo.init!r}; expected one of {LORA_INITS}.')
  if not 0.0 <= lo.dropout < 1.0:
    raise ValueError(f'{where}.dropout must be in [0, 1), got {lo.dropout!r}.')


@dataclasses.dataclass(frozen=True)
class PeftConfig:
  """Which methods adapt which projections, and for how many contexts.

  `targets` is a preset ('A', 'F', 'AF', 'all') or comma-separated glob patterns over the
  projection names of a block (e.g. 'q_proj,v_proj' or 'attn/*'). IA3 reads presets as the
  paper does (A: keys and values, F: the feed-forward intermediate); `method_targets` overrides
  the targets of single methods, e.g. {'bitfit': 'all'}.

  `contexts` gives each context its own `ContextSpec` (methods, rank, alpha, rslora, init,
  dropout; unset fields inherit `methods` and `lora`): either a sequence with one entry per
  context, e.g. [{'methods': 'lora', 'rank': 64}, {'methods': 'lora+bitfit', 'rank': 8},
  {'methods': 'none'}], or a mapping {'c1': {'rank': 16}} of overrides for some contexts (on the
  command line: --config.peft.contexts.c1.rank=16). `methods` then becomes the union of the
  contexts' methods and `adapted_contexts` the contexts with any method.
  """
  methods: tuple[str, ...] = ()
  targets: str = 'AF'
  method_targets: tuple[tuple[str, str], ...] = ()
  num_contexts: int = 1
  adapted_contexts: tuple[int, ...] | None = None  # None: every context has a row
  lora: LoraConfig = LoraConfig()
  strategy: str = 'auto'
  tile: int = 64  # tokens per tile of the grouped strategy
  contexts: tuple[ContextSpec, ...] | None = None  # per-context specs; None: all alike

  def __post_init__(self):
    object.__setattr__(self, 'methods', _parse_methods(self.methods, 'peft.methods'))
    if isinstance(self.method_targets, Mapping):
      object.__setattr__(self, 'method_targets', tuple(sorted(self.method_targets.items())))
    if self.adapted_contexts is not None:
      object.__setattr__(self, 'adapted_contexts', tuple(int(c) for c in self.adapted_contexts))
    if isinstance(self.lora, Mapping):
      object.__setattr__(self, 'lora', config_from_dict(LoraConfig, self.lora, 'peft.lora'))
    if self.contexts is not None:
      self._resolve_contexts()
    self.validate()

  def _resolve_contexts(self):
    """Fills every context's spec from the defaults; derives methods and adapted_contexts."""
    raw, C = self.contexts, self.num_contexts
    if not isinstance(C, int) or C < 1:
      raise ValueError(f'peft.num_contexts must be an integer >= 1, got {C!r}.')
    if hasattr(raw, 'to_dict'):
      raw = raw.to_dict()
    if isinstance(raw, Mapping):
      entries = [{} for _ in range(C)]
      for key, spec in raw.items():
        k = str(key)
        c = int(k[1:]) if k[:1] == 'c' and k[1:].isdigit() else int(k) if k.isdigit() else None
        if c is None or not 0 <= c < C:
          raise ValueError(f'peft.contexts key {key!r} must name a context as c0..c{C - 1} '
                           f'(num_contexts={C}).')
        entries[c] = spec
    elif isinstance(raw, (list, tuple)):
      if len(raw) != C:
        raise ValueError(f'peft.contexts lists {len(raw)} contexts but peft.num_contexts={C}; '
                         'give one entry per context.')
      entries = list(raw)
    else:
      raise ValueError(f'peft.contexts must be a list of per-context specs or a mapping '
                       f"{{'c<i>': spec}}, got {type(raw).__name__}.")
    specs = []
    for c, e in enumerate(entries):
      where = f'peft.contexts[{c}]'
      if not isinstance(e, ContextSpec):
        if hasattr(e, 'to_dict'):
          e = e.to_dict()
        if not isinstance(e, Mapping):
          fields = [f.name for f in dataclasses.fields(ContextSpec)]
          raise ValueError(f'{where} must be a dict of {fields}, got {e!r}.')
        e = config_from_dict(ContextSpec, e, where)
      methods = _parse_methods(self.methods if e.methods is None else e.methods,
                               f'{where}.methods')
      fill = {f: getattr(self.lora, f) if getattr(e, f) is None else getattr(e, f)
              for f in _LORA_FIELDS}
      spec = ContextSpec(methods=methods, **fill)
      if spec.low_rank:
        _check_lora(spec.lora, where)
      specs.append(spec)
    adapted = tuple(c for c, sp in enumerate(specs) if sp.methods)
    if not adapted:
      raise ValueError('peft.contexts gives no context any method; at least one must be adapted.')
    if self.adapted_contexts is not None and tuple(self.adapted_contexts) != adapted:
      raise ValueError(f'peft.adapted_contexts={self.adapted_contexts} disagrees with '
                       f'peft.contexts, which adapts {adapted}; give unadapted contexts '
                       "methods='none' instead.")
    union = tuple(m for m in METHODS if any(m in sp.methods for sp in specs))
    object.__setattr__(self, 'contexts', tuple(specs))
    object.__setattr__(self, 'methods', union)
    object.__setattr__(self, 'adapted_contexts', adapted)

  def validate(self):
    for m, _ in self.method_targets:
      if m not in self.methods:
        raise ValueError(f'peft.method_targets names {m!r}, which is not in peft.methods='
                         f'{self.methods}.')
    if not isinstance(self.num_contexts, int) or self.num_contexts < 1:
      raise ValueError(f'peft.num_contexts must be an integer >= 1, got {self.num_contexts!r}.')
    if self.adapted_contexts is not None:
      bad = [c for c in self.adapted_contexts if not 0 <= c < self.num_contexts]
      if bad or len(set(self.adapted_contexts)) != len(self.adapted_contexts) or (
          not self.adapted_contexts):
        raise ValueError(
            f'peft.adapted_contexts={self.adapted_contexts} must be distinct context ids in '
            f'[0, {self.num_contexts}) (num_contexts), at least one.')
    _check_lora(self.lora, 'peft.lora')
    if self.strategy not in LORA_STRATEGIES:
      raise ValueError(f'peft.strategy={self.strategy!r}; expected one of {LORA_STRATEGIES}.')
    if not isinstance(self.tile, int) or self.tile < 1:
      raise ValueError(f'peft.tile must be an integer >= 1, got {self.tile!r}.')

  @classmethod
  def from_dict(cls, d: Mapping[str, Any]) -> PeftConfig:
    """Builds from a dict or ml_collections ConfigDict; unknown keys are an error."""
    return config_from_dict(cls, d, 'peft')

  @property
  def rows(self) -> tuple[int, ...]:
    """The adapted contexts, in table-row order."""
    if self.adapted_contexts is None:
      return tuple(range(self.num_contexts))
    return self.adapted_contexts

  @property
  def num_rows(self) -> int:
    return len(self.rows)

  def targets_of(self, method: str) -> str:
    return dict(self.method_targets).get(method, self.targets)

  @property
  def specs(self) -> tuple[ContextSpec, ...]:
    """Every context's resolved spec (unadapted contexts have no methods)."""
    if self.contexts is not None:
      return self.contexts
    lo = {f: getattr(self.lora, f) for f in _LORA_FIELDS}
    rows = set(self.rows)
    return tuple(ContextSpec(methods=self.methods if c in rows else (), **lo)
                 for c in range(self.num_contexts))

  @property
  def row_specs(self) -> tuple[ContextSpec, ...]:
    """The specs of the adapted contexts, in table-row order."""
    specs = self.specs
    return tuple(specs[c] for c in self.rows)

  @property
  def uniform(self) -> bool:
    """Whether every adapted context has the same spec (no masks, one scalar scale)."""
    return len(set(self.row_specs)) == 1

  def row_of(self, context: int) -> int:
    """The table row of `context`; an error if the context has no adaptor group."""
    if context not in self.rows:
      raise ValueError(f'Context {context} has no adaptor row: the model adapts contexts '
                       f'{self.rows} of num_contexts={self.num_contexts}.')
    return self.rows.index(context)

  def context_spec(self, context: int) -> tuple[tuple[str, ...], LoraConfig]:
    """The methods and LoRA hyper-parameters of one context.

    With per-context specs (`PeftConfig.contexts`) each row has its own; the LoRA tables are
    then padded to the largest rank, and a context's group is the first `rank` columns of A and
    rows of B.
    """
    spec = self.row_specs[self.row_of(context)]
    return tuple(spec.methods), spec.lora
