"""The optimizer over the trainable tree and the train state it updates.

Only the trainable tree (`cpeft_jax.trainable.split`) is differentiated and only it has
optimizer state; the frozen tree is a separate argument of the steps.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import flax
import jax
import optax

from cpeft_jax import configlib

SCHEDULES = ('constant', 'cosine', 'linear')


@dataclasses.dataclass(frozen=True)
class OptimConfig:
  """Adam(W) with the paper's defaults: fixed lr 1e-4, betas (0.9, 0.95), no decay/clipping."""
  learning_rate: float = 1e-4
  b1: float = 0.9
  b2: float = 0.95
  eps: float = 1e-8
  weight_decay: float = 0.0
  schedule: str = 'constant'
  warmup_steps: int = 0
  total_steps: int = 0  # needed by cosine and linear
  grad_clip_norm: float = 0.0  # 0: no clipping

  def __post_init__(self):
    if self.schedule not in SCHEDULES:
      raise configlib.ConfigError(f'optim.schedule={self.schedule!r}; expected one of '
                                  f'{SCHEDULES}.')
    if self.schedule != 'constant' and self.total_steps <= self.warmup_steps:
      raise configlib.ConfigError(
          f'optim.schedule={self.schedule!r} needs optim.total_steps ({self.total_steps}; 0 in '
          'a config: the run\'s train.epochs x batches per epoch) > optim.warmup_steps '
          f'({self.warmup_steps}).')
    if not self.learning_rate > 0:
      raise configlib.ConfigError(f'optim.learning_rate must be > 0, got {self.learning_rate}.')

  @classmethod
  def from_dict(cls, d: Mapping[str, Any]) -> OptimConfig:
    return configlib.config_from_dict(cls, d, 'optim')


def schedule(cfg: OptimConfig) -> optax.Schedule:
  lr, warm = cfg.learning_rate, cfg.warmup_steps
  if cfg.schedule == 'cosine':
    return optax.warmup_cosine_decay_schedule(0.0, lr, warm, cfg.total_steps)
  if cfg.schedule == 'linear':
    return optax.join_schedules([optax.linear_schedule(0.0, lr, warm),
                                 optax.linear_schedule(lr, 0.0, cfg.total_steps - warm)], [warm])
  return optax.join_schedules([optax.linear_schedule(0.0, lr, warm), optax.constant_schedule(lr)],
                              [warm]) if warm else optax.constant_schedule(lr)


def optimizer(cfg: OptimConfig) -> optax.GradientTransformation:
  adam = optax.adamw(schedule(cfg), b1=cfg.b1, b2=cfg.b2, eps=cfg.eps,
                     weight_decay=cfg.weight_decay) if cfg.weight_decay else optax.adam(
                         schedule(cfg), b1=cfg.b1, b2=cfg.b2, eps=cfg.eps)
  if cfg.grad_clip_norm:
    return optax.chain(optax.clip_by_global_norm(cfg.grad_clip_norm), adam)
  return adam


@flax.struct.dataclass
class TrainState:
  """What a train step updates: the trainable tree and its optimizer state."""
  step: jax.Array
  trainable: Any
  opt_state: Any
  tx: optax.GradientTransformation = flax.struct.field(pytree_node=False)

  @classmethod
  def create(cls, trainable, tx: optax.GradientTransformation) -> TrainState:
    return cls(step=jax.numpy.zeros((), jax.numpy.int32), trainable=trainable,
               opt_state=tx.init(trainable), tx=tx)

  def apply_gradients(self, grads) -> TrainState:
    updates, opt_state = self.tx.update(grads, self.opt_state, self.trainable)
    return self.replace(step=self.step + 1, trainable=optax.apply_updates(self.trainable, updates),
                        opt_state=opt_state)
