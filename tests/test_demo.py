"""The demo dataset: captions true of the pixels, determinism, and the TFDS round trip."""

import collections
import io
import re

import numpy as np
import pytest

from cpeft_jax.data import demo
from cpeft_jax.data.demo import scenes

# The test's own reading of the caption language (independent of the generator's tables).
COUNTS = {'a single': 1, 'a pair of': 2, 'an': 1, 'a': 1, 'one': 1, 'two': 2, 'three': 3,
          'four': 4}
SIZES = {'small': 'small', 'little': 'small', 'large': 'large', 'big': 'large'}
SHAPES = ('circle', 'square', 'triangle', 'diamond', 'cross')
POSITIONS = {
    'on the left side': 'left', 'on the left': 'left', 'to the left': 'left',
    'on the right side': 'right', 'on the right': 'right', 'to the right': 'right',
    'at the top left': 'top left', 'at the top right': 'top right',
    'at the bottom left': 'bottom left', 'at the bottom right': 'bottom right',
    'at the top': 'top', 'near the top': 'top', 'along the top': 'top',
    'at the bottom': 'bottom', 'near the bottom': 'bottom', 'along the bottom': 'bottom',
    'in the center': 'center', 'in the middle': 'center',
    'in the top left corner': 'top left', 'in the top right corner': 'top right',
    'in the bottom left corner': 'bottom left', 'in the bottom right corner': 'bottom right',
}
NUMBERS = {w: i for i, w in enumerate('zero one two three four five six seven eight nine'.split())}


def _alt(words):
  return '|'.join(sorted(map(re.escape, words), key=len, reverse=True))


GROUP_RE = re.compile(
    rf'(?P<count>{_alt(COUNTS)}) (?:(?P<size>{_alt(SIZES)}) )?(?P<color>{_alt(scenes.COLORS)}) '
    rf'(?P<shape>{_alt(SHAPES)})(?P<plural>e?s)?(?: (?P<pos>{_alt(POSITIONS)}))?'
    r'(?=,| and |$| on a)')
FRAME_RE = re.compile(r'(a picture of |an image showing |there (is|are) |a dark scene with '
                      r'|(?P<total>\w+) shapes?: )?G(, G)*( and G)?( on a dark background)?')


def _components(mask_HW):
  """Connected components (4-neighbour) of a boolean mask, as lists of (row, col)."""
  seen = np.zeros_like(mask_HW)
  out = []
  for start in zip(*np.nonzero(mask_HW)):
    if seen[start]:
      continue
    seen[start] = True
    stack, pixels = [start], []
    while stack:
      r, c = stack.pop()
      pixels.append((r, c))
      for nr, nc in ((r + 1, c), (r - 1, c), (r, c + 1), (r, c - 1)):
        inside = 0 <= nr < mask_HW.shape[0] and 0 <= nc < mask_HW.shape[1]
        if inside and mask_HW[nr, nc] and not seen[nr, nc]:
          seen[nr, nc] = True
          stack.append((nr, nc))
    out.append(np.array(pixels))
  return out


def _classify(pixels):
  """Names a component's shape from its bounding-box fill and row widths."""
  rows, cols = pixels[:, 0], pixels[:, 1]
  height, width = np.ptp(rows) + 1, np.ptp(cols) + 1
  fill = len(pixels) / (height * width)
  row_width = lambda r: int((rows == r).sum())
  top, bottom = row_width(rows.min()), row_width(rows.max())
  if fill > 0.93:
    return 'square'
  if bottom >= 0.75 * width and top <= 0.5 * width and fill < 0.68:
    return 'triangle'
  # A cross's arms are flat ends: its first two (and last two) rows have the same width.
  if top == row_width(rows.min() + 1) and bottom == row_width(rows.max() - 1) and top < 0.6 * width:
    return 'cross'
  return 'circle' if fill > 0.64 else 'diamond'


