"""The benchmarked train steps and generators: this project's and the peer stack's.

A case is built once (weights, optimizer state, compiled program) and then called as a
synchronous zero-argument function that runs one train step (or one generation) to completion.
Every case of a run shares one `Shape`, one batch and, where the stacks allow, one set of base
weights (the peer loads ours through `save_decoder`, as a user would load a checkpoint).

Ours: `cpeft_jax.train.step.train_step` (next-token loss over the caption positions, optax
Adam b1=0.9 b2=0.95 lr=1e-4) on the Llama decoder; frozen weights float32, compute in the
shape's dtype. The peer: transformers' LlamaForCausalLM + peft LoRA, torch.optim.Adam with the
same hyper-parameters, float32 weights, bf16 autocast or plain float32.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import tempfile
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from bench import harness
from cpeft_jax import checkpoints, xla_flags
from cpeft_jax.adaptors import LoraConfig, PeftConfig
from cpeft_jax.models.decoder_config import DecoderConfig
from cpeft_jax.models.decoders import init_adaptors
from cpeft_jax.models.llama import Decoder
from cpeft_jax.train import state as state_lib
from cpeft_jax.train import step as step_lib

LR, B1, B2, EPS = 1e-4, 0.9, 0.95, 1e-8
PEER_TARGETS = ('q_proj', 'k_proj', 'v_proj', 'o_proj', 'gate_proj', 'up_proj', 'down_proj')


@dataclasses.dataclass(frozen=True)
class Shape:
  """The decoder, batch and generation shape of one run. The decoder has separate gate and up
  projections (the Hugging Face Llama layout) so that both stacks adapt the same matrices."""
  name: str
  vocab: int
  width: int
  layers: int
  heads: int
  ffn: int
  batch: int
  seq: int
  rank: int = 64
  gen_batch: int = 8
  gen_prompt: int = 65  # BOS + 64 image positions, the caption prompt's length
  gen_new: int = 32
  strategy: str = 'auto'  # the LoRA knobs of PeftConfig, for tuning (see bench/contexts.py)
  tile: int = 64
  # Frozen weights of the PEFT cases stored in the compute dtype ('compute') or float32. Every
  # use casts them to the compute dtype, so bf16 storage gives the same numbers with half the
  # memory and no per-step cast; full fine-tuning always keeps float32 master weights.
  frozen_dtype: str = 'compute'
  remat: bool = False  # rematerialise each layer in the backward pass (every case alike)

  def decoder(self, dtype: str) -> DecoderConfig:
    return DecoderConfig(vocab_size=self.vocab, hidden_size=self.width, num_layers=self.layers,
                         num_heads=self.heads, intermediate_size=self.ffn, dtype=dtype,
                         param_dtype='float32', remat=self.remat)

  def describe(self) -> str:
    return (f'frozen weights of the PEFT cases in {self.frozen_dtype} dtype; '
            f'Llama decoder width {self.width}, {self.layers} layers, {self.heads} heads, '
            f'SwiGLU {self.ffn} (separate gate/up), vocab {self.vocab}; train batch '
            f'{self.batch} x seq {self.seq}; LoRA r={self.rank} alpha={self.rank} on '
            f'q/k/v/o/gate/up/down, strategy {self.strategy} (tile {self.tile}); generation '
            f'batch {self.gen_batch}, prompt {self.gen_prompt}, '
            f'{self.gen_new} new tokens, greedy, float32; layer remat '
            f'{"on" if self.remat else "off"} in every case')


SHAPES = {
    'paper': Shape('paper', vocab=50272, width=768, layers=12, heads=12, ffn=3072, batch=8,
                   seq=128),
    'quick': Shape('quick', vocab=1024, width=128, layers=2, heads=4, ffn=512, batch=4, seq=32,
                   gen_batch=4, gen_prompt=17, gen_new=16),
}


@dataclasses.dataclass(frozen=True)
class TrainSpec:
  """One row of the train table. mode: 'connector' (a trainable linear map on the image
  positions' input embeddings, the rest frozen: the projection-only baseline, whose gradient
  still flows back through every layer), 'peft' (adaptor tables), 'full' (every weight)."""
  label: str
  mode: str = 'peft'
  methods: tuple[str, ...] = ('lora',)
  contexts: int = 1
  dtype: str = 'bfloat16'
  targets: str = 'AF'

  def peft(self, shape: Shape) -> PeftConfig | None:
    if self.mode != 'peft':
      return None
    return PeftConfig(methods=self.methods, targets=self.targets, num_contexts=self.contexts,
                      lora=LoraConfig(rank=shape.rank, alpha=float(shape.rank)),
                      strategy=shape.strategy, tile=shape.tile)


OURS = {
    'connector': TrainSpec('no adaptors: connector only (D x D, image positions)', 'connector',
                           methods=()),
    'lora_c1': TrainSpec('LoRA, context-agnostic (C=1)'),
    'lora_c2': TrainSpec('Context-LoRA C=2 (image / text)', contexts=2),
    'lora_c8': TrainSpec('Context-LoRA C=8 (8 segments)', contexts=8),
    'ia3_c2': TrainSpec('Context-IA3 C=2 (k, v, down input)', methods=('ia3',), contexts=2),
    'bitfit_c2': TrainSpec('Context-BitFit C=2 (all projections)', methods=('bitfit',),
                           contexts=2),
    'full': TrainSpec('full fine-tuning (every weight)', 'full', methods=()),
    'lora_c1_fp32': TrainSpec('LoRA, context-agnostic (C=1), float32', dtype='float32'),
}
PEERS = {
    'peft_bf16': 'transformers + peft LoRA, bf16 autocast',
    'peft_fp32': 'transformers + peft LoRA, float32',
}


def make_batch(shape: Shape, num_contexts: int = 1, seed: int = 0) -> dict[str, np.ndarray]:
  """Random token ids; the loss covers the caption positions (after BOS + image), as the paper."""
  rng = np.random.default_rng(seed)
  B, L = shape.batch, shape.seq
  tokens = rng.integers(3, shape.vocab, (B, L + 1)).astype(np.int32)
  mask = np.ones((B, L), np.float32)
  n_img = harness.image_tokens(L)
  mask[:, :n_img] = 0  # positions 0..n_img-1 predict image tokens: not scored
  image = np.zeros((B, L), bool)
  image[:, 1:1 + n_img] = True
  return {'tokens': tokens[:, :-1], 'targets': tokens[:, 1:], 'loss_mask': mask,
          'context_ids': harness.context_ids(B, L, num_contexts), 'image_mask': image}


def frozen_base(spec: 'TrainSpec', shape: Shape, base):
  """The frozen weights a PEFT case reads: `base`, or a cast copy (see Shape.frozen_dtype)."""
  if shape.frozen_dtype == 'compute' and spec.dtype != 'float32':
    return jax.jit(lambda t: jax.tree.map(lambda x: x.astype(spec.dtype), t))(base)
  return base


def init_base(shape: Shape, seed: int = 0, dtype: str = 'float32'):
  """The frozen decoder's 'params' (float32 draws, stored in `dtype`), shared by every case of
  a run. A lone PEFT case's process makes its frozen weights in their dtype straight away, as
  a user's run loads them: the float32 draws are a temporary of this one call."""
  model = Decoder(shape.decoder('float32'))
  init = lambda k: model.init(k, jnp.zeros((1, 1), jnp.int32))['params']
  return jax.jit(lambda k: jax.tree.map(lambda x: x.astype(dtype), init(k)))(jax.random.key(seed))


