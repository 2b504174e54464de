"""Corrupted and malformed inputs: each is an error naming the file, key or tensor, or a
counted skip naming the file; never a silent cast, a random weight or a crash mid-epoch.

Checkpoints are copies of conftest's tiny Llama (and a tiny CLIP tower written by save_vision)
with their tensors edited; images and captions JSONs are written here, a few pixels each.
"""

import json
import logging
import pathlib
import re
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import PIL.Image
import pytest
from safetensors import safe_open
from safetensors.numpy import save_file

from cpeft_jax import checkpoints
from cpeft_jax.checkpoints import io
from cpeft_jax.data import preprocess, sources
from cpeft_jax.models.llama import Decoder
from helpers import TOKENS
from configs import demo, paper  # noqa: I100  (helpers puts the repository on sys.path)

# ----------------------------------------------------------------------------- checkpoints


def _rewrite(src, dst, edit=None, config=None):
  """A copy of checkpoint `src` whose tensors went through `edit(dict)`, config.json through
  `config(dict)`."""
  dst.mkdir()
  hf = json.loads((src / 'config.json').read_text())
  (dst / 'config.json').write_text(json.dumps(config(hf) if config else hf))
  with safe_open(str(src / 'model.safetensors'), 'numpy') as f:
    tensors = {k: f.get_tensor(k) for k in f.keys()}
  if edit:
    edit(tensors)
  save_file(tensors, str(dst / 'model.safetensors'), metadata={'format': 'pt'})
  return dst


