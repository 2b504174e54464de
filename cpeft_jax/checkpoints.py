"""Hugging Face checkpoints -> the Flax decoder's trees, one name map per architecture.

A checkpoint is a directory (or a hub id already in the local Hugging Face cache: loading never
goes online) holding config.json and either safetensors (model.safetensors, or shards listed in
model.safetensors.index.json) or the msgpack files of transformers' former Flax models
(flax_model.msgpack, or shards listed in flax_model.msgpack.index.json). Tensors are read one
at a time and written straight into the stacked [layers, ...] leaves of 'params' in the
requested dtype, so the model is never held twice. Every shape is checked before anything is
read; missing tensors are freshly initialised and reported, unexpected ones reported, and
`strict=True` turns either into an error. Adaptor tables always start fresh.

The pieces that do not depend on the architecture (locating a checkpoint, reading its weight
files, planning and filling the leaves, reporting) are shared with vision_checkpoints.py.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import pathlib
import re
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import flax
import jax
import jax.numpy as jnp
import numpy as np

from cpeft_jax import adaptors
from cpeft_jax.adaptors import PeftConfig
from cpeft_jax.models import hf_configs
from cpeft_jax.models.decoders import make_decoder
from cpeft_jax.models.llama import DTYPES, DecoderConfig

log = logging.getLogger(__name__)

CONFIG = 'config.json'
SAFETENSORS, SAFETENSORS_INDEX = 'model.safetensors', 'model.safetensors.index.json'
MSGPACK, MSGPACK_INDEX = 'flax_model.msgpack', 'flax_model.msgpack.index.json'

# How a PyTorch tensor becomes a Flax leaf. LINEAR: torch weight [d_out, d_in] -> kernel
# [d_in, d_out]; CONV1D: GPT-2's Conv1D weight, already [d_in, d_out]; EMBED: [vocab, d] as is
# (Flax calls it 'embedding'); VECTOR: as is; SCALE: a LayerNorm weight (Flax's 'scale').
LINEAR, CONV1D, EMBED, VECTOR, SCALE = 'linear', 'conv1d', 'embed', 'vector', 'scale'
# The axes permutation that turns a stored tensor of each kind into its Flax leaf: PyTorch's,
# and that of transformers' former Flax models (whose GPT-2 Conv1D kernel is [d_out, d_in]).
TORCH_LAYOUT = {LINEAR: (1, 0)}
FLAX_LAYOUT = {CONV1D: (1, 0)}


@dataclasses.dataclass(frozen=True)
class Split:
  """Piece `index` of `parts` equal pieces of one tensor along the leaf's output (last) axis:
  GPT-2's fused c_attn holds q, k and v."""
  name: str
  index: int
  parts: int


@dataclasses.dataclass(frozen=True)
class Concat:
  """Tensors joined along the leaf's output axis: separate gate and up into gate_up_proj."""
  names: tuple[str, ...]


@dataclasses.dataclass(frozen=True)
class NameMap:
  """One architecture's checkpoint names, keyed by the Flax parameter path ('/'-joined).

  Names are transformers' PyTorch state-dict names (or a `Split`/`Concat` of them); '{layer}'
  marks a per-layer tensor, stacked into the leading layer axis of the Flax leaf. `prefix` is the base model's prefix, absent from
  checkpoints of the bare base model. `ignore` matches buffers that hold no weights, and
  `tied_copies` the stored copies of tied embeddings (transformers ties them and ignores them).
  """
  params: Mapping[str, tuple[str | Split | Concat, str]]
  prefix: str = 'model.'
  ignore: tuple[str, ...] = ()
  tied_copies: tuple[str, ...] = ()