def _count(tree) -> int:
  return int(sum(np.prod(x.shape) for x in jax.tree.leaves(tree)))


@dataclasses.dataclass
class Built:
  """A built case: `run()` does one synchronous step."""
  run: Callable[[], object]
  trainable: int
  xla_mib: float | None = None
  first_loss: float | None = None
  compiled: object = None  # our step's jax Compiled (for its cost analysis), None for the peer


def build_ours(spec: TrainSpec, shape: Shape, base, share_base: bool = True,
               frozen=None) -> Built:
  """This project's jitted train step for `spec`, compiled, with its state.

  Full fine-tuning trains (and donates) `base` itself unless `share_base`, then a copy. The
  other modes read `frozen` (default: `frozen_base(spec, shape, base)`) as their frozen weights.
  """
  peft = spec.peft(shape)
  cfg = shape.decoder(spec.dtype)
  model = Decoder(cfg, peft)
  batch = {k: jnp.asarray(v) for k, v in make_batch(shape, spec.contexts).items()}
  if spec.mode != 'full' and frozen is None:
    frozen = frozen_base(spec, shape, base)
  if spec.mode == 'full':
    trainable, frozen = {'params': base}, {}
  elif spec.mode == 'connector':
    D = shape.width
    trainable = {'connector': {'kernel': jnp.eye(D, dtype=jnp.float32),
                               'bias': jnp.zeros((D,), jnp.float32)}}
    frozen = {'params': frozen}
  else:
    trainable, frozen = {'adaptors': init_adaptors(cfg, peft)}, {'params': frozen}

  def apply_fn(variables, batch, *, train, rng):
    del train, rng  # no dropout in the benchmark (the peer's Llama has none either)
    params = variables['params']
    x_BLD = model.apply({'params': params}, batch['tokens'], method=Decoder.embed)
    if 'connector' in variables:
      c = variables['connector']
      proj_BLD = x_BLD @ c['kernel'].astype(x_BLD.dtype) + c['bias'].astype(x_BLD.dtype)
      x_BLD = jnp.where(batch['image_mask'][..., None], proj_BLD, x_BLD)
    return model.apply({'params': params, 'adaptors': variables.get('adaptors', {})},
                       embeddings_BLD=x_BLD, context_ids_BL=batch['context_ids'],
                       method=Decoder.features)

  tx = state_lib.optimizer(state_lib.OptimConfig(learning_rate=LR, b1=B1, b2=B2, eps=EPS))
  state = state_lib.TrainState.create(trainable, tx)
  if spec.mode == 'full' and share_base:
    state = jax.tree.map(jnp.copy, state)
  rng = jax.random.key(0)
  step = jax.jit(functools.partial(step_lib.train_step, apply_fn=apply_fn), donate_argnums=0)
  compiled = step.lower(state, frozen, batch, rng).compile()
  xla_flags.release_freed_memory()  # as the trainer does before its first step
  mem = compiled.memory_analysis()
  xla_mib = None
  if mem is not None:
    xla_mib = (mem.argument_size_in_bytes + mem.output_size_in_bytes + mem.temp_size_in_bytes
               - mem.alias_size_in_bytes) / 2**20
  box = {'state': state}

  def run():
    box['state'], metrics = compiled(box['state'], frozen, batch, rng)
    return jax.block_until_ready(metrics)['loss']
  first = float(run())
  return Built(run, _count(trainable), xla_mib, first, compiled)