def _objects_by_color(image_HW3):
  """color name -> [(shape, extent in cells, (row, col) cell of the centroid)] from pixels."""
  cell = image_HW3.shape[0] / scenes.GRID
  found = collections.defaultdict(list)
  for name, rgb in scenes.COLORS.items():
    for pixels in _components((image_HW3 == rgb).all(-1)):
      extent = max(np.ptp(pixels[:, 0]), np.ptp(pixels[:, 1])) + 1
      centre = pixels.mean(0) // cell
      found[name].append((_classify(pixels), extent / cell, (int(centre[0]), int(centre[1]))))
  return found


def _region_holds(position, cells):
  corner = {'top left': (0, 0), 'top right': (0, 2), 'bottom left': (2, 0), 'bottom right': (2, 2)}
  if position in corner:
    return cells == [corner[position]]
  test = {'left': lambda r, c: c == 0, 'right': lambda r, c: c == 2, 'top': lambda r, c: r == 0,
          'bottom': lambda r, c: r == 2, 'center': lambda r, c: (r, c) == (1, 1)}[position]
  return all(test(r, c) for r, c in cells)


def test_color_names_mean_their_colors():
  hue = {name: int(np.argmax(rgb)) for name, rgb in scenes.COLORS.items()}
  assert hue['red'] == 0 and hue['green'] == 1 and hue['blue'] == 2
  assert min(scenes.COLORS['white']) > 200 and scenes.COLORS['yellow'][2] < 100
  assert all(max(rgb) > 2 * max(scenes.BACKGROUND) for rgb in scenes.COLORS.values())


@pytest.mark.parametrize('image_size, num', [(64, 150), (96, 60)])
def test_captions_are_true_of_the_pixels(image_size, num):
  sizes_seen = set()
  for example in demo.generate_examples('train', num, seed=3, image_size=image_size):
    image_HW3 = example['image']
    assert image_HW3.shape == (image_size, image_size, 3) and image_HW3.dtype == np.uint8
    found = _objects_by_color(image_HW3)
    colored = (image_HW3 != scenes.BACKGROUND).any(-1)
    painted = np.zeros_like(colored)
    for rgb in scenes.COLORS.values():
      painted |= (image_HW3 == rgb).all(-1)
    assert painted[colored].all(), 'only palette colours are drawn'
    assert len(example['captions']) == 5
    for entry in example['captions']:
      text = entry['text']
      groups = list(GROUP_RE.finditer(text))
      frame = FRAME_RE.fullmatch(GROUP_RE.sub('G', text))
      assert frame, f'unexpected wording: {text!r}'
      assert sorted(m['color'] for m in groups) == sorted(found), text  # every colour, once
      if frame['total']:
        assert NUMBERS[frame['total']] == sum(len(v) for v in found.values()), text
      for m in groups:
        objects = found[m['color']]
        count = COUNTS[m['count']]
        assert len(objects) == count, text
        assert (m['plural'] is not None) == (count > 1), text
        assert {shape for shape, _, _ in objects} == {m['shape']}, (text, objects)
        if m['size']:
          small = all(extent < 0.5 for _, extent, _ in objects)
          assert small == (SIZES[m['size']] == 'small'), (text, objects)
          sizes_seen.add(SIZES[m['size']])
        if m['pos']:
          assert _region_holds(POSITIONS[m['pos']], sorted(cell for _, _, cell in objects)), text
  assert sizes_seen == {'small', 'large'}


def test_scene_description_matches_pixels():
  for index in range(40):
    example, scene = demo.make_example('validation', index, seed=1)
    found = _objects_by_color(example['image'])
    assert sorted(found) == sorted(g.color for g in scene.groups)
    for group in scene.groups:
      assert len(found[group.color]) == group.count
      assert {shape for shape, _, _ in found[group.color]} == {group.shape}
      if group.position is not None:
        assert _region_holds(group.position, sorted(c for _, _, c in found[group.color]))
    assert len(scene.items) == sum(g.count for g in scene.groups) <= scenes.GRID**2


def test_variety():
  scenes_ = [demo.make_example('train', i)[1] for i in range(300)]
  groups = [g for s in scenes_ for g in s.groups]
  assert {g.shape for g in groups} == set(SHAPES)
  assert {g.color for g in groups} == set(scenes.COLORS)
  assert {g.count for g in groups} == {1, 2, 3, 4}
  assert {len(s.groups) for s in scenes_} == {1, 2, 3}
  assert {g.position for g in groups} >= {'left', 'right', 'top', 'bottom', 'center', None}
  texts = [c['text'] for i in range(50) for c in demo.make_example('train', i)[0]['captions']]
  assert len(set(texts)) > 0.95 * len(texts)


