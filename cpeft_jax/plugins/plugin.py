"""A plug-in: one context's adaptor group saved on its own, and models assembled from them.

A plug-in is a directory holding that context's rows of every table (as a one-context model's
tables: lora_a [N, 1, d_in, r], ...), the one-context `PeftConfig` they belong to, and the
fingerprints of the frozen base(s) they were trained on (a hash of the architecture plus a few
statistics of every base tensor) and a sha256 of its tables. Loading checks both, so a plug-in
cannot silently run on the wrong base or with changed tables, and every fingerprint field is
required, so that none can be dropped to skip a check. Plug-ins trained in separate runs are
assembled into one model: their contexts become rows of the same tables, and a batch can mix
examples (or tokens) of each. `freeze_contexts` trains some rows while others stay fixed (e.g.
a new plug-in beside old ones).

    plugin = plugins.extract(tables, peft, context=1, bases={'decoder': fp}, name='qa')
    plugins.save('runs/qa_plugin', plugin)
    peft, tables = plugins.assemble([plugins.load('runs/cap', fps), plugins.load('runs/qa', fps)])

From a training run's workdir in one step (its best or latest weights, the bases it was built on):

    python -m cpeft_jax.plugins --workdir=DIR [--checkpoint=best] --context=N --out=PLUGDIR

A training config then starts from plug-ins with `peft.plugins` (`experiment.build`).
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping, Sequence
from typing import Any

from etils import epath
import jax
import jax.numpy as jnp
import numpy as np
import optax
import safetensors.numpy

from cpeft_jax import integrity, trees
from cpeft_jax.adaptors import PeftConfig
from cpeft_jax.plugins.fingerprint import check_base, check_fingerprints

FORMAT = 'cpeft-plugin/1'
PLUGIN_CONFIG, PLUGIN_TABLES = 'plugin.json', 'tables.safetensors'
TABLES_HASH = 'tables_sha256'  # plugin.json's sha256 of the tables (integrity.tree_sha256)
# Table leaf name -> axis of the context rows, counted from the end (as params.py).
ROW_AXIS = {'lora_a': -3, 'lora_b': -3, 'ia3': -2, 'bitfit': -2, 'dora_m': -2}
# The methods whose tables each leaf belongs to.
LEAF_METHODS = {'lora_a': ('lora', 'dora'), 'lora_b': ('lora', 'dora'), 'ia3': ('ia3',),
                'bitfit': ('bitfit',), 'dora_m': ('dora',)}
@dataclasses.dataclass(frozen=True)
class Plugin:
  """One context's adaptor group: one-context tables, their config, and the bases they fit."""
  peft: PeftConfig
  tables: Any
  bases: Mapping[str, Mapping[str, Any]]
  name: str = ''
  meta: Mapping[str, Any] = dataclasses.field(default_factory=dict)


# ----------------------------------------------------------------------------- bases


def check_plugin(plugin: Plugin, bases: Mapping[str, Mapping[str, Any]], where: str) -> None:
  """Raises unless every base `plugin` records is in `bases` (the run's) with the same weights."""
  missing = sorted(set(plugin.bases) - set(bases))
  if missing:
    raise ValueError(f'{where} was trained with bases {missing} that this model lacks (it has '
                     f'{sorted(bases)}).')
  for name in sorted(plugin.bases):
    check_base(plugin.bases[name], bases[name], f'{where} (base {name!r})')


def _check_bases(plugin: Plugin, bases: Mapping[str, Mapping[str, Any]] | None, where: str):
  if bases is None:
    return
  unknown = sorted(set(bases) - set(plugin.bases))
  if unknown:
    raise ValueError(f'{where} records bases {sorted(plugin.bases)}, not {unknown}.')
  for name, got in bases.items():
    check_base(plugin.bases[name], got, f'{where} (base {name!r})')


# ----------------------------------------------------------------------------- save and load


def _single(peft: PeftConfig, context: int) -> PeftConfig:
  """The one-context config of `context`'s group (its own methods and LoRA if per-context)."""
  methods, lora = peft.context_spec(context)
  return dataclasses.replace(
      peft, num_contexts=1, adapted_contexts=None, contexts=None, methods=methods, lora=lora,
      method_targets=tuple((m, t) for m, t in peft.method_targets if m in methods))


def _group(tables, single: PeftConfig):
  """The leaves of `single`'s methods, LoRA cut to its rank (per-context tables are padded)."""
  flat = trees.flatten(tables)
  out = {}
  for path, leaf in flat.items():
    name = path.rsplit('/', 1)[-1]
    if not set(LEAF_METHODS[name]) & set(single.methods):
      continue
    if name == 'lora_a':
      leaf = leaf[..., :single.lora.rank]
    elif name == 'lora_b':
      leaf = leaf[..., :single.lora.rank, :]
    out[path] = leaf
  return trees.unflatten(out)


