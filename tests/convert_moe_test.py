"""Mixtral and Qwen3-MoE conversion: layouts, both expert formats, refusals (no torch needed).

Logits parity against the golden fixtures and the round trips are in
tests/convert_hf_test.py, with the other families.
"""

import dataclasses
import os

import jax
import numpy as np
import pytest
import safetensors.numpy

from llm.convert import hf
from llm.model import ModelConfig
from tests.convert_hf_test import (
  FIXTURES,
  _copy_fixture,
  _edit_config,
  _expected,
  _logits,
  _random_params,
  _tensors,
)


def test_mixtral_config_and_layout():
  cfg, params = hf.load(os.path.join(FIXTURES, 'mixtral'))
  assert (cfg.num_experts, cfg.experts_per_token, cfg.router_renormalize) == (4, 2, True)
  assert (cfg.d_ff, cfg.moe_d_ff, cfg.head_dim, cfg.num_kv_heads, cfg.qk_norm) == (
    24,
    0,
    16,
    2,
    False,
  )
  assert cfg.rope_theta == 1e6 and cfg.sparse_layers() == (True, True)
  moe = params['layers']['moe']
  assert moe['router'].shape == (2, 32, 4)
  assert moe['wi'].shape == moe['wg'].shape == (2, 4, 32, 24)
  assert moe['wo'].shape == (2, 4, 24, 32) and 'mlp' not in params['layers']


def test_qwen3_moe_config_and_layout():
  """mlp_only_layers [0, 1, 3] of 5: one dense layer, then units of (dense, sparse)."""
  src = os.path.join(FIXTURES, 'qwen3_moe')
  cfg, params = hf.load(src)
  assert (cfg.moe_first_dense, cfg.moe_every, cfg.router_renormalize, cfg.qk_norm) == (
    1,
    2,
    False,
    True,
  )
  assert cfg.sparse_layers() == (False, False, True, False, True)
  assert (cfg.d_ff, cfg.moe_d_ff, cfg.head_dim) == (40, 16, 16)
  assert params['dense_layers']['mlp']['wi'].shape == (1, 32, 40)
  assert params['layers']['block_0']['mlp']['wi'].shape == (2, 32, 40)
  assert params['layers']['block_1']['moe']['wi'].shape == (2, 4, 32, 16)
  assert params['layers']['block_1']['attn']['q_norm']['scale'].shape == (2, 16)
  ids, want = _expected('qwen3_moe')
  cfg_u, params_u = hf.load(src, scan_layers=False)
  assert 'moe' in params_u['layers_2'] and 'mlp' in params_u['layers_3']
  np.testing.assert_allclose(_logits(cfg_u, params_u, ids), want, atol=1e-4, rtol=0)


def _fuse(tensors: dict, module: str) -> dict:
  """transformers 5's in-memory layout: per-expert weights -> gate_up_proj [E, 2F, D] and
  down_proj [E, D, F], under `mlp` (Mixtral's block_sparse_moe is renamed)."""
  out, experts = {}, {}
  for name, w in tensors.items():
    parts = name.split('.')
    if len(parts) > 5 and parts[3] == module and parts[4] == 'experts':
      experts.setdefault(int(parts[2]), {})[(int(parts[5]), parts[6])] = w
    else:
      out[name.replace(f'.{module}.', '.mlp.')] = w
  mixtral = module == 'block_sparse_moe'
  gate, up, down = ('w1', 'w3', 'w2') if mixtral else ('gate_proj', 'up_proj', 'down_proj')
  for i, by_expert in experts.items():
    E = 1 + max(j for j, _ in by_expert)
    gate_EFD, up_EFD, down_EDF = (
      np.stack([by_expert[(j, p)] for j in range(E)]) for p in (gate, up, down)
    )
    out[f'model.layers.{i}.mlp.experts.gate_up_proj'] = np.concatenate([gate_EFD, up_EFD], axis=1)
    out[f'model.layers.{i}.mlp.experts.down_proj'] = down_EDF
  return out


