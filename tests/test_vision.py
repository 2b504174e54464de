"""Vision encoders (CLIP, SigLIP, Swin V2) against transformers' PyTorch models, and the loader."""

import json
import logging
import shutil

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cpeft_jax import checkpoints
from cpeft_jax.models import swinv2
from cpeft_jax.models.clip import config_from_hf as clip_config
from cpeft_jax.models.vision import ViT, ViTConfig

torch = pytest.importorskip('torch')
transformers = pytest.importorskip('transformers')

VIT = dict(image_size=32, patch_size=8, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
           num_attention_heads=4)
SWIN = dict(image_size=32, patch_size=2, embed_dim=16, depths=[2, 2], num_heads=[2, 4],
            window_size=4, pretrained_window_sizes=[0, 3])
# Odd grids: patch merging pads (10 -> 5 -> 3), windows pad (5 in windows of 4) and shrink.
SWIN_ODD = dict(image_size=20, patch_size=2, embed_dim=8, depths=[2, 1, 3], num_heads=[2, 2, 4],
                window_size=4)
ATOL = 1e-4


def _torch_models():
  T = transformers
  return {
      'clip': T.CLIPVisionModel(T.CLIPVisionConfig(**VIT)),
      'siglip': T.SiglipVisionModel(T.SiglipVisionConfig(**VIT)),
      'swinv2': T.Swinv2Model(T.Swinv2Config(**SWIN)),
      'swinv2_odd': T.Swinv2Model(T.Swinv2Config(**SWIN_ODD)),
  }


@pytest.fixture(scope='module')
def ckpts(tmp_path_factory):
  """name -> (directory, pixels_BHWC, last_hidden_state, hidden_states) of tiny random models."""
  torch.manual_seed(0)
  out = {}
  for name, model in _torch_models().items():
    model.eval()
    with torch.no_grad():  # non-trivial biases, norms, embeddings and logit scales
      for pname, p in model.named_parameters():
        if pname.endswith(('bias', 'logit_scale', 'class_embedding')) or 'norm' in pname or (
            'position_embedding' in pname):
          p.add_(0.2 * torch.randn_like(p))
    size = model.config.image_size
    pixels = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
      res = model(pixel_values=pixels, output_hidden_states=True)
    directory = tmp_path_factory.mktemp(name)
    model.save_pretrained(directory)
    out[name] = (directory, pixels.numpy().transpose(0, 2, 3, 1), res.last_hidden_state.numpy(),
                 [h.numpy() for h in res.hidden_states])
  return out


def _run(directory, pixels, **kw):
  module, params = checkpoints.load_vision(directory, **kw)
  return np.asarray(jax.jit(module.apply)({'params': params}, jnp.asarray(pixels)))


@pytest.mark.parametrize('name', ['clip', 'siglip', 'swinv2', 'swinv2_odd'])
def test_last_hidden_state_matches_transformers(ckpts, name):
  directory, pixels, last, _ = ckpts[name]
  got = _run(directory, pixels, drop_cls=False)
  assert got.shape == last.shape
  np.testing.assert_allclose(got, last, rtol=0, atol=ATOL)


@pytest.mark.parametrize('name', ['clip', 'siglip', 'swinv2'])
def test_feature_layer_minus_2_is_hidden_states_minus_2(ckpts, name):
  """The raw hidden state (no post-norm), e.g. LLaVA's CLIP features; Swin's after merging."""
  directory, pixels, _, hidden = ckpts[name]
  got = _run(directory, pixels, feature_layer=-2, drop_cls=False)
  np.testing.assert_allclose(got, hidden[-2], rtol=0, atol=ATOL)


def test_feature_layer_0_is_the_embeddings(ckpts):
  directory, pixels, _, hidden = ckpts['swinv2']
  np.testing.assert_allclose(_run(directory, pixels, feature_layer=0), hidden[0], atol=ATOL)


