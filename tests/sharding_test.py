"""The mesh helpers: the embedding lookup keeps the table split and matches a plain take."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from llm import sharding


@pytest.mark.parametrize(
  'sizes',
  [
    dict(data=2, fsdp=2, tensor=2),
    dict(data=1, fsdp=8, tensor=1),
    dict(data=2, fsdp=1, tensor=4),
    dict(data=8, fsdp=1, tensor=1),
  ],
)
def test_embedding_lookup_on_a_split_table_equals_a_plain_take(sizes):
  table_VD = jax.random.normal(jax.random.key(0), (64, 16))
  tokens_BT = jax.random.randint(jax.random.key(1), (8, 5), 0, 64)
  w_BTD = jax.random.normal(jax.random.key(2), (8, 5, 16))

  def loss(table, tokens):
    return jnp.sum(sharding.embedding_lookup(table, tokens) * w_BTD)

  want, want_grad = jax.value_and_grad(loss)(table_VD, tokens_BT)
  mesh = sharding.make_mesh(sizes)
  with sharding.rules_context(mesh):
    table = jax.device_put(table_VD, NamedSharding(mesh, P('tensor', 'fsdp')))
    tokens = jax.device_put(tokens_BT, sharding.batch_sharding(mesh))
    fn = jax.jit(jax.value_and_grad(loss))
    got, got_grad = fn(table, tokens)
    hlo = fn.lower(table, tokens).compile().as_text()
  np.testing.assert_allclose(got, want, rtol=1e-5)
  np.testing.assert_allclose(got_grad, want_grad, rtol=1e-6, atol=1e-6)
  # The table's gradient stays split like the table; nothing gathers it whole.
  assert got_grad.sharding.spec == P('tensor', 'fsdp')
  if sizes['fsdp'] > 1:
    assert 'all-to-all' in hlo
    assert 'f32[64,16]' not in hlo.split('ENTRY')[-1]
