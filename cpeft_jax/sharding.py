"""The device mesh (data, fsdp, tensor) and the partition rules that place the model on it.

`config.mesh = dict(data=-1, fsdp=1, tensor=1)` names the size of each axis; -1 takes the
devices the others leave. The batch is split over ('data', 'fsdp'). Parameters are placed by
regex rules over their paths ('collection/module/.../leaf'): the first rule whose regex is
found in the path wins, and its axes apply to the *trailing* dimensions of the leaf, so one
rule covers a kernel with or without the scanned layer axis and a table with its leading
(layer, context) axes. An axis entry may name several mesh axes, ('tensor', 'fsdp'): the
dimension is split over their product, the first one major. Where the mesh does not divide a
dimension, mesh axes are dropped from the end of its entry until it does (at worst the
dimension is replicated); a rule never makes a leaf fail to place.

The frozen base follows the Megatron layout, by the projection names of every supported
architecture (Llama, GPT-2 with its fused c_attn already split into q/k/v_proj, OPT; the
CLIP/SigLIP towers and the MLP connector share OPT's names):
  column-parallel  q/k/v/gate/up/gate_up_proj, c_fc, fc1   kernel [d_in, d_out] (fsdp, tensor),
                                                           bias [d_out] over tensor
  row-parallel     o/down/out_proj, c_proj, fc2            kernel (tensor, fsdp), bias replicated
  embed_tokens (tensor, fsdp); embed_positions (-, fsdp); lm_head (fsdp, tensor);
  OPT's project_in/out (fsdp, -); norms, the other biases, the rest: replicated.

The adaptor tables ('adaptors': [layers, contexts, ...] per projection) are split over fsdp
as well as tensor, along the feature axis they share with their base kernel: a
column-parallel projection's lora_a [d_in, r] over fsdp and its lora_b [r, d_out], ia3,
bitfit and dora_m [d_out] over (tensor, fsdp); a row-parallel one's lora_a [d_in, r] and ia3
[d_in] over (tensor, fsdp), its lora_b [r, d_out], bitfit and dora_m over fsdp. So each
device holds 1/fsdp of every table (1/(fsdp x tensor) of those split over both). The
optimizer state mirrors the trainable tree: `state_shardings` gives each of its leaves that
stands for a parameter (its path ends with the parameter's, same shape: Adam's mu and nu)
that parameter's sharding, whatever the rules say about the longer path.

A quantized frozen leaf (cpeft_jax/quantize.py) is a small pytree under its kernel's path:
'.../kernel/qarray/qvalue' (the 4/8-bit values, the kernel's shape) and '.../qarray/scale'
(the kernel's rank, one scale per output channel and per block of the contracted axis). Both
follow the kernel's rule: the values are split as the kernel would be, and the scales along
the same axes, which keeps each device's scales beside its values; a scale axis that its mesh
axis does not divide (one block, or a block count the axis does not divide) is replicated.

`Placement` (a mesh, the rules and a path prefix) is what loaders and inits take so that every
array is created in its NamedSharding: a jit's out_shardings, or `put` of a host array through
jax.make_array_from_callback (each device receives only its slice; no device holds a whole
leaf that the rules split).
"""

from __future__ import annotations

import dataclasses
import functools
import re
from collections.abc import Mapping, Sequence
from typing import Any

from absl import logging
import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from cpeft_jax import trees

AXES = ('data', 'fsdp', 'tensor')
BATCH_AXES = ('data', 'fsdp')  # the leading (batch) dimension of every input
DEFAULT_MESH = {'data': -1, 'fsdp': 1, 'tensor': 1}
# The parts of a quantized leaf, matched by the rules as the kernel they stand for.
_QUANTIZED_PART = re.compile(r'/qarray/(qvalue|scale|zero_point)$')

_COL = r'(?:(?:q|k|v|gate|up|gate_up)_proj|c_fc|fc1)'  # output features over 'tensor'
_ROW = r'(?:(?:o|down|out)_proj|c_proj|fc2)'  # input features over 'tensor'
_TF = ('tensor', 'fsdp')  # one dimension over both: the kernel's tensor split, then fsdp
# (regex searched in the leaf path, axes of the trailing dims); the first match wins.
DEFAULT_RULES: tuple[tuple[str, tuple[Any, ...]], ...] = (
    # The frozen base.
    (rf'/{_COL}/kernel$', ('fsdp', 'tensor')),
    (rf'/{_ROW}/kernel$', ('tensor', 'fsdp')),
    (rf'/{_COL}/bias$', ('tensor',)),
    (r'/embed_tokens/embedding$', ('tensor', 'fsdp')),
    (r'/embed_positions/embedding$', (None, 'fsdp')),
    (r'/lm_head/kernel$', ('fsdp', 'tensor')),
    (r'/project_(in|out)/kernel$', ('fsdp', None)),
    # The adaptor tables [layers, contexts, ...] (and, by their paths, their Adam moments).
    (rf'/{_COL}/lora_a$', ('fsdp', None)),
    (rf'/{_COL}/lora_b$', (None, _TF)),
    (rf'/{_COL}/(ia3|bitfit|dora_m)$', (_TF,)),
    (rf'/{_ROW}/lora_a$', (_TF, None)),
    (rf'/{_ROW}/lora_b$', (None, 'fsdp')),
    (rf'/{_ROW}/ia3$', (_TF,)),  # a row-parallel projection scales its input
    (rf'/{_ROW}/(bitfit|dora_m)$', ('fsdp',)),
    (r'.*', ()),  # norms, other biases, the connector's proj, the vision stem: replicated
)


