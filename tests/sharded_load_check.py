"""Loads tiny checkpoints into an 8-device CPU mesh and compares them with today's 1-device load.

Run by test_sharded_load.py in a subprocess with XLA_FLAGS=--xla_force_host_platform_device_count=8
(the device count is fixed when JAX starts). Asserts values, shardings and that every leaf the
rules split has shards smaller than the whole; prints one JSON line of what it measured: for each
case, the peak bytes on device 0 held by the load's own arrays at every moment a tensor block is
read, the final device-0 footprint the plan predicts, and the sizes of the tensors.

usage: python tests/sharded_load_check.py WORKDIR
"""

import json
import pathlib
import shutil
import sys
import types

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / 'tests')]
from cpeft_jax import checkpoints, experiment, quantize, sharding, trees  # noqa: E402
from cpeft_jax import trainable as trainable_lib  # noqa: E402
from cpeft_jax.adaptors import ADAPTORS, LoraConfig, PeftConfig  # noqa: E402
from cpeft_jax.checkpoints import tensors  # noqa: E402
from cpeft_jax.models.decoder_config import DecoderConfig  # noqa: E402
from cpeft_jax.models.llama import Decoder  # noqa: E402
from cpeft_jax.models.vlm import VisionLanguageModel  # noqa: E402
from cpeft_jax.train import trainer  # noqa: E402
from helpers import PatchEncoder  # noqa: E402

DEV0 = jax.devices()[0]
# fsdp=8 splits every kernel 8 ways; the mixed mesh also replicates blocks (over 'data') and
# splits GPT-2's fused c_attn pieces and OPT's biases over 'tensor'.
MESHES = {'fsdp8': dict(data=1, fsdp=8, tensor=1), 'mixed': dict(data=2, fsdp=2, tensor=2)}
LLAMA = DecoderConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_layers=2,
                      num_heads=4, num_kv_heads=2, rms_norm_eps=1e-5, rope_theta=500.0)


def dev0_bytes(x) -> int:
  """Bytes of `x` on device 0, from its sharding (reading its shards would create arrays)."""
  if DEV0 not in x.sharding.device_set:
    return 0
  return x.nbytes * int(np.prod(x.sharding.shard_shape(x.shape))) // max(x.size, 1)


class Watch:
  """Device-0 bytes of the arrays created since it started, sampled as each block is read and
  at each jax.device_put."""

  def __init__(self):
    self.before = {id(a) for a in jax.live_arrays()}
    self.peak, self.single, self.reads, self._orig = 0, 0, 0, {}

  def sample(self):
    new = [a for a in jax.live_arrays() if id(a) not in self.before]
    self.peak = max(self.peak, sum(dev0_bytes(a) for a in new))
    # The largest array on one device only (today's loader built each leaf so, then moved it).
    self.single = max([self.single] + [a.nbytes for a in new if len(a.sharding.device_set) == 1])

  def __enter__(self):
    for cls in (tensors.Safetensors, tensors.Arrays):
      self._orig[cls] = cls.read
      def read(src, key, index=None, _orig=cls.read):
        self.sample()
        out = _orig(src, key, index)
        self.reads += 1
        self.sample()
        return out
      cls.read = read
    self._put = jax.device_put
    def put(*args, **kwargs):  # a leaf built whole and then moved would show here
      self.sample()
      return self._put(*args, **kwargs)
    jax.device_put = put
    return self

  def __exit__(self, *exc):
    for cls, fn in self._orig.items():
      cls.read = fn
    jax.device_put = self._put
    self.sample()


def check_tree(got, want, placement, what):
  """Values equal today's load; each leaf in its planned sharding; split leaves never whole."""
  got_flat, want_flat = trees.flatten(got), trees.flatten(want)
  assert got_flat.keys() == want_flat.keys(), what
  leaves = jax.tree_util.tree_flatten_with_path(got)[0]
  planned = jax.tree.leaves(placement.tree(got))
  split = 0
  for (kp, x), sh in zip(leaves, planned):
    path = trees.path_str(kp)
    assert x.sharding == sh, f'{what} {path}: {x.sharding} != planned {sh}'
    if not sh.is_fully_replicated:
      split += 1
      assert all(s.data.size < x.size for s in x.addressable_shards), f'{what} {path} whole'
  for path in got_flat:
    a, b = got_flat[path], want_flat[path]
    if quantize.is_quantized(a):
      a, b = a.qarray, b.qarray
    jax.tree.map(lambda u, v: np.testing.assert_array_equal(
        np.asarray(u), np.asarray(v), err_msg=f'{what} {path}'), a, b)
  assert split, f'{what}: the rules split no leaf'
  return split