def test_deterministic_in_the_seed():
  first = list(demo.generate_examples('train', 6, seed=7))
  again = list(demo.generate_examples('train', 6, seed=7))
  longer = list(demo.generate_examples('train', 9, seed=7))
  other_seed = list(demo.generate_examples('train', 6, seed=8))
  other_split = list(demo.generate_examples('test', 6, seed=7))
  for a, b, c in zip(first, again, longer):
    np.testing.assert_array_equal(a['image'], b['image'])
    np.testing.assert_array_equal(a['image'], c['image'])
    assert a['captions'] == b['captions'] == c['captions']
  assert any((a['image'] != b['image']).any() for a, b in zip(first, other_seed))
  assert any((a['image'] != b['image']).any() for a, b in zip(first, other_split))


def test_ids_are_unique_across_splits():
  image_ids, caption_ids = set(), set()
  for split in demo.SPLITS:
    for example in demo.generate_examples(split, 5):
      image_ids.add(example['image/id'])
      caption_ids.update(c['id'] for c in example['captions'])
  assert len(image_ids) == 15 and len(caption_ids) == 75


@pytest.mark.parametrize('call, match', [
    (lambda: demo.make_example('val', 0), r"unknown split 'val'; expected one of \['train'"),
    (lambda: demo.make_example('train', -1), r'example index must be in \[0, 1000000\), got -1'),
    (lambda: demo.make_example('train', 0, image_size=16),
     r'image_size must be >= 24 pixels to draw shapes, got 16'),
    (lambda: demo.make_example('train', 0, captions_per_image=0),
     r'captions_per_image must be >= 1'),
])
def test_errors(call, match):
  with pytest.raises(ValueError, match=match):
    call()


def _decode_png(data):
  import PIL.Image
  return np.asarray(PIL.Image.open(io.BytesIO(data)).convert('RGB'))


def test_png_round_trip():
  from cpeft_jax.data.demo import builder
  image_HW3 = np.random.default_rng(0).integers(0, 256, (5, 7, 3), dtype=np.uint8)
  np.testing.assert_array_equal(_decode_png(builder.encode_png(image_HW3)), image_HW3)
  with pytest.raises(ValueError, match=r'expected a uint8 \[H, W, 3\] image, got float32 \(2, 2\)'):
    builder.encode_png(np.zeros((2, 2), np.float32))


@pytest.fixture(scope='module')
def built(tmp_path_factory):
  """A tiny demo dataset built with TFDS (array_record) into a temporary data_dir."""
  from cpeft_jax.data.demo import builder
  config = builder.make_config(image_size=32, num_train=6, num_validation=3, num_test=2, seed=5)
  b = builder.CpeftDemoCaptions(config=config, data_dir=str(tmp_path_factory.mktemp('tfds')),
                                file_format='array_record')
  b.download_and_prepare()
  return b


def _expected(split, num):
  return list(demo.generate_examples(split, num, seed=5, image_size=32))


def test_tfds_build_without_decoding(built):
  import tensorflow_datasets as tfds
  from cpeft_jax.data.demo import builder
  assert {k: v.num_examples for k, v in built.info.splits.items()} == {
      'train': 6, 'validation': 3, 'test': 2}
  for split, num in (('train', 6), ('validation', 3), ('test', 2)):
    source = built.as_data_source(split=split, decoders={'image': tfds.decode.SkipDecoding()})
    assert len(source) == num
    for stored, example in zip(source, _expected(split, num)):
      assert stored['image'] == builder.encode_png(example['image'])
      np.testing.assert_array_equal(_decode_png(stored['image']), example['image'])
      assert stored['image/id'] == example['image/id']
      assert stored['image/filename'] == example['image/filename'].encode()
      texts = [t.decode() for t in stored['captions']['text']]
      assert texts == [c['text'] for c in example['captions']]
      assert list(stored['captions']['id']) == [c['id'] for c in example['captions']]