def parse_mesh(text: str) -> dict[str, int]:
  """A --mesh flag, 'data=2,fsdp=2,tensor=2', as {axis: size}; `mesh_shape` checks the sizes."""
  try:
    return {k.strip(): int(v) for k, v in (item.split('=') for item in text.split(','))}
  except ValueError:
    raise ValueError(f'--mesh={text!r}; expected axis=size pairs like data=2,fsdp=2,tensor=2.')


def mesh_shape(spec: Mapping[str, int] | None, num_devices: int) -> dict[str, int]:
  """Axis sizes with -1 resolved; raises unless they multiply to `num_devices`."""
  spec = dict(DEFAULT_MESH if spec is None else spec)
  unknown = sorted(set(spec) - set(AXES))
  if unknown:
    raise ValueError(f'config.mesh has unknown axes {unknown}; expected {list(AXES)}.')
  sizes = {a: spec.get(a, 1) for a in AXES}
  for a, n in sizes.items():
    if isinstance(n, bool) or not isinstance(n, int) or (n < 1 and n != -1):
      raise ValueError(f'config.mesh.{a}={n!r}; expected a positive int or -1 (the rest).')
  free = [a for a, n in sizes.items() if n == -1]
  if len(free) > 1:
    raise ValueError(f'config.mesh: only one axis may be -1, got {free}.')
  fixed = int(np.prod([n for n in sizes.values() if n != -1]))
  if free:
    if num_devices % fixed:
      raise ValueError(f'config.mesh={spec}: the fixed axes ({fixed} devices) do not divide the '
                       f'{num_devices} devices.')
    sizes[free[0]] = num_devices // fixed
  if int(np.prod(list(sizes.values()))) != num_devices:
    raise ValueError(f'config.mesh={spec} spans {int(np.prod(list(sizes.values())))} devices; '
                     f'expected a product of {num_devices} (jax.device_count()).')
  return sizes


def make_mesh(spec: Mapping[str, int] | None = None) -> jax.sharding.Mesh:
  sizes = mesh_shape(spec, jax.device_count())
  return jax.make_mesh(tuple(sizes[a] for a in AXES), AXES,
                       axis_types=(jax.sharding.AxisType.Auto,) * len(AXES))


def on_mesh(fn, mesh: jax.sharding.Mesh):
  """`fn` (a jitted step) traced and run with `mesh` as the context mesh (jax.set_mesh): the
  model then routes contexts and runs its adaptors shard by shard over the batch axes
  (adaptors.routing), with no collective on tokens."""
  @functools.wraps(fn)
  def call(*args, **kwargs):
    with jax.set_mesh(mesh):
      return fn(*args, **kwargs)
  return call


def check_batch(sizes: Mapping[str, int], name: str, batch_size: int) -> None:
  """Raises unless `batch_size` splits over data x fsdp of the mesh axis `sizes`."""
  n = int(np.prod([sizes[a] for a in BATCH_AXES]))
  if batch_size % n:
    raise ValueError(f'{name}.batch_size={batch_size} must be divisible by data x fsdp = {n} '
                     f'(mesh {dict(sizes)}).')


def batch_sharding(mesh: jax.sharding.Mesh) -> NamedSharding:
  return NamedSharding(mesh, P(BATCH_AXES))