def take_row(tables, row: int):
  def take(path, leaf):
    axis = ROW_AXIS[path[-1].key]
    return jax.lax.slice_in_dim(jnp.asarray(leaf), row, row + 1, axis=leaf.ndim + axis)
  return jax.tree_util.tree_map_with_path(take, tables)


def extract(tables, peft: PeftConfig, context: int, bases: Mapping[str, Mapping[str, Any]],
            name: str = '', meta: Mapping[str, Any] | None = None) -> Plugin:
  """Context `context`'s adaptor group of a model as a plug-in (a one-context model's tables)."""
  row = peft.row_of(context)  # an error if the context has no adaptor group
  if not bases:
    raise ValueError('A plug-in needs the fingerprint of at least one base, e.g. '
                     "bases={'decoder': plugins.fingerprint(params, cfg)}.")
  check_fingerprints(bases, f'The plug-in of context {context}')
  single = _single(peft, context)
  return Plugin(single, _group(take_row(tables, row), single), dict(bases), name,
                dict(meta or {}))


def _peft_to_json(peft: PeftConfig) -> dict:
  d = dataclasses.asdict(peft)
  d['method_targets'] = dict(peft.method_targets)
  if d.get('contexts', 0) is None:  # readable by versions without per-context specs
    del d['contexts']
  return d


def save(directory: epath.PathLike, plugin: Plugin) -> epath.Path:
  """Writes tables.safetensors, then plugin.json (config, bases, metadata, the tables' sha256).

  `directory` is any epath path (gs://... where that filesystem is installed). plugin.json goes
  last, so a plug-in cut off mid-save has none and `load` refuses it.
  """
  directory = epath.Path(directory)
  check_fingerprints(plugin.bases, f'Plug-in {plugin.name or "(unnamed)"!r} for {directory}')
  directory.mkdir(parents=True, exist_ok=True)
  arrays = {k: np.asarray(jax.device_get(v)) for k, v in trees.flatten(plugin.tables).items()}
  (directory / PLUGIN_TABLES).write_bytes(safetensors.numpy.save(arrays))
  (directory / PLUGIN_CONFIG).write_text(json.dumps(
      {'format': FORMAT, 'name': plugin.name, 'peft': _peft_to_json(plugin.peft),
       'bases': plugin.bases, 'meta': plugin.meta,
       TABLES_HASH: integrity.tree_sha256(arrays)}, indent=1) + '\n')
  return directory


def load(directory: epath.PathLike,
         bases: Mapping[str, Mapping[str, Any]] | None = None) -> Plugin:
  """A saved plug-in; `bases` ({name: fingerprint} of the bases at hand) are checked against it.

  Its tables must hash to the sha256 in plugin.json (`integrity.Damaged` otherwise) and its
  plugin.json must hold every field `save` writes, well-formed (ValueError naming the file).
  """
  directory = epath.Path(directory)
  path = directory / PLUGIN_CONFIG
  if not path.is_file() or not (directory / PLUGIN_TABLES).is_file():
    raise FileNotFoundError(f'{directory} is not a plug-in: expected {PLUGIN_CONFIG} and '
                            f'{PLUGIN_TABLES}.')
  config = _read_config(path)
  try:
    peft = PeftConfig.from_dict(config['peft'])
  except (TypeError, ValueError, KeyError) as e:
    raise ValueError(f'{path}: "peft" is not a valid PeftConfig: {e}') from e
  check_fingerprints(config['bases'], f'Plug-in {directory} ({PLUGIN_CONFIG})')
  tables_path = directory / PLUGIN_TABLES
  try:
    saved = safetensors.numpy.load(tables_path.read_bytes())
  except Exception as e:  # noqa: BLE001  (safetensors' errors for a broken file)
    raise integrity.unreadable(f'Plug-in {directory} ({PLUGIN_TABLES})', e) from e
  if integrity.tree_sha256(saved) != config[TABLES_HASH]:
    raise integrity.Damaged(f'Plug-in {directory} is damaged: the sha256 of {PLUGIN_TABLES} is '
                            f'not the {TABLES_HASH} in {PLUGIN_CONFIG} (its tables changed '
                            'since it was saved).')
  flat = {k: jnp.asarray(v) for k, v in saved.items()}
  plugin = Plugin(peft, trees.unflatten(flat), config['bases'], config['name'], config['meta'])
  _check_bases(plugin, bases, f'Plug-in {directory}')
  return plugin


_FIELDS = {'format': str, 'name': str, 'peft': dict, 'bases': dict, 'meta': dict,
           TABLES_HASH: str}


