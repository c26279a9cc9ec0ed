"""Hugging Face weight conversion against golden fixtures (no torch needed).

The fixtures under tests/fixtures/hf/ were written by tests/make_hf_fixtures.py
with transformers: tiny random GPT-2 and Llama (GQA, llama3 RoPE scaling,
sharded) models, and the mixtures of experts Mixtral and Qwen3-MoE (QK-norm,
dense and sparse layers interleaved), and their logits on fixed input ids.
"""

import dataclasses
import functools
import json
import os
import shutil

import flax.linen as nn
import jax
import ml_dtypes
import numpy as np
import pytest

from llm import model as model_lib
from llm.convert import hf, safetensors_io
from llm.model import ModelConfig, Transformer

FIXTURES = os.path.join(os.path.dirname(__file__), 'fixtures', 'hf')


@functools.cache
def _apply(cfg):
  # One compile per config: eager apply retraces on every call.
  return jax.jit(Transformer(cfg).apply)


def _logits(cfg, params, ids):
  return np.asarray(_apply(cfg)({'params': params}, np.asarray(ids, np.int32)))


def _expected(name):
  e = np.load(os.path.join(FIXTURES, f'{name}_expected.npz'))
  return e['input_ids'], e['logits']


def _tensors(hf_dir):
  out = {}
  for path in safetensors_io.checkpoint_files(hf_dir):
    out.update((n, np.array(w)) for n, w in safetensors_io.iter_tensors(path))
  return out


def _random_params(cfg, seed=0):
  """Random params of the model's shapes, norms and biases included (never 1 or 0).

  Drawn with numpy from the abstract shapes: `Transformer.init` takes seconds.
  """
  shapes = nn.unbox(model_lib.abstract_params(cfg))
  rng = np.random.RandomState(seed)
  return jax.tree.map(lambda s: (0.3 * rng.standard_normal(s.shape)).astype(s.dtype), shapes)


@pytest.mark.parametrize('name', ['gpt2', 'llama', 'mixtral', 'qwen3_moe'])
def test_fixture_logits_match_transformers(name):
  cfg, params = hf.load(os.path.join(FIXTURES, name))
  ids, want = _expected(name)
  np.testing.assert_allclose(_logits(cfg, params, ids), want, atol=1e-4, rtol=0)


def test_gpt2_config():
  cfg, params = hf.load(os.path.join(FIXTURES, 'gpt2'))
  assert (cfg.norm, cfg.mlp, cfg.position, cfg.use_bias, cfg.tie_embeddings) == (
    'layernorm',
    'gelu',
    'learned',
    True,
    True,
  )
  assert (cfg.d_model, cfg.num_heads, cfg.d_ff, cfg.max_seq_len) == (32, 4, 128, 32)
  assert 'unembed' not in params and params['layers']['attn']['q'].shape == (2, 32, 4, 8)


def test_llama_config_gqa_rope_scaling():
  cfg, params = hf.load(os.path.join(FIXTURES, 'llama'))
  assert (cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.norm_eps) == (4, 2, 16, 1e-6)
  assert (cfg.rope_scaling, cfg.rope_scaling_factor, cfg.rope_original_max_seq_len) == (
    'llama3',
    4.0,
    64,
  )
  assert params['layers']['attn']['k'].shape == (2, 32, 2, 16)
  assert params['unembed'].shape == (32, cfg.vocab_size)


def test_unrolled_layout_and_bfloat16_params():
  ids, want = _expected('llama')
  cfg, params = hf.load(os.path.join(FIXTURES, 'llama'), scan_layers=False)
  assert 'layers_1' in params and 'layers' not in params
  np.testing.assert_allclose(_logits(cfg, params, ids), want, atol=1e-4, rtol=0)
  cfg, params = hf.load(os.path.join(FIXTURES, 'llama'), param_dtype='bfloat16')
  assert params['embedding'].dtype == ml_dtypes.bfloat16


# config.json keys that export must write back as they were (the MoE fixtures have no tokenizer).
_SAME_KEYS = {
  'gpt2': ('bos_token_id', 'eos_token_id'),
  'llama': ('bos_token_id', 'eos_token_id'),
  'mixtral': ('num_local_experts', 'num_experts_per_tok', 'intermediate_size', 'head_dim'),
  'qwen3_moe': (
    'num_experts_per_tok',
    'moe_intermediate_size',
    'intermediate_size',
    'head_dim',
    'norm_topk_prob',
    'mlp_only_layers',
    'decoder_sparse_step',
  ),
}