@pytest.mark.parametrize('name, module', [('mixtral', 'block_sparse_moe'), ('qwen3_moe', 'mlp')])
def test_fused_expert_layout_imports_the_same(name, module, tmp_path):
  src = os.path.join(FIXTURES, name)
  d = _copy_fixture(name, tmp_path)
  os.remove(d / 'model.safetensors')
  fused = _fuse(_tensors(src), module)
  assert any(n.endswith('experts.gate_up_proj') for n in fused)
  safetensors.numpy.save_file(fused, str(d / 'model.safetensors'))
  _, want = hf.load(src)
  _, got = hf.load(str(d))
  jax.tree.map(np.testing.assert_array_equal, got, want)


@pytest.mark.parametrize(
  'name, changes, match',
  [
    ('mixtral', dict(router_jitter_noise=0.1), 'router_jitter_noise=0.1'),
    ('mixtral', dict(sliding_window=4096), 'sliding_window=4096'),
    ('qwen3_moe', dict(use_sliding_window=True, sliding_window=64), 'use_sliding_window'),
    (
      'qwen3_moe',
      dict(mlp_only_layers=[], decoder_sparse_step=2),
      r'makes layers \[1, 3\] of 5 sparse, which this model cannot express',
    ),
    ('qwen3_moe', dict(num_local_experts=0), r'makes layers \[\] of 5 sparse'),
  ],
)
def test_unsupported_moe_variants_are_refused(name, changes, match, tmp_path):
  d = _copy_fixture(name, tmp_path)
  _edit_config(d, **changes)
  with pytest.raises(ValueError, match=match):
    hf.load(str(d))


def test_expressible_sparse_step_is_read(tmp_path):
  """decoder_sparse_step=2 with no mlp_only_layers on 4 layers: sparse 1 and 3 (moe_every=2)."""
  d = _copy_fixture('qwen3_moe', tmp_path)
  _edit_config(d, num_hidden_layers=4, mlp_only_layers=[], decoder_sparse_step=2)
  cfg = hf.config_from_hf(str(d))
  assert (cfg.moe_first_dense, cfg.moe_every) == (0, 2)


def test_per_expert_tensors_are_checked(tmp_path):
  d = _copy_fixture('mixtral', tmp_path)
  _edit_config(d, num_local_experts=5)
  with pytest.raises(ValueError, match=r'lacks tensors.*block_sparse_moe\.experts\.4\.w1\.weight'):
    hf.load(str(d))


_QWEN = ModelConfig(
  vocab_size=64,
  num_layers=2,
  d_model=16,
  num_heads=2,
  num_kv_heads=2,
  d_ff=24,
  qk_norm=True,
  num_experts=4,
  experts_per_token=2,
  moe_d_ff=8,
  moe_first_dense=1,
)


def test_moe_export_refusals(tmp_path):
  shared = dataclasses.replace(_QWEN, num_shared_experts=1)
  with pytest.raises(ValueError, match=r'as Qwen3MoeForCausalLM it has model.num_shared_experts=1'):
    hf.save(shared, _random_params(shared), str(tmp_path / 'a'))
  dense_first = dataclasses.replace(_QWEN, qk_norm=False)
  with pytest.raises(ValueError, match=r'as MixtralForCausalLM it has model.moe_first_dense=1'):
    hf.save(dense_first, _random_params(dense_first), str(tmp_path / 'b'))
  biased = dataclasses.replace(_QWEN, use_bias=True)
  with pytest.raises(ValueError, match='nonzero MLP biases'):
    hf.save(biased, _random_params(biased), str(tmp_path / 'c'))
  dense = ModelConfig(vocab_size=64, d_model=16, num_heads=2, num_kv_heads=2, qk_norm=True)
  with pytest.raises(ValueError, match=r'LlamaForCausalLM it has model.qk_norm=True'):
    hf.save(dense, _random_params(dense), str(tmp_path / 'd'))


def test_qwen3_attention_bias_without_mlp_biases_round_trips(tmp_path):
  """use_bias=True from attention_bias: the dense MLP's biases stay zero and are not written."""
  cfg = dataclasses.replace(_QWEN, use_bias=True)
  params = _random_params(cfg)
  mlp = params['dense_layers']['mlp']
  for k in ('wi_bias', 'wo_bias'):
    mlp[k] = np.zeros_like(mlp[k])
  hf.save(cfg, params, str(tmp_path))
  assert not any('mlp.up_proj.bias' in n for n in _tensors(str(tmp_path)))
  cfg2, params2 = hf.load(str(tmp_path))
  assert cfg2 == cfg
  jax.tree.map(np.testing.assert_array_equal, params2, params)