def _read_config(path: epath.Path) -> dict[str, Any]:
  """plugin.json, with each field `save` writes present and of its type."""
  try:
    config = json.loads(path.read_text())
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise ValueError(f'{path} is not valid JSON ({e}); expected the plug-in\'s config as '
                     'plugins.save writes it.') from e
  if not isinstance(config, dict):
    raise ValueError(f'{path} holds {type(config).__name__}; expected a JSON object.')
  if config.get('format') != FORMAT:
    raise ValueError(f'{path}: format {config.get("format")!r}, expected {FORMAT!r}.')
  if TABLES_HASH not in config:
    meta = config.get('meta') if isinstance(config.get('meta'), dict) else {}
    run = (f'--workdir={meta["workdir"]} --context={meta.get("context", "N")} '
           f'--checkpoint={meta.get("checkpoint", "best")}' if meta.get('workdir')
           else '--workdir=RUN --context=N')
    raise ValueError(
        f'{path} has no {TABLES_HASH!r}: the plug-in was written before plug-ins carried a hash '
        'of their tables, so they cannot be checked. Re-export it: python -m cpeft_jax.plugins '
        f'{run} --out={path.parent} (a plug-in converted from a PEFT adapter: rerun python -m '
        'cpeft_jax.interop.convert with --plugin_out).')
  if missing := [k for k in _FIELDS if k not in config]:
    raise ValueError(f'{path} lacks field(s) {missing}; expected {sorted(_FIELDS)}.')
  if wrong := [f'{k} is {type(config[k]).__name__}, expected {t.__name__}'
               for k, t in _FIELDS.items() if not isinstance(config[k], t)]:
    raise ValueError(f'{path}: wrong types: {"; ".join(wrong)}.')
  return config


# ----------------------------------------------------------------------------- assembly


def assemble(plugins: Sequence[Plugin] | Mapping[int, Plugin], num_contexts: int | None = None,
             strategy: str = 'auto') -> tuple[PeftConfig, Any]:
  """One model's (PeftConfig, tables) whose context rows are the plug-ins' groups.

  A sequence puts plug-in i in context i; a mapping names each plug-in's context, and contexts
  without a plug-in see the frozen base. Plug-ins must share targets and bases. With the same
  methods, LoRA ranks may differ (smaller ones are zero-padded) and so may alpha/rsLoRA (each
  plug-in's scale is folded into its B); with different methods (e.g. a LoRA plug-in beside an
  IA3 one) the result has per-context specs (`PeftConfig.contexts`). Either way every context
  computes exactly what its plug-in did alone.
  """
  by_context = dict(plugins) if isinstance(plugins, Mapping) else dict(enumerate(plugins))
  if not by_context:
    raise ValueError('assemble needs at least one plug-in.')
  contexts = sorted(by_context)
  C = num_contexts or contexts[-1] + 1
  if contexts[0] < 0 or contexts[-1] >= C:
    raise ValueError(f'Plug-in contexts {contexts} must lie in [0, num_contexts={C}).')
  items = [(c, by_context[c]) for c in contexts]
  first_c, first = items[0]
  label = lambda c, p: f'plug-in {p.name or "?"!r} (context {c})'
  for c, p in items[1:]:
    for name in set(first.bases) & set(p.bases):
      check_base(first.bases[name], p.bases[name], f'{label(c, p)} vs {label(first_c, first)}')
    a, b = first.peft, p.peft
    clash = [m for m in set(dict(a.method_targets)) & set(dict(b.method_targets))
             if dict(a.method_targets)[m] != dict(b.method_targets)[m]]
    if a.targets != b.targets or clash:
      raise ValueError(f'{label(c, p)} adapts {b.methods} on {b.targets!r} '
                       f'{dict(b.method_targets)}, {label(first_c, first)} {a.methods} on '
                       f'{a.targets!r} {dict(a.method_targets)}; assembled plug-ins must share '
                       'their targets.')
  if len({tuple(sorted(p.peft.methods)) for _, p in items}) > 1:
    return _assemble_specs(items, C, strategy)
  rank = max(p.peft.lora.rank for _, p in items)
  lora = dataclasses.replace(first.peft.lora, rank=rank)
  peft = dataclasses.replace(first.peft, num_contexts=C, lora=lora, strategy=strategy,
                             adapted_contexts=None if contexts == list(range(C)) else contexts)

  def conform(p: Plugin):
    fold = p.peft.lora.scale / lora.scale
    r = p.peft.lora.rank

    def fix(path, leaf):
      leaf = jnp.asarray(leaf)
      if path[-1].key == 'lora_a':
        return jnp.pad(leaf, [(0, 0)] * (leaf.ndim - 1) + [(0, rank - r)])
      if path[-1].key == 'lora_b':
        return jnp.pad(leaf * fold, [(0, 0)] * (leaf.ndim - 2) + [(0, rank - r), (0, 0)])
      return leaf
    return jax.tree_util.tree_map_with_path(fix, p.tables)

  conformed = [conform(p) for _, p in items]
  shapes = [jax.tree.map(jnp.shape, t) for t in conformed]
  for (c, p), s in zip(items[1:], shapes[1:]):
    if s != shapes[0]:
      raise ValueError(f'The tables of {label(c, p)} and {label(first_c, first)} differ in '
                       'shape; were they trained on the same base?')
  tables = jax.tree_util.tree_map_with_path(
      lambda path, *rows: jnp.concatenate(rows, axis=rows[0].ndim + ROW_AXIS[path[-1].key]),
      *conformed)
  return peft, tables