def replicated(mesh: jax.sharding.Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def parse_rules(rules: Sequence[Sequence[Any]] | None) -> tuple[tuple[re.Pattern, tuple], ...]:
  """Compiled (regex, axes) rules; checks each axis name. None: `DEFAULT_RULES`."""
  out = []
  for i, rule in enumerate(DEFAULT_RULES if rules is None else rules):
    if len(rule) != 2:
      raise ValueError(f'partition rule {i} is {rule!r}; expected (regex, axes).')
    pattern, axes = rule
    axes = tuple(axes)
    for a in axes:
      names = a if isinstance(a, (tuple, list)) else (a,)
      if any(n is not None and n not in AXES for n in names):
        raise ValueError(f'partition rule {pattern!r} names axis {a!r}; expected None or one of '
                         f'{list(AXES)}.')
    try:
      out.append((re.compile(pattern), axes))
    except re.error as e:
      raise ValueError(f'partition rule {pattern!r} is not a valid regex: {e}') from e
  return tuple(out)


def spec_for(path: str, shape: tuple[int, ...], mesh: jax.sharding.Mesh, rules) -> P:
  """The PartitionSpec of one leaf: the first matching rule, aligned to the trailing dims.

  The values and scales of a quantized kernel take the kernel's rule (see the module's doc).
  """
  kernel_path = _QUANTIZED_PART.sub('', path)
  for pattern, axes in rules:
    if pattern.search(kernel_path):
      break
  else:
    return P()
  if len(axes) > len(shape):
    return P()  # e.g. a scalar optimizer count whose path happens to match
  dims = [None] * (len(shape) - len(axes)) + list(axes)
  for i, a in enumerate(dims):
    if a is None:
      continue
    names = tuple(a) if isinstance(a, (tuple, list)) else (a,)
    keep = names
    while keep and shape[i] % int(np.prod([mesh.shape[n] for n in keep])):
      keep = keep[:-1]
    if keep != names:
      logging.info('sharding: %s dim %d (%d) is not divisible by mesh axis %s (%d); %s.',
                   path, i, shape[i], a, int(np.prod([mesh.shape[n] for n in names])),
                   f'split over {keep} only' if keep else 'replicated')
    dims[i] = keep if len(keep) > 1 else (keep[0] if keep else None)
  return P(*dims)


def tree_shardings(tree, mesh: jax.sharding.Mesh, rules=None):
  """NamedShardings for every leaf of `tree` (arrays or jax.ShapeDtypeStructs)."""
  rules = parse_rules(None) if rules is None else rules
  return jax.tree_util.tree_map_with_path(
      lambda kp, x: NamedSharding(
          mesh, spec_for(trees.path_str(kp), tuple(np.shape(x)), mesh, rules)), tree)


def state_shardings(state, mesh: jax.sharding.Mesh, rules=None):
  """NamedShardings of a train state (`.trainable`, `.opt_state`, arrays or shapes).

  The trainable tree is placed by the rules; every optimizer leaf whose path ends with a
  parameter's path and has its shape (Adam's mu and nu, under any chain or mask) takes that
  parameter's sharding, so the moments are split exactly as what they track; other optimizer
  leaves (counts, hyperparameters) by the rules.
  """
  rules = parse_rules(None) if rules is None else rules
  trainable_sh = tree_shardings(state.trainable, mesh, rules)
  params = {trees.path_str(kp): (tuple(np.shape(x)), sh) for (kp, x), sh in zip(
      jax.tree_util.tree_flatten_with_path(state.trainable)[0], jax.tree.leaves(trainable_sh))}

  def mirror(kp, x):
    path, shape = 'opt_state/' + trees.path_str(kp), tuple(np.shape(x))
    parts = path.split('/')
    for i in range(1, len(parts)):
      param = params.get('/'.join(parts[i:]))
      if param is not None and param[0] == shape:
        return param[1]
    return NamedSharding(mesh, spec_for(path, shape, mesh, rules))

  rest = tree_shardings(state.replace(trainable=None, opt_state=None), mesh, rules)  # the step
  return rest.replace(trainable=trainable_sh,
                      opt_state=jax.tree_util.tree_map_with_path(mirror, state.opt_state))


def describe(shardings) -> dict[str, str]:
  """{path: spec} of the sharded leaves, for logs and tests."""
  flat = jax.tree_util.tree_flatten_with_path(shardings)[0]
  return {trees.path_str(kp): str(s.spec) for kp, s in flat if any(a is not None for a in s.spec)}


@dataclasses.dataclass(frozen=True)
class Placement:
  """Where the leaves of a subtree go: the rules applied to `prefix` + each leaf's path.

  A decoder loader is given `Placement(mesh, rules, 'params/decoder/')`, so its paths
  ('layers/attn/q_proj/kernel') are matched as the VLM's ('params/decoder/layers/...').
  """
  mesh: jax.sharding.Mesh
  rules: Any = None  # as in a config (None: DEFAULT_RULES), or already parsed
  prefix: str = ''

  def __post_init__(self):
    if self.rules is None or not all(isinstance(r[0], re.Pattern) for r in self.rules):
      object.__setattr__(self, 'rules', parse_rules(self.rules))

  def under(self, prefix: str) -> Placement:
    return dataclasses.replace(self, prefix=self.prefix + prefix)

  def __call__(self, path: str, shape: tuple[int, ...]) -> NamedSharding:
    return NamedSharding(self.mesh, spec_for(self.prefix + path, tuple(shape), self.mesh,
                                             self.rules))

  def tree(self, tree, path: str = ''):
    """NamedShardings of every leaf of `tree` (arrays or shapes) found at `path`."""
    base = self.prefix + (path + '/' if path else '')
    return jax.tree_util.tree_map_with_path(
        lambda kp, x: NamedSharding(self.mesh, spec_for(
            base + trees.path_str(kp), tuple(np.shape(x)), self.mesh, self.rules)), tree)

  def put(self, path: str, x) -> jax.Array:
    """A host array as a global array placed by the rules; each device gets only its slice."""
    x = np.asarray(x)
    return jax.make_array_from_callback(x.shape, self(path, x.shape), lambda index: x[index])

  def put_tree(self, tree, path: str = ''):
    """`put` of every leaf of a tree of host arrays."""
    base = path + '/' if path else ''
    return jax.tree_util.tree_map_with_path(
        lambda kp, x: self.put(base + trees.path_str(kp), x), tree)