def load_case(name, mesh, load, want, prefix):
  placement = sharding.Placement(mesh, None, prefix)
  with Watch() as w:
    got = load(placement)
  split = check_tree(got, want, placement, name)
  footprint = sum(dev0_bytes(x) for x in jax.tree.leaves(got))
  sizes = [x.nbytes for x in jax.tree.leaves(want)]
  sharded_sizes = [x.nbytes for x, sh in zip(jax.tree.leaves(want), jax.tree.leaves(
      placement.tree(want))) if not sh.is_fully_replicated]
  return dict(peak_dev0=w.peak, footprint_dev0=footprint, single_device=w.single,
              reads=w.reads, split_leaves=split, total=sum(sizes), largest=max(sizes),
              largest_split=max(sharded_sizes), smallest_split=min(sharded_sizes))


def llama_dirs(work):
  shapes = jax.eval_shape(lambda: Decoder(LLAMA).init(jax.random.key(0), np.zeros((1, 3), int)))
  rng = np.random.default_rng(0)
  params = jax.tree.map(lambda s: 0.2 * rng.standard_normal(s.shape).astype(np.float32),
                        shapes['params'])
  single = checkpoints.save_decoder(work / 'llama', LLAMA, params)
  import transformers  # the sharded index and the Flax msgpack are written from its model
  hf = transformers.AutoModelForCausalLM.from_pretrained(single)
  hf.save_pretrained(work / 'llama_index', max_shard_size='20KB')
  assert (work / 'llama_index' / 'model.safetensors.index.json').is_file()
  msgpack = work / 'llama_msgpack'
  msgpack.mkdir()
  shutil.copy(single / 'config.json', msgpack / 'config.json')
  sd = {k: v.detach().numpy() for k, v in hf.state_dict().items()}
  layer = lambda i: {
      'self_attn': {n: {'kernel': sd[f'model.layers.{i}.self_attn.{n}.weight'].T}
                    for n in ('q_proj', 'k_proj', 'v_proj', 'o_proj')},
      'mlp': {n: {'kernel': sd[f'model.layers.{i}.mlp.{n}.weight'].T}
              for n in ('gate_proj', 'up_proj', 'down_proj')},
      **{n: {'weight': sd[f'model.layers.{i}.{n}.weight']}
         for n in ('input_layernorm', 'post_attention_layernorm')}}
  state = {'model': {'embed_tokens': {'embedding': sd['model.embed_tokens.weight']},
                     'layers': {str(i): layer(i) for i in range(LLAMA.num_layers)},
                     'norm': {'weight': sd['model.norm.weight']}},
           'lm_head': {'kernel': sd['lm_head.weight'].T}}
  (msgpack / 'flax_model.msgpack').write_bytes(flax.serialization.to_bytes(state))
  partial = work / 'llama_partial'  # no lm_head: partial_load keeps its fresh init
  partial.mkdir()
  shutil.copy(single / 'config.json', partial / 'config.json')
  import safetensors.numpy
  tensors_ = safetensors.numpy.load_file(single / 'model.safetensors')
  del tensors_['lm_head.weight']
  safetensors.numpy.save_file(tensors_, partial / 'model.safetensors')
  return single, work / 'llama_index', msgpack, partial


def hf_dirs(work):
  """GPT-2 (fused c_attn, Conv1D), OPT with project_in/out, a CLIP vision tower."""
  import torch
  import transformers
  torch.manual_seed(0)
  models = {
      'gpt2': transformers.GPT2LMHeadModel(transformers.GPT2Config(
          vocab_size=64, n_positions=16, n_embd=32, n_layer=2, n_head=4,
          initializer_range=0.2)),
      'opt': transformers.OPTForCausalLM(transformers.OPTConfig(
          vocab_size=64, max_position_embeddings=16, hidden_size=32, num_hidden_layers=2,
          num_attention_heads=4, ffn_dim=48, word_embed_proj_dim=16, init_std=0.2)),
      'clip': transformers.CLIPVisionModel(transformers.CLIPVisionConfig(
          hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
          image_size=32, patch_size=8, initializer_range=0.2))}
  out = {}
  for name, model in models.items():
    with torch.no_grad():
      for p in model.parameters():  # non-trivial biases and norms: a mix-up shows
        p.add_(0.1 * torch.randn_like(p))
    model.save_pretrained(work / name)
    out[name] = work / name
  return out


