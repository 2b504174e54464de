"""Procedural scenes: groups of coloured shapes on a 3x3 grid, drawn with numpy.

A scene is a few groups; a group is `count` identical items (same shape, colour and size),
each in its own grid cell, so items never touch. A group's position phrase (left, top, center,
a corner, ...) is derived from the cells it actually occupies, so it is true by construction.
"""

from __future__ import annotations

import dataclasses

import numpy as np

SHAPES = ('circle', 'square', 'triangle', 'diamond', 'cross')
COLORS = {
    'red': (220, 40, 40),
    'green': (40, 180, 60),
    'blue': (50, 90, 235),
    'yellow': (235, 215, 40),
    'purple': (150, 60, 200),
    'orange': (245, 140, 30),
    'white': (240, 240, 240),
    'cyan': (40, 200, 210),
}
SIZES = ('small', 'large')
BACKGROUND = (24, 24, 24)
GRID = 3
MAX_COUNT = 4
MAX_GROUPS = 3
# Radius as a fraction of a grid cell's side, and the gap kept between an item and its cell edge.
_RADIUS = {'small': 0.2, 'large': 0.36}
_MARGIN = 1.5
# Where a group may be asked to go; 'anywhere' leaves the cells to chance.
_TARGETS = ('left', 'right', 'top', 'bottom', 'center', 'anywhere')
_CORNERS = {(0, 0): 'top left', (0, 2): 'top right', (2, 0): 'bottom left', (2, 2): 'bottom right'}


@dataclasses.dataclass(frozen=True)
class Item:
  """One drawn shape: centre (x right, y down) and radius in pixels, and its grid cell."""
  shape: str
  color: str
  size: str
  x: float
  y: float
  radius: float
  cell: tuple[int, int]  # (row, column)


@dataclasses.dataclass(frozen=True)
class Group:
  """Identical items of one colour; `position` is None when the cells share no region."""
  shape: str
  color: str
  size: str
  count: int
  position: str | None


@dataclasses.dataclass(frozen=True)
class Scene:
  image_size: int
  groups: tuple[Group, ...]
  items: tuple[Item, ...]


def position_of(cells: set[tuple[int, int]]) -> str | None:
  """The region every cell lies in: 'center', a corner ('top left'), a side, or None."""
  if cells == {(1, 1)}:
    return 'center'
  if len(cells) == 1 and next(iter(cells)) in _CORNERS:
    return _CORNERS[next(iter(cells))]
  rows, cols = {r for r, _ in cells}, {c for _, c in cells}
  for region, ok in (('left', cols == {0}), ('right', cols == {GRID - 1}),
                     ('top', rows == {0}), ('bottom', rows == {GRID - 1})):
    if ok:
      return region
  return None


def _region_cells(target: str) -> list[tuple[int, int]]:
  every = [(r, c) for r in range(GRID) for c in range(GRID)]
  pick = {
      'left': lambda r, c: c == 0, 'right': lambda r, c: c == GRID - 1,
      'top': lambda r, c: r == 0, 'bottom': lambda r, c: r == GRID - 1,
      'center': lambda r, c: (r, c) == (1, 1), 'anywhere': lambda r, c: True,
  }[target]
  return [cell for cell in every if pick(*cell)]


def sample_scene(rng: np.random.Generator, image_size: int = 64) -> Scene:
  """Draws a random scene description (no pixels yet); every group has its own colour."""
  if image_size < 24:
    raise ValueError(f'image_size must be >= 24 pixels to draw shapes, got {image_size}')
  num_groups = int(rng.choice([1, 2, 3], p=[0.3, 0.4, 0.3]))
  colors = rng.choice(list(COLORS), size=num_groups, replace=False)
  free = set(_region_cells('anywhere'))
  cell_px = image_size / GRID
  groups, items = [], []
  for color in colors:
    shape = str(rng.choice(SHAPES))
    size = str(rng.choice(SIZES))
    count = int(rng.integers(1, MAX_COUNT + 1))
    target = str(rng.choice(_TARGETS))
    options = sorted(free & set(_region_cells(target)))
    if len(options) < count:
      options = sorted(free)
    count = min(count, len(options))
    if count == 0:
      break
    picked = [options[i] for i in sorted(rng.choice(len(options), size=count, replace=False))]
    free -= set(picked)
    radius = _RADIUS[size] * cell_px
    slack = max(cell_px / 2 - radius - _MARGIN, 0.0)
    for row, col in picked:
      dx, dy = rng.uniform(-slack, slack, size=2)
      items.append(Item(shape, str(color), size, x=float((col + 0.5) * cell_px + dx),
                        y=float((row + 0.5) * cell_px + dy), radius=radius, cell=(row, col)))
    groups.append(Group(shape, str(color), size, count, position_of(set(picked))))
  return Scene(image_size, tuple(groups), tuple(items))


def shape_mask(shape: str, u_HW: np.ndarray, v_HW: np.ndarray) -> np.ndarray:
  """Inside-test of a unit shape at offsets (u right, v down) in radii from its centre."""
  au, av = np.abs(u_HW), np.abs(v_HW)
  if shape == 'circle':
    return u_HW**2 + v_HW**2 <= 1.0
  if shape == 'square':
    return (au <= 0.85) & (av <= 0.85)
  if shape == 'diamond':
    return au + av <= 1.0
  if shape == 'triangle':  # apex up at v=-1, base at v=0.8
    return (v_HW <= 0.8) & (au <= (v_HW + 1.0) / 1.8)
  if shape == 'cross':
    return ((au <= 0.34) & (av <= 1.0)) | ((av <= 0.34) & (au <= 1.0))
  raise ValueError(f'unknown shape {shape!r}; expected one of {list(SHAPES)}')


def draw(scene: Scene) -> np.ndarray:
  """Renders a scene as a uint8 RGB image [S, S, 3] (pixel centres at half-integers)."""
  size = scene.image_size
  image_HW3 = np.empty((size, size, 3), np.uint8)
  image_HW3[:] = BACKGROUND
  centres = np.arange(size) + 0.5
  for item in scene.items:
    u_HW = (centres[None, :] - item.x) / item.radius
    v_HW = (centres[:, None] - item.y) / item.radius
    image_HW3[shape_mask(item.shape, u_HW, v_HW)] = COLORS[item.color]
  return image_HW3