def test_tfds_read_back_decoded(built):
  import tensorflow_datasets as tfds
  from cpeft_jax.data.demo import builder
  source = built.as_data_source(split='train')
  for stored, example in zip(source, _expected('train', 6)):
    np.testing.assert_array_equal(stored['image'], example['image'])
  # Reading needs only the prepared files, not this package's builder (as with COCO).
  reader = tfds.builder_from_directory(built.data_dir)
  np.testing.assert_array_equal(reader.as_data_source(split='test')[1]['image'],
                                _expected('test', 2)[1]['image'])
  # data_source() reuses the prepared files.
  root = built.data_path.parent.parent.parent  # <root>/cpeft_demo_captions/<config>/<version>
  again = builder.data_source('validation', data_dir=str(root), config=built.builder_config)
  assert [int(e['image/id']) for e in again] == [e['image/id'] for e in _expected('validation', 3)]


# ----------------------------------------------------------------------------- the two-variant demo


def _tiny_demo_config():
  import sys
  sys.path.insert(0, str(__import__('pathlib').Path(__file__).parents[1]))
  from configs import demo as demo_config
  c = demo_config.get_config('epochs=1,num_train=48,rank=2,pretrain_epochs=0,vision_epochs=30')
  c.data.demo.update(image_size=32, num_validation=8, num_test=2)
  c.data.seq_len = 48  # BOS + 16 image tokens + up to 30 caption tokens + EOS
  c.pretrain.vision.update(image_size=32, patch_size=8, hidden_size=48, num_layers=1,
                           num_heads=2, intermediate_size=64, batch_size=16, learning_rate=3e-3,
                           extra_scenes=16)
  c.model.update(hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64)
  c.train.update(batch_size=8, log_every=5, checkpoint_every=0)
  c.eval.update(batch_size=8, num_captions=2)
  c.optim.update(warmup_steps=2, learning_rate=3e-3)
  return c


@pytest.fixture(scope='module')
def two_variants(tmp_path_factory):
  """The demo's whole command on a tiny config: (config, workdir, results, printed text)."""
  import contextlib
  from cpeft_jax import demo as demo_run
  config, workdir = _tiny_demo_config(), tmp_path_factory.mktemp('demo_run')
  out = io.StringIO()
  with contextlib.redirect_stdout(out):
    results = demo_run.run(config, str(workdir))
  return config, workdir, results, out.getvalue()


def test_two_variant_demo_end_to_end(two_variants):
  import json
  import math
  config, workdir, results, printed = two_variants
  assert list(results) == ['agnostic', 'modality']
  for name, r in results.items():
    best = json.loads((workdir / name / 'best.json').read_text())
    assert r['val_loss'] == best['val_loss'] and math.isclose(r['val_ppl'],
                                                              math.exp(best['val_loss']))
    assert f'{r["val_ppl"]:.3f}' in printed
    # Each variant loaded the shared stage-0 checkpoints through the Hugging Face loaders.
    run_config = json.loads((workdir / name / 'config.json').read_text())
    assert run_config['vision'] == dict(kind='hf', path=str(workdir / 'base_vision'),
                                        dtype='float32', feature_layer=-1, drop_cls=True)
    assert run_config['text_model'] == str(workdir / 'base_lm')
    assert run_config['data']['context_map'] == name
    # Captions of the first validation images, each with its first reference caption.
    assert len(r['captions']) == 2
    for i, cap in enumerate(r['captions']):
      example, _ = demo.make_example('validation', i, image_size=32)
      assert cap['reference'] == example['captions'][0]['text']
      assert isinstance(cap['generated'], str) and cap['generated'] in printed
  # Context-specific LoRA holds one table per context: twice the agnostic LoRA parameters.
  lora = results['modality']['trainable_params'] - results['agnostic']['trainable_params']
  D, F, r, L = 32, 64, 2, 1  # width, feed-forward, rank, layers of the tiny decoder
  assert lora == L * r * (4 * (D + D) + 2 * (D + F) + (F + D))  # q k v o, gate up, down