_LAYER = 'model.layers.{layer}.'
LLAMA = NameMap(
    params={
        'embed_tokens/embedding': ('model.embed_tokens.weight', EMBED),
        'norm/weight': ('model.norm.weight', VECTOR),
        'lm_head/kernel': ('lm_head.weight', LINEAR),
        'layers/input_layernorm/weight': (_LAYER + 'input_layernorm.weight', VECTOR),
        'layers/post_attention_layernorm/weight': (_LAYER + 'post_attention_layernorm.weight',
                                                   VECTOR),
        **{f'layers/attn/{p}/kernel': (_LAYER + f'self_attn.{p}.weight', LINEAR)
           for p in ('q_proj', 'k_proj', 'v_proj', 'o_proj')},
        **{f'layers/attn/{p}/bias': (_LAYER + f'self_attn.{p}.bias', VECTOR)
           for p in ('q_proj', 'k_proj', 'v_proj')},  # Qwen2 only (cfg.qkv_bias)
        **{f'layers/mlp/{p}/kernel': (_LAYER + f'mlp.{p}.weight', LINEAR)
           for p in ('gate_proj', 'up_proj', 'down_proj')},
        'layers/mlp/gate_up_proj/kernel': (Concat((_LAYER + 'mlp.gate_proj.weight',
                                                   _LAYER + 'mlp.up_proj.weight')), LINEAR),
    },
    ignore=(r'model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq',),  # older PyTorch buffers
    tied_copies=('lm_head.weight',))


def _layer_norm(flax_path, hf_name):
  return {f'{flax_path}/scale': (hf_name + '.weight', SCALE),
          f'{flax_path}/bias': (hf_name + '.bias', VECTOR)}


def _dense(flax_path, hf_name, kind=LINEAR):
  return {f'{flax_path}/kernel': (hf_name + '.weight', kind),
          f'{flax_path}/bias': (hf_name + '.bias', VECTOR)}


_H = 'transformer.h.{layer}.'
GPT2 = NameMap(
    params={
        'embed_tokens/embedding': ('transformer.wte.weight', EMBED),
        'embed_positions/embedding': ('transformer.wpe.weight', EMBED),
        **_layer_norm('norm', 'transformer.ln_f'),
        **_layer_norm('layers/ln_1', _H + 'ln_1'),
        **_layer_norm('layers/ln_2', _H + 'ln_2'),
        **{f'layers/attn/{p}/{leaf}': (Split(f'{_H}attn.c_attn.{w}', i, 3), kind)
           for i, p in enumerate(('q_proj', 'k_proj', 'v_proj'))
           for leaf, w, kind in (('kernel', 'weight', CONV1D), ('bias', 'bias', VECTOR))},
        **_dense('layers/attn/c_proj', _H + 'attn.c_proj', CONV1D),
        **_dense('layers/mlp/c_fc', _H + 'mlp.c_fc', CONV1D),
        **_dense('layers/mlp/c_proj', _H + 'mlp.c_proj', CONV1D),
    },
    prefix='transformer.',
    ignore=(r'(transformer\.)?h\.\d+\.attn\.(bias|masked_bias)',),  # causal-mask buffers
    tied_copies=('lm_head.weight',))

_D, _L = 'model.decoder.', 'model.decoder.layers.{layer}.'
OPT = NameMap(
    params={
        'embed_tokens/embedding': (_D + 'embed_tokens.weight', EMBED),
        'embed_positions/embedding': (_D + 'embed_positions.weight', EMBED),
        'project_in/kernel': (_D + 'project_in.weight', LINEAR),
        'project_out/kernel': (_D + 'project_out.weight', LINEAR),
        'lm_head/kernel': ('lm_head.weight', LINEAR),
        **_layer_norm('norm', _D + 'final_layer_norm'),
        **_layer_norm('layers/self_attn_layer_norm', _L + 'self_attn_layer_norm'),
        **_layer_norm('layers/final_layer_norm', _L + 'final_layer_norm'),
        **{k: v for p in ('q_proj', 'k_proj', 'v_proj', 'out_proj')
           for k, v in _dense(f'layers/attn/{p}', f'{_L}self_attn.{p}').items()},
        **_dense('layers/mlp/fc1', _L + 'fc1'),
        **_dense('layers/mlp/fc2', _L + 'fc2'),
    },
    tied_copies=('lm_head.weight',))
# Mistral and Qwen2 name their tensors as Llama does.
NAME_MAPS = {'llama': LLAMA, 'mistral': LLAMA, 'qwen2': LLAMA, 'gpt2': GPT2, 'opt': OPT}
# The decoder architecture (DecoderConfig.arch) of each model_type.
ARCH_OF = {'llama': 'llama', 'mistral': 'llama', 'qwen2': 'llama', 'gpt2': 'gpt2', 'opt': 'opt'}


