"""A function mapped over a range of indices in worker processes, results in index order.

Grain (the loader MaxText uses) does the work: `MapDataset.range(...).map(fn)` sliced over N
spawned processes by `mp_prefetch`, worker w computing indices w, w + N, ... and the parent
interleaving them back in order, so the output is the same whatever N. Arrays come back
through shared memory. An exception in a worker is re-raised in the parent as the same object
(type and message), with the worker's traceback.

Workers live no longer than the iterator: closing it (a consumer that stops early, a trainer
that breaks out on a signal) stops and joins them. They ignore SIGINT and SIGTERM, which a
terminal or a scheduler sends to the whole process group, so a trainer that catches those to
save at a step boundary still gets its batches; and they exit by themselves if the parent
dies without closing them (SIGKILL, a crash), so none is left behind. Each call starts its
workers anew (seconds: each imports grain, jax and the caller's modules). A process that exits
right after stopping early may see Python's resource tracker warn of leaked shared_memory
objects (the batches that were in flight); it removes them itself.
"""

from __future__ import annotations

import functools
import gc
import os
import signal
import threading
import time
from collections.abc import Callable, Iterator
from typing import TypeVar

import grain
from absl import flags

T = TypeVar('T')
_PARENT_POLL_S = 1.0  # how often a worker checks that its parent is still alive


def ordered_map(fn: Callable[[int], T], indices: range, workers: int,
                buffer: int = 1) -> Iterator[T]:
  """fn(i) for i in `indices` (step 1), computed by `workers` >= 1 processes, each keeping
  `buffer` results ready ahead of the consumer. `fn` must pickle (cloudpickle)."""
  if not isinstance(workers, int) or isinstance(workers, bool) or workers < 1:
    raise ValueError(f'workers must be an int >= 1, got {workers!r}.')
  if indices.step != 1:
    raise ValueError(f'indices must be a range with step 1, got {indices}.')
  if not len(indices):
    return
  if not flags.FLAGS.is_parsed():
    # Grain reads its absl flags (their defaults) when it starts workers; a program without
    # absl.app (a notebook, pytest) has not parsed any, and absl refuses to read them then.
    flags.FLAGS.mark_as_parsed()
  ds = grain.MapDataset.range(indices.start, indices.stop).map(fn).to_iter_dataset()
  ds = ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=workers,
                                                   per_worker_buffer_size=max(1, buffer)),
                      worker_init_fn=functools.partial(_init_worker, os.getpid()))
  it = iter(ds)
  try:
    yield from it
  finally:
    it.close()  # stops and joins the workers (grain kills any that do not stop in time)
    # Grain's prefetch threads leave the last results in a reference cycle; their shared
    # memory is released when the cycle is collected, which at exit may be too late (the
    # resource tracker then warns of leaked shared_memory objects).
    gc.collect()


def _init_worker(parent: int, index: int, count: int) -> None:
  """In each worker before any work: leave SIGINT and SIGTERM to the parent (it closes the
  workers), and exit when the parent (`parent`, its pid taken in the parent, since a worker
  that starts slowly may first run this after the parent died) is gone."""
  del index, count
  signal.signal(signal.SIGINT, signal.SIG_IGN)
  signal.signal(signal.SIGTERM, signal.SIG_IGN)

  def watch():
    while os.getppid() == parent:
      time.sleep(_PARENT_POLL_S)
    os._exit(1)  # orphaned: nobody reads our results

  threading.Thread(target=watch, daemon=True, name='parent-watch').start()
