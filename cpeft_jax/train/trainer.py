"""The training loop around the pure step: data, checkpoints, validation, metrics, signals.

`train_and_evaluate` builds the experiment (running the demo's stage-0 pre-training when the
config asks for it), places it on the mesh and hands it to a `Trainer`, whose state advances
with a `Progress` record (epoch, batch of that epoch, best validation loss) saved beside it, so
a rerun resumes exactly: same data order and RNG. The loop dispatches step n+1 before it pulls
step n's metrics to the host; all I/O lives here, none in the step.

SIGTERM and SIGINT (Ctrl-C) only raise a flag, read between steps and between validation
batches, where the state and its progress agree: that pair is saved and the run stops. A second
signal changes nothing. On several hosts the flag is voted on (`hosts.StopVote`, or a blocking
`hosts.any_host` at epoch boundaries and between validation batches), so that a signal any one
host receives stops every host after the same step, all of them joining the same save. Every
save (periodic, epoch end, signal) goes through `Trainer.save`, which never writes non-finite
parameters and rewrites a step already saved only when its progress differs (the same step
before and after its epoch's validation).
"""

from __future__ import annotations

import dataclasses
import functools
import os
import signal
import time
from typing import Any

from absl import logging
import jax
import jax.numpy as jnp
import ml_collections
import optax
import tqdm

from cpeft_jax import experiment, hosts, losses, params, plugins, runs, schema, sharding
from cpeft_jax import xla_flags
from cpeft_jax import adaptors
from cpeft_jax import trainable as trainable_lib
from cpeft_jax import workdir as workdir_lib
from cpeft_jax.evaluation import perplexity
from cpeft_jax.models import vlm
from cpeft_jax.train import adaptor_export, checkpointing, metrics, pretrain
from cpeft_jax.train import state as state_lib
from cpeft_jax.train import step as step_lib


@dataclasses.dataclass
class Progress:
  """Where a run stands: `batch` batches of epoch `epoch` done, and the best validation loss.

  Saved with every checkpoint of the state (as its JSON metadata), so the two always agree.
  """
  epoch: int = 0
  batch: int = 0
  best_val_loss: float | None = None

  def as_meta(self) -> dict[str, Any]:
    return dataclasses.asdict(self)

  @classmethod
  def from_meta(cls, meta: dict[str, Any]) -> Progress:
    return cls(**{f.name: meta[f.name] for f in dataclasses.fields(cls)})


@dataclasses.dataclass
class Placed:
  """The train state and frozen base on the mesh, with the shardings the jitted steps use."""
  state: state_lib.TrainState
  frozen: Any
  state_sh: Any
  frozen_sh: Any
  batch_sh: jax.sharding.NamedSharding
  replicated: jax.sharding.NamedSharding


def place(exp: experiment.Experiment, trainable, frozen, tx) -> Placed:
  """The train state and frozen base on the mesh, the optimizer state built in its shardings.

  Shapes come from jax.eval_shape, so each leaf's sharding is known before its memory is
  used; the optimizer state is created by a jit whose outputs are already sharded. The
  trainable and frozen trees come from `experiment.build` already in these shardings (its
  init jit's out_shardings and sharded checkpoint loads), where device_put returns them as
  they are; it moves only a tree placed otherwise.
  """
  rules = sharding.parse_rules(exp.config.get('partition_rules'))
  create = lambda t: state_lib.TrainState.create(t, tx)
  state_sh = sharding.state_shardings(jax.eval_shape(create, trainable), exp.mesh, rules)
  frozen_sh = sharding.tree_shardings(frozen, exp.mesh, rules)
  logging.info('sharded leaves on mesh %s: %s', dict(exp.mesh.shape),
               sharding.describe({'frozen': frozen_sh, 'state': state_sh}))
  trainable = jax.device_put(trainable, state_sh.trainable)
  state = jax.jit(create, out_shardings=state_sh)(trainable)
  return Placed(state, jax.device_put(frozen, frozen_sh), state_sh, frozen_sh,
                sharding.batch_sharding(exp.mesh), sharding.replicated(exp.mesh))