def test_truncated_safetensors_names_the_file(llama_base, tmp_path):
  path = _rewrite(llama_base.dir, tmp_path / 'ckpt')
  data = (path / 'model.safetensors').read_bytes()
  (path / 'model.safetensors').write_bytes(data[:len(data) // 2])
  with pytest.raises(ValueError, match=r'ckpt/model\.safetensors is not a readable safetensors '
                                       r'file.*incomplete'):
    checkpoints.load_decoder(path)


def test_garbage_safetensors_names_the_file(llama_base, tmp_path):
  path = _rewrite(llama_base.dir, tmp_path / 'ckpt')
  (path / 'model.safetensors').write_bytes(b'not a checkpoint at all' * 4)
  with pytest.raises(ValueError, match=r'ckpt/model\.safetensors is not a readable safetensors'):
    checkpoints.load_decoder(path)


def test_garbage_index_and_config_name_the_file(llama_base, tmp_path):
  path = _rewrite(llama_base.dir, tmp_path / 'ckpt')
  (path / 'model.safetensors').unlink()
  (path / 'model.safetensors.index.json').write_text('{"weight_map": ')
  with pytest.raises(ValueError, match=r'ckpt/model\.safetensors\.index\.json is not valid JSON'):
    checkpoints.load_decoder(path)
  (path / 'config.json').write_text('{"model_type": "llama",')
  with pytest.raises(ValueError, match=r'ckpt/config\.json is not valid JSON'):
    checkpoints.load_decoder(path)


def test_missing_lm_head_is_an_error_naming_file_and_tensor(llama_base, tmp_path):
  path = _rewrite(llama_base.dir, tmp_path / 'ckpt', lambda t: t.pop('lm_head.weight'))
  with pytest.raises(ValueError, match=r'ckpt/model\.safetensors does not match the decoder.*'
                                       r'missing: lm_head\.weight.*partial_load'):
    checkpoints.load_decoder(path)


def test_partial_load_keeps_a_missing_lm_head_fresh(llama_base, tmp_path, caplog):
  path = _rewrite(llama_base.dir, tmp_path / 'ckpt', lambda t: t.pop('lm_head.weight'))
  with caplog.at_level(logging.WARNING, logger='cpeft_jax.checkpoints'):
    loaded = checkpoints.load_decoder(path, partial_load=('lm_*',), seed=3)
  assert loaded.report == checkpoints.LoadReport(('lm_head.weight',), ())
  assert 'lm_head.weight' in caplog.text and 'partial_load' in caplog.text
  init = jax.jit(lambda key: Decoder(loaded.config).init(key, jnp.asarray(TOKENS[:1, :1])))
  fresh = init(jax.random.key(3))['params']['lm_head']['kernel']
  np.testing.assert_allclose(loaded.params['lm_head']['kernel'], fresh, rtol=1e-6, atol=1e-7)
  np.testing.assert_array_equal(loaded.params['norm']['weight'],
                                llama_base.params['norm']['weight'])
  # A pattern that matches nothing missing changes nothing; a comma-separated string is a list.
  assert checkpoints.load_decoder(path, partial_load='x.*, lm_head.weight').report.missing == (
      'lm_head.weight',)
  with pytest.raises(ValueError, match=r'partial_load=\(3,\); expected a tuple of fnmatch'):
    checkpoints.load_decoder(path, partial_load=(3,))


def test_tied_checkpoint_without_lm_head_loads(llama_base, tmp_path):
  path = _rewrite(llama_base.dir, tmp_path / 'ckpt', lambda t: t.pop('lm_head.weight'),
                  lambda hf: dict(hf, tie_word_embeddings=True))
  loaded = checkpoints.load_decoder(path)
  assert loaded.report == checkpoints.LoadReport((), ()) and 'lm_head' not in loaded.params


def test_extra_tensor_is_an_error_naming_it(llama_base, tmp_path):
  def edit(t):
    t['model.layers.0.mlp.extra_proj.weight'] = np.ones((2, 2), np.float32)
    t['model.layers.1.self_attn.rotary_emb.inv_freq'] = np.ones(4, np.float32)  # known buffer
  path = _rewrite(llama_base.dir, tmp_path / 'ckpt', edit)
  with pytest.raises(ValueError, match=r'ckpt/model\.safetensors does not match.*1 tensor\(s\) '
                                       r'in the file are not used.*extra_proj\.weight\.$'):
    checkpoints.load_decoder(path)


@pytest.mark.parametrize('dtype', [np.int32, np.bool_])
def test_non_float_tensor_is_an_error_naming_it(llama_base, tmp_path, dtype):
  key = 'model.layers.1.mlp.up_proj.weight'
  path = _rewrite(llama_base.dir, tmp_path / 'ckpt',
                  lambda t: t.__setitem__(key, np.ones_like(t[key], dtype)))
  want = {np.int32: 'I32', np.bool_: 'BOOL'}[dtype]
  with pytest.raises(ValueError, match=rf'ckpt/model\.safetensors: 1 tensor\(s\) are not '
                                       rf'floating point.*{key} \({want}\)'):
    checkpoints.load_decoder(path)


def test_state_dict_with_int_tensor_is_an_error(llama_base):
  with safe_open(str(llama_base.dir / 'model.safetensors'), 'numpy') as f:
    sd = {k: f.get_tensor(k) for k in f.keys()}
  sd['model.norm.weight'] = sd['model.norm.weight'].astype(np.int64)
  with pytest.raises(ValueError, match=r'the state dict: 1 tensor.*model\.norm\.weight \(int64\)'):
    checkpoints.params_from_state_dict(sd, llama_base.cfg)


@pytest.fixture(scope='module')
def clip_tower(tmp_path_factory):
  """A tiny CLIP vision tower written by save_vision."""
  module = checkpoints.vision_module(dict(
      model_type='clip_vision_model', image_size=16, patch_size=8, hidden_size=16,
      intermediate_size=32, num_hidden_layers=1, num_attention_heads=2))
  shapes = jax.eval_shape(module.init, jax.random.key(0), jnp.zeros((1, 16, 16, 3)))['params']
  rng = np.random.default_rng(0)
  params = jax.tree.map(lambda s: rng.standard_normal(s.shape).astype(np.float32), shapes)
  return checkpoints.save_vision(tmp_path_factory.mktemp('clip') / 'tower', module.cfg, params)


def test_vision_tower_bad_tensors(clip_tower, tmp_path):
  tower = pathlib.Path(clip_tower)
  gone = 'vision_model.encoder.layers.0.mlp.fc2.bias'
  path = _rewrite(tower, tmp_path / 'gone', lambda t: t.pop(gone))
  with pytest.raises(ValueError, match=rf'gone/model\.safetensors does not match the vision '
                                       rf'encoder.*missing: {gone}'):
    checkpoints.load_vision(path)
  _, params = checkpoints.load_vision(path, partial_load=('*.fc2.bias',))
  assert params['layers']['fc2']['bias'].shape == (1, 16)
  key = 'vision_model.embeddings.class_embedding'
  path = _rewrite(tower, tmp_path / 'int', lambda t: t.__setitem__(key, t[key].astype(np.int32)))
  with pytest.raises(ValueError, match=rf'int/model\.safetensors: 1 tensor.*{key} \(I32\)'):
    checkpoints.load_vision(path)


def test_configs_that_load_a_base_have_partial_load():
  for c in (demo.get_config(), paper.get_config()):
    assert c.partial_load == ()
  assert io.partial_patterns(None) == ()


# ----------------------------------------------------------------------------- images


def _rgb(h=12, w=10):
  y, x = np.mgrid[0:h, 0:w]
  return np.stack([y * 20, x * 25, 255 - y * 10 - x * 5], -1).astype(np.uint8)


def _coco_json(folder, files, extra_annotations=()):
  """A COCO captions JSON over `files` (one caption each) in `folder`."""
  data = {'images': [{'id': i, 'file_name': f} for i, f in enumerate(files)],
          'annotations': [{'image_id': i, 'caption': f'picture {i}'} for i in range(len(files))]
          + list(extra_annotations)}
  path = folder / 'captions.json'
  path.write_text(json.dumps(data))
  return str(path)


def test_truncated_and_garbage_images_are_counted_skips(tmp_path, caplog):
  PIL.Image.fromarray(_rgb(64, 64)).save(tmp_path / 'good.jpg', quality=90)
  data = (tmp_path / 'good.jpg').read_bytes()
  (tmp_path / 'truncated.jpg').write_bytes(data[:len(data) // 2])
  with PIL.Image.open(tmp_path / 'truncated.jpg') as im:
    im.verify()  # the header check of before passes it: only decoding finds the cut
  (tmp_path / 'garbage.png').write_bytes(np.random.default_rng(0).bytes(200))
  path = _coco_json(tmp_path, ['good.jpg', 'truncated.jpg', 'garbage.png'])
  with caplog.at_level(logging.WARNING):
    split = sources.load('folder', 'train', captions_json=path)
  assert split.image_ids.tolist() == [0] and split.skipped['corrupt_images'] == 2
  assert 'truncated.jpg' in caplog.text and 'image file is truncated' in caplog.text
  assert 'garbage.png' in caplog.text


def test_sixteen_bit_png_matches_its_8_bit_version(tmp_path):
  x16 = (np.arange(12 * 10).reshape(12, 10) * 547).astype(np.uint16)  # 0 .. 65 ks
  PIL.Image.fromarray(x16).save(tmp_path / 'deep.png')
  with PIL.Image.open(tmp_path / 'deep.png') as im:
    assert im.mode == 'I;16'
  PIL.Image.fromarray((x16 >> 8).astype(np.uint8), 'L').save(tmp_path / 'ref.png')
  split = sources.load('folder', 'x', captions_json=_coco_json(tmp_path, ['deep.png', 'ref.png']))
  got, ref = split.image(0), split.image(1)
  np.testing.assert_array_equal(got, ref)
  np.testing.assert_array_equal(got[..., 1], x16 >> 8)
  assert 0 < got.mean() < 255  # PIL's own convert clips this to white
  as_i = PIL.Image.fromarray(x16.astype(np.int32))  # mode 'I' holds 16-bit data too
  np.testing.assert_array_equal(np.asarray(preprocess.to_rgb(as_i)), ref)


def test_palette_and_alpha_modes_convert_to_rgb(tmp_path):
  rgb = _rgb()
  palette = np.array([[255, 0, 0], [0, 128, 255], [10, 200, 30]], np.uint8)
  index = np.arange(120).reshape(12, 10) % 3
  p = PIL.Image.fromarray(index.astype(np.uint8), 'P')
  p.putpalette(palette.ravel().tolist())
  p.save(tmp_path / 'p.png')
  p.save(tmp_path / 'p_transparent.png', transparency=1)  # palette entry 1 see-through
  alpha = np.tile(np.array([0, 128, 255], np.uint8), 40).reshape(12, 10)
  PIL.Image.fromarray(np.dstack([rgb, alpha]), 'RGBA').save(tmp_path / 'rgba.png')
  PIL.Image.fromarray(np.dstack([rgb[..., 0], alpha]), 'LA').save(tmp_path / 'la.png')
  PIL.Image.fromarray(rgb[..., 1], 'L').save(tmp_path / 'l.png')
  cmyk = np.array([[0, 0, 0, 0], [255, 0, 0, 0], [0, 0, 0, 255], [0, 255, 255, 0]], np.uint8)
  PIL.Image.fromarray(cmyk.reshape(2, 2, 4), 'CMYK').save(tmp_path / 'cmyk.tif')
  names = ['p.png', 'p_transparent.png', 'rgba.png', 'la.png', 'l.png', 'cmyk.tif']
  split = sources.load('folder', 'x', captions_json=_coco_json(tmp_path, names))
  assert split.skipped['corrupt_images'] == 0
  got = {n: split.image(i) for i, n in enumerate(names)}
  assert all(g.dtype == np.uint8 and g.shape[-1] == 3 for g in got.values())
  np.testing.assert_array_equal(got['p.png'], palette[index])
  want = np.where((index == 1)[..., None], 255, palette[index])  # onto white
  np.testing.assert_array_equal(got['p_transparent.png'], want)
  a = alpha[..., None] / 255
  assert np.abs(got['rgba.png'] - (rgb * a + 255 * (1 - a))).max() <= 1
  grey = rgb[..., :1] * a + 255 * (1 - a)
  assert np.abs(got['la.png'] - grey).max() <= 1
  np.testing.assert_array_equal(got['l.png'], np.repeat(rgb[..., 1:2], 3, -1))
  np.testing.assert_array_equal(got['cmyk.tif'].reshape(4, 3),
                                [[255, 255, 255], [0, 255, 255], [0, 0, 0], [255, 0, 0]])


# ----------------------------------------------------------------------------- captions JSON


def _load(tmp_path, data, split='train'):
  PIL.Image.fromarray(_rgb()).save(tmp_path / 'a.png')
  path = tmp_path / 'bad.json'
  path.write_text(json.dumps(data))
  return sources.load('folder', split, captions_json=str(path))


def _karpathy(**entry):
  base = {'filename': 'a.png', 'split': 'train', 'cocoid': 1, 'sentences': [{'raw': 'a cat'}]}
  return {'images': [{**base, **entry}]}


@pytest.mark.parametrize('name', ['../../etc/passwd', '/etc/passwd', 'sub/../../a.png', ''])
def test_file_names_must_stay_in_the_image_folder(tmp_path, name):
  coco = {'images': [{'id': 1, 'file_name': name}],
          'annotations': [{'image_id': 1, 'caption': 'x'}]}
  want = r'bad\.json: images\[0\] has file name ' + re.escape(repr(name)) + ', which is not a path'
  with pytest.raises(ValueError, match=want):
    _load(tmp_path, coco)
  with pytest.raises(ValueError, match=r'bad\.json: images\[0\] has file name .*not a path'):
    _load(tmp_path, _karpathy(filename=name))


def test_karpathy_filepath_must_stay_in_the_image_folder(tmp_path):
  with pytest.raises(ValueError, match=r"images\[0\] has file name '\.\./a\.png'"):
    _load(tmp_path, _karpathy(filepath='..'))


def test_duplicate_image_ids_are_errors(tmp_path):
  coco = {'images': [{'id': 7, 'file_name': 'a.png'}, {'id': 7, 'file_name': 'a.png'}],
          'annotations': [{'image_id': 7, 'caption': 'x'}]}
  with pytest.raises(ValueError, match=r'bad\.json: images\[1\] repeats image id 7 of '
                                       r'images\[0\]'):
    _load(tmp_path, coco)
  karpathy = _karpathy()
  karpathy['images'].append({**karpathy['images'][0], 'split': 'val'})  # across splits too
  with pytest.raises(ValueError, match=r'images\[1\] repeats image id 1'):
    _load(tmp_path, karpathy)


def test_sentences_as_a_string_is_an_error(tmp_path):
  with pytest.raises(ValueError, match=r"bad\.json: images\[0\] has sentences='a cat'; "
                                       'expected a list'):
    _load(tmp_path, _karpathy(sentences='a cat'))


@pytest.mark.parametrize('data, want', [
    ({'images': [{'id': 1}], 'annotations': []}, r"images\[0\] has no 'file_name'"),
    ({'images': [{'id': 1, 'file_name': 3}], 'annotations': []},
     r'images\[0\] has file_name=3; expected a string'),
    ({'images': [{'id': [1], 'file_name': 'a.png'}], 'annotations': []},
     r'images\[0\] has image id \[1\]; expected an integer or a string'),
    ({'images': [{'id': 1, 'file_name': 'a.png'}], 'annotations': [{'image_id': 1}]},
     r"annotations\[0\] has no 'caption'"),
    ({'images': [{'id': 1, 'file_name': 'a.png'}],
      'annotations': [{'image_id': 1, 'caption': ['a', 'cat']}]},
     r"annotations\[0\] has caption=\['a', 'cat'\]; expected a string"),
    ({'images': [{'id': 1, 'file_name': 'a.png'}], 'annotations': [{'caption': 'x'}]},
     r"annotations\[0\] has no 'image_id'"),
    (_karpathy(filename=None), r'images\[0\] has filename=None; expected a string'),
    ({'images': [{'split': 'train', 'sentences': []}]}, r"images\[0\] has no 'filename'"),
    (_karpathy(sentences=[]), r'images\[0\] \(a\.png\) has an empty "sentences" list'),
    (_karpathy(sentences=[{'raw': 'ok'}, {'raw': 5}]),
     r"images\[0\] \(a\.png\) sentences\[1\] is \{'raw': 5\}; expected a string"),
    (_karpathy(sentences=[{'tokens': 'a cat'}]),
     r'images\[0\] \(a\.png\) sentences\[0\] is .*expected'),
    (_karpathy(split=['train']), r"images\[0\] has split=\['train'\]; expected a string"),
])
def test_malformed_fields_name_the_entry(tmp_path, data, want):
  with pytest.raises(ValueError, match=r'Captions JSON .*bad\.json: ' + want):
    _load(tmp_path, data)


def test_well_formed_entries_still_load(tmp_path):
  split = _load(tmp_path, _karpathy(sentences=['plain string', {'tokens': ['two', 'words']},
                                               {'raw': '  '}]))
  assert split.captions == [['plain string', 'two words']]
  assert split.skipped['empty_captions'] == 1
  shutil.copy(tmp_path / 'a.png', tmp_path / 'b.png')
  split = _load(tmp_path, {'images': [{'id': 'x', 'file_name': './a.png'},
                                      {'id': 'y', 'file_name': 'b.png'}],
                           'annotations': [{'image_id': 'x', 'caption': 'a'},
                                           {'image_id': 'z', 'caption': 'orphan'}]})
  assert split.captions == [['a']] and split.skipped['orphan_captions'] == 1
  assert split.skipped['uncaptioned_images'] == 1  # b.png: no annotation names it