# ----------------------------------------------------------------------------- the peer


def hf_config(shape: Shape):
  import transformers
  return transformers.LlamaConfig(
      vocab_size=shape.vocab, hidden_size=shape.width, num_hidden_layers=shape.layers,
      num_attention_heads=shape.heads, num_key_value_heads=shape.heads,
      intermediate_size=shape.ffn, rms_norm_eps=1e-6, rope_theta=10000.0,
      tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, pad_token_id=0)


def hf_model(shape: Shape, base=None):
  """transformers' LlamaForCausalLM in float32: our weights `base` when given (written by
  save_decoder and loaded back, as a user loads a checkpoint), else random ones."""
  import torch
  import transformers
  torch.set_num_threads(harness.cores())
  if base is None:
    return transformers.LlamaForCausalLM(hf_config(shape)).eval()
  with tempfile.TemporaryDirectory() as tmp:
    checkpoints.save_decoder(os.path.join(tmp, 'llama'), shape.decoder('float32'), base)
    return transformers.LlamaForCausalLM.from_pretrained(os.path.join(tmp, 'llama'),
                                                         torch_dtype=torch.float32).eval()


def build_peer(model, shape: Shape, variants=('peft_fp32', 'peft_bf16'),
               device: str = 'cpu') -> dict[str, Built]:
  """The peft LoRA train step, in bf16 autocast and in float32, on one peft model (LoRA
  r=rank, alpha=rank, the seven projections, no dropout) and one Adam, on torch `device`
  ('cpu' or 'cuda'; `run()` waits for the step: it reads the loss back)."""
  import peft
  import torch
  import torch.nn.functional as F
  lora = peft.LoraConfig(r=shape.rank, lora_alpha=shape.rank, lora_dropout=0.0,
                         target_modules=list(PEER_TARGETS), bias='none')
  if shape.remat:  # the peer's equivalent of our layer remat
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={'use_reentrant': False})
  pm = peft.get_peft_model(model.to(device), lora)
  pm.train()
  params = [p for p in pm.parameters() if p.requires_grad]
  opt = torch.optim.Adam(params, lr=LR, betas=(B1, B2), eps=EPS)
  b = make_batch(shape, 1)
  tokens = torch.from_numpy(b['tokens']).long().to(device)
  targets = torch.from_numpy(b['targets']).long().to(device)
  mask = torch.from_numpy(b['loss_mask']).to(device)
  device_type = torch.device(device).type

  def step(bf16):
    opt.zero_grad(set_to_none=True)
    with torch.autocast(device_type, dtype=torch.bfloat16, enabled=bf16):
      logits = pm(input_ids=tokens).logits
    losses = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), reduction='none')
    loss = (losses * mask.flatten()).sum() / mask.sum()
    loss.backward()
    opt.step()
    return loss.item()
  n = sum(p.numel() for p in params)
  out = {}
  for name in sorted(variants, key=lambda v: v != 'peft_fp32'):  # fp32 first: B is still zero
    bf16 = name == 'peft_bf16'
    out[name] = Built(lambda bf16=bf16: step(bf16), n)
    out[name].first_loss = out[name].run()
  return out


