"""Static-shape numpy batches of laid-out captions and images, seeded and resumable.

Training yields one example per (image, caption) pair, shuffled per epoch by (seed, epoch); an
epoch's batch k is the same whatever happened before, so (epoch, batch) is the whole iterator
state. On several hosts each reads its own rows of every batch, and together they read the
batches one host would. Evaluation yields every image
once with its first caption (`all_references`: once per caption, the authors' validation over
all references), and pads the last batch with rows whose loss mask is zero, so no example is
skipped.

With several `tasks` (e.g. ('caption', 'qa')) every image gives examples of each task (a
prompt and a target, see `Split.texts`), mixed in one shuffled stream; evaluation yields every
image once per task. Each batch says each row's task (`tasks`, an index into the tuple).

`epoch` prepares batches ahead on a thread, or with `workers` > 0 (data.workers) in that many
processes (`workers.ordered_map`, grain), each building whole batches: since a batch is a pure
function of (seed, epoch, k), the batches are the same bytes whatever the worker count.
"""

from __future__ import annotations

import dataclasses
import functools
import queue
import threading
from collections.abc import Iterator, Mapping

import numpy as np
import PIL.Image

from cpeft_jax import contexts
from cpeft_jax import invocations as invocations_lib
from cpeft_jax.data import layout
from cpeft_jax.data import tokenizer as tokenizer_lib
from cpeft_jax.data import workers as workers_lib
from cpeft_jax.data.sources import Split


@dataclasses.dataclass(frozen=True)
class AugmentConfig:
  """The paper's image augmentation: horizontal flip, random crop, colour jitter (off: 0)."""
  flip: bool = False
  crop_min_scale: float = 1.0  # random crop keeping at least this fraction of the area
  brightness: float = 0.0
  contrast: float = 0.0
  saturation: float = 0.0

  def __post_init__(self):
    if not 0.0 < self.crop_min_scale <= 1.0:
      raise ValueError(f'augment.crop_min_scale must be in (0, 1], got {self.crop_min_scale}.')


def check_tasks(tasks) -> tuple[str, ...]:
  """A config's `data.tasks` as a tuple of distinct task names (a string is one task)."""
  tasks = (tasks,) if isinstance(tasks, str) else tuple(tasks)
  if not tasks or len(set(tasks)) != len(tasks) or not all(isinstance(t, str) for t in tasks):
    raise ValueError(f'data.tasks must be distinct task names, e.g. (\'caption\',) or '
                     f"('caption', 'qa'), got {tasks!r}.")
  return tasks


def config_tasks(config) -> tuple[str, ...]:
  """A config's data.tasks (default: captions only), in order: batch['tasks'] indexes them."""
  return tuple(config.data.get('tasks', ('caption',)))


def base_tasks(config) -> tuple[str, ...]:
  """The tasks whose texts build the word-level vocabulary and pre-train the demo's decoder:
  pretrain.tasks (a base shared by runs on different tasks), else data.tasks."""
  pretrain = config.get('pretrain') or {}
  return tuple(pretrain.get('tasks') or config.data.get('tasks') or ('caption',))


def augment(image_HW3: np.ndarray, rng: np.random.Generator, cfg: AugmentConfig) -> np.ndarray:
  """A randomly flipped, cropped and jittered copy (uint8, same size)."""
  img = image_HW3
  H, W, _ = img.shape
  if cfg.crop_min_scale < 1.0:
    scale = rng.uniform(cfg.crop_min_scale, 1.0)
    h, w = max(1, round(H * np.sqrt(scale))), max(1, round(W * np.sqrt(scale)))
    top, left = rng.integers(0, H - h + 1), rng.integers(0, W - w + 1)
    img = np.asarray(PIL.Image.fromarray(img[top:top + h, left:left + w]).resize(
        (W, H), PIL.Image.BILINEAR))
  if cfg.flip and rng.random() < 0.5:
    img = img[:, ::-1]
  if cfg.brightness or cfg.contrast or cfg.saturation:
    x = img.astype(np.float32)
    x = x * rng.uniform(1 - cfg.brightness, 1 + cfg.brightness)
    mean = x.mean()
    x = (x - mean) * rng.uniform(1 - cfg.contrast, 1 + cfg.contrast) + mean
    gray = x.mean(-1, keepdims=True)
    x = (x - gray) * rng.uniform(1 - cfg.saturation, 1 + cfg.saturation) + gray
    img = np.clip(x, 0, 255).astype(np.uint8)
  return np.ascontiguousarray(img)