def test_demo_stage0_tower_learned_its_labels(two_variants):
  """The vision tower's label accuracy on validation beats always answering the majority."""
  import json
  _, workdir, _, printed = two_variants
  m = json.loads((workdir / 'base_vision_metrics.json').read_text())
  print('tiny stage-0 tower, validation accuracy (majority rate):', m)
  assert m['color'] > m['color_majority'] + 0.1
  assert 'validation label accuracy' in printed


def test_demo_rerun_skips_finished_stages(two_variants):
  import contextlib
  from cpeft_jax import demo as demo_run
  config, workdir, results, _ = two_variants
  stamps = {p: p.stat().st_mtime_ns for p in workdir.rglob('*') if p.is_file()}
  out = io.StringIO()
  with contextlib.redirect_stdout(out):
    again = demo_run.run(config, str(workdir))
  assert again == results and 'stage 0' not in out.getvalue()
  assert {p: p.stat().st_mtime_ns for p in workdir.rglob('*') if p.is_file()} == stamps


@pytest.mark.parametrize('change, match', [
    (lambda c: c.update(variants=('agnostic', 'agnostic')), 'distinct context maps'),
    (lambda c: c.update(variants=('modality', 'task')), r"\['task'\] are not presets"),
    (lambda c: c.peft.update(methods=('dora9',)), "Unknown PEFT method 'dora9'"),
    (lambda c: c.update(text_model='/some/llama'), 'pre-trains its own base models'),
])
def test_demo_config_errors_before_any_stage(tmp_path, change, match):
  from cpeft_jax import demo as demo_run
  config = _tiny_demo_config()
  change(config)
  with pytest.raises(ValueError, match=match):
    demo_run.run(config, str(tmp_path))
  assert not any(tmp_path.iterdir())


def test_vision_labels_name_what_each_patch_shows():
  """Stage 0's per-patch labels against the pixels: a labelled patch holds that colour (most
  of its drawn pixels) and a shape of it, an unlabelled one only background; counts match."""
  import types
  from cpeft_jax.train import pretrain
  from cpeft_jax.models.vision import ViTConfig
  made = [demo.make_example('train', i, seed=2) for i in range(12)]
  images = np.stack([e['image'] for e, _ in made])
  split = types.SimpleNamespace(image_ids=np.array([e['image/id'] for e, _ in made]))
  cfg = ViTConfig(image_size=64, patch_size=8, hidden_size=8, num_heads=1, intermediate_size=8,
                  num_layers=1)
  y = pretrain.vision_labels(split, images, cfg, seed=2)
  names = list(scenes.COLORS)
  assert set(y) == {'count', 'shape', 'color', 'size', 'group_count'}
  for k, (_, scene) in enumerate(made):
    assert y['count'][k] == sum(g.count for g in scene.groups)
    shape_of = {g.color: g.shape for g in scene.groups}
    group_of = {g.color: g for g in scene.groups}
    for n in range(64):
      r, c = divmod(n, 8)
      patch = images[k, 8 * r:8 * r + 8, 8 * c:8 * c + 8].reshape(-1, 3)
      drawn = {name: int((patch == rgb).all(-1).sum()) for name, rgb in scenes.COLORS.items()}
      if y['color'][k, n] == 0:
        assert not any(drawn.values())
        assert y['shape'][k, n] == y['size'][k, n] == y['group_count'][k, n] == 0
      else:
        name = names[y['color'][k, n] - 1]
        assert drawn[name] == max(drawn.values()) > 0
        assert scenes.SHAPES[y['shape'][k, n] - 1] == shape_of[name]
        assert scenes.SIZES[y['size'][k, n] - 1] == group_of[name].size
        assert y['group_count'][k, n] == group_of[name].count