def test_drop_cls(ckpts):
  directory, pixels, _, hidden = ckpts['clip']
  got = _run(directory, pixels, feature_layer=-2)
  assert got.shape == (2, 16, 32)
  np.testing.assert_allclose(got, hidden[-2][:, 1:], rtol=0, atol=ATOL)
  directory, pixels, last, _ = ckpts['siglip']  # no class token: nothing to drop
  assert _run(directory, pixels, drop_cls=True).shape == last.shape


@pytest.mark.parametrize('name', ['clip', 'siglip', 'swinv2'])
def test_bfloat16(ckpts, name):
  directory, pixels, last, _ = ckpts[name]
  module, params = checkpoints.load_vision(directory, dtype='bfloat16', drop_cls=False)
  assert all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(params))
  got = jax.jit(module.apply)({'params': params}, jnp.asarray(pixels))
  assert got.dtype == jnp.bfloat16 and got.shape == last.shape
  err = np.abs(np.asarray(got.astype(jnp.float32)) - last).max()
  assert err <= 0.05 * np.abs(last).max(), err


def test_only_layers_up_to_the_feature_layer_are_loaded(ckpts, caplog):
  directory, _, _, _ = ckpts['siglip']
  with caplog.at_level(logging.WARNING):
    _, params = checkpoints.load_vision(directory, feature_layer=1, strict=True)
  assert params['layers']['fc1']['kernel'].shape == (1, 32, 64)
  assert 'post_layernorm' not in params and not caplog.records  # skipped, not unexpected


def test_paper_encoder_shape():
  """microsoft/swinv2-tiny-patch4-window8-256's config: 64 embeddings of width 768."""
  cfg = swinv2.config_from_hf(dict(model_type='swinv2', image_size=256, patch_size=4,
                                   embed_dim=96, depths=[2, 2, 6, 2], num_heads=[3, 6, 12, 24],
                                   window_size=8))
  assert (cfg.num_tokens, cfg.out_width) == (64, 768)
  out = jax.eval_shape(lambda x: swinv2.SwinV2(cfg).init_with_output(jax.random.key(0), x)[0],
                       jax.ShapeDtypeStruct((1, 256, 256, 3), jnp.float32))
  assert out.shape == (1, 64, 768)


# ----------------------------------------------------------------------------- the loader


def test_full_clip_model_with_text_tower(tmp_path, ckpts):
  """A CLIPModel checkpoint: shape from vision_config, tower under 'vision_model.'."""
  torch.manual_seed(0)
  text = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
              vocab_size=99, bos_token_id=0, eos_token_id=1, pad_token_id=1)
  full = transformers.CLIPModel(transformers.CLIPConfig(vision_config=VIT, text_config=text))
  full.eval().save_pretrained(tmp_path)
  pixels = ckpts['clip'][1]
  with torch.no_grad():
    want = full.vision_model(torch.tensor(pixels.transpose(0, 3, 1, 2))).last_hidden_state.numpy()
  module, params = checkpoints.load_vision(tmp_path, drop_cls=False, strict=True)
  got = module.apply({'params': params}, jnp.asarray(pixels))
  np.testing.assert_allclose(np.asarray(got), want, rtol=0, atol=ATOL)


def test_sharded_checkpoint(tmp_path, ckpts):
  directory, pixels, last, _ = ckpts['siglip']
  model = transformers.SiglipVisionModel.from_pretrained(directory)
  model.save_pretrained(tmp_path, max_shard_size='20KB')
  assert (tmp_path / 'model.safetensors.index.json').is_file()
  np.testing.assert_allclose(_run(tmp_path, pixels, strict=True), last, rtol=0, atol=ATOL)


