"""Plain helpers and constants several test modules share (fixtures live in conftest.py).

The tiny demo config of the training-loop tests, the stand-in image encoder and batch of the
vision-language tests, the per-token float64 reference of one adapted layer, the tokens of the
tiny decoders and adaptor tables made from shapes alone. Nothing here imports torch.
"""

import os
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from cpeft_jax import xla_flags
from cpeft_jax.adaptors import ContextDense, LoraConfig, PeftConfig
from cpeft_jax.data import layout
from cpeft_jax.models.decoder_config import DecoderConfig
from cpeft_jax.models.decoders import init_adaptors

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from configs import demo  # noqa: E402  (configs/ is a directory of the repository, not a package)


def cpu_env(devices: int | None = None, **extra) -> dict:
  """A test subprocess's environment: XLA:CPU with `devices` host devices (XLA's default if
  None), compiled for speed of compiling (`xla_flags.FAST_COMPILE`: tiny shapes compile sooner;
  the same dots and collectives), plus `extra` variables."""
  count = () if devices is None else (f'--xla_force_host_platform_device_count={devices}',)
  return dict(os.environ, JAX_PLATFORMS='cpu', XLA_FLAGS=' '.join(count + xla_flags.FAST_COMPILE),
              **extra)

# --- The training loop's tiny demo run. -------------------------------------------------------


def tiny(epochs, **kw):
  """The demo config shrunk to seconds: 24 images, a 2-layer 32-wide decoder, 16 image tokens."""
  c = demo.get_config(f'epochs={epochs},num_train=24,rank=4,pretrain_epochs=2')
  c.pretrain.batch_size = 16
  c.data.demo.num_validation = 8
  c.data.seq_len = 80
  c.vision.patch_size = 16  # 16 image tokens
  c.model.update(hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64)
  c.train.update(batch_size=8, log_every=5, checkpoint_every=7)
  c.eval.batch_size = 5  # 8 validation images: the last batch is padded, never dropped
  c.optim.update(warmup_steps=2, total_steps=45, learning_rate=3e-3)
  for k, v in kw.items():
    c.train[k] = v
  return c


# --- The vision-language model's stand-in encoder and batch. ----------------------------------

VLM_DEC = DecoderConfig(vocab_size=40, hidden_size=32, num_layers=2, num_heads=4,
                        intermediate_size=48)
VLM_PEFT = PeftConfig(methods=('lora',), num_contexts=2, lora=LoraConfig(rank=2, alpha=2.0))
VLM_IMAGE_TOKENS = 4  # a 16x16 image in 8x8 patches


