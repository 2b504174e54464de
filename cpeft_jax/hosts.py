"""Several processes (hosts) of one run: who writes, where they wait for each other, and what
they must agree on.

Every process of a multi-host run executes the same program on its own share of the data. Work
whose result is files shared by all (the demo dataset, stage 0's checkpoints) runs on process 0
alone while the others wait for it (`lead_then_all`); a decision that changes which collectives
run next (stop now, after a signal one host received) is taken by all hosts together
(`any_host`), else one host enters a collective the others never reach and the run hangs.
With one process each of these is a plain call.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import TypeVar

import jax
import numpy as np

T = TypeVar('T')


def is_lead() -> bool:
  """Process 0: the one that writes files every host shares (JSON, metrics, exports)."""
  return jax.process_index() == 0


def sync(name: str) -> None:
  """Waits until every process reaches the sync point `name` (no-op on one process)."""
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils
    multihost_utils.sync_global_devices(name)


def any_host(flag: bool) -> bool:
  """True on every process when `flag` is true on any: a collective, so every process must call
  it at the same point of the program."""
  if jax.process_count() == 1:
    return bool(flag)
  from jax.experimental import multihost_utils
  flags = multihost_utils.process_allgather(np.asarray(flag, np.int32))
  return bool(np.asarray(flags).any())


def lead_then_all(fn: Callable[[], T], what: str) -> T | None:
  """`fn()` on process 0 while the others wait; then every process goes on (and reads what it
  wrote). Returns fn's result on process 0 and None elsewhere. An error on process 0 is raised
  there and, as a RuntimeError naming `what`, on every other process: no host is left waiting.
  """
  if jax.process_count() == 1:
    return fn()
  from jax.experimental import multihost_utils
  out, error = None, None
  if is_lead():
    try:
      out = fn()
    except BaseException as e:  # noqa: BLE001 - every host must learn of it, then re-raise
      error = e
  ok = multihost_utils.broadcast_one_to_all(np.asarray(error is None, np.int32))
  if error is not None:
    raise error
  if not int(ok):
    raise RuntimeError(f'{what} failed on process 0 (see its log); process '
                       f'{jax.process_index()} stops too.')
  return out


def cpu_collectives_default() -> None:
  """On CPU, multi-process collectives need an implementation (gloo) chosen before the backend
  starts; the environment's JAX_CPU_COLLECTIVES_IMPLEMENTATION wins."""
  if not os.environ.get('JAX_CPU_COLLECTIVES_IMPLEMENTATION'):
    jax.config.update('jax_cpu_collectives_implementation', 'gloo')


def define_flags() -> None:
  """The multi-host flags both CLIs take (train.py, evaluate.py)."""
  from absl import flags
  flags.DEFINE_bool('distributed', None, 'Call jax.distributed.initialize() before any JAX work. '
                    'Default: when JAX_COORDINATOR_ADDRESS is set.')
  flags.DEFINE_integer('num_processes', None, 'Multi-host: number of processes (else detected).')
  flags.DEFINE_integer('process_id', None, "Multi-host: this process's index (else detected).")


def start_from_flags() -> None:
  """jax.distributed.initialize() when --distributed (or JAX_COORDINATOR_ADDRESS) asks for it;
  it must precede any JAX computation. On TPU, SLURM and Open MPI it finds the cluster itself;
  elsewhere it takes JAX_COORDINATOR_ADDRESS with --num_processes and --process_id."""
  from absl import flags, logging
  f = flags.FLAGS
  wanted = f.distributed
  if wanted is None:
    wanted = bool(os.environ.get('JAX_COORDINATOR_ADDRESS'))
  if not wanted:
    return
  cpu_collectives_default()
  jax.distributed.initialize(num_processes=f.num_processes, process_id=f.process_id)
  logging.warning('process %d of %d, %d local of %d devices', jax.process_index(),
                  jax.process_count(), jax.local_device_count(), jax.device_count())


class StopVote:
  """Whether any host asked to stop (a signal), agreed by every host without a pause.

  Each step, every host casts its own flag (`cast`: dispatched like a step, nothing waits) and
  reads back the or over all hosts of the previous step's votes (`agreed`), when it reads that
  step's metrics anyway; every host then stops after the same step, and the one a scheduler
  signalled is not left in a collective the others never enter. With one process the flag
  itself decides, at once.
  """

  def __init__(self):
    self.multi = jax.process_count() > 1
    if self.multi:
      P = jax.sharding.PartitionSpec
      by_host = sorted(jax.devices(), key=lambda d: (d.process_index, d.id))
      mesh = jax.sharding.Mesh(np.asarray(by_host).reshape(jax.process_count(), -1),
                               ('hosts', 'local'))
      self._in = jax.sharding.NamedSharding(mesh, P('hosts'))
      self._any = jax.jit(lambda v: v.max(), out_shardings=jax.sharding.NamedSharding(mesh, P()))

  def cast(self, flag: bool):
    """This host's vote (one process: the flag; several: a device array being reduced)."""
    if not self.multi:
      return bool(flag)
    mine = np.asarray([int(flag)], np.int32)
    return self._any(jax.make_array_from_callback((jax.process_count(),), self._in,
                                                  lambda index: mine))

  def agreed(self, now, before) -> bool:
    """Stop after this step? `now`: this step's vote, `before`: the previous step's (None at
    the first step of a loop)."""
    if not self.multi:
      return bool(now)
    return before is not None and bool(np.asarray(before))
