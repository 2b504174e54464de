"""ContextDense: a dense layer with a frozen kernel/bias and per-context LoRA, DoRA, IA3, BitFit.

The base weights live in the 'params' collection, the tables in the 'adaptors' collection
(`ADAPTORS`), so the trainable tree and the frozen tree are separate arguments of
`Module.apply`. With per-context specs the LoRA tables are padded to the largest rank and static
per-row masks make the padding (and rows of contexts without a method) inert. DoRA's column
norms and magnitudes live here too.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from cpeft_jax.adaptors.config import ADAPTORS, ContextSpec, LoraConfig, PeftConfig
from cpeft_jax.adaptors.routing import Routing, lora_delta, route, select
from cpeft_jax.adaptors.targets import LayerAdaptor
from cpeft_jax.lowp import matmul


def _lora_a_init(lora: LoraConfig):
  def init(key, shape, dtype=jnp.float32):
    d_in, r = shape[-2], shape[-1]
    if lora.init == 'gaussian':
      return jax.random.normal(key, shape, dtype) / r
    bound = 1.0 / math.sqrt(d_in)  # kaiming_uniform(a=sqrt(5)) on [r, d_in], as PEFT
    return jax.random.uniform(key, shape, dtype, -bound, bound)
  return init


def _lora_a_init_rows(specs: Sequence[ContextSpec], rank_R: np.ndarray):
  """A's init for per-context specs: each row its own init and rank, the padding zero."""
  gauss_R = np.array([s.init == 'gaussian' for s in specs])

  def init(key, shape, dtype=jnp.float32):
    d_in, r = shape[-2], shape[-1]
    k_u, k_n = jax.random.split(key)
    bound = 1.0 / math.sqrt(d_in)
    u = jax.random.uniform(k_u, shape, dtype, -bound, bound)
    n = jax.random.normal(k_n, shape, dtype) / np.maximum(rank_R, 1)[:, None, None]
    a = jnp.where(gauss_R[:, None, None], n, u)
    return a * _rank_mask(rank_R, r)[:, None, :].astype(dtype)
  return init


def _rank_mask(rank_R: np.ndarray, r: int) -> np.ndarray:
  """Static [R, r]: 1 on each row's real rank, 0 on its padding."""
  return (np.arange(r)[None, :] < rank_R[:, None]).astype(np.float32)


def _mask_rows(table_RD, on_R: np.ndarray, fill: float):
  """Rows whose context lacks the method are held at `fill` (and get zero gradient)."""
  if on_R.all():
    return table_RD
  return jnp.where(on_R[:, None], table_RD, jnp.asarray(fill, table_RD.dtype))


def column_norms(kernel_DE, a_RDr=None, b_RrE=None):
  """||W + A_c B_c|| over the input axis, per row: [R, E] (or [E] without A, B), float32.

  Expands ||w_j||^2 + 2 <W^T A_c, B_c>_j + B_c^T (A_c^T A_c) B_c so that no [R, D, E] copy of
  the merged weight is ever formed; B carries the LoRA scale.
  """
  w = kernel_DE.astype(jnp.float32)
  sq_E = jnp.sum(w * w, axis=0)
  if a_RDr is None:
    return jnp.sqrt(sq_E)
  a, b = a_RDr.astype(jnp.float32), b_RrE.astype(jnp.float32)
  wa_RrE = jnp.einsum('de,cdr->cre', w, a)
  gram_Rrr = jnp.einsum('cdr,cds->crs', a, a)
  sq_RE = (sq_E + 2 * jnp.sum(wa_RrE * b, axis=1)
           + jnp.einsum('cre,crs,cse->ce', b, gram_Rrr, b))
  return jnp.sqrt(jnp.maximum(sq_RE, 0.0))


def _dora_factor(kernel_DE, a_RDr, b_RrE, m_RE, dora_R: np.ndarray):
  """g_c = m_c / ||W + s_c A_c B_c||_col per row, 1 for rows without DoRA: [R, E] float32.

  The norm is a constant in the gradient, as in PyTorch PEFT (DoRA paper, section 4.3).
  """
  norm_RE = jax.lax.stop_gradient(column_norms(kernel_DE, a_RDr, b_RrE))
  return jnp.where(dora_R[:, None], m_RE.astype(jnp.float32) / norm_RE, 1.0)