@pytest.mark.parametrize('name', sorted(_SAME_KEYS))
def test_hf_ours_hf_gives_identical_tensors(name, tmp_path):
  src = os.path.join(FIXTURES, name)
  cfg, params = hf.load(src)
  hf.save(cfg, params, str(tmp_path), tokenizer=src if name in ('gpt2', 'llama') else None)
  before, after = _tensors(src), _tensors(str(tmp_path))
  assert sorted(before) == sorted(after)
  for n, w in before.items():
    np.testing.assert_array_equal(after[n], w, err_msg=n)
    assert after[n].dtype == w.dtype
  cfg2, _ = hf.load(str(tmp_path))
  assert cfg2 == cfg
  with open(os.path.join(src, 'config.json')) as f:
    want = json.load(f)
  with open(tmp_path / 'config.json') as f:
    got = json.load(f)
  for key in ('vocab_size', 'tie_word_embeddings', *_SAME_KEYS[name]):
    assert got[key] == want[key], key


_CONFIGS = {
  'llama_tied_mqa': ModelConfig(
    vocab_size=96, num_layers=3, d_model=24, num_heads=3, num_kv_heads=1, d_ff=40, rope_theta=5e5
  ),
  'llama_bias_linear_rope': ModelConfig(
    vocab_size=64,
    d_model=16,
    num_heads=2,
    num_kv_heads=2,
    d_ff=32,
    use_bias=True,
    tie_embeddings=True,
    rope_scaling='linear',
    rope_scaling_factor=2.0,
  ),
  'gpt2_untied': ModelConfig(
    vocab_size=80,
    d_model=16,
    num_heads=4,
    num_kv_heads=4,
    d_ff=48,
    max_seq_len=16,
    norm='layernorm',
    mlp='gelu',
    position='learned',
    use_bias=True,
    tie_embeddings=False,
    scan_layers=False,
  ),
  'mixtral_tied_mqa_unrolled': ModelConfig(
    vocab_size=64,
    d_model=16,
    num_heads=2,
    num_kv_heads=1,
    d_ff=24,
    tie_embeddings=True,
    rope_theta=1e6,
    num_experts=3,
    experts_per_token=2,
    scan_layers=False,
  ),
  'qwen3_moe_every_2': ModelConfig(
    vocab_size=64,
    num_layers=4,
    d_model=16,
    num_heads=2,
    num_kv_heads=2,
    head_dim=12,
    d_ff=40,
    qk_norm=True,
    num_experts=4,
    experts_per_token=2,
    moe_d_ff=8,
    moe_every=2,
    router_renormalize=False,
  ),
  'qwen3_moe_first_dense_tied': ModelConfig(
    vocab_size=64,
    num_layers=3,
    d_model=16,
    num_heads=2,
    num_kv_heads=1,
    d_ff=24,
    qk_norm=True,
    tie_embeddings=True,
    num_experts=4,
    experts_per_token=1,
    moe_d_ff=16,
    moe_first_dense=1,
  ),
  'gpt2_no_bias': ModelConfig(
    vocab_size=80,
    d_model=16,
    num_heads=4,
    num_kv_heads=4,
    d_ff=48,
    max_seq_len=16,
    norm='layernorm',
    mlp='gelu',
    position='learned',
  ),
}


@pytest.mark.parametrize('name', sorted(_CONFIGS))
def test_ours_hf_ours_round_trip(name, tmp_path):
  cfg = _CONFIGS[name]
  params = _random_params(cfg)
  hf.save(cfg, params, str(tmp_path), max_shard_bytes=20_000)
  cfg2, params2 = hf.load(str(tmp_path), scan_layers=cfg.scan_layers)
  ids = np.random.RandomState(1).randint(0, cfg.vocab_size, (2, 8))
  want = _logits(cfg, params, ids)
  np.testing.assert_allclose(_logits(cfg2, params2, ids), want, atol=1e-5, rtol=0)
  if cfg.use_bias or cfg.norm == 'rmsnorm':
    # Same family and biases: the params come back bit for bit.
    assert cfg2 == cfg
    jax.tree.map(np.testing.assert_array_equal, params2, params)


def test_export_writes_only_nonzero_bias_groups(tmp_path):
  cfg = _CONFIGS['llama_bias_linear_rope']
  params = _random_params(cfg)
  params['layers']['mlp'] = {
    k: np.zeros_like(v) if k.endswith('_bias') else v for k, v in params['layers']['mlp'].items()
  }
  hf.save(cfg, params, str(tmp_path))
  with open(tmp_path / 'config.json') as f:
    config = json.load(f)
  assert (config['attention_bias'], config['mlp_bias']) == (True, False)
  assert config['rope_scaling'] == {'rope_type': 'linear', 'factor': 2.0}
  _, params2 = hf.load(str(tmp_path))
  jax.tree.map(np.testing.assert_array_equal, params2, params)