class LoadReport(NamedTuple):
  """Checkpoint names the model needed but did not find, and found but did not use."""
  missing: tuple[str, ...]
  unexpected: tuple[str, ...]


class Pretrained(NamedTuple):
  """A loaded decoder: its config, frozen 'params', fresh 'adaptors' tables, and the report."""
  config: DecoderConfig
  params: dict
  adaptors: dict
  report: LoadReport


# ----------------------------------------------------------------------------- locating files


def resolve(path_or_id: str | os.PathLike, *, revision: str | None = None,
            cache_dir: str | os.PathLike | None = None) -> pathlib.Path:
  """A checkpoint directory: the path itself, or a hub id's snapshot in the local HF cache."""
  path = pathlib.Path(path_or_id).expanduser()
  if path.is_dir():
    return path
  text = str(path_or_id)
  if path.exists() or text.startswith(('/', '.', '~')) or text.count('/') > 1:
    raise FileNotFoundError(f'Checkpoint {text!r} is not a directory.')
  from huggingface_hub import snapshot_download
  from huggingface_hub.errors import HFValidationError, LocalEntryNotFoundError
  cache = cache_dir or _hub_cache()
  try:
    return pathlib.Path(snapshot_download(text, revision=revision, cache_dir=cache,
                                          local_files_only=True))
  except (LocalEntryNotFoundError, HFValidationError) as e:
    raise FileNotFoundError(
        f'Checkpoint {text!r} is not a local directory and not in the local Hugging Face cache '
        f'({cache}); loading never downloads. Download it first (`hf download {text}`) or pass '
        'its directory.') from e


def _hub_cache() -> str:
  """The hub cache as the environment says now (huggingface_hub reads it once, at import)."""
  if os.environ.get('HF_HUB_CACHE'):
    return os.environ['HF_HUB_CACHE']
  if os.environ.get('HF_HOME'):
    return os.path.join(os.environ['HF_HOME'], 'hub')
  from huggingface_hub import constants
  return constants.HF_HUB_CACHE


def read_config(directory: str | os.PathLike) -> dict[str, Any]:
  path = pathlib.Path(directory) / CONFIG
  if not path.is_file():
    raise FileNotFoundError(f'No {CONFIG} in checkpoint directory {directory}.')
  return json.loads(path.read_text())


# ----------------------------------------------------------------------------- tensor sources


class Safetensors:
  """Safetensors files read one tensor at a time; names and layouts are PyTorch's."""
  torch_layout, sep = True, '.'

  def __init__(self, files):
    from safetensors import safe_open
    self._file_of = {}
    with jax.default_device(jax.devices('cpu')[0]):
      for file in files:
        # 'flax', not 'numpy': numpy has no bfloat16. Reads go to the CPU (see `read`).
        handle = safe_open(str(file), framework='flax')
        self._file_of.update(dict.fromkeys(handle.keys(), handle))

  def name(self, hf_name: str, kind: str) -> str:
    del kind
    return hf_name

  def keys(self):
    return self._file_of.keys()

  def shape(self, key):
    return tuple(self._file_of[key].get_slice(key).get_shape())

  def read(self, key) -> np.ndarray:
    with jax.default_device(jax.devices('cpu')[0]):  # host memory, not an accelerator's
      return np.asarray(self._file_of[key].get_tensor(key))


class _Arrays:
  """In-memory arrays keyed by name: a PyTorch state dict, or a flattened Flax msgpack."""

  def __init__(self, arrays: Mapping[str, Any], torch_layout: bool):
    self._arrays, self.torch_layout = dict(arrays), torch_layout
    self.sep = '.' if torch_layout else '/'

  def name(self, hf_name: str, kind: str) -> str:
    if self.torch_layout:
      return hf_name
    # transformers' Flax models: 'model/layers/0/self_attn/q_proj/kernel', 'norm/weight', ...
    *path, leaf = hf_name.split('.')
    if leaf == 'weight':
      leaf = {LINEAR: 'kernel', CONV1D: 'kernel', EMBED: 'embedding', VECTOR: 'weight',
              SCALE: 'scale'}[kind]
    return '/'.join(path + [leaf])

  def keys(self):
    return self._arrays.keys()

  def shape(self, key):
    return tuple(np.shape(self._arrays[key]))

  def read(self, key) -> np.ndarray:
    return np.asarray(self._arrays.pop(key))  # popped: each tensor is used once, then freed


