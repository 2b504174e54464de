"""Plug-ins: save/load round trip, assembly of separately built groups, base checks, freezing.

The reference for an assembled model is each plug-in run alone as a one-context model.
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from cpeft_jax import checkpoints, plugins
from cpeft_jax.adaptors import LoraConfig, PeftConfig
from cpeft_jax.models.llama import Decoder
from helpers import MASK, PER_CONTEXT, TOKENS, fresh_tables, random_tables

PEFT = PeftConfig(methods=('lora', 'ia3'), targets='AF', num_contexts=2,
                  lora=LoraConfig(rank=4, alpha=8.0))


@pytest.fixture(scope='module')
def base(llama_base):
  """conftest.py's tiny Llama: dir, cfg, params."""
  return llama_base


@functools.partial(jax.jit, static_argnums=(0, 1))
def _apply(cfg, peft, params, tables, ctx_BL):
  variables = {'params': params} | ({'adaptors': tables} if tables is not None else {})
  return Decoder(cfg, peft).apply(variables, jnp.asarray(TOKENS), attention_mask_BL=MASK,
                                  context_ids_BL=ctx_BL)


def run(base, peft, tables, ctx_BL):
  return np.asarray(_apply(base.cfg, peft, base.params, tables, jnp.asarray(ctx_BL, jnp.int32)))


def fp(base):
  return {'decoder': plugins.fingerprint(base.params, base.cfg)}


def test_saved_plugin_loaded_elsewhere_gives_identical_outputs(base, tmp_path):
  tables = random_tables(fresh_tables(base.cfg, PEFT), seed=4)
  plugin = plugins.extract(tables, PEFT, context=1, bases=fp(base), name='qa', meta={'task': 1})
  plugins.save(tmp_path / 'qa', plugin)
  # Elsewhere: the base loaded again from its checkpoint, the plug-in from its directory.
  again = checkpoints.load_decoder(base.dir)
  loaded = plugins.load(tmp_path / 'qa',
                        {'decoder': plugins.fingerprint(again.params, again.config)})
  assert (loaded.name, loaded.meta, loaded.peft) == ('qa', {'task': 1}, plugin.peft)
  peft, got_tables = plugins.assemble([loaded])
  assert peft == dataclasses.replace(PEFT, num_contexts=1)
  zeros = np.zeros(TOKENS.shape)
  got = run(base, peft, got_tables, zeros)
  np.testing.assert_array_equal(got, run(base, *plugins.assemble([plugin]), zeros))
  np.testing.assert_allclose(got, run(base, PEFT, tables, zeros + 1), atol=1e-5)


def test_plugin_of_a_per_context_model_is_that_context_alone(base):
  peft = dataclasses.replace(PEFT, methods=('lora',), contexts=PER_CONTEXT)
  tables = random_tables(fresh_tables(base.cfg, peft), seed=8)  # noise in the padding too
  for c in (0, 1):
    plugin = plugins.extract(tables, peft, c, fp(base))
    assert plugin.peft.methods == (('lora', 'ia3') if c == 0 else ('lora',))
    assert plugin.peft.lora.rank == (4 if c == 0 else 2)
    ones = np.full(TOKENS.shape, c)
    np.testing.assert_allclose(run(base, plugin.peft, plugin.tables, ones * 0),
                               run(base, peft, tables, ones), atol=1e-5)


def test_assembled_plugins_reproduce_each_on_its_own_context(base):
  # Two groups built separately, with their own rank and scale, and one more unadapted context.
  cap_peft = dataclasses.replace(PEFT, num_contexts=1)
  qa_peft = dataclasses.replace(cap_peft, lora=LoraConfig(rank=2, alpha=4.0, rslora=True))
  cap = plugins.extract(random_tables(fresh_tables(base.cfg, cap_peft), seed=5), cap_peft, 0,
                        fp(base), 'caption')
  qa = plugins.extract(random_tables(fresh_tables(base.cfg, qa_peft), seed=6), qa_peft, 0,
                       fp(base), 'qa')
  peft, tables = plugins.assemble({0: cap, 2: qa}, num_contexts=3)
  assert (peft.rows, peft.lora.rank) == ((0, 2), 4)
  # A mixed batch: example 0 is captioning (context 0), example 1 is QA (context 2), and the
  # first three tokens of example 1 are in the unadapted context 1.
  ctx_BL = np.array([[0] * 9, [1] * 3 + [2] * 6])
  got = run(base, peft, tables, ctx_BL)
  zeros = np.zeros(TOKENS.shape)
  want_cap = run(base, cap_peft, cap.tables, zeros)
  want_qa = run(base, qa_peft, qa.tables, zeros)
  want_plain = run(base, cap_peft, fresh_tables(base.cfg, cap_peft), zeros)
  assert np.abs(want_cap - want_qa)[MASK].max() > 0.05  # the plug-ins differ
  np.testing.assert_allclose(got[0], want_cap[0], atol=1e-5)
  # Example 1's QA tokens attend to base-context tokens, so compare with the QA plug-in run on
  # the same context pattern (its context 0 at the QA positions, unadapted elsewhere).
  single = dataclasses.replace(qa_peft, num_contexts=2, adapted_contexts=(1,))
  want_mixed = run(base, single, qa.tables, np.array([[0] * 9, [0] * 3 + [1] * 6]))
  m = MASK[1]
  np.testing.assert_allclose(got[1][m], want_mixed[1][m], atol=1e-5)
  np.testing.assert_allclose(got[1][:3], want_plain[1][:3], atol=1e-5)