def test_bfloat16_checkpoint_loads_into_float32(tmp_path, ckpts):
  directory = ckpts['clip'][0]
  model = transformers.CLIPVisionModel.from_pretrained(directory).to(torch.bfloat16)
  model.save_pretrained(tmp_path)
  _, params = checkpoints.load_vision(tmp_path, strict=True)
  want = model.embeddings.patch_embedding.weight.detach().float().numpy().transpose(2, 3, 1, 0)
  assert params['patch_embedding']['kernel'].dtype == jnp.float32
  np.testing.assert_array_equal(np.asarray(params['patch_embedding']['kernel']), want)


def _copy(directory, tmp_path):
  dst = tmp_path / 'ckpt'
  shutil.copytree(directory, dst)
  return dst


def test_unsupported_model_type(tmp_path, ckpts):
  d = _copy(ckpts['clip'][0], tmp_path)
  (d / 'config.json').write_text(json.dumps({'model_type': 'dinov2'}))
  with pytest.raises(ValueError, match="model_type='dinov2'.*clip, clip_vision_model, siglip"):
    checkpoints.load_vision(d)


def test_shape_mismatch_names_key_and_shapes(tmp_path, ckpts):
  d = _copy(ckpts['clip'][0], tmp_path)
  hf = json.loads((d / 'config.json').read_text())
  (d / 'config.json').write_text(json.dumps({**hf, 'intermediate_size': 48}))
  with pytest.raises(ValueError, match=r'encoder\.layers\.0\.mlp\.fc1\.weight: checkpoint '
                                       r'\(64, 32\), model \(48, 32\)'):
    checkpoints.load_vision(d)


def test_missing_and_unexpected_tensors(tmp_path, ckpts, caplog):
  from safetensors.numpy import load_file, save_file
  d = _copy(ckpts['siglip'][0], tmp_path)
  tensors = load_file(d / 'model.safetensors')
  del tensors['encoder.layers.1.mlp.fc2.bias']
  tensors['encoder.layers.0.mlp.fc3.weight'] = np.zeros((2, 2), np.float32)
  save_file(tensors, d / 'model.safetensors')
  with pytest.raises(ValueError, match=r'ckpt/model\.safetensors does not match.*1 tensor\(s\) '
                                       r'.*missing: .*fc2\.bias.*1 tensor\(s\) in the file are '
                                       r'not used.*fc3\.weight'):
    checkpoints.load_vision(d)
  with caplog.at_level(logging.WARNING):
    module, params = checkpoints.load_vision(d, strict=False)
  assert params['layers']['fc2']['bias'].shape == (2, 32)
  assert any('fc2.bias' in r.message for r in caplog.records)
  assert any('fc3.weight' in r.message for r in caplog.records)


def test_config_and_input_errors(ckpts):
  with pytest.raises(ValueError, match='feature_layer=3; expected an integer in'):
    clip_config({'model_type': 'clip_vision_model', **VIT}, feature_layer=3)
  with pytest.raises(ValueError, match='only square sizes'):
    clip_config({'model_type': 'clip_vision_model', **VIT, 'image_size': [32, 48]})
  with pytest.raises(ValueError, match='hidden_act'):
    ViTConfig(hidden_act='swiglu')
  with pytest.raises(ValueError, match='use_absolute_embeddings'):
    swinv2.config_from_hf({'model_type': 'swinv2', 'use_absolute_embeddings': True})
  cfg = ViTConfig(image_size=32, patch_size=8, hidden_size=32, intermediate_size=64,
                  num_layers=1, num_heads=4)
  with pytest.raises(ValueError, match=r'pixels \[B, 32, 32, 3\], got shape \(1, 3, 32, 32\)'):
    jax.eval_shape(ViT(cfg).init, jax.random.key(0), jnp.zeros((1, 3, 32, 32)))


# ----------------------------------------------------------------------------- the writer