def _read_msgpack(files) -> _Arrays:
  """transformers' Flax checkpoints are msgpack (no random access): each file is read whole."""
  flat = {}
  for file in files:
    state = flax.serialization.msgpack_restore(pathlib.Path(file).read_bytes())
    flat.update(flax.traverse_util.flatten_dict(state, sep='/'))  # shards hold flat '/' keys
    del state
  return _Arrays(flat, torch_layout=False)


def open_weights(directory: pathlib.Path, msgpack: bool = True):
  """The tensors of a checkpoint directory: safetensors, or (if `msgpack`) Flax msgpack files."""
  formats = [(SAFETENSORS, SAFETENSORS_INDEX, Safetensors)]
  if msgpack:
    formats.append((MSGPACK, MSGPACK_INDEX, _read_msgpack))
  for single, index, opener in formats:
    if (directory / single).is_file():
      return opener([directory / single])
    if (directory / index).is_file():
      weight_map = json.loads((directory / index).read_text())['weight_map']
      files = [directory / f for f in dict.fromkeys(weight_map.values())]
      absent = [f.name for f in files if not f.is_file()]
      if absent:
        raise FileNotFoundError(f'{directory / index} lists shards that are not there: {absent}.')
      return opener(files)
  names = [name for single, index, _ in formats for name in (single, index)]
  present = sorted(p.name for p in directory.iterdir())
  raise FileNotFoundError(
      f'No weights in {directory}: expected {", ".join(names[:-1])} or {names[-1]}; found '
      f'{present}. (PyTorch .bin files are not read: save the model again with '
      'save_pretrained, which writes safetensors.)')


# ----------------------------------------------------------------------------- loading


def load_decoder(path_or_id: str | os.PathLike, peft: PeftConfig | None = None,
                 dtype: str = 'float32', *, strict: bool = False, seed: int = 0,
                 revision: str | None = None, cache_dir: str | os.PathLike | None = None,
                 **overrides) -> Pretrained:
  """A pre-trained decoder: (config, params in `dtype`, fresh adaptor tables, load report).

  `dtype` is that of the frozen weights and of the computation; `overrides` set other
  `DecoderConfig` fields (e.g. dtype='bfloat16' with param_dtype='float32', remat=True).
  """
  directory = resolve(path_or_id, revision=revision, cache_dir=cache_dir)
  cfg = hf_configs.decoder_config(read_config(directory),
                                  **{'dtype': dtype, 'param_dtype': dtype, **overrides})
  params, report = load_params(directory, cfg, strict=strict, seed=seed)
  return Pretrained(cfg, params, init_adaptors(cfg, peft, seed), report)


def load_params(path: str | os.PathLike, cfg: DecoderConfig, *, strict: bool = False,
                seed: int = 0, leaf_fn: Callable | None = None) -> tuple[dict, LoadReport]:
  """The 'params' tree of `cfg` (in cfg.param_dtype) from a checkpoint directory or cached id.

  `leaf_fn(path, array)`, if given, transforms each leaf as soon as it is filled (e.g.
  cpeft_jax.quantize.leaf_quantizer), so the whole tree never exists untransformed.
  """
  directory = resolve(path)
  model_type = read_config(directory).get('model_type')
  names = _name_map(model_type, cfg, f'{directory / CONFIG} has model_type')
  return _assemble(open_weights(directory), cfg, names, strict, seed, str(directory), leaf_fn)


def params_from_state_dict(state_dict: Mapping[str, Any], cfg: DecoderConfig, *,
                           model_type: str = 'llama', strict: bool = False,
                           seed: int = 0) -> tuple[dict, LoadReport]:
  """The 'params' tree from an in-memory PyTorch state dict (numpy-convertible tensors)."""
  names = _name_map(model_type, cfg, 'model_type')
  return _assemble(_Arrays(state_dict, torch_layout=True), cfg, names, strict, seed,
                   'the state dict')


def _name_map(model_type, cfg: DecoderConfig, what: str) -> NameMap:
  if model_type not in NAME_MAPS:
    raise ValueError(f'{what}={model_type!r}; supported model types: {", ".join(NAME_MAPS)}.')
  if ARCH_OF[model_type] != cfg.arch:
    raise ValueError(f'{what}={model_type!r}, a {ARCH_OF[model_type]} checkpoint, but the '
                     f'decoder config has arch={cfg.arch!r}.')
  return NAME_MAPS[model_type]