class PatchEncoder(nn.Module):
  """A stand-in frozen encoder: 8x8 patches, one linear map, [B, 4, 24]."""

  @nn.compact
  def __call__(self, pixels_BHWC):
    B, H, W, C = pixels_BHWC.shape
    p = pixels_BHWC.reshape(B, H // 8, 8, W // 8, 8, C).transpose(0, 1, 3, 2, 4, 5)
    return nn.Dense(24)(p.reshape(B, (H // 8) * (W // 8), 64 * C))


def vlm_batch(boundary=False):
  """Two captions laid out behind 4 image tokens (seq_len 12) and their 16x16 images."""
  b = layout.layout_captions([[5, 6, 7], [8, 9]], num_image_tokens=VLM_IMAGE_TOKENS, seq_len=12,
                             bos_id=1, eos_id=2, pad_id=0, boundary=boundary,
                             context_map='modality')
  pixels = jax.random.uniform(jax.random.key(3), (2, 16, 16, 3))
  return pixels, b


# --- One adapted layer and its per-token float64 reference. -----------------------------------

D_IN, D_OUT = 12, 10


def randomize(tables, seed):
  """Every entry random, padding included: the layer must ignore what is not real."""
  leaves, treedef = jax.tree.flatten(tables)
  keys = jax.random.split(jax.random.key(seed), len(leaves))
  return treedef.unflatten([jax.random.normal(k, x.shape, x.dtype) for k, x in zip(keys, leaves)])


def init_random(adapt, peft, x, ctx, seed=0):
  """A ContextDense(D_OUT) with random tables (DoRA magnitudes near the column norms) and bias."""
  layer = ContextDense(D_OUT, use_bias=True, peft=peft, adapt=adapt)
  v = layer.init(jax.random.key(seed), x, ctx)
  tables = randomize(v['adaptors'], seed + 1)
  if 'dora_m' in tables:  # magnitudes near the column norms, as in training
    tables['dora_m'] = jnp.abs(tables['dora_m']) + 1.0
  params = dict(v['params'], bias=jax.random.normal(jax.random.key(9), (D_OUT,)))
  return layer, {'params': params, 'adaptors': tables}


def reference(v, adapt, peft, x_TD, ctx_T):
  """Slow per-token loop in float64 applying each context's own spec to the real slices only.

  y = ((x*s_in) W + b) * s_out + bitfit + s x A B; DoRA: g (x W + s x A B) + b + bitfit with
  g = m / ||W + s A B||_col computed from the merged weight itself.
  """
  p = jax.tree.map(lambda a: np.asarray(a, np.float64), v['params'])
  t = jax.tree.map(lambda a: np.asarray(a, np.float64), v['adaptors'])
  W, bias = p['kernel'], p.get('bias', 0.0)
  out = []
  for x, c in zip(np.asarray(x_TD, np.float64), np.asarray(ctx_T)):
    spec = peft.specs[c]
    if c not in peft.rows:
      out.append(x @ W + bias)
      continue
    row, has = peft.rows.index(c), set(spec.methods)
    r, s = spec.rank, spec.lora.scale
    xin = x * t['ia3'][row] if adapt.ia3 == 'in' and 'ia3' in has else x
    y = xin @ W
    if adapt.dora and 'dora' in has:
      delta_W = s * t['lora_a'][row][:, :r] @ t['lora_b'][row][:r]
      g = t['dora_m'][row] / np.linalg.norm(W + delta_W, axis=0)
      y = g * (y + x @ delta_W)
    y = y + bias
    if adapt.ia3 == 'out' and 'ia3' in has:
      y = y * t['ia3'][row]
    if adapt.bitfit and 'bitfit' in has:
      y = y + t['bitfit'][row]
    if adapt.lora and 'lora' in has:
      y = y + s * (x @ t['lora_a'][row][:, :r] @ t['lora_b'][row][:r])
    out.append(y)
  return np.stack(out)


# --- The tiny decoders' tokens, and adaptor tables from shapes alone. -------------------------

# The tiny Llama's (vocab 64) tokens; the second row is right-padded.
TOKENS = np.random.default_rng(0).integers(0, 64, (2, 9))
MASK = np.arange(9)[None] < np.array([[9], [6]])
# The tiny GPT-2's and OPTs' tokens (ids 0-2 are their pad, bos and eos); the same MASK.
GPT_TOKENS = np.random.default_rng(0).integers(3, 64, (2, 9))
# The two-context LoRA the GPT-2 and OPT checkpoints are loaded with (conftest.gpt_opt).
GPT_OPT_PEFT = PeftConfig(methods=('lora',), num_contexts=2, targets='AF',
                          lora=LoraConfig(rank=4, alpha=8.0))

# Per-context specs: context 1's own rank and scale, padded tables, and IA3 on context 0 only,
# which the export of context 1 must leave out.
PER_CONTEXT = [{'methods': 'lora+ia3'},
               {'methods': 'lora', 'rank': 2, 'alpha': 3.0, 'rslora': True}]


def fresh_tables(cfg, peft):
  """Tables of an adapter that changes nothing (A = B = 0, IA3 = 1), from shapes alone:
  compiling the model's init for every config would cost seconds each."""
  shapes = jax.eval_shape(lambda: init_adaptors(cfg, peft))
  return jax.tree_util.tree_map_with_path(
      lambda path, s: jnp.full(s.shape, 1.0 if path[-1].key == 'ia3' else 0.0, s.dtype), shapes)


def random_tables(tables, seed, scale=0.2):
  """Non-trivial adaptor tables: LoRA A/B and BitFit noisy, IA3 and DoRA's magnitude near one
  (numpy: no compiles)."""
  rng = np.random.default_rng(seed)

  def fill(path, leaf):
    noise = scale * rng.standard_normal(leaf.shape).astype(np.float32)
    return jnp.asarray(1 + noise if path[-1].key in ('ia3', 'dora_m') else noise)
  return jax.tree_util.tree_map_with_path(fill, tables)