def test_saved_tower_is_transformers_clip_and_loads_back(tmp_path):
  """save_vision writes what transformers' CLIPVisionModel reads with no missing or unexpected
  weights and computes to our hidden states (and pooled output from `extra`), and what
  load_vision gives back bit for bit."""
  cfg = clip_config(dict(model_type='clip_vision_model', hidden_act='quick_gelu', **VIT),
                    drop_cls=False)
  rng = np.random.default_rng(0)
  pixels = rng.normal(size=(2, 32, 32, 3)).astype(np.float32)
  params = ViT(cfg).init(jax.random.key(3), pixels)['params']
  # Non-trivial norms and biases, so a swapped or untransposed tensor shows.
  params = jax.tree.map(lambda x: x + 0.2 * rng.normal(size=x.shape).astype(np.float32), params)
  extra = {'post_layernorm.weight': 1 + rng.normal(size=32).astype(np.float32),
           'post_layernorm.bias': rng.normal(size=32).astype(np.float32)}
  ours = np.asarray(ViT(cfg).apply({'params': params}, pixels))
  directory = tmp_path / 'tower'
  processor = transformers.CLIPImageProcessorPil(
      size={'shortest_edge': 32}, crop_size={'height': 32, 'width': 32}, image_mean=[0.5] * 3,
      image_std=[0.5] * 3)
  checkpoints.save_vision(directory, cfg, params, extra=extra, processor=processor)

  model, info = transformers.CLIPVisionModel.from_pretrained(directory, output_loading_info=True)
  assert not info['missing_keys'] and not info['unexpected_keys'], info
  with torch.no_grad():
    res = model.eval()(pixel_values=torch.from_numpy(pixels.transpose(0, 3, 1, 2)))
  np.testing.assert_allclose(res.last_hidden_state.numpy(), ours, rtol=0, atol=ATOL)
  cls = ours[:, 0]
  pooled = (cls - cls.mean(-1, keepdims=True)) / np.sqrt(cls.var(-1, keepdims=True) + 1e-5)
  np.testing.assert_allclose(res.pooler_output.numpy(),
                             pooled * extra['post_layernorm.weight'] + extra['post_layernorm.bias'],
                             rtol=0, atol=ATOL)

  module, loaded = checkpoints.load_vision(directory, drop_cls=False, strict=True)
  assert module.cfg == cfg
  jax.tree.map(np.testing.assert_array_equal, loaded, params)
  from cpeft_jax.data import preprocess
  proc = preprocess.ImageProcessing.from_pretrained(directory)
  assert proc.image_mean == (0.5,) * 3 and proc.output_size == (32, 32)


def test_save_vision_refuses_other_towers(tmp_path):
  cfg = ViTConfig(image_size=32, patch_size=8, hidden_size=32, intermediate_size=64,
                  num_layers=1, num_heads=4)  # SigLIP-like: no class token, a final norm
  params = ViT(cfg).init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)))['params']
  with pytest.raises(ValueError, match='save_vision writes CLIP vision towers'):
    checkpoints.save_vision(tmp_path / 'x', cfg, params)
  assert not (tmp_path / 'x').exists()


# ----------------------------------------------------------------------------- quantized towers