def init_adaptors(cfg: DecoderConfig, peft: PeftConfig | None, seed: int = 0) -> dict:
  """Fresh adaptor tables; only they are computed (the base's init is dead code under jit)."""
  if peft is None or not peft.methods:
    return {}
  model = make_decoder(cfg, peft)
  tokens = jnp.zeros((1, 1), jnp.int32)
  init = lambda key: model.init(key, tokens).get(adaptors.ADAPTORS, {})
  if not jax.tree.leaves(jax.eval_shape(init, jax.random.key(seed))):
    return {}
  return jax.jit(init)(jax.random.key(seed))


class _Views:
  """A tensor source plus the `Split`/`Concat` pieces a name map asks for, as extra keys.

  A stored tensor that several pieces share (GPT-2's c_attn) is read once and kept until its
  last piece is read. `axis_of(kind)` is the stored axis that becomes the leaf's last one.
  """

  def __init__(self, source, layout):
    self.source, self.layout = source, layout
    self.torch_layout, self.sep = source.torch_layout, source.sep
    self._views, self._uses, self._held = {}, {}, {}
    self._present = set(source.keys())

  def define(self, spec, kind) -> str:
    """The key of a name-map entry (already mapped through `source.name`)."""
    if isinstance(spec, str):
      return spec
    parts = (spec.name,) if isinstance(spec, Split) else tuple(spec.names)
    key = (f'{spec.name}[{spec.index}/{spec.parts}]' if isinstance(spec, Split)
           else '+'.join(parts))
    if key not in self._views:
      self._views[key] = (spec, parts, kind)
      for p in parts:
        self._uses[p] = self._uses.get(p, 0) + 1
    return key

  def sources(self, key) -> tuple[str, ...]:
    return self._views[key][1] if key in self._views else (key,)

  def absent(self, key) -> list[str]:
    return [p for p in self.sources(key) if p not in self._present]

  def keys(self):
    return self._present | {k for k in self._views if not self.absent(k)}

  def _axis(self, kind, ndim):
    perm = self.layout.get(kind)
    return perm[-1] if perm else ndim - 1

  def shape(self, key):
    if key not in self._views:
      return self.source.shape(key)
    spec, parts, kind = self._views[key]
    shapes = [list(self.source.shape(p)) for p in parts]
    axis = self._axis(kind, len(shapes[0]))
    out = shapes[0]
    if isinstance(spec, Split):
      out[axis] //= spec.parts
    else:
      out[axis] = sum(s[axis] for s in shapes)
    return tuple(out)

  def _read(self, name):
    if name not in self._held:
      self._held[name] = self.source.read(name)
    x = self._held[name]
    self._uses[name] -= 1
    if not self._uses[name]:
      del self._held[name]
    return x

  def read(self, key) -> np.ndarray:
    if key not in self._views:
      return self.source.read(key)
    spec, parts, kind = self._views[key]
    xs = [self._read(p) for p in parts]
    axis = self._axis(kind, xs[0].ndim)
    if isinstance(spec, Split):
      if xs[0].shape[axis] % spec.parts:
        raise ValueError(f'{spec.name} has {xs[0].shape[axis]} features along axis {axis}, '
                         f'which do not split into {spec.parts} equal parts.')
      return np.split(xs[0], spec.parts, axis=axis)[spec.index]
    return np.concatenate(xs, axis=axis)