# ----------------------------------------------------------------------------- generation


def gen_prompt(shape: Shape, seed: int = 1) -> np.ndarray:
  rng = np.random.default_rng(seed)
  p = rng.integers(3, shape.vocab, (shape.gen_batch, shape.gen_prompt)).astype(np.int32)
  p[:, 0] = 1
  return p


def build_generation(shape: Shape, base, model=None) -> tuple[dict[str, Built], dict]:
  """Greedy generation, ours (generate_text, jitted, KV cache) and, given the transformers
  `model`, its generate (use_cache=True), on the same float32 weights and prompts. EOS (id 2)
  may end rows early in both; `info` counts the tokens each produced and whether they agree,
  and the bytes of the weights a one-token step reads (all but the input embedding table).
  'prefill_*' runs the same call for one new token: the prompt's forward pass and one pick."""
  from cpeft_jax.evaluation import generate as gen
  dec = Decoder(shape.decoder('float32'))
  prompt = gen_prompt(shape)
  # Laid out for decoding once, as evaluation does before its batches (transformers' model
  # likewise holds its weights in the layout it multiplies).
  weights = jax.block_until_ready(gen.prepare(dec, {'params': base}))
  ours = lambda new=shape.gen_new: np.asarray(gen.generate_text(
      dec, weights, prompt, max_new_tokens=new, eos_id=2, text_context=0, pad_id=0))
  out = {'generate_ours': Built(ours, 0), 'prefill_ours': Built(lambda: ours(1), 0)}
  a = ours()
  out['prefill_ours'].run()  # compiled outside the timing
  step_bytes = 4 * (_count(base) - shape.vocab * shape.width)
  info = {'tokens_ours': _generated(a), 'steps_ours': _steps(a), 'step_weight_bytes': step_bytes}
  if model is None:
    return out, info
  import torch
  ids = torch.from_numpy(prompt).long()
  attn = torch.ones_like(ids)

  def theirs(new=shape.gen_new):
    with torch.no_grad():
      out = model.generate(input_ids=ids, attention_mask=attn, max_new_tokens=new,
                           do_sample=False, num_beams=1, use_cache=True, eos_token_id=2,
                           pad_token_id=0)
    return out[:, prompt.shape[1]:].numpy()
  b = theirs()
  b = np.pad(b, ((0, 0), (0, shape.gen_new - b.shape[1])))  # HF stops when all rows end
  info.update(same_tokens=bool(np.array_equal(a, b)), tokens_peer=_generated(b),
              steps_peer=_steps(b))
  out['generate_peer'] = Built(theirs, 0)
  out['prefill_peer'] = Built(lambda: theirs(1), 0)
  return out, info


def _steps(out_BT) -> int:
  """One-token steps after the prefill's token: the longest row's tokens, less one (the loop
  runs until every row has ended)."""
  return max(_generated(row[None]) for row in out_BT) - 1


def _generated(out_BT) -> int:
  """Tokens generated up to and including each row's EOS (pads after it do not count)."""
  n = 0
  for row in out_BT:
    hits = np.flatnonzero(row == 2)
    n += int(hits[0]) + 1 if hits.size else len(row)
  return n
