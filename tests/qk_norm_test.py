"""QK-norm (`model.qk_norm`, Qwen3): an RMSNorm over head_dim on queries and keys before RoPE.

Hugging Face parity is in tests/convert_hf_test.py (the Qwen3-MoE fixture);
here: it adds two [H] scales and nothing else, and computes what the formula says.
"""

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from llm import model as model_lib
from llm.model import ModelConfig, layers

CFG = ModelConfig(vocab_size=32, num_layers=1, d_model=16, num_heads=4, num_kv_heads=2, head_dim=8)
B, T = 2, 6


def _params(cfg, seed=0):
  shapes = nn.unbox(model_lib.abstract_params(cfg))
  rng = np.random.RandomState(seed)
  return jax.tree.map(lambda s: (0.5 * rng.standard_normal(s.shape)).astype(s.dtype), shapes)


def _paths(tree):
  return {jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_leaves_with_path(tree)}


def test_adds_only_the_two_scales():
  qk = dataclasses.replace(CFG, qk_norm=True)
  plain, normed = nn.unbox(model_lib.abstract_params(CFG)), nn.unbox(model_lib.abstract_params(qk))
  added = _paths(normed) - _paths(plain)
  assert _paths(plain) <= _paths(normed)
  assert added == {"['layers']['attn']['q_norm']['scale']", "['layers']['attn']['k_norm']['scale']"}
  assert normed['layers']['attn']['q_norm']['scale'].shape == (1, CFG.head_dim)


def _rms(x, scale, eps):
  return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * scale


def test_attention_matches_a_manual_computation():
  cfg = dataclasses.replace(CFG, qk_norm=True)
  rng = np.random.RandomState(1)
  x_BTD = rng.standard_normal((B, T, cfg.d_model)).astype(np.float32)
  positions_BT = np.broadcast_to(np.arange(T, dtype=np.int32), (B, T))
  attn = layers.Attention(cfg)
  params = jax.tree.map(
    lambda s: (0.5 * rng.standard_normal(s.shape)).astype(np.float32),
    nn.unbox(jax.eval_shape(attn.init, jax.random.key(0), x_BTD, positions_BT, None)),
  )
  got = attn.apply(params, x_BTD, positions_BT, None)

  p = params['params']
  q = _rms(np.einsum('BTD,DNH->BTNH', x_BTD, p['q']), p['q_norm']['scale'], cfg.norm_eps)
  k = _rms(np.einsum('BTD,DKH->BTKH', x_BTD, p['k']), p['k_norm']['scale'], cfg.norm_eps)
  v = np.einsum('BTD,DKH->BTKH', x_BTD, p['v'])
  q = np.asarray(layers.apply_rope(jnp.asarray(q), positions_BT, cfg.rope_theta))
  k = np.asarray(layers.apply_rope(jnp.asarray(k), positions_BT, cfg.rope_theta))
  G = cfg.num_heads // cfg.num_kv_heads
  k, v = np.repeat(k, G, axis=2), np.repeat(v, G, axis=2)
  scores_BNTS = np.einsum('BTNH,BSNH->BNTS', q, k) / np.sqrt(cfg.head_dim)
  scores_BNTS = np.where(np.tril(np.ones((T, T), bool)), scores_BNTS, -np.inf)
  weights_BNTS = np.exp(scores_BNTS - scores_BNTS.max(-1, keepdims=True))
  weights_BNTS /= weights_BNTS.sum(-1, keepdims=True)
  out_BTNH = np.einsum('BNTS,BSNH->BTNH', weights_BNTS, v)
  want = np.einsum('BTNH,NHD->BTD', out_BTNH, p['o'])
  np.testing.assert_allclose(np.asarray(got), want, atol=2e-5, rtol=1e-5)


def test_scaled_query_and_key_kernels_give_the_same_logits():
  """The norm removes a kernel's scale: what QK-norm is for (bounded attention logits)."""
  cfg = dataclasses.replace(CFG, qk_norm=True)
  params = _params(cfg)
  ids = np.random.RandomState(2).randint(0, cfg.vocab_size, (B, T)).astype(np.int32)
  apply = jax.jit(model_lib.Transformer(cfg).apply)
  want = apply({'params': params}, ids)
  attn = params['layers']['attn']
  scaled = dict(
    params, layers=dict(params['layers'], attn=dict(attn, q=7 * attn['q'], k=3 * attn['k']))
  )
  np.testing.assert_allclose(apply({'params': scaled}, ids), want, atol=1e-4, rtol=1e-4)
  off = jax.jit(model_lib.Transformer(CFG).apply)
  plain = {k: v for k, v in attn.items() if k not in ('q_norm', 'k_norm')}
  dense = dict(params, layers=dict(params['layers'], attn=dict(plain, q=7 * attn['q'])))
  assert not np.allclose(off({'params': dense}, ids), want, atol=1e-2)