def test_sharded_bfloat16_export(tmp_path):
  cfg = _CONFIGS['llama_tied_mqa']
  params = _random_params(cfg)
  hf.save(cfg, params, str(tmp_path), dtype='bfloat16', max_shard_bytes=8_000)
  names = os.listdir(tmp_path)
  assert safetensors_io.INDEX_FILE in names
  assert sum(n.endswith('.safetensors') for n in names) > 2
  _, params2 = hf.load(str(tmp_path))
  rounded = jax.tree.map(lambda x: x.astype(ml_dtypes.bfloat16).astype(np.float32), params)
  jax.tree.map(np.testing.assert_array_equal, params2, rounded)


def _copy_fixture(name, tmp_path):
  dst = tmp_path / name
  shutil.copytree(os.path.join(FIXTURES, name), dst)
  return dst


def _edit_config(hf_dir, **changes):
  with open(hf_dir / 'config.json') as f:
    config = json.load(f)
  config.update(changes)
  with open(hf_dir / 'config.json', 'w') as f:
    json.dump(config, f)


def test_pickle_checkpoints_are_refused(tmp_path):
  d = _copy_fixture('gpt2', tmp_path)
  os.remove(d / 'model.safetensors')
  (d / 'pytorch_model.bin').write_bytes(b'not to be unpickled')
  with pytest.raises(ValueError, match='pytorch_model.bin.*unpickling'):
    hf.load(str(d))


def test_unknown_architecture_is_named(tmp_path):
  d = _copy_fixture('gpt2', tmp_path)
  _edit_config(d, architectures=['MistralForCausalLM'], model_type='mistral')
  with pytest.raises(ValueError, match='MistralForCausalLM.*GPT2LMHeadModel, LlamaForCausalLM'):
    hf.load(str(d))


def test_missing_and_unexpected_tensors_are_named(tmp_path):
  d = _copy_fixture('gpt2', tmp_path)
  _edit_config(d, n_layer=3)
  with pytest.raises(ValueError, match=r'lacks tensors.*h\.2\.attn\.c_attn\.weight'):
    hf.load(str(d))
  _edit_config(d, n_layer=1)
  with pytest.raises(ValueError, match=r'does not account for.*h\.1\.'):
    hf.load(str(d))
  _edit_config(d, n_layer=2, tie_word_embeddings=False)
  with pytest.raises(ValueError, match='lm_head.weight'):
    hf.load(str(d))


def test_shape_mismatch_is_named(tmp_path):
  d = _copy_fixture('llama', tmp_path)
  _edit_config(d, intermediate_size=48)
  with pytest.raises(ValueError, match=r'mlp\.\w+_proj\.weight has shape'):
    hf.load(str(d))


@pytest.mark.parametrize(
  'changes, match',
  [
    (dict(hidden_act='gelu'), "hidden_act='gelu'"),
    (dict(rope_parameters=dict(rope_type='yarn', factor=2.0)), "rope type 'yarn'"),
  ],
)
def test_unsupported_llama_variants_are_refused(changes, match, tmp_path):
  d = _copy_fixture('llama', tmp_path)
  _edit_config(d, **changes)
  with pytest.raises(ValueError, match=match):
    hf.load(str(d))


def test_transformers4_rope_format(tmp_path):
  d = _copy_fixture('llama', tmp_path)
  with open(d / 'config.json') as f:
    config = json.load(f)
  rope = config.pop('rope_parameters')
  _edit_config(d, rope_parameters=None, rope_theta=rope.pop('rope_theta'), rope_scaling=rope)
  cfg, _ = hf.load(str(d))
  cfg_v5, _ = hf.load(os.path.join(FIXTURES, 'llama'))
  assert cfg == cfg_v5


def test_only_runtime_fields_may_be_overridden():
  with pytest.raises(ValueError, match=r"\['d_model'\] would change"):
    hf.load(os.path.join(FIXTURES, 'llama'), d_model=64)
  with pytest.raises(ValueError, match='learned positions'):
    hf.load(os.path.join(FIXTURES, 'gpt2'), max_seq_len=64)


def test_export_refusals(tmp_path):
  odd = dataclasses.replace(_CONFIGS['gpt2_no_bias'], mlp='swiglu')
  with pytest.raises(ValueError, match=r"GPT2LMHeadModel it has model.mlp='swiglu'"):
    hf.save(odd, _random_params(odd), str(tmp_path / 'a'))
  cfg = _CONFIGS['gpt2_no_bias']
  params = _random_params(cfg)
  hf.save(cfg, params, str(tmp_path / 'b'))
  with pytest.raises(FileExistsError, match='already holds a model'):
    hf.save(cfg, params, str(tmp_path / 'b'))
  with pytest.raises(ValueError, match='does not match the config|has shape'):
    hf.save(dataclasses.replace(cfg, d_ff=64), params, str(tmp_path / 'c'))