def _assemble(source, cfg: DecoderConfig, names: NameMap, strict: bool, seed: int,
              where: str, leaf_fn: Callable | None = None) -> tuple[dict, LoadReport]:
  model = make_decoder(cfg)
  tokens = jnp.zeros((1, 1), jnp.int32)
  init = lambda key: model.init(key, tokens)['params']
  shapes = flax.traverse_util.flatten_dict(jax.eval_shape(init, jax.random.key(0)), sep='/')
  keys = set(source.keys())
  base_only = not any(k.startswith(names.prefix.replace('.', source.sep)) for k in keys)
  layout = TORCH_LAYOUT if source.torch_layout else FLAX_LAYOUT
  views = _Views(source, layout)

  def lookup(hf_name, kind):
    if base_only and hf_name.startswith(names.prefix):
      hf_name = hf_name[len(names.prefix):]
    return source.name(hf_name, kind)

  def key_of(spec, kind, i):
    if isinstance(spec, str):
      return lookup(spec.format(layer=i), kind)
    if isinstance(spec, Split):
      return views.define(Split(lookup(spec.name.format(layer=i), kind), spec.index,
                                spec.parts), kind)
    return views.define(Concat(tuple(lookup(n.format(layer=i), kind) for n in spec.names)),
                        kind)

  def tensor_of(path):
    if path not in names.params:
      raise ValueError(f'The name map has no checkpoint tensor for the Flax parameter {path!r}; '
                       f'this DecoderConfig cannot be loaded from {where}.')
    spec, kind = names.params[path]
    text = spec if isinstance(spec, str) else repr(spec)
    return (lambda i: key_of(spec, kind, i)), '{layer}' in text, kind

  for path, leaf in shapes.items():  # define every piece first: plan_leaves lists keys once
    name_of, stacked, _ = tensor_of(path)
    for i in range(leaf.shape[0]) if stacked else [None]:
      name_of(i)
  plan, missing = plan_leaves(
      shapes, views, tensor_of, layout, where,
      mismatch='{key}: the checkpoint has {got}, the model expects {want}')
  used = {r for slots, _, _ in plan.values() for k in slots if k is not None
          for r in views.sources(k)}
  missing = list(dict.fromkeys(a for k in missing for a in views.absent(k)))
  skip = [re.compile(p) for p in names.ignore]
  if cfg.tie_embeddings:
    skip += [re.compile(re.escape(lookup(n, LINEAR))) for n in names.tied_copies]
  unexpected = sorted(k for k in keys - used if not any(p.fullmatch(k) for p in skip))
  report = LoadReport(tuple(missing), tuple(unexpected))
  log_report(report, where, strict)
  return fill_leaves(plan, shapes, views, layout, init, seed, cfg.param_dtype, where,
                     leaf_fn), report


# ----------------------------------------------------------------------------- shared with vision

# A leaf's plan: the checkpoint name filling each slot (one per layer if stacked; None where the
# checkpoint lacks it), whether it is stacked, and its kind.
Plan = dict[str, tuple[list[str | None], bool, str]]


def plan_leaves(shapes: Mapping[str, Any], source, tensor_of: Callable[[str], tuple],
                layout: Mapping[str, tuple[int, ...]], where: str,
                mismatch: str = '{key}: checkpoint {got}, model {want}') -> tuple[Plan, list]:
  """Which tensor fills each slot of each leaf, and which are missing; nothing is read.

  `tensor_of(path)` gives a leaf's (layer index -> checkpoint name, stacked, kind); `layout`
  maps a kind to the permutation from the stored tensor to the leaf. Every shape is checked
  first, and any mismatch (worded by `mismatch`) is an error before anything loads.
  """
  keys = set(source.keys())
  plan, missing, mismatched = {}, [], []
  for path, leaf in shapes.items():
    name_of, stacked, kind = tensor_of(path)
    want = tuple(leaf.shape[1:] if stacked else leaf.shape)
    if layout.get(kind):
      want = tuple(want[i] for i in np.argsort(layout[kind]))
    slots = []
    for i in range(leaf.shape[0]) if stacked else [None]:
      key = name_of(i)
      if key not in keys:
        missing.append(key)
        key = None
      elif source.shape(key) != want:
        mismatched.append(mismatch.format(key=key, got=source.shape(key), want=want))
      slots.append(key)
    plan[path] = (slots, stacked, kind)
  if mismatched:
    raise ValueError(f'Shape mismatch between {where} and the model config (nothing loaded):\n  '
                     + '\n  '.join(mismatched))
  return plan, missing