def test_plugins_with_different_methods_assemble_with_per_context_specs(base):
  lora_peft = PeftConfig(methods=('lora',), targets='AF', lora=LoraConfig(rank=2, alpha=4.0))
  ia3_peft = PeftConfig(methods=('ia3', 'bitfit'), targets='AF', method_targets={'bitfit': 'all'})
  made = [plugins.extract(random_tables(fresh_tables(base.cfg, peft), seed=s), peft, 0, fp(base))
          for s, peft in ((9, lora_peft), (10, ia3_peft))]
  peft, tables = plugins.assemble({1: made[0], 2: made[1]})
  assert (peft.rows, peft.methods) == ((1, 2), ('lora', 'ia3', 'bitfit'))
  got = run(base, peft, tables, np.array([[1] * 9, [2] * 9]))
  zeros = np.zeros(TOKENS.shape)
  for b, plugin in enumerate(made):
    want = run(base, plugin.peft, plugin.tables, zeros)
    np.testing.assert_allclose(got[b], want[b], atol=1e-5)


def test_wrong_base_is_a_clear_error(base, tmp_path):
  tables = random_tables(fresh_tables(base.cfg, PEFT), seed=4)
  plugins.save(tmp_path / 'p', plugins.extract(tables, PEFT, 0, fp(base), 'p'))
  other = jax.tree_util.tree_map_with_path(  # the same architecture, other weights in a layer
      lambda path, x: x * 1.5 if 'down_proj' in jax.tree_util.keystr(path) else x, base.params)
  with pytest.raises(ValueError, match=r"(?s)Plug-in .*/p \(base 'decoder'\) was trained on "
                     r"another base: the weights of 1 tensor\(s\) differ, e.g. \['layers/mlp/"
                     r"down_proj/kernel'\]"):
    plugins.load(tmp_path / 'p', {'decoder': plugins.fingerprint(other, base.cfg)})
  arch = dataclasses.replace(base.cfg, rope_theta=10000.0)
  with pytest.raises(ValueError, match=r'another architecture \(config hash'):
    plugins.load(tmp_path / 'p', {'decoder': plugins.fingerprint(base.params, arch)})
  # bfloat16 copy of the same base is the same base.
  bf16 = jax.tree.map(lambda x: x.astype(jnp.bfloat16), base.params)
  plugins.load(tmp_path / 'p', {'decoder': plugins.fingerprint(bf16, base.cfg)})
  with pytest.raises(FileNotFoundError, match='is not a plug-in'):
    plugins.load(tmp_path)


def test_assembling_mismatched_plugins_is_an_error(base):
  one = dataclasses.replace(PEFT, num_contexts=1)
  a = plugins.extract(fresh_tables(base.cfg, one), one, 0, fp(base), 'a')
  b = dataclasses.replace(a, peft=dataclasses.replace(one, targets='A'), name='b')
  with pytest.raises(ValueError, match=r"plug-in 'b' \(context 1\) adapts \('lora', 'ia3'\) on "
                     r"'A' \{\}, plug-in 'a' \(context 0\) \('lora', 'ia3'\) on 'AF'"):
    plugins.assemble([a, b])
  other = jax.tree.map(lambda x: x * 1.5, base.params)
  c = dataclasses.replace(a, bases={'decoder': plugins.fingerprint(other, base.cfg)}, name='c')
  with pytest.raises(ValueError, match=r"plug-in 'c' \(context 1\) vs plug-in 'a' \(context 0\) "
                     'was trained on another base'):
    plugins.assemble([a, c])


def test_frozen_contexts_stay_fixed_and_the_rest_trains_as_alone(base):
  peft = dataclasses.replace(PEFT, methods=('lora', 'bitfit'), targets='A')
  tables0 = random_tables(fresh_tables(base.cfg, peft), seed=7)
  ctx_BL = jnp.asarray(np.array([[0] * 9, [1] * 9]), jnp.int32)

  def loss(tables):
    return (_apply(base.cfg, peft, base.params, tables, ctx_BL) ** 2).mean()

  tx = optax.chain(optax.adamw(0.05, weight_decay=0.1), plugins.freeze_contexts(peft, [1]))

  @jax.jit
  def step(tables, opt):
    updates, opt = tx.update(jax.grad(loss)(tables), opt, tables)
    return optax.apply_updates(tables, updates), opt

  # Reference: the same optimizer on row 1 alone, row 0 a constant.
  take = lambda t, r: plugins.take_row(t, r)
  put = lambda row1: plugins.assemble([plugins.Plugin(peft, take(tables0, 0), {}),
                                       plugins.Plugin(peft, row1, {})])[1]
  ref_tx = optax.adamw(0.05, weight_decay=0.1)

  @jax.jit
  def ref_step(row1, opt):
    updates, opt = ref_tx.update(jax.grad(lambda r: loss(put(r)))(row1), opt, row1)
    return optax.apply_updates(row1, updates), opt

  tables, opt = tables0, tx.init(tables0)
  row1, ref_opt = take(tables0, 1), ref_tx.init(take(tables0, 1))
  for _ in range(3):
    tables, opt = step(tables, opt)
    row1, ref_opt = ref_step(row1, ref_opt)
  jax.tree.map(np.testing.assert_array_equal, take(tables, 0), take(tables0, 0))
  # Float32 rounding apart (the two programs sum the gradients in different orders, and Adam's
  # normalised steps carry that into the tables); Adam moves a row by up to 0.05 a step, so a
  # leak between rows shows far above this tolerance.
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=5e-6), take(tables, 1), row1)
  assert not np.allclose(jax.tree.leaves(take(tables, 1))[0], jax.tree.leaves(take(tables0, 1))[0])
  with pytest.raises(ValueError, match=r'Contexts \[3\] have no adaptor rows'):
    plugins.freeze_contexts(peft, [3])