def test_extra_scenes_are_fresh_and_repeatable():
  """The tower's extra pre-training scenes: the same for the same seed, none of them a
  training, validation or test scene of the dataset, and labelled like the dataset's."""
  from cpeft_jax.train import pretrain
  from cpeft_jax.models.vision import ViTConfig
  made, images = pretrain.extra_scenes(40, seed=2, image_size=64)
  again, images2 = pretrain.extra_scenes(40, seed=2, image_size=64)
  assert made == again and np.array_equal(images, images2) and images.shape == (40, 64, 64, 3)
  assert not np.array_equal(pretrain.extra_scenes(1, seed=3, image_size=64)[1], images[:1])
  dataset = {demo.make_example(split, i, seed=2)[1] for split in demo.SPLITS for i in range(40)}
  assert not dataset & set(made)
  assert np.array_equal(images[5], scenes.draw(made[5]))
  cfg = ViTConfig(image_size=64, patch_size=8, hidden_size=8, num_heads=1, intermediate_size=8,
                  num_layers=1)
  y = pretrain.scene_labels(made, images, cfg)
  assert [int(c) for c in y['count']] == [len(s.items) for s in made]


# The test's own reading of the question language.
PLURAL_OF = {'circles': 'circle', 'squares': 'square', 'triangles': 'triangle',
             'diamonds': 'diamond', 'crosses': 'cross'}
QUESTION_RE = re.compile(r'question : (?P<q>.+) \? answer :')


def _answer_from_pixels(question, found):
  """The true answer to a demo question, read off the drawn objects (color -> objects)."""
  objects = [(color, shape, cell) for color, objs in found.items() for shape, _, cell in objs]
  shape_of = lambda w: PLURAL_OF.get(w, w)
  if question == 'how many shapes are there':
    return len(objects)
  if m := re.fullmatch(rf'how many ({_alt(scenes.COLORS)}) shapes are there', question):
    return len(found[m[1]])
  if m := re.fullmatch(r'how many (\w+) are there', question):
    return sum(shape == shape_of(m[1]) for _, shape, _ in objects)
  if m := re.fullmatch(r'what color (is|are) the (\w+)', question):
    colors = {color for color, shape, _ in objects if shape == shape_of(m[2])}
    assert len(colors) == 1, f'ambiguous question {question!r}: {colors}'
    return colors.pop()
  if m := re.fullmatch(r'what shape (is|are) the (\w+) ones?', question):
    shapes = {shape for shape, _, _ in found[m[2]]}
    assert len(shapes) == 1, question
    return shapes.pop()
  if m := re.fullmatch(r'where (is|are) the (\w+) (\w+)', question):
    assert {shape for shape, _, _ in found[m[2]]} == {shape_of(m[3])}, question
    return sorted(cell for _, _, cell in found[m[2]])
  raise AssertionError(f'unexpected question {question!r}')


def test_qa_answers_are_true_of_the_pixels():
  kinds = collections.Counter()
  firsts = set()
  for index in range(60):
    example, _ = demo.make_example('validation', index, seed=2)
    found = _objects_by_color(example['image'])
    pairs = demo.qa_pairs(example['image/id'], seed=2)
    assert len(set(pairs)) == len(pairs) >= 4
    firsts.add(pairs[0][0].split()[2])
    for prompt, answer in pairs:
      question = QUESTION_RE.fullmatch(prompt)['q']
      truth = _answer_from_pixels(question, found)
      kinds[' '.join(question.split()[:2])] += 1
      if isinstance(truth, int):
        assert NUMBERS[answer] == truth, (prompt, answer, truth)
      elif isinstance(truth, list):
        assert _region_holds(answer, truth), (prompt, answer, truth)
      else:
        assert answer == truth, (prompt, answer, truth)
  assert set(kinds) == {'how many', 'what color', 'what shape', 'where is', 'where are'}
  assert len(firsts) >= 3  # the pair evaluation uses varies in kind between images