def optimizer(config: ml_collections.ConfigDict, optim: state_lib.OptimConfig,
              peft: adaptors.PeftConfig) -> optax.GradientTransformation:
  """The run's optimizer, with train.freeze_contexts' rows and (train.freeze_connector) the
  connector kept exactly as they are: their updates are zeroed after the optimizer."""
  tx = state_lib.optimizer(optim)
  frozen = tuple(int(c) for c in config.train.get('freeze_contexts') or ())
  if frozen:
    rows = plugins.adapted_contexts(peft)
    unknown = sorted(set(frozen) - set(rows))
    if unknown:
      raise ValueError(f'train.freeze_contexts={frozen}: contexts {unknown} have no adaptor rows '
                       f'(this model adapts contexts {tuple(rows)}).')
    tx = optax.chain(tx, plugins.freeze_contexts(peft, [c for c in rows if c not in frozen]))
  if config.train.get('freeze_connector'):
    is_connector = lambda tree: jax.tree_util.tree_map_with_path(
        lambda path, _: [getattr(k, 'key', k) for k in path[:2]] == ['params', 'connector'],
        tree)
    tx = optax.chain(tx, optax.masked(optax.set_to_zero(), is_connector))
  return tx


def adaptor_counts(exp: experiment.Experiment, trainable) -> dict[str, dict[int, int]]:
  """{method: {context: trainable adaptor parameters}} of the decoder's tables."""
  tables = trainable.get(adaptors.ADAPTORS, {}).get('decoder', {})
  return params.count_adaptors(tables, exp.model.peft) if tables else {}


