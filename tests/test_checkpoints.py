"""Loading Hugging Face checkpoints: logits against transformers' PyTorch models, and the errors.

Every checkpoint is a tiny random model written by transformers' save_pretrained (the hub is
never reached); the flax_model.msgpack files are written here in the layout of transformers 4's
FlaxLlamaForCausalLM, which transformers 5 no longer has.
"""

import json
import logging
import shutil
import types

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip('torch')
transformers = pytest.importorskip('transformers')
from safetensors.numpy import save_file  # noqa: E402

from cpeft_jax import checkpoints  # noqa: E402
from cpeft_jax.adaptors import LoraConfig, PeftConfig  # noqa: E402
from cpeft_jax.models import decoders, hf_configs  # noqa: E402
from cpeft_jax.models.llama import Decoder  # noqa: E402
from helpers import MASK, TOKENS  # noqa: E402  (the second row is right-padded)

TINY = dict(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-5, rope_theta=500.0,
            initializer_range=0.2)  # logits of a few units
ARCHS = {  # llama: GQA, untied; qwen2: q/k/v biases, tied; mistral: head_dim != hidden / heads
    'llama': lambda: transformers.LlamaForCausalLM(
        transformers.LlamaConfig(**TINY, tie_word_embeddings=False)),
    'qwen2': lambda: transformers.Qwen2ForCausalLM(
        transformers.Qwen2Config(**TINY, tie_word_embeddings=True)),
    'mistral': lambda: transformers.MistralForCausalLM(
        transformers.MistralConfig(**TINY, head_dim=16, sliding_window=None)),
}
PEFT = PeftConfig(methods=('lora', 'ia3', 'bitfit'), num_contexts=2,
                  lora=LoraConfig(rank=4, alpha=8.0))
CONTEXTS = np.arange(18).reshape(2, 9) % 2


def _torch_model(arch, dtype=torch.float32):
  torch.manual_seed(0)
  hf = ARCHS[arch]().eval()
  with torch.no_grad():  # non-trivial biases and norms, so that a mix-up shows
    for name, p in hf.named_parameters():
      if name.endswith('bias') or 'norm' in name:
        p.add_(0.1 * torch.randn_like(p))
  return hf.to(dtype)


def _torch_logits(hf):
  with torch.no_grad():
    return hf(input_ids=torch.tensor(TOKENS),
              attention_mask=torch.tensor(MASK.astype(np.int64))).logits.float().numpy()


def _logits(loaded, peft=None):
  model = Decoder(loaded.config, peft)
  variables = {'params': loaded.params}
  if peft is not None:
    variables['adaptors'] = loaded.adaptors
  return np.asarray(model.apply(variables, jnp.asarray(TOKENS), attention_mask_BL=MASK,
                                context_ids_BL=jnp.asarray(CONTEXTS) if peft else None))


@pytest.fixture(scope='module', params=list(ARCHS))
def saved(request, tmp_path_factory):
  arch = request.param
  hf = _torch_model(arch)
  directory = tmp_path_factory.mktemp(arch)
  hf.save_pretrained(directory)
  return types.SimpleNamespace(arch=arch, dir=directory, want=_torch_logits(hf))


@pytest.fixture(scope='module')
def llama(tmp_path_factory):
  hf = _torch_model('llama')
  directory = tmp_path_factory.mktemp('llama')
  hf.save_pretrained(directory)
  return types.SimpleNamespace(dir=directory, hf=hf, want=_torch_logits(hf),
                               loaded=checkpoints.load_decoder(directory))


def _rewrite(src, dst, edit):
  """A copy of checkpoint `src` whose tensors went through `edit(dict of numpy arrays)`."""
  dst.mkdir()
  shutil.copy(src / 'config.json', dst / 'config.json')
  from safetensors import safe_open
  with safe_open(str(src / 'model.safetensors'), 'numpy') as f:
    tensors = {k: f.get_tensor(k) for k in f.keys()}
  edit(tensors)
  save_file(tensors, str(dst / 'model.safetensors'), metadata={'format': 'pt'})
  return dst


def test_logits_match_transformers(saved):
  loaded = checkpoints.load_decoder(saved.dir, PEFT)
  assert loaded.report == checkpoints.LoadReport((), ())
  assert loaded.config.qkv_bias == (saved.arch == 'qwen2')
  assert loaded.config.tie_embeddings == (saved.arch == 'qwen2')
  assert ('lm_head' in loaded.params) == (saved.arch != 'qwen2')
  got = _logits(loaded, PEFT)  # fresh adaptors leave the base model's function unchanged
  assert np.abs(got[MASK] - saved.want[MASK]).max() <= 1e-4