def test_standin_lm_pretrains_around_frozen_borrowed_embeddings(tmp_path):
  """configs/paper.py:text_model=standin: stage 0 pre-trains the paper-shaped LM with another
  checkpoint's input embeddings (OPT's), which come out of training unchanged while the rest
  trains; a table of the wrong shape is an error naming pretrain.embeddings."""
  import sys
  import types
  import transformers
  from cpeft_jax import checkpoints
  from cpeft_jax.data import tokenizer as tokenizer_lib
  from cpeft_jax.train import pretrain
  sys.path.insert(0, str(__import__('pathlib').Path(__file__).parents[1]))
  from configs import paper
  texts = ['a red circle', 'two blue squares at the top', 'one green cross', 'a big cyan diamond']
  tok = tokenizer_lib.word_level(texts)
  opt_dir = tmp_path / 'opt'
  transformers.OPTForCausalLM(transformers.OPTConfig(
      vocab_size=len(tok), hidden_size=32, word_embed_proj_dim=32, num_hidden_layers=1,
      ffn_dim=64, num_attention_heads=2, max_position_embeddings=64)).save_pretrained(opt_dir)
  table = checkpoints.input_embeddings(opt_dir)
  config = paper.get_config('text_model=standin')
  assert config.pretrain.embeddings == 'facebook/opt-125m' and config.model.hidden_size == 768
  config.model.update(vocab_size=len(tok), hidden_size=32, num_layers=1, num_heads=2,
                      intermediate_size=64)
  config.data.seq_len = 12 + 4
  config.pretrain.update(epochs=2, batch_size=2, learning_rate=1e-2, embeddings=str(opt_dir))
  split = types.SimpleNamespace(texts=lambda task: [[('', t)] for t in texts])
  trained = pretrain.text_lm(config, str(tmp_path / 'trained'), split, tok, 4)
  config.pretrain.epochs = 0
  untrained = pretrain.text_lm(config, str(tmp_path / 'untrained'), split, tok, 4)
  np.testing.assert_array_equal(checkpoints.input_embeddings(trained), table)
  np.testing.assert_array_equal(checkpoints.input_embeddings(untrained), table)
  a, b = (checkpoints.open_weights(__import__('pathlib').Path(d)) for d in (trained, untrained))
  name = 'model.layers.0.self_attn.q_proj.weight'
  assert not np.allclose(a.read(name), b.read(name))  # the rest of the LM did train
  config.model.hidden_size = 48
  with pytest.raises(ValueError, match=r"pretrain.embeddings=.*\(5\d*, 32\)|pretrain.embeddings"):
    pretrain.text_lm(config, str(tmp_path / 'wrong'), split, tok, 4)


def test_grading_reads_the_caption_language_back():
  """Every reference caption of a scene grades fully right; a wrong colour, a wrong count, a
  missing group or an extra one is caught."""
  from cpeft_jax.data.demo import grading
  results, scene_of = [], {}
  for i in range(40):
    example, scene = demo.make_example('validation', i)
    scene_of[example['image/id']] = scene
    results += [{'image_id': example['image/id'], 'caption': c['text']}
                for c in example['captions']]
  g = grading.grade(results)
  assert g['groups_right'] == 1.0 and g['captions_right'] == 1.0 and g['captions'] == 200
  image_id, scene = next((k, s) for k, s in scene_of.items() if len(s.groups) >= 2)
  first, second = scene.groups[:2]
  other = next(c for c in scenes.COLORS if c not in {g.color for g in scene.groups})
  words = {1: 'one', 2: 'two', 3: 'three', 4: 'four'}

  def phrase(g, color=None, count=None):
    n = count or g.count
    return f'{words[n]} {color or g.color} {g.shape}{"s" if n > 1 else ""}'.replace(
        'crosss', 'crosses')
  wrong = [phrase(first, color=other), phrase(first, count=first.count % 4 + 1)]
  for text in wrong:
    g = grading.grade([{'image_id': image_id, 'caption': text + ' and ' + phrase(second)}])
    assert g['captions_right'] == 0.0
    assert g['groups_right'] == 1 / len(scene.groups)  # the second group only
  all_groups = ', '.join(phrase(x) for x in scene.groups)
  assert grading.grade([{'image_id': image_id, 'caption': all_groups}])['captions_right'] == 1.0
  extra = all_groups + ' and a single ' + other + ' cross'
  assert grading.grade([{'image_id': image_id, 'caption': extra}])['captions_right'] == 0.0
  missing = ', '.join(phrase(x) for x in scene.groups[1:])
  assert grading.grade([{'image_id': image_id, 'caption': missing}])['captions_right'] == 0.0