def fill_leaves(plan: Plan, shapes: Mapping[str, Any], source,
                layout: Mapping[str, tuple[int, ...]], init: Callable, seed: int,
                param_dtype: str, where: str, leaf_fn: Callable | None = None) -> dict:
  """The 'params' tree: each leaf filled tensor by tensor, missing slots from `init(seed)`;
  `leaf_fn(path, array)` transforms each leaf as soon as it is filled."""
  fresh = {}
  needed = [p for p, (slots, _, _) in plan.items() if None in slots]
  if needed:  # Initialise only the leaves with missing tensors: the rest is dead code.
    fresh = jax.jit(lambda key: {p: flax.traverse_util.flatten_dict(init(key), sep='/')[p]
                                 for p in needed})(jax.random.key(seed))
  dtype = np.dtype(DTYPES[param_dtype])
  used = sum(k is not None for slots, _, _ in plan.values() for k in slots)
  log.info('Loading %d tensors from %s into %d %s leaves.', used, where, len(plan), param_dtype)
  out = {}
  for path, (slots, stacked, kind) in plan.items():
    buf = np.empty(shapes[path].shape, dtype)
    axes = layout.get(kind)
    for i, key in enumerate(slots):
      at = i if stacked else ...
      if key is None:
        buf[at] = np.asarray(fresh[path][at])
      else:
        x = source.read(key)
        buf[at] = x.transpose(axes) if axes else x
    out[path] = jnp.asarray(buf) if leaf_fn is None else leaf_fn(path, buf)
    del buf
  return flax.traverse_util.unflatten_dict(out, sep='/')


def log_report(report: LoadReport, where: str, strict: bool, what: str = 'model'):
  """Warns of missing and unexpected tensors; with `strict`, they are an error naming `what`."""
  def brief(keys):
    return ', '.join(keys[:20]) + (f' and {len(keys) - 20} more' if len(keys) > 20 else '')
  problems = []
  if report.missing:
    problems.append(f'{len(report.missing)} tensor(s) missing from {where}, initialised fresh: '
                    f'{brief(report.missing)}')
  if report.unexpected:
    problems.append(f'{len(report.unexpected)} unexpected tensor(s) in {where}, not loaded: '
                    f'{brief(report.unexpected)}')
  if problems and strict:
    raise ValueError(f'Checkpoint does not match the {what} (strict=True): '
                     + '; '.join(problems) + '.')
  for p in problems:
    log.warning(p)


def save_decoder(directory: str | os.PathLike, cfg: DecoderConfig, params,
                 tokenizer=None) -> pathlib.Path:
  """Writes a Hugging Face checkpoint (config.json + model.safetensors) of `params`.

  The inverse of `load_params`: a Llama checkpoint for arch 'llama', GPT-2 or OPT for theirs;
  transformers' PyTorch models and this project's loader both read it. Written to a temporary
  name and renamed, so an interrupted save leaves no half-written checkpoint. Fused pieces go
  back to transformers' layout (gate+up split, GPT-2's q/k/v joined into c_attn).
  """
  import safetensors.numpy
  if cfg.arch == 'llama' and cfg.qkv_bias:
    raise ValueError('save_decoder writes Llama checkpoints, which have no q/k/v biases; '
                     'this decoder has qkv_bias=True.')
  hf = _hf_config(cfg, tokenizer)
  directory = pathlib.Path(directory)
  tmp = directory.with_name(directory.name + '.tmp')
  tmp.mkdir(parents=True, exist_ok=True)
  flat = flax.traverse_util.flatten_dict(flax.core.unfreeze(params), sep='/')
  flat = {k: np.asarray(jax.device_get(v), np.float32) for k, v in flat.items()}
  tensors = _checkpoint_tensors(flat, NAME_MAPS[hf.model_type], cfg.num_layers)
  safetensors.numpy.save_file(tensors, str(tmp / SAFETENSORS), metadata={'format': 'pt'})
  hf.to_json_file(str(tmp / CONFIG))
  if tokenizer is not None:
    tokenizer.save_pretrained(str(tmp))
  return swap_in(tmp, directory)