def _rounding_noise(full, paths, seed=0, block=16):
  """`full` with each of `paths`' kernels [..., d_in, d_out] moved by what int8 rounding would
  do to it, modelled as independent noise: uniform over the step absmax / 127 of its 16-wide
  block along d_in. Derived from the format alone, not from the quantizer under test."""
  rng = np.random.default_rng(seed)
  flat = flax.traverse_util.flatten_dict(full, sep='/')
  for p in paths:
    w = np.asarray(flat[p], np.float32)
    blocks = w.reshape(*w.shape[:-2], w.shape[-2] // block, block, w.shape[-1])
    step = np.abs(blocks).max(-2, keepdims=True) / 127
    flat[p] = (blocks + step * rng.uniform(-0.5, 0.5, blocks.shape)).reshape(w.shape)
  return flax.traverse_util.unflatten_dict(flat, sep='/')


@pytest.mark.parametrize('name', ['clip', 'swinv2'])
def test_quantized_tower_loads_tensor_by_tensor(ckpts, name, monkeypatch):
  """quantize.targets='vision' quantizes the projections as each tensor is read: when the next
  tensor arrives, no earlier projection survives in full precision (neither the loader's buffer
  nor a jax copy of it), and a leaf stacked over layers goes to the device one layer at a time;
  the features stay close to the full-precision tower's and equal those of its dequantized
  weights."""
  import weakref

  from cpeft_jax import quantize as qz
  directory, pixels, _, _ = ckpts[name]
  quantized_shapes, quantize_one = [], qz._quantize
  monkeypatch.setattr(qz, '_quantize',
                      lambda x, *a: quantized_shapes.append(x.shape) or quantize_one(x, *a))
  qcfg = qz.QuantConfig(format='int8', block_size=16, targets='vision')
  quantizer = qz.leaf_quantizer(qcfg, 'encoder/')
  before = {id(a) for a in jax.live_arrays()}
  done = []  # (path, a copy, weak reference to the loader's tensor) of each quantized leaf

  def leaf_fn(path, x):
    for p, _, ref in done:
      assert ref() is None, f'{p} is still held in full precision while {path} loads'
    for a in jax.live_arrays():  # the reader's copy of the current tensor may be alive
      if id(a) not in before and jnp.issubdtype(a.dtype, jnp.floating):
        held = [p for p, w, _ in done if w.shape == a.shape and np.array_equal(w, a)]
        assert not held, f'{held} alive in full precision (a jax array) while {path} loads'
    out = quantizer(path, x)
    if qz.is_quantized(out):
      done.append((path, np.array(x), weakref.ref(x)))
    return out

  module, qparams = checkpoints.load_vision(directory, drop_cls=False, leaf_fn=leaf_fn)
  _, full = checkpoints.load_vision(directory, drop_cls=False)
  assert sorted(p for p, _, _ in done) == qz.quantized_paths(qparams)
  kernels = [p for p in flax.traverse_util.flatten_dict(full, sep='/') if p.endswith('kernel')
             and np.ndim(flax.traverse_util.flatten_dict(full, sep='/')[p]) in (2, 3)
             and 'cpb_mlp' not in p]  # the projections (not the patch conv, nor Swin's cpb MLP)
  assert len(done) == len(kernels) >= 6
  assert {len(s) for s in quantized_shapes} == {2}  # [d_in, d_out]: one layer at a time
  assert len(quantized_shapes) == sum(np.prod(w.shape[:-2]) for _, w, _ in done)
  whole = qz.quantize_params({'encoder': full}, qcfg)['encoder']  # quantizing the loaded tree
  for x, y in zip(jax.tree.leaves(qparams), jax.tree.leaves(whole)):
    assert x.dtype == y.dtype and np.array_equal(np.asarray(x), np.asarray(y))

  run = jax.jit(module.apply)
  want = np.asarray(run({'params': full}, jnp.asarray(pixels)))
  got = np.asarray(run({'params': qparams}, jnp.asarray(pixels)))
  dequantized = np.asarray(run({'params': qz.dequantize_params(qparams)}, jnp.asarray(pixels)))
  np.testing.assert_allclose(got, dequantized, rtol=0, atol=2e-5)
  rel = np.abs(got - want).max() / np.abs(want).max()
  # The tolerance: the same tower with rounding-sized noise on the same kernels, i.e. the step
  # of int8 in 16-wide blocks times this tower's own amplification (Swin V2's post-norm
  # residuals and cosine attention amplify weight errors ~20x more than CLIP); 2x for the max
  # of one draw. A wrong scale or block (say, int4's step) moves the features far more.
  noisy = np.asarray(run({'params': _rounding_noise(full, qz.quantized_paths(qparams))},
                         jnp.asarray(pixels)))
  expected = np.abs(noisy - want).max() / np.abs(want).max()
  assert 0 < rel <= 2 * expected, (rel, expected)