def decoder_cases(work, mesh_name):
  mesh = sharding.make_mesh(MESHES[mesh_name])
  single, index, msgpack, partial = llama_dirs(work / mesh_name)
  hf = hf_dirs(work / mesh_name)
  qcfg = quantize.QuantConfig(format='nf4', block_size=16, targets='decoder,lm_head,embed')
  cases = {
      'llama': (single, {}, None), 'llama_index': (index, {}, None),
      'llama_msgpack': (msgpack, {}, None), 'llama_bf16': (single, dict(
          dtype='bfloat16', param_dtype='bfloat16'), None),
      'llama_fused': (single, dict(fused_gate_up=True), None),
      'llama_nf4': (single, {}, qcfg), 'llama_partial': (partial, {}, None),
      'gpt2': (hf['gpt2'], {}, None),
      'opt': (hf['opt'], {}, None)}
  out = {}
  for name, (directory, overrides, q) in cases.items():
    cfg = checkpoints.load_decoder(directory, partial_load=('lm_head.weight',),
                                   **overrides).config
    fn = lambda at, q=q: quantize.leaf_quantizer(q, placement=at) if q else None
    kw = dict(partial_load=('lm_head.weight',), seed=3) if name == 'llama_partial' else {}
    want, _ = checkpoints.load_decoder_params(directory, cfg, leaf_fn=fn(None), **kw)
    out[name] = load_case(f'{mesh_name}/{name}', mesh, lambda at: checkpoints.load_decoder_params(
        directory, cfg, leaf_fn=fn(at), placement=at, **kw)[0], want, 'params/decoder/')
  _, want = checkpoints.load_vision(hf['clip'])
  out['clip'] = load_case(f'{mesh_name}/clip', mesh, lambda at: checkpoints.load_vision(
      hf['clip'], placement=at)[1], want, 'params/encoder/')
  return out


def init_case():
  """The VLM's init (connector, adaptor tables) and the train state, on fsdp=8."""
  mesh = sharding.make_mesh(MESHES['fsdp8'])
  dec = DecoderConfig(vocab_size=40, hidden_size=64, num_layers=2, num_heads=4,
                      num_kv_heads=2, intermediate_size=128)
  peft = PeftConfig(methods=('lora', 'ia3', 'bitfit'), num_contexts=4,
                    lora=LoraConfig(rank=8, alpha=8.0))
  model = VisionLanguageModel(PatchEncoder(), dec, peft)
  inputs = (jnp.zeros((1, 16, 16, 3)), jnp.zeros((1, 10), jnp.int32),
            jnp.asarray(experiment.dummy_kinds(4, 10)), jnp.zeros((1, 10), jnp.int32))
  placement = sharding.Placement(mesh)
  variables = experiment.init_variables(model, inputs, 0, set(), placement)
  want = jax.jit(model.init)(jax.random.key(0), *inputs)
  split = check_tree(variables, want, placement, 'init')
  tables = [x for x in jax.tree.leaves(variables[ADAPTORS]) if x.ndim > 2]
  assert all(not x.sharding.is_fully_replicated for x in tables), 'a table is replicated'
  trainable, frozen = trainable_lib.split(variables, 'peft')
  exp = types.SimpleNamespace(config={}, mesh=mesh)
  placed = trainer.place(exp, trainable, frozen, optax.adam(1e-3))
  # build's trees already are in the state's shardings: place moves nothing.
  for a, b in zip(jax.tree.leaves(trainable), jax.tree.leaves(placed.state.trainable)):
    assert a.sharding == b.sharding
  for a, b in zip(jax.tree.leaves(frozen), jax.tree.leaves(placed.frozen)):
    assert a is b, 'place moved a frozen leaf that build had placed'
  got = jax.tree.leaves(placed.state)
  planned = jax.tree.leaves(placed.state_sh)
  assert len(got) == len(planned)
  assert all(x.sharding == s for x, s in zip(got, planned))
  moments = [x for x in jax.tree.leaves(placed.state.opt_state) if x.ndim > 2]
  assert moments and all(not x.sharding.is_fully_replicated for x in moments)
  table_bytes = sum(x.nbytes for x in jax.tree.leaves(variables[ADAPTORS]))
  return dict(split_leaves=split, tables_bytes=table_bytes,
              tables_dev0=sum(dev0_bytes(x) for x in jax.tree.leaves(variables[ADAPTORS])),
              moments_bytes=sum(x.nbytes for x in moments),
              moments_dev0=sum(dev0_bytes(x) for x in moments))


def main(work):
  assert jax.device_count() == 8, jax.device_count()
  work = pathlib.Path(work)
  out = {m: decoder_cases(work, m) for m in MESHES}
  out['init'] = init_case()
  print(json.dumps(out))


if __name__ == '__main__':
  main(sys.argv[1])