def _checkpoint_tensors(flat: dict[str, np.ndarray], names: NameMap,
                        num_layers: int) -> dict[str, np.ndarray]:
  """Flax leaves -> transformers' tensors by the name map read backwards (consumes `flat`)."""
  tensors, pieces = {}, {}
  for path, (spec, kind) in names.params.items():
    if path not in flat:
      continue
    value = flat.pop(path)
    if isinstance(spec, Concat):  # equal parts along the leaf's output axis
      parts = zip(spec.names, np.split(value, len(spec.names), axis=-1))
    elif isinstance(spec, Split):  # joined below, once every piece is there
      pieces.setdefault((spec.name, spec.parts), {})[spec.index] = (value, kind)
      continue
    else:
      parts = [(spec, value)]
    for name, v in parts:
      tensors.update(_per_layer(name, v, kind, num_layers))
  for (name, parts), got in pieces.items():
    if sorted(got) != list(range(parts)):
      raise ValueError(f'save_decoder has only pieces {sorted(got)} of {name} (of {parts}).')
    kind = got[0][1]
    value = np.concatenate([got[i][0] for i in range(parts)], axis=-1)
    tensors.update(_per_layer(name, value, kind, num_layers))
  if flat:
    raise ValueError(f'save_decoder has no checkpoint name for {sorted(flat)}.')
  return tensors


def _per_layer(name: str, value: np.ndarray, kind: str, num_layers: int):
  values = [value[i] for i in range(num_layers)] if '{layer}' in name else [value]
  return {name.format(layer=i): np.ascontiguousarray(v.T if kind == LINEAR else v)
          for i, v in enumerate(values)}


def _hf_config(cfg: DecoderConfig, tokenizer=None):
  """transformers' config of `cfg` (the inverse of hf_configs.decoder_config)."""
  import transformers
  ids = {} if tokenizer is None else dict(bos_token_id=tokenizer.bos_token_id,
                                          eos_token_id=tokenizer.eos_token_id,
                                          pad_token_id=tokenizer.pad_token_id)
  if cfg.arch == 'gpt2':
    hf = transformers.GPT2Config(
        vocab_size=cfg.vocab_size, n_positions=cfg.max_positions, n_embd=cfg.hidden_size,
        n_layer=cfg.num_layers, n_head=cfg.num_heads, n_inner=cfg.intermediate_size,
        activation_function=cfg.activation, layer_norm_epsilon=cfg.layer_norm_eps,
        tie_word_embeddings=True, **ids)
    hf.architectures = ['GPT2LMHeadModel']
  elif cfg.arch == 'opt':
    if cfg.layer_norm_eps != 1e-5:
      raise ValueError(f'save_decoder writes OPT checkpoints, whose LayerNorms have eps 1e-5; '
                       f'this decoder has layer_norm_eps={cfg.layer_norm_eps}.')
    hf = transformers.OPTConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size,
        num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads,
        ffn_dim=cfg.intermediate_size, max_position_embeddings=cfg.max_positions,
        activation_function=cfg.activation, do_layer_norm_before=cfg.pre_norm,
        word_embed_proj_dim=cfg.embed_dim or cfg.hidden_size,
        tie_word_embeddings=cfg.tie_embeddings, **ids)
    hf.architectures = ['OPTForCausalLM']
  else:
    hf = transformers.LlamaConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size,
        num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads,
        num_key_value_heads=cfg.kv_heads, head_dim=cfg.dims,
        intermediate_size=cfg.intermediate_size, rms_norm_eps=cfg.rms_norm_eps,
        rope_theta=cfg.rope_theta, tie_word_embeddings=cfg.tie_embeddings,
        **({} if cfg.rope_type == 'default' else {'rope_scaling': _rope_scaling(cfg)}), **ids)
    hf.architectures = ['LlamaForCausalLM']
  return hf


def swap_in(tmp: pathlib.Path, directory: pathlib.Path) -> pathlib.Path:
  """Moves a fully written `tmp` directory to `directory`, replacing any old one; the old one
  is moved aside first and deleted last, so no moment leaves neither."""
  import shutil
  old = directory.with_name(directory.name + '.old')
  if old.exists():
    shutil.rmtree(old)
  if directory.exists():
    directory.rename(old)
  tmp.rename(directory)
  if old.exists():
    shutil.rmtree(old)
  return directory


def _rope_scaling(cfg: DecoderConfig) -> dict[str, Any]:
  """transformers' rope_scaling dict of a scaled rotary embedding."""
  out = {'rope_type': cfg.rope_type, 'factor': cfg.rope_factor}
  if cfg.rope_type == 'llama3':
    out.update(low_freq_factor=cfg.rope_low_freq_factor,
               high_freq_factor=cfg.rope_high_freq_factor,
               original_max_position_embeddings=cfg.rope_original_max_positions)
  return out