class Trainer:
  """Trains a placed experiment epoch by epoch, validating after each and keeping the best.

  `state` and `progress` advance together; `train_epoch` and `validate_and_keep_best` are the
  two halves of an epoch, `finish` writes what a finished run leaves beside its checkpoints.
  """

  def __init__(self, exp: experiment.Experiment, placed: Placed, workdir: str, train_data,
               eval_data, optim: state_lib.OptimConfig):
    config = exp.config
    self.exp, self.config, self.workdir = exp, config, workdir
    self.train_data, self.eval_data = train_data, eval_data
    self.state, self.frozen = placed.state, placed.frozen
    self.progress = Progress()
    self.steps_per_epoch = len(train_data)
    apply = vlm.apply_fn(exp.model, config.train.get('adaptor_dropout', 0.0))
    peft = exp.model.peft
    self.rows = peft.rows if peft.methods else ()
    self.tasks = exp.tasks if len(exp.tasks) > 1 else ()  # per-task losses of a multi-task run
    self.step_jit = jax.jit(
        functools.partial(step_lib.train_step, apply_fn=apply,
                          micro_steps=config.train.micro_steps, num_contexts=peft.num_contexts,
                          num_tasks=len(self.tasks)),
        in_shardings=(placed.state_sh, placed.frozen_sh, placed.batch_sh, placed.replicated),
        out_shardings=(placed.state_sh, placed.replicated), donate_argnums=(0,))
    self.step_fn = sharding.on_mesh(self.step_jit, exp.mesh)
    self.step_compiled = False
    self.eval_fn = sharding.on_mesh(jax.jit(
        functools.partial(losses.eval_step, apply_fn=apply),
        in_shardings=(placed.state_sh.trainable, placed.frozen_sh, placed.batch_sh),
        out_shardings=placed.replicated), exp.mesh)
    self.lr_at = state_lib.schedule(optim)
    self.lead = jax.process_index() == 0
    self.mgr = checkpointing.manager(os.path.join(workdir, workdir_lib.CHECKPOINTS))
    self.writer = metrics.Writer(workdir, enabled=self.lead)
    self.rng = jax.random.key(config.seed + 1)
    self.seq_tokens = config.train.batch_size * config.data.seq_len  # positions a step computes
    self.stop_signal = None
    self.vote = hosts.StopVote()
    self.last: dict[str, float] = {}
    self.divergence = metrics.Divergence(config.train.get('max_zero_grad_steps', 20),
                                         exp.model.decoder_cfg.vocab_size)

  def resume(self) -> None:
    """Continues from the newest intact checkpoint in the workdir, if there is one (damaged
    newer ones are skipped with a warning), after removing leftovers of cut-off saves."""
    checkpointing.clean_stale(self.workdir)
    restored = checkpointing.restore_newest(self.mgr, self.state)
    if restored is None:
      return
    self.state, meta = restored
    self.progress = Progress.from_meta(meta)
    logging.info('resumed from step %d (epoch %d, batch %d)', int(self.state.step),
                 self.progress.epoch, self.progress.batch)

  def save(self) -> None:
    """Saves the state with its progress, unless its parameters are not all finite."""
    step = int(jax.device_get(self.state.step))
    if not bool(_all_finite(self.state.trainable)):
      raise FloatingPointError(f'The trainable parameters are not finite after step {step} '
                               '(nothing saved; the last checkpoint in the workdir holds the '
                               'state before it): lower optim.learning_rate?')
    checkpointing.save(self.mgr, self.state, self.progress.as_meta())

  def _host_metrics(self, pending) -> dict[str, float]:
    m = metrics.host_metrics(jax.device_get(pending[1]), pending[0], self.rows, self.tasks)
    self.divergence.update(pending[0], m)
    return m

  def _stop(self, signum, frame) -> None:
    del frame
    if self.stop_signal is None:
      self.stop_signal = signum
      logging.warning('Signal %d: saving at the next step boundary, then stopping.', signum)

  def stop_here(self, where: str, agreed: bool | None = None) -> None:
    """After a signal (here or, `agreed` by the hosts' vote, on any host): saves the state and
    its progress as they are now, then exits. Without `agreed` the hosts vote now: every host
    must call it at the same point."""
    if agreed is None:
      agreed = hosts.any_host(self.stop_signal is not None)
    if not agreed:
      return
    self.save()
    by = (f'signal {self.stop_signal}' if self.stop_signal is not None else
          'a signal to another host')
    raise SystemExit(f'Stopped by {by} {where}; checkpoint saved, rerun the same command to '
                     'resume.')

  def train_epoch(self, epoch: int) -> None:
    """The rest of epoch `epoch` from the progress's batch; saves every train.checkpoint_every
    steps and, after a signal, saves and stops."""
    c, p, per_epoch = self.config, self.progress, self.steps_per_epoch
    self.stop_here(f'at step {int(jax.device_get(self.state.step))}')
    pending, vote, clock = None, None, (time.time(), p.batch)
    bar = tqdm.tqdm(total=per_epoch, initial=p.batch, disable=not self.lead,
                    desc=f'epoch {epoch + 1}/{c.train.epochs}', unit='step',
                    dynamic_ncols=True, leave=False, mininterval=1.0)
    for k, batch in enumerate(self.train_data.epoch(epoch, start=p.batch), p.batch):
      args = (self.state, self.frozen, experiment.device_batch(self.exp, batch),
              jax.random.fold_in(self.rng, epoch * per_epoch + k))
      if not self.step_compiled:
        self.compile_step(*args)
      self.state, m = self.step_fn(*args)
      del args  # the batch is not kept alive while the next one loads
      vote, before = self.vote.cast(self.stop_signal is not None), vote
      stop = self.vote.agreed(vote, before)  # the hosts' votes up to step n-1 (one host: now)
      if pending is not None:  # pull step n-1's metrics after dispatching step n
        self.last = self._host_metrics(pending)
        bar.update(1)
        bar.set_postfix(loss=f'{self.last["loss"]:.3f}', refresh=False)
        clock = self._log_step(pending[0], k, clock)
      pending = (int(epoch * per_epoch + k + 1), m)
      p.epoch, p.batch = epoch, k + 1
      if stop or (c.train.checkpoint_every and pending[0] % c.train.checkpoint_every == 0):
        self.last = self._host_metrics(pending)  # never save a NaN state
        if stop and k + 1 < per_epoch:
          self._log_step(pending[0], k + 1, clock)  # as the next step would have logged it
        self.stop_here(f'at step {pending[0]}', agreed=stop)
        self.save()
    if pending is not None:
      self.last = self._host_metrics(pending)
      bar.update(1)
    bar.close()

  def compile_step(self, *args) -> None:
    """Compiles the train step for `args` before it first runs (that call then finds it in
    JAX's cache), and in between hands the memory that loading and compiling freed back to the
    OS (`xla_flags.release_freed_memory`), so the step's buffers do not come on top of it at
    the process's peak."""
    sharding.on_mesh(self.step_jit.lower, self.exp.mesh)(*args).compile()  # traced as it runs
    xla_flags.release_freed_memory()
    self.step_compiled = True

  def _log_step(self, step: int, k: int, clock):
    """Writes step `step`'s metrics every train.log_every steps; `clock` is (time, batch) of
    the last line, `k` the batch now; returns the new clock."""
    if step % self.config.train.log_every:
      return clock
    dt = max(time.time() - clock[0], 1e-9) / max(k - clock[1], 1)
    self.writer.write(step, {**self.last, **metrics.rates(self.last, dt, self.seq_tokens),
                             'learning_rate': float(self.lr_at(step - 1))})
    return time.time(), k

  def validate_and_keep_best(self, epoch: int) -> None:
    """Validation loss after epoch `epoch`; the best weights so far go to DIR/best, then the
    state is saved at the start of the next epoch."""
    p = self.progress
    self.stop_here(f'before the validation of epoch {epoch + 1}')
    val_loss, val_ppl = perplexity.mean_loss(
        _Interruptible(self.eval_data, self), functools.partial(
            self.eval_fn, self.state.trainable, self.frozen),
        functools.partial(experiment.device_batch, self.exp))
    step = int(jax.device_get(self.state.step))
    self.writer.write(step, {'epoch': epoch + 1, 'train_loss': self.last.get('loss', float('nan')),
                             'val_loss': val_loss, 'val_ppl': val_ppl})
    p.epoch, p.batch = epoch + 1, 0
    if p.best_val_loss is None or val_loss < p.best_val_loss:
      p.best_val_loss = val_loss
      checkpointing.save_best(self.workdir, self.state.trainable, {
          'step': step, 'epoch': epoch + 1, 'val_loss': val_loss, 'val_ppl': val_ppl})
    self.save()

  def fit(self) -> None:
    """Every remaining epoch; SIGTERM or Ctrl-C saves at the next step boundary and stops."""
    old = {s: signal.signal(s, self._stop) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
      for epoch in range(self.progress.epoch, self.config.train.epochs):
        self.train_epoch(epoch)
        self.validate_and_keep_best(epoch)
    finally:
      try:  # the last (asynchronous) save commits before the run ends, however it ends
        checkpointing.wait(self.mgr)
      finally:
        for s, handler in old.items():
          signal.signal(s, handler)
        self.writer.close()

  def finish(self) -> dict[str, float]:
    """The adaptor-only export and (train.plugins) every context's plug-in of the best weights;
    returns the run's result."""
    c, best = self.config, self.progress.best_val_loss
    truncated, dropped = self.train_data.truncated
    if truncated:
      logging.warning('%d training captions were truncated (%d tokens dropped) to fit '
                      'seq_len=%d.', truncated, dropped, c.data.seq_len)
    # Every host reads the best weights (orbax reads are collective); process 0 writes.
    if c.train.get('export', True):  # the small adaptor-only copy, DIR/export
      try:
        adaptor_export.export(self.workdir)
      except (OSError, ValueError) as e:  # training itself succeeded: say so, keep its result
        logging.error('Export to %s/export failed (%s); retry with python -m '
                      'cpeft_jax.train.adaptor_export --workdir=%s', self.workdir, e, self.workdir)
    if c.train.get('plugins') and best is not None:
      runs.write_plugins(self.workdir, self.exp.model.peft)
    return {'val_loss': best,
            'val_ppl': losses.perplexity(best) if best is not None else float('nan'),
            'steps': int(jax.device_get(self.state.step))}


@jax.jit
def _all_finite(tree) -> jax.Array:
  return jnp.all(jnp.asarray([jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)]))