class ContextDense(nn.Module):
  """A dense layer with a frozen kernel/bias and per-context adaptor tables.

  Call with activations x [..., d_in] and either context ids of shape x.shape[:-1] or a
  `Routing` from `route` (the decoder routes once and shares it with every layer).
  """
  features: int
  use_bias: bool = False
  peft: PeftConfig | None = None
  adapt: LayerAdaptor = LayerAdaptor()
  dtype: Any = None  # compute dtype; None: that of x
  param_dtype: Any = jnp.float32  # frozen base weights
  adaptor_dtype: Any = jnp.float32  # trainable tables
  kernel_init: Any = nn.initializers.lecun_normal()
  deterministic: bool = True

  @nn.compact
  def __call__(self, x, context):
    d_in = x.shape[-1]
    dtype = self.dtype or x.dtype
    kernel = self.param('kernel', self.kernel_init, (d_in, self.features), self.param_dtype)
    bias = (self.param('bias', nn.initializers.zeros, (self.features,), self.param_dtype)
            if self.use_bias else None)
    x = x.astype(dtype)
    if self.peft is None or not self.adapt.any:
      y = matmul(x, kernel.astype(dtype))
      return y if bias is None else y + bias.astype(dtype)

    peft, adapt, R = self.peft, self.adapt, self.peft.num_rows
    uniform = peft.uniform
    routing = context if isinstance(context, Routing) else route(context, peft)
    lead = x.shape[:-1]
    x_TD = x.reshape(-1, d_in)

    def table(name, init, shape):
      return self.variable(ADAPTORS, name, lambda: init(self.make_rng('params'), shape,
                                                        self.adaptor_dtype)).value

    xb_TD = x_TD
    if adapt.ia3 == 'in':
      s_RD = _mask_rows(table('ia3', nn.initializers.ones, (R, d_in)),
                        adapt.rows_with('ia3', peft), 1.0)
      xb_TD = x_TD * select(s_RD, routing, dtype, 1.0)
    y_TE = matmul(xb_TD, kernel.astype(dtype))
    delta_TE = None
    if adapt.dora:  # g * (x W + s x A B), the bias left out as in PEFT
      delta_TE, g_TE, xl_TD = self._low_rank(x_TD, kernel, routing, table, uniform)
      if xl_TD is x_TD:
        y_TE = y_TE * g_TE
      else:  # PEFT recomputes the base on the dropped-out input: x W + (g - 1) x_d W
        y_TE = y_TE + (g_TE - 1) * (matmul(xl_TD, kernel.astype(dtype)))
      delta_TE = delta_TE * g_TE
    if bias is not None:
      y_TE = y_TE + bias.astype(dtype)
    if adapt.ia3 == 'out':
      s_RE = _mask_rows(table('ia3', nn.initializers.ones, (R, self.features)),
                        adapt.rows_with('ia3', peft), 1.0)
      y_TE = y_TE * select(s_RE, routing, dtype, 1.0)
    if adapt.bitfit:
      b_RE = _mask_rows(table('bitfit', nn.initializers.zeros, (R, self.features)),
                        adapt.rows_with('bitfit', peft), 0.0)
      y_TE = y_TE + select(b_RE, routing, dtype, 0.0)
    if adapt.lora and not adapt.dora:
      delta_TE = self._low_rank(x_TD, kernel, routing, table, uniform)[0]
    if delta_TE is not None:
      y_TE = y_TE + delta_TE
    return y_TE.reshape(*lead, self.features)

  def _low_rank(self, x_TD, kernel, routing, table, uniform):
    """The LoRA/DoRA branch: (scaled x_d A B, DoRA's per-token g or None, x_d)."""
    peft, adapt, R = self.peft, self.adapt, self.peft.num_rows
    dtype = x_TD.dtype
    specs = peft.row_specs
    rank_R = adapt.ranks(peft)
    r = int(rank_R.max())
    if uniform:
      lo = specs[0].lora
      a = table('lora_a', _lora_a_init(lo), (R, x_TD.shape[-1], r))
      b = table('lora_b', nn.initializers.zeros, (R, r, self.features))
      a, b = a.astype(dtype), b.astype(dtype)
      xl_TD = (nn.Dropout(lo.dropout, deterministic=self.deterministic)(x_TD)
               if lo.dropout else x_TD)
      delta_TE = lora_delta(xl_TD, a, b, routing) * jnp.asarray(lo.scale, dtype)
      b_scaled = b * jnp.asarray(lo.scale, dtype) if adapt.dora else None
    else:
      # Padded to the largest rank; the static mask zeroes each row's padding (and the rows
      # of contexts without LoRA here), and B's mask carries each row's own scale.
      mask_Rr = _rank_mask(rank_R, r)
      scale_R = np.array([s.lora.scale for s in specs], np.float32)
      a = table('lora_a', _lora_a_init_rows(specs, rank_R), (R, x_TD.shape[-1], r))
      b = table('lora_b', nn.initializers.zeros, (R, r, self.features))
      a = a.astype(dtype) * jnp.asarray(mask_Rr[:, None, :], dtype)
      b_scaled = b.astype(dtype) * jnp.asarray((mask_Rr * scale_R[:, None])[:, :, None], dtype)
      xl_TD = self._dropout(x_TD, routing, rank_R)
      delta_TE = lora_delta(xl_TD, a, b_scaled, routing)
    if not adapt.dora:
      return delta_TE, None, xl_TD
    dora_R = adapt.rows_with('dora', peft)
    m_RE = self.variable(ADAPTORS, 'dora_m', lambda: jnp.where(
        dora_R[:, None], column_norms(kernel)[None, :], 0.0).astype(self.adaptor_dtype)).value
    g_RE = _dora_factor(kernel, a, b_scaled, m_RE, dora_R)
    return delta_TE, select(g_RE, routing, dtype, 1.0), xl_TD

  def _dropout(self, x_TD, routing, rank_R):
    """LoRA dropout with each context's own rate; one rate: the plain dropout layer."""
    rates = [s.dropout for s, k in zip(self.peft.row_specs, rank_R) if k]
    if self.deterministic or not rates or max(rates) == 0:
      return x_TD
    if len(set(rates)) == 1:
      return nn.Dropout(rates[0], deterministic=False)(x_TD)
    rate_G = np.array([s.dropout if k else 0.0 for s, k in zip(self.peft.row_specs, rank_R)]
                      + [0.0], np.float32)
    keep_T1 = 1.0 - jnp.asarray(rate_G)[routing.row_T][:, None]
    keep = jax.random.bernoulli(self.make_rng('dropout'), keep_T1, x_TD.shape)
    return jnp.where(keep, x_TD / keep_T1.astype(x_TD.dtype), 0).astype(x_TD.dtype)


def init_dora_magnitudes(params, tables):
  """Sets every 'dora_m' row with a nonzero magnitude to ||W||_col of its sibling kernel.

  DoRA's magnitude starts at the column norms of the *pre-trained* W (B = 0 at init). Tables
  initialised beside a random base (e.g. before a checkpoint is loaded) take their magnitudes
  from the loaded base with this; rows of contexts without DoRA (all zeros) stay zero.
  """
  if isinstance(tables, Mapping):
    out = {k: init_dora_magnitudes(params[k] if k in params else None, v) if isinstance(
        v, Mapping) else v for k, v in tables.items()}
    if 'dora_m' in tables:
      if params is None or 'kernel' not in params:
        raise ValueError("A 'dora_m' table has no sibling 'kernel' in the base parameters.")
      m = tables['dora_m']
      norm = jnp.sqrt(jnp.sum(jnp.square(params['kernel'].astype(jnp.float32)), axis=-2))
      on = jnp.any(m != 0, axis=-1, keepdims=True)
      out['dora_m'] = jnp.where(on, jnp.expand_dims(norm, -2), 0).astype(m.dtype)
    return out
  return tables