def test_adaptor_tables_are_the_models_fresh_init(llama):
  cfg = llama.loaded.config
  got = decoders.init_adaptors(cfg, PEFT, seed=3)
  want = Decoder(cfg, PEFT).init(jax.random.key(3), jnp.asarray(TOKENS))['adaptors']
  assert jax.tree.structure(got) == jax.tree.structure(want)
  jax.tree.map(np.testing.assert_array_equal, got, want)
  assert decoders.init_adaptors(cfg, None) == {}


def test_sharded_safetensors(llama, tmp_path):
  llama.hf.save_pretrained(tmp_path, max_shard_size='20KB')
  assert (tmp_path / 'model.safetensors.index.json').is_file()
  assert len(list(tmp_path.glob('model-*.safetensors'))) > 1
  loaded = checkpoints.load_decoder(tmp_path)
  jax.tree.map(np.testing.assert_array_equal, loaded.params, llama.loaded.params)


def _flax_llama_state(sd, num_layers):
  """The params of transformers 4's FlaxLlamaForCausalLM: kernels [d_in, d_out], layers '0'..."""
  t = lambda k: sd[k].detach().numpy()
  norm = lambda i, n: {'weight': t(f'model.layers.{i}.{n}.weight')}
  layer = lambda i: {
      'self_attn': {n: {'kernel': t(f'model.layers.{i}.self_attn.{n}.weight').T}
                    for n in ('q_proj', 'k_proj', 'v_proj', 'o_proj')},
      'mlp': {n: {'kernel': t(f'model.layers.{i}.mlp.{n}.weight').T}
              for n in ('gate_proj', 'up_proj', 'down_proj')},
      'input_layernorm': norm(i, 'input_layernorm'),
      'post_attention_layernorm': norm(i, 'post_attention_layernorm')}
  return {'model': {'embed_tokens': {'embedding': t('model.embed_tokens.weight')},
                    'layers': {str(i): layer(i) for i in range(num_layers)},
                    'norm': {'weight': t('model.norm.weight')}},
          'lm_head': {'kernel': t('lm_head.weight').T}}


