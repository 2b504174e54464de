"""The import graph of cpeft_jax/ runs one way: no circle, no module importing a room above
its own, no import inside a function to dodge a circle, no private name used across modules.

Every import counts, including those inside functions. A new room gets a layer in `LAYERS`; a
module may import modules of lower layers, and of its own package at the same layer.
"""

import ast
import pathlib

ROOT = pathlib.Path(__file__).resolve().parents[1] / 'cpeft_jax'

# Rooms from the bottom up; the longest matching prefix names a module's room.
LAYERS = {
    'cpeft_jax.trees': 0, 'cpeft_jax.configlib': 0, 'cpeft_jax.lowp': 0,
    'cpeft_jax.workdir': 0, 'cpeft_jax.xla_flags': 0, 'cpeft_jax.contexts': 0,
    'cpeft_jax.hosts': 0, 'cpeft_jax.invocations': 0,
    'cpeft_jax.sharding': 1, 'cpeft_jax.integrity': 1,
    'cpeft_jax.adaptors': 2,
    'cpeft_jax.models': 3, 'cpeft_jax.quantize': 3, 'cpeft_jax.data': 3,
    'cpeft_jax.checkpoints': 4,
    'cpeft_jax.catalog': 5, 'cpeft_jax.plugins': 5, 'cpeft_jax.trainable': 5,
    'cpeft_jax.losses': 6,
    'cpeft_jax.experiment': 7,
    'cpeft_jax.params': 8, 'cpeft_jax.runs': 8, 'cpeft_jax.schema': 8,
    'cpeft_jax.evaluation': 9, 'cpeft_jax.interop': 9,
    'cpeft_jax.train': 10,
    'cpeft_jax.demo': 11, 'cpeft_jax.plugins.__main__': 11, 'cpeft_jax.plan': 11,
    'cpeft_jax.sweep': 12,
}
# Imports inside functions that are there on purpose (a command line's own dependencies).
FUNCTION_LEVEL_OK = set()


def _modules():
  mods = {}
  for p in ROOT.rglob('*.py'):
    name = '.'.join(p.relative_to(ROOT.parent).with_suffix('').parts)
    mods[name.removesuffix('.__init__')] = p
  return mods


def _imports(mods):
  """{module: [(imported module, line, inside a function, imported names)]}."""
  out = {}
  for m, p in mods.items():
    tree = ast.parse(p.read_text())
    pkg = m if p.name == '__init__.py' else m.rsplit('.', 1)[0]
    in_function = {id(n) for f in ast.walk(tree)
                   if isinstance(f, (ast.FunctionDef, ast.AsyncFunctionDef))
                   for n in ast.walk(f)}
    found = []
    for node in ast.walk(tree):
      if isinstance(node, ast.Import):
        targets = [(a.name, ()) for a in node.names]
      elif isinstance(node, ast.ImportFrom):
        base = node.module or ''
        if node.level:
          base = '.'.join(pkg.split('.')[:len(pkg.split('.')) - node.level + 1] +
                          ([base] if base else []))
        subs = [f'{base}.{a.name}' for a in node.names if f'{base}.{a.name}' in mods]
        names = tuple(a.name for a in node.names if f'{base}.{a.name}' not in mods)
        targets = [(s, ()) for s in subs] + ([(base, names)] if names else [])
      else:
        continue
      for t, names in targets:
        if t in mods and t != m:
          found.append((t, node.lineno, id(node) in in_function, names))
    out[m] = found
  return out


def _layer(module):
  if module == 'cpeft_jax':
    return 0, module
  prefix = max((k for k in LAYERS if module == k or module.startswith(k + '.')), key=len,
               default=None)
  assert prefix is not None, f'{module} has no layer in LAYERS: give its room one'
  return LAYERS[prefix], prefix


def test_imports_run_one_way():
  mods = _modules()
  wrong = []
  for m, found in _imports(mods).items():
    layer, room = _layer(m)
    for t, line, _, _ in found:
      t_layer, t_room = _layer(t)
      if t_layer > layer or (t_layer == layer and t_room != room):
        wrong.append(f'{m}:{line} imports {t} ({t_room}, layer {t_layer} >= {layer})')
  assert not wrong, '\n'.join(wrong)


def test_no_circle():
  mods = _modules()
  edges = {m: {t for t, *_ in found} for m, found in _imports(mods).items()}
  done, path = set(), []

  def visit(m):
    if m in path:
      raise AssertionError('import circle: ' + ' -> '.join(path[path.index(m):] + [m]))
    if m in done:
      return
    path.append(m)
    for t in sorted(edges[m]):
      visit(t)
    path.pop()
    done.add(m)
  for m in sorted(edges):
    visit(m)


def test_no_function_level_project_import():
  found = [f'{m}:{line} imports {t}' for m, imports in _imports(_modules()).items()
           for t, line, inside, _ in imports if inside and (m, t) not in FUNCTION_LEVEL_OK]
  assert not found, '\n'.join(found)


def test_no_private_name_across_modules():
  mods = _modules()
  found = []
  for m, imports in _imports(mods).items():
    found += [f'{m}:{line} imports {t}.{n}' for t, line, _, names in imports for n in names
              if n.startswith('_')]
    aliases = {}
    tree = ast.parse(mods[m].read_text())
    for node in ast.walk(tree):
      if isinstance(node, ast.ImportFrom) and node.module:
        for a in node.names:
          if f'{node.module}.{a.name}' in mods:
            aliases[a.asname or a.name] = f'{node.module}.{a.name}'
      elif isinstance(node, ast.Import):
        for a in node.names:
          if a.name in mods and a.asname:
            aliases[a.asname] = a.name
    for node in ast.walk(tree):
      if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and
          node.value.id in aliases and node.attr.startswith('_') and
          not node.attr.startswith('__')):
        found.append(f'{m}:{node.lineno} uses {aliases[node.value.id]}.{node.attr}')
  assert not found, '\n'.join(found)


def test_layers_can_fail():
  """The checks see real edges: experiment imports adaptors (layer 2 < 7), and a reversed
  edge would be reported."""
  imports = _imports(_modules())
  assert 'cpeft_jax.adaptors' in {t.rsplit('.', 1)[0] if t.count('.') > 1 else t
                                  for t, *_ in imports['cpeft_jax.experiment']}
  assert _layer('cpeft_jax.adaptors.dense')[0] < _layer('cpeft_jax.experiment')[0]