@dataclasses.dataclass
class _Interruptible:
  """Validation batches that stop (saving the state after the epoch's last step) on a signal."""
  data: Any
  trainer: Trainer

  def epoch(self, epoch: int, start: int = 0):
    for batch in self.data.epoch(epoch, start=start):
      self.trainer.stop_here('during validation')
      yield batch


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, float]:
  """Trains; returns the final metrics. Resumes from the latest checkpoint in `workdir`."""
  schema.check(config)  # every key known, typed and in range, before any work
  experiment.make_mesh(config)  # a bad mesh, batch size or partition rule fails before any work
  w = workdir_lib.path(workdir)
  if hosts.is_lead():  # one writer; the others wait for the directory and its config.json
    w.mkdir(parents=True, exist_ok=True)
    workdir_lib.write_text(w / workdir_lib.CONFIG, config.to_json_best_effort(indent=2))
  hosts.sync('cpeft_workdir_created')
  train_split = experiment.open_split(config, workdir, config.data.train_split)
  eval_split = experiment.open_split(config, workdir, config.data.eval_split)
  exp = experiment.build(config, workdir, train_split, text_lm=pretrain.text_lm)
  train_data, eval_data = exp.batches(train_split, train=True), exp.batches(eval_split, train=False)

  trainable, frozen = trainable_lib.split_for(exp.variables, config)
  counts = {m: sum(v.values()) for m, v in adaptor_counts(exp, trainable).items()}
  n_train = sum(x.size for x in jax.tree.leaves(trainable))
  logging.info('trainable parameters: %s (%s)', f'{n_train:,}', counts)
  optim = state_lib.OptimConfig.from_dict(
      dict(config.optim, total_steps=config.optim.total_steps or
           len(train_data) * config.train.epochs))
  placed = place(exp, trainable, frozen, optimizer(config, optim, exp.model.peft))
  trainer = Trainer(exp, placed, workdir, train_data, eval_data, optim)
  trainer.resume()
  trainer.fit()
  return trainer.finish()