@pytest.mark.parametrize('sharded', [False, True])
def test_flax_msgpack(llama, tmp_path, sharded):
  shutil.copy(llama.dir / 'config.json', tmp_path / 'config.json')
  state = _flax_llama_state(llama.hf.state_dict(), TINY['num_hidden_layers'])
  if not sharded:
    (tmp_path / 'flax_model.msgpack').write_bytes(flax.serialization.to_bytes(state))
  else:  # as transformers' flax_shard_checkpoint: flat '/'-joined keys per shard, plus an index
    flat = flax.traverse_util.flatten_dict(state, sep='/')
    names = sorted(flat)
    weight_map = {}
    for i, part in enumerate((names[:len(names) // 2], names[len(names) // 2:])):
      file = f'flax_model-0000{i + 1}-of-00002.msgpack'
      (tmp_path / file).write_bytes(flax.serialization.to_bytes({k: flat[k] for k in part}))
      weight_map.update(dict.fromkeys(part, file))
    (tmp_path / 'flax_model.msgpack.index.json').write_text(json.dumps(
        {'metadata': {}, 'weight_map': weight_map}))
  loaded = checkpoints.load_decoder(tmp_path)
  assert loaded.report == checkpoints.LoadReport((), ())
  jax.tree.map(np.testing.assert_array_equal, loaded.params, llama.loaded.params)
  assert np.abs(_logits(loaded)[MASK] - llama.want[MASK]).max() <= 1e-4


def test_bfloat16(llama, tmp_path):
  loaded = checkpoints.load_decoder(llama.dir, dtype='bfloat16')
  assert {x.dtype for x in jax.tree.leaves(loaded.params)} == {jnp.dtype(jnp.bfloat16)}
  assert loaded.config.dtype == loaded.config.param_dtype == 'bfloat16'
  got, ref = _logits(loaded), _logits(llama.loaded)
  assert 0 < np.sqrt(np.mean((got - ref) ** 2) / np.mean(ref ** 2)) < 0.05
  # A bf16 checkpoint (which numpy alone cannot read) loads exactly into fp32.
  hf16 = _torch_model('llama', torch.bfloat16)
  hf16.save_pretrained(tmp_path)
  params = checkpoints.load_decoder(tmp_path).params
  np.testing.assert_array_equal(
      params['layers']['attn']['q_proj']['kernel'][1],
      hf16.model.layers[1].self_attn.q_proj.weight.detach().float().numpy().T)


def test_missing_tensor_is_reported_and_initialised(llama, tmp_path, caplog):
  gone = 'model.layers.1.mlp.down_proj.weight'
  path = _rewrite(llama.dir, tmp_path / 'ckpt', lambda t: t.pop(gone))
  with caplog.at_level(logging.WARNING, logger='cpeft_jax.checkpoints'):
    loaded = checkpoints.load_decoder(path, seed=7, partial_load=('model.layers.*.down_proj.*',))
  assert loaded.report == checkpoints.LoadReport((gone,), ())
  assert gone in caplog.text and 'missing' in caplog.text
  down = loaded.params['layers']['mlp']['down_proj']['kernel']
  np.testing.assert_array_equal(down[0], llama.loaded.params['layers']['mlp']['down_proj'][
      'kernel'][0])
  fresh = Decoder(loaded.config).init(jax.random.key(7), jnp.asarray(TOKENS))['params']
  # The same draw; jitted and eager sampling may round the last bit differently.
  np.testing.assert_allclose(down[1], fresh['layers']['mlp']['down_proj']['kernel'][1],
                             rtol=1e-5, atol=1e-7)
  with pytest.raises(ValueError, match=f'ckpt/model.safetensors does not match.*missing: {gone}'):
    checkpoints.load_decoder(path)


def test_unexpected_and_ignored_tensors(llama, tmp_path):
  def edit(t):
    t['model.layers.0.self_attn.rotary_emb.inv_freq'] = np.ones(4, np.float32)  # old buffer
    t['model.layers.0.self_attn.extra.weight'] = np.ones((2, 2), np.float32)
  path = _rewrite(llama.dir, tmp_path / 'ckpt', edit)
  loaded = checkpoints.load_decoder(path, strict=False)
  assert loaded.report == checkpoints.LoadReport((), ('model.layers.0.self_attn.extra.weight',))
  with pytest.raises(ValueError, match='not used by the decoder: .*self_attn.extra.weight'):
    checkpoints.load_decoder(path)


def test_base_model_checkpoint_without_prefix(llama, tmp_path):
  def edit(t):
    for k in list(t):
      t[k.removeprefix('model.')] = t.pop(k)
    del t['lm_head.weight']
  loaded = checkpoints.load_decoder(_rewrite(llama.dir, tmp_path / 'ckpt', edit),
                                    partial_load=('lm_head.weight',))
  assert loaded.report == checkpoints.LoadReport(('lm_head.weight',), ())
  np.testing.assert_array_equal(loaded.params['embed_tokens']['embedding'],
                                llama.loaded.params['embed_tokens']['embedding'])


def test_shape_mismatch_names_key_and_shapes(llama, tmp_path):
  key = 'model.layers.1.self_attn.k_proj.weight'
  path = _rewrite(llama.dir, tmp_path / 'ckpt',
                  lambda t: t.__setitem__(key, np.zeros((32, 32), np.float32)))
  want = rf'{key}: the checkpoint has \(32, 32\), the model expects \(16, 32\)'
  with pytest.raises(ValueError, match=want):
    checkpoints.load_decoder(path)


def test_unknown_model_type(llama, tmp_path):
  path = _rewrite(llama.dir, tmp_path / 'ckpt', lambda t: None)
  config = json.loads((path / 'config.json').read_text())
  (path / 'config.json').write_text(json.dumps(dict(config, model_type='gpt_neox')))
  with pytest.raises(ValueError, match="model_type='gpt_neox'.*llama, mistral, qwen2, gpt2, opt"):
    checkpoints.load_decoder(path)


def test_vocab_size_mismatch_names_the_embedding(llama, tmp_path):
  path = _rewrite(llama.dir, tmp_path / 'ckpt', lambda t: None)
  config = json.loads((path / 'config.json').read_text())
  (path / 'config.json').write_text(json.dumps(dict(config, vocab_size=80)))
  want = (r'model\.embed_tokens\.weight: the checkpoint has \(64, 32\), the model expects '
          r'\(80, 32\)(.|\n)*lm_head\.weight: the checkpoint has \(64, 32\)')
  with pytest.raises(ValueError, match=want):
    checkpoints.load_decoder(path)


def test_fused_gate_up_loads_from_separate_gate_and_up(llama):
  fused = checkpoints.load_decoder(llama.dir, fused_gate_up=True)
  assert fused.report == checkpoints.LoadReport((), ())
  mlp = llama.loaded.params['layers']['mlp']
  np.testing.assert_array_equal(fused.params['layers']['mlp']['gate_up_proj']['kernel'],
                                np.concatenate([mlp['gate_proj']['kernel'],
                                                mlp['up_proj']['kernel']], -1))
  assert np.abs(_logits(fused)[MASK] - llama.want[MASK]).max() <= 1e-4


@pytest.mark.parametrize('rope', [
    dict(rope_type='linear', factor=4.0),
    dict(rope_type='llama3', factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
         original_max_position_embeddings=64)])  # head_dim 8: one short, one medium, two long
def test_rope_scaling_matches_transformers(rope, tmp_path):
  import dataclasses
  torch.manual_seed(0)
  hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(**TINY, rope_scaling=rope)).eval()
  hf.save_pretrained(tmp_path)
  loaded = checkpoints.load_decoder(tmp_path)
  assert (loaded.config.rope_type, loaded.config.rope_factor) == (rope['rope_type'],
                                                                  rope['factor'])
  want = _torch_logits(hf)
  got = _logits(loaded)
  assert np.abs(got[MASK] - want[MASK]).max() <= 1e-4
  plain = types.SimpleNamespace(config=dataclasses.replace(loaded.config, rope_type='default'),
                                params=loaded.params)
  assert np.abs(_logits(plain)[MASK] - want[MASK]).max() > 1e-3  # the scaling matters here


def test_catalog(tmp_path, monkeypatch, llama):
  from cpeft_jax import catalog
  assert {t.model_type for t in catalog.TEXT.values()} <= set(hf_configs.MODEL_TYPES)
  assert {v.model_type for v in catalog.VISION.values()} <= set(checkpoints.vision.ARCHITECTURES)
  assert all(n in catalog.table() for n in (*catalog.TEXT, *catalog.VISION))
  assert catalog.vision_settings('openai/clip-vit-base-patch32')['feature_layer'] == -2
  assert catalog.vision_settings(str(tmp_path))['feature_layer'] == -1
  assert catalog.resolve(llama.dir) == llama.dir
  monkeypatch.setenv('HF_HOME', str(tmp_path))
  monkeypatch.delenv('HF_HUB_CACHE', raising=False)
  with pytest.raises(FileNotFoundError, match=r"hf download facebook/opt-125m(.|\n)*catalog "
                     'preset: opt, 125M parameters'):
    catalog.resolve('facebook/opt-125m')


def test_hub_id_offline(llama, tmp_path, monkeypatch):
  monkeypatch.setenv('HF_HUB_OFFLINE', '1')
  monkeypatch.setenv('HF_HOME', str(tmp_path))
  monkeypatch.delenv('HF_HUB_CACHE', raising=False)
  with pytest.raises(FileNotFoundError, match="'someone/tiny-llama' is not a local directory "
                     'and not in the local Hugging Face cache'):
    checkpoints.load_decoder('someone/tiny-llama')
  # The same id, once in the cache (the layout huggingface_hub writes), loads offline.
  repo = tmp_path / 'hub' / 'models--someone--tiny-llama'
  shutil.copytree(llama.dir, repo / 'snapshots' / 'abc123')
  (repo / 'refs').mkdir()
  (repo / 'refs' / 'main').write_text('abc123')
  loaded = checkpoints.load_decoder('someone/tiny-llama')
  jax.tree.map(np.testing.assert_array_equal, loaded.params, llama.loaded.params)


def test_no_weights_in_directory(llama, tmp_path):
  shutil.copy(llama.dir / 'config.json', tmp_path / 'config.json')
  with pytest.raises(FileNotFoundError, match='No weights in'):
    checkpoints.load_decoder(tmp_path)


# ----------------------------------------------------------------------------- config.json


def _hf(model_type='llama', **kw):
  return dict(model_type=model_type, **TINY, **kw)


def test_rope_theta_from_old_and_new_configs():
  assert hf_configs.decoder_config(_hf()).rope_theta == 500.0  # rope_theta at the top level
  new = dict(_hf(), rope_parameters={'rope_theta': 250.0, 'rope_type': 'default'})
  del new['rope_theta']
  assert hf_configs.decoder_config(new).rope_theta == 250.0
  linear = hf_configs.decoder_config(_hf(rope_scaling={'type': 'linear', 'factor': 2.0}))
  assert (linear.rope_theta, linear.rope_type, linear.rope_factor) == (500.0, 'linear', 2.0)
  with pytest.raises(ValueError, match="rope scaling 'yarn' \\(factor=8.0\\).*'llama3'"):
    hf_configs.decoder_config(_hf(rope_parameters={'rope_type': 'yarn', 'factor': 8.0,
                                                   'rope_theta': 5e5}))
  with pytest.raises(ValueError, match="'llama3' without \\['low_freq_factor'"):
    hf_configs.decoder_config(_hf(rope_parameters={'rope_type': 'llama3', 'factor': 8.0}))


def test_sliding_window_refused_unless_inert():
  with pytest.raises(ValueError, match='sliding_window=16 < max_position_embeddings=2048'):
    hf_configs.decoder_config(_hf('mistral', sliding_window=16, max_position_embeddings=2048))
  for inert in (dict(sliding_window=None), dict(sliding_window=4096, max_position_embeddings=4096)):
    hf_configs.decoder_config(_hf('mistral', **inert))
  hf_configs.decoder_config(_hf('qwen2', sliding_window=16, use_sliding_window=False))
  hf_configs.decoder_config(_hf('qwen2', sliding_window=16, use_sliding_window=True,
                                max_window_layers=2))  # no layer slides
  with pytest.raises(ValueError, match=r'in layers \[1\]'):
    hf_configs.decoder_config(_hf('qwen2', sliding_window=16, use_sliding_window=True,
                                  max_window_layers=1))


def test_unsupported_features_refused():
  with pytest.raises(ValueError, match='attention_bias=true'):
    hf_configs.decoder_config(_hf(attention_bias=True))
  with pytest.raises(ValueError, match="hidden_act='gelu'"):
    hf_configs.decoder_config(_hf(hidden_act='gelu'))
  with pytest.raises(ValueError, match="lacks \\['intermediate_size'\\]"):
    hf_configs.decoder_config({k: v for k, v in _hf().items() if k != 'intermediate_size'})


_SHAPE_KEYS = {  # the keys without a default for the learned-position decoders
    'gpt2': dict(vocab_size=64, n_positions=16, n_embd=32, n_layer=2, n_head=4),
    'opt': dict(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                ffn_dim=48)}


@pytest.mark.parametrize('model_type', hf_configs.MODEL_TYPES)
def test_defaults_agree_with_transformers(model_type):
  """A config.json with only the shape keys means what transformers' config class says."""
  if model_type in _SHAPE_KEYS:
    minimal = dict(model_type=model_type, **_SHAPE_KEYS[model_type])
  else:
    minimal = _hf(model_type)
    del minimal['rope_theta'], minimal['rms_norm_eps']
  full = transformers.AutoConfig.for_model(**minimal).to_dict()

  def outcome(d):
    try:
      return hf_configs.decoder_config(d)
    except ValueError as e:
      return str(e)
  assert outcome(minimal) == outcome(full)


@pytest.mark.parametrize('fused', [False, True])
def test_save_decoder_round_trips_through_transformers(tmp_path, fused):
  torch = pytest.importorskip('torch')
  import dataclasses as dc
  import transformers
  from cpeft_jax.models.decoder_config import DecoderConfig
  from cpeft_jax.models.llama import Decoder
  cfg = DecoderConfig(vocab_size=64, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2,
                      intermediate_size=48, rope_theta=300.0, rms_norm_eps=1e-5,
                      fused_gate_up=fused)
  tokens = np.random.default_rng(0).integers(0, 64, (2, 7))
  params = Decoder(cfg).init(jax.random.key(4), tokens)['params']
  params = jax.tree.map(lambda x: x + 0.05 * jax.random.normal(jax.random.key(5), x.shape), params)
  want = np.asarray(Decoder(cfg).apply({'params': params}, tokens))
  path = checkpoints.save_decoder(tmp_path / 'ckpt', cfg, params)
  assert not (tmp_path / 'ckpt.tmp').exists()
  hf = transformers.LlamaForCausalLM.from_pretrained(str(path)).eval()
  with torch.no_grad():
    got = hf(input_ids=torch.tensor(tokens)).logits.numpy()
  np.testing.assert_allclose(got, want, atol=1e-4)
  loaded = checkpoints.load_decoder(path)  # the checkpoint has separate gate and up
  assert loaded.report == checkpoints.LoadReport((), ())
  assert dc.replace(loaded.config, fused_gate_up=fused) == cfg
  np.testing.assert_allclose(Decoder(loaded.config).apply({'params': loaded.params}, tokens), want,
                             atol=1e-5)
  if not fused:
    jax.tree.map(np.testing.assert_array_equal, loaded.params, params)


def test_swap_in_replaces_a_directory_and_leaves_no_backup(tmp_path):
  target, tmp = tmp_path / 'ckpt', tmp_path / 'ckpt.tmp'
  target.mkdir()
  (target / 'old.txt').write_text('old')
  tmp.mkdir()
  (tmp / 'new.txt').write_text('new')
  assert checkpoints.swap_in(tmp, target) == target
  assert sorted(p.name for p in tmp_path.iterdir()) == ['ckpt']
  assert sorted(p.name for p in target.iterdir()) == ['new.txt']