@dataclasses.dataclass
class CaptionBatches:
  """Batches of {pixels, tokens, targets, kinds, context_ids, attention_mask, loss_mask, tasks,
  ...}; `context_map` is a preset, a kind map or rules over kind and task (see
  `contexts.parse_context_map`)."""
  split: Split
  tokenizer: object
  batch_size: int
  num_image_tokens: int
  seq_len: int
  context_map: Mapping[str, int] | str
  image_size: int
  mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
  std: tuple[float, float, float] = (0.5, 0.5, 0.5)
  train: bool = True
  seed: int = 0
  augment: AugmentConfig = AugmentConfig()
  boundary: bool = False
  host: tuple[int, int] = (0, 1)  # (index, count) for multi-host runs
  tasks: tuple[str, ...] = ('caption',)  # batch['tasks'] holds indices into this
  # Invocation-triggered contexts {text: context id}: in a row, the tokens from the first
  # occurrence of a text's tokens onwards move to its context (invocations.invocation_contexts);
  # the tokens before it keep the context map's ids.
  invocations: Mapping[str, int] | None = None
  all_references: bool = False  # evaluation: every (image, caption) pair, not first captions
  # Processes that build batches (`epoch`); 0: one thread in this process. Same batches.
  workers: int = 0

  def __post_init__(self):
    index, count = self.host
    if not 0 <= index < count:
      raise ValueError(f'host=(index={index}, count={count}) is not a valid host.')
    if not isinstance(self.workers, int) or isinstance(self.workers, bool) or self.workers < 0:
      raise ValueError(f'data.workers must be an int >= 0 (0: no worker processes), got '
                       f'{self.workers!r}.')
    self.tasks = check_tasks(self.tasks)
    self.context_map = contexts.check_context_map(self.context_map, self.tasks)
    self._ids = tokenizer_lib.special_ids(self.tokenizer)
    self._invocations = self._encode_invocations(dict(self.invocations or {}))
    self._texts = [self.split.texts(task) for task in self.tasks]
    self._check_prompts()
    # Rows are (image, text, task); a caption-only run has today's order of (image, caption).
    if self.train or self.all_references:
      pairs = [(i, j, t) for t, texts in enumerate(self._texts) for i, own in enumerate(texts)
               for j in range(len(own))]
    else:  # each image's first text of each task
      pairs = [(i, 0, t) for t, texts in enumerate(self._texts) for i, own in enumerate(texts)
               if own]
    # Every host orders all pairs alike; batch k of a host is its slice of the global batch k
    # (batch_size x count rows), so the run sees the same batches on any number of hosts, and
    # every host runs the same number of batches (a collective step waits for all of them).
    self._pairs = np.asarray(pairs, np.int64).reshape(-1, 3)
    self._global = self.batch_size * count
    if self.train and len(self._pairs) < self._global:
      raise ValueError(f'{self.split.name} has {len(self._pairs)} training pairs, fewer than one '
                       f'batch of {self.batch_size}' + (f' rows on each of {count} hosts.'
                                                       if count > 1 else '.'))
    self.truncated = [0, 0]  # (captions truncated, tokens dropped) so far

  def __len__(self) -> int:
    n = len(self._pairs)
    return n // self._global if self.train else -(-n // self._global)

  def _order(self, epoch: int) -> np.ndarray:
    if not self.train:
      return self._pairs
    perm = np.random.default_rng([self.seed, epoch]).permutation(len(self._pairs))
    return self._pairs[perm]

  def batch(self, epoch: int, k: int) -> dict[str, np.ndarray]:
    """Batch k of an epoch, a pure function of (seed, epoch, k); counts its truncations."""
    out = self.build(epoch, k)
    self._count_truncation(out)
    return out

  def _count_truncation(self, out: Mapping[str, np.ndarray]) -> None:
    truncated, dropped = layout.truncation(out)
    self.truncated[0] += truncated
    self.truncated[1] += dropped

  def build(self, epoch: int, k: int) -> dict[str, np.ndarray]:
    """Batch k of an epoch, without side effects (what a worker process runs)."""
    order, first = self._order(epoch), k * self._global + self.host[0] * self.batch_size
    rows = order[first:first + self.batch_size]  # this host's rows of the global batch k
    valid = len(rows)
    if valid < self.batch_size:  # evaluation's last batch: pad with masked copies of its row 0
      pad = order[k * self._global:k * self._global + 1]
      rows = np.concatenate([rows, np.repeat(pad, self.batch_size - valid, 0)])
    prompts, targets = zip(*(self._texts[t][i][j] for i, j, t in rows))
    encoded = None
    if any(prompts):  # caption-only batches skip this (their prompts are empty)
      ids = iter(tokenizer_lib.encode(self.tokenizer, [p for p in prompts if p]))
      encoded = [next(ids) if p else [] for p in prompts]
    out = layout.layout_captions(
        tokenizer_lib.encode(self.tokenizer, list(targets)),
        num_image_tokens=self.num_image_tokens, seq_len=self.seq_len, bos_id=self._ids.bos,
        eos_id=self._ids.eos, pad_id=self._ids.pad, boundary=self.boundary,
        context_map=self.context_map, prompts=encoded, task_ids=rows[:, 2],
        task_names=self.tasks)
    out['loss_mask'][valid:] = 0.0
    out['pixels'] = np.stack([self._pixels(i, epoch, self.host[0] * self.batch_size + n)
                              for n, (i, _, _) in enumerate(rows)])  # n: the global row
    out['image_ids'] = self.split.image_ids[rows[:, 0]]
    out['valid'] = np.arange(self.batch_size) < valid
    out['tasks'] = rows[:, 2].astype(np.int32)
    if self._invocations:
      keep = max(self._invocations) + 1  # a marker: no invocation before this token
      inv_BL = invocations_lib.invocation_contexts(out['tokens'], self._invocations, keep,
                                                   attention_mask_BL=out['attention_mask'])
      out['context_ids'] = np.where(inv_BL != keep, inv_BL, out['context_ids']).astype(np.int32)
    return out

  def _encode_invocations(self, texts: dict) -> dict[int, tuple[int, ...]]:
    """{context id: token ids} of the {text: context id} invocations, checked."""
    if not texts:
      return {}
    bad = {t: c for t, c in texts.items() if not isinstance(t, str) or not t.strip()}
    if bad:
      raise ValueError(f'data.invocations maps texts to context ids; {bad} has no text')
    ids = tokenizer_lib.encode(self.tokenizer, list(texts))
    by_context = {}
    for (text, ctx), seq in zip(texts.items(), ids):
      if ctx in by_context:
        raise ValueError(f'data.invocations gives context {ctx} two texts; one per context')
      if not seq:
        raise ValueError(f'data.invocations text {text!r} has no tokens')
      by_context[ctx] = seq
    return invocations_lib.check_invocations(by_context, max(by_context) + 1)

  def _check_prompts(self):
    """Every prompt leaves room for a target token (checked once, not when a batch meets it)."""
    budget = layout.caption_budget(self.num_image_tokens, self.seq_len, self.boundary)
    for task, texts in zip(self.tasks, self._texts):
      prompts = sorted({p for pairs in texts for p, _ in pairs if p})
      if not prompts:
        continue
      lengths = [len(ids) for ids in tokenizer_lib.encode(self.tokenizer, prompts)]
      longest = int(np.argmax(lengths))
      if lengths[longest] >= budget:
        raise ValueError(
            f'Task {task!r} has a prompt of {lengths[longest]} tokens ({prompts[longest]!r}); '
            f'data.seq_len={self.seq_len} with {self.num_image_tokens} image tokens leaves '
            f'{budget} for prompt and target: expected seq_len >= '
            f'{self.seq_len + lengths[longest] - budget + 1}.')

  def _pixels(self, i: int, epoch: int, n: int) -> np.ndarray:
    img = self.split.image(int(i))
    if img.shape[:2] != (self.image_size, self.image_size):
      img = np.asarray(PIL.Image.fromarray(img).resize((self.image_size,) * 2,
                                                       PIL.Image.BICUBIC))
    if self.train:
      img = augment(img, np.random.default_rng([self.seed, epoch, int(i), n]), self.augment)
    x = img.astype(np.float32) / 255.0
    return (x - np.asarray(self.mean, np.float32)) / np.asarray(self.std, np.float32)

  def epoch(self, epoch: int, start: int = 0, prefetch: int = 2) -> Iterator[dict]:
    """Batches start.. of an epoch, prepared ahead: `prefetch` of them on a background thread,
    or with `workers` processes, one ready per worker (`workers.ordered_map`). Truncations
    count as batches are consumed."""
    if self.workers:
      batches = workers_lib.ordered_map(functools.partial(self.build, epoch),
                                        range(start, len(self)), self.workers)
    else:
      batches = self._thread_batches(epoch, start, prefetch)
    try:
      for out in batches:
        self._count_truncation(out)
        yield out
    finally:
      batches.close()  # stops the thread or the worker processes when the consumer stops

  def _thread_batches(self, epoch: int, start: int, prefetch: int) -> Iterator[dict]:
    q: queue.Queue = queue.Queue(maxsize=max(1, prefetch))
    stop = threading.Event()

    def work():
      try:
        for k in range(start, len(self)):
          if stop.is_set():
            return
          q.put(self.build(epoch, k))
        q.put(None)
      except BaseException as e:  # noqa: BLE001 - re-raised in the consumer
        q.put(e)

    threading.Thread(target=work, daemon=True).start()
    try:
      while (item := q.get()) is not None:
        if isinstance(item, BaseException):
          raise item
        yield item
    finally:
      stop.set()
      while not q.empty():  # unblocks a put, after which the thread sees `stop`
        q.get_nowait()