_FILL = {'lora_a': 0.0, 'lora_b': 0.0, 'ia3': 1.0, 'bitfit': 0.0, 'dora_m': 0.0}


def _assemble_specs(items, C: int, strategy: str) -> tuple[PeftConfig, Any]:
  """Plug-ins with different methods: one per-context spec each, identity rows elsewhere."""
  first = items[0][1].peft
  specs = [{'methods': 'none'} for _ in range(C)]
  method_targets = {}
  for c, p in items:
    lo = p.peft.lora
    specs[c] = {'methods': tuple(p.peft.methods), 'rank': lo.rank, 'alpha': lo.alpha,
                'rslora': lo.rslora, 'init': lo.init, 'dropout': lo.dropout}
    method_targets.update(dict(p.peft.method_targets))
  peft = PeftConfig(methods=(), targets=first.targets, method_targets=method_targets,
                    num_contexts=C, lora=first.lora, strategy=strategy, tile=first.tile,
                    contexts=specs)
  flats = [trees.flatten(p.tables)
           for _, p in items]
  out = {}
  for path in sorted(set().union(*flats)):
    name = path.rsplit('/', 1)[-1]
    have = [f[path] for f in flats if path in f]
    rank_axis = {'lora_a': -1, 'lora_b': -2}.get(name)
    shape = list(have[0].shape)
    if rank_axis is not None:  # the layer pads each projection's tables to its largest rank
      shape[rank_axis] = max(x.shape[rank_axis] for x in have)
    rows = []
    for f in flats:
      if path not in f:
        rows.append(jnp.full(shape, _FILL[name], have[0].dtype))
        continue
      leaf = jnp.asarray(f[path])
      if rank_axis is not None:
        pad = [(0, 0)] * leaf.ndim
        pad[leaf.ndim + rank_axis] = (0, shape[rank_axis] - leaf.shape[rank_axis])
        leaf = jnp.pad(leaf, pad)
      rows.append(leaf)
    out[path] = jnp.concatenate(rows, axis=len(shape) + ROW_AXIS[name])
  return peft, trees.unflatten(out)


# ----------------------------------------------------------------------------- freezing


def _rows(peft: PeftConfig, contexts: Sequence[int]) -> np.ndarray:
  bad = [c for c in contexts if c not in peft.rows]
  if bad:
    raise ValueError(f'Contexts {bad} have no adaptor rows; the model adapts {peft.rows}.')
  keep = np.zeros(peft.num_rows, bool)
  keep[[peft.rows.index(c) for c in contexts]] = True
  return keep


def mask_rows(tree, peft: PeftConfig, contexts: Sequence[int]):
  """`tree` (gradients or updates of adaptor tables) with every row but `contexts`' zeroed.

  Leaves that are not adaptor tables (e.g. a connector) pass through unchanged.
  """
  keep_R = _rows(peft, contexts)

  def mask(path, leaf):
    name = getattr(path[-1], 'key', None) if path else None
    if name not in ROW_AXIS or leaf is None:
      return leaf
    axis = np.ndim(leaf) + ROW_AXIS[name]
    shape = [1] * np.ndim(leaf)
    shape[axis] = peft.num_rows
    return leaf * jnp.asarray(keep_R.reshape(shape), leaf.dtype)
  return jax.tree_util.tree_map_with_path(mask, tree)


def freeze_contexts(peft: PeftConfig, trainable: Sequence[int]) -> optax.GradientTransformation:
  """An optax transformation that zeroes the updates of every context row not in `trainable`.

  Chain it last (optax.chain(optimizer, freeze_contexts(...))) so that frozen rows stay exactly
  as they are under any optimizer, weight decay included.
  """
  _rows(peft, trainable)  # checked here, at construction
  return optax.stateless(lambda updates, params=None: mask_rows(updates, peft, trainable))


def adapted_contexts(peft: PeftConfig) -> tuple[int, ...]:
  """The contexts that have an adaptor group (some method in their spec)."""
  return tuple(c for c, spec in zip(peft.rows, peft.row_specs) if spec.methods)
