"""Generation: the KV cache against full recomputation, sampling rules, batching, stopping."""

import dataclasses
import functools
import os
import re
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec

from llm import generate, sharding
from llm import model as model_lib
from llm.data.tokenizer import ByteTokenizer
from llm.generate import text
from llm.io import checkpoint
from llm.model import ModelConfig, Transformer

# Vocab (room for the byte tokenizer) and heads divisible by the test mesh's tensor=2.
GPT = ModelConfig(
  vocab_size=260,
  num_layers=2,
  d_model=32,
  num_heads=4,
  num_kv_heads=4,
  d_ff=64,
  max_seq_len=32,
  norm='layernorm',
  mlp='gelu',
  position='learned',
  use_bias=True,
  tie_embeddings=True,
)
LLAMA = ModelConfig(
  vocab_size=260, num_layers=2, d_model=32, num_heads=4, num_kv_heads=2, d_ff=64, max_seq_len=32
)
# A mixture of experts whose stack has all three kinds of runs: a dense first
# layer, then units of a dense and a sparse layer (with a shared expert).
MOE = dataclasses.replace(
  LLAMA,
  num_layers=5,
  num_experts=4,
  moe_d_ff=32,
  num_shared_experts=1,
  moe_first_dense=1,
  moe_every=2,
)
FAMILIES = {'gpt': GPT, 'llama_gqa': LLAMA}
PROMPTS = [[1, 5, 6], [1, 9, 10, 11, 12, 13, 14], [1, 20], [1, *range(30, 48)]]


@functools.cache
def params_of(cfg):
  """Random params from numpy: compiling the real initialisers takes seconds on CPU."""
  rng = np.random.default_rng(0)

  def draw(path, leaf):
    noise = rng.normal(0.0, 0.1, leaf.shape).astype(np.float32)
    return noise + 1 if jax.tree_util.keystr(path).endswith("['scale']") else noise

  return jax.tree_util.tree_map_with_path(draw, nn.unbox(model_lib.abstract_params(cfg)))


@functools.cache
def mesh_of_8():
  return sharding.make_mesh({'data': 2, 'fsdp': 2, 'tensor': 2})


@functools.cache
def jitted_apply(cfg):
  return jax.jit(Transformer(cfg).apply)


def full_logits(cfg, params, rows):
  """Logits of each row alone (no cache), right-padded: padding never affects earlier tokens."""
  tokens = np.zeros((len(rows), 32), np.int32)
  for b, r in enumerate(rows):
    tokens[b, : len(r)] = r
  return np.asarray(jitted_apply(cfg)({'params': params}, tokens))


@pytest.mark.parametrize(
  'family, scan', [('gpt', True), ('llama_gqa', False), ('moe', True), ('moe', False)]
)
def test_cached_decoding_matches_full_recompute_on_a_mesh(family, scan):
  cfg = dataclasses.replace({**FAMILIES, 'moe': MOE}[family], scan_layers=scan)
  mesh = mesh_of_8()
  host_params = params_of(dataclasses.replace(cfg, scan_layers=True))
  if not scan:
    host_params = model_lib.unstack_layers(host_params, cfg)
  params = generate.place_params(cfg, host_params, mesh)
  lengths = np.array([len(p) for p in PROMPTS], np.int32)
  P, steps = generate.bucket_length(lengths.max(), cfg.max_seq_len), 6
  tokens = np.zeros((len(PROMPTS), P), np.int32)
  for b, p in enumerate(PROMPTS):
    tokens[b, : len(p)] = p
  fed = np.random.default_rng(0).integers(3, cfg.vocab_size, (len(PROMPTS), steps))
  model = Transformer(cfg)

  @jax.jit
  def prefill(params, tokens, lengths):
    cache = model_lib.init_cache(cfg, tokens.shape[0], P + steps)
    positions = jnp.broadcast_to(jnp.arange(P), tokens.shape)
    segments = (positions < lengths[:, None]).astype(jnp.int32)
    return model.apply(
      {'params': params}, tokens, positions, segments, cache=cache, logits_index_B=lengths - 1
    )

  @jax.jit
  def step(params, token, position, cache):
    return model.apply({'params': params}, token[:, None], position[:, None], cache=cache)

  with sharding.rules_context(mesh):
    logits, cache = prefill(params, tokens, lengths)
    cached = [logits[:, 0]]
    for s in range(steps):
      logits, cache = step(params, fed[:, s], lengths + s, cache)
      cached.append(logits[:, 0])
  # The cache is laid out like the activations: rows over data x fsdp, kv heads over tensor.
  # (XLA leaves the mesh's size-1 axes, here sequence and expert, out of the spec.)
  assert cache['k'].sharding.spec == PartitionSpec(None, ('data', 'fsdp'), None, 'tensor')
  full = full_logits(cfg, host_params, [p + fed[b].tolist() for b, p in enumerate(PROMPTS)])
  for s, got in enumerate(cached):
    want = full[np.arange(len(PROMPTS)), lengths - 1 + s]
    np.testing.assert_allclose(np.asarray(got), want, atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize('family', FAMILIES)
def test_greedy_is_deterministic_and_the_argmax_of_full_logits(family):
  cfg = FAMILIES[family]
  params = params_of(cfg)
  gens = generate.generate_ids(cfg, params, PROMPTS, max_new_tokens=8)
  again = generate.generate_ids(cfg, params, PROMPTS, max_new_tokens=8)
  assert gens == again
  rows = [p + g.tokens for p, g in zip(PROMPTS, gens, strict=True)]
  full = full_logits(cfg, params, rows)
  for b, (p, g) in enumerate(zip(PROMPTS, gens, strict=True)):
    assert g.finish_reason == 'length' and len(g.tokens) == 8
    np.testing.assert_array_equal(full[b, len(p) - 1 : len(p) + 7].argmax(-1), g.tokens)


@pytest.mark.parametrize('family', FAMILIES)
def test_batch_of_different_lengths_equals_one_prompt_at_a_time(family):
  cfg, params = FAMILIES[family], params_of(FAMILIES[family])
  batched = generate.generate_ids(cfg, params, PROMPTS, max_new_tokens=8)
  # Alone (the other rows empty), the short prompts land in another length bucket (16, not 32).
  alone = [
    generate.generate_ids(cfg, params, [p], max_new_tokens=8, num_rows=len(PROMPTS))[0]
    for p in PROMPTS
  ]
  assert batched == alone


def test_sharded_generation_equals_single_device():
  cfg, mesh = LLAMA, mesh_of_8()
  params = generate.place_params(cfg, params_of(cfg), mesh)
  sharded = generate.generate_ids(cfg, params, PROMPTS, max_new_tokens=8, mesh=mesh)
  assert sharded == generate.generate_ids(cfg, params_of(cfg), PROMPTS, max_new_tokens=8)


def sample_many(logits_V, sampling, n=4000):
  logits_BV = jnp.broadcast_to(jnp.asarray(logits_V, jnp.float32), (n, len(logits_V)))
  return np.asarray(generate.sample(logits_BV, jax.random.key(1), sampling))


def test_top_k_never_samples_outside_the_k_best():
  logits = np.random.default_rng(0).normal(size=50) * 3
  drawn = sample_many(logits, generate.Sampling(temperature=2.0, top_k=5))
  best = set(np.argsort(logits)[-5:].tolist())
  assert set(drawn.tolist()) == best  # All of them drawn, nothing else.


def test_top_p_keeps_the_nucleus_and_its_proportions():
  probs = np.array([0.05, 0.5, 0.1, 0.3, 0.05])
  drawn = sample_many(np.log(probs), generate.Sampling(temperature=1.0, top_p=0.75))
  # The fewest best tokens reaching 0.75: 0.5 + 0.3.
  assert set(drawn.tolist()) == {1, 3}
  assert abs(np.mean(drawn == 1) - 0.5 / 0.8) < 0.03
  only_best = sample_many(np.log(probs), generate.Sampling(temperature=1.0, top_p=0.5))
  assert set(only_best.tolist()) == {1}


def test_temperature_zero_is_greedy():
  logits = jax.random.normal(jax.random.key(0), (16, 96))
  for s in (generate.Sampling(), generate.Sampling(temperature=0.0, top_k=5, top_p=0.5)):
    np.testing.assert_array_equal(
      generate.sample(logits, jax.random.key(3), s), jnp.argmax(logits, -1)
    )
  cfg, params = LLAMA, params_of(LLAMA)
  greedy = generate.generate_ids(cfg, params, PROMPTS, max_new_tokens=8)
  zero = generate.generate_ids(
    cfg, params, PROMPTS, max_new_tokens=8, sampling=generate.Sampling(0.0, top_k=3), seed=7
  )
  assert zero == greedy


def test_sampling_follows_the_seed_and_chunking_changes_nothing():
  cfg, params = GPT, params_of(GPT)
  hot = generate.Sampling(temperature=1.5, top_k=40)
  run = functools.partial(generate.generate_ids, cfg, params, PROMPTS, max_new_tokens=8)
  a = run(sampling=hot, seed=1)
  assert a == run(sampling=hot, seed=1)
  assert a != run(sampling=hot, seed=2)
  assert a == run(sampling=hot, seed=1, on_chunk=lambda ids, done: None, chunk_steps=5)


def test_eos_ends_a_row_and_is_not_returned():
  cfg, params = LLAMA, params_of(LLAMA)
  free = generate.generate_ids(cfg, params, PROMPTS, max_new_tokens=8)
  eos = free[1].tokens[3]
  gens = generate.generate_ids(cfg, params, PROMPTS, max_new_tokens=8, eos_ids=(eos,))
  assert gens[1].finish_reason == 'eos'
  assert gens[1].tokens == free[1].tokens[: free[1].tokens.index(eos)]
  for g, f in zip(gens, free, strict=True):
    if eos not in f.tokens:
      assert g == f


def test_context_limit_stops_generation_and_long_prompts_are_refused():
  cfg, params = LLAMA, params_of(LLAMA)
  near_end = [1] * (cfg.max_seq_len - 3)
  (g,) = generate.generate_ids(cfg, params, [near_end], max_new_tokens=8, num_rows=4)
  assert g.finish_reason == 'context' and len(g.tokens) == 3
  with pytest.raises(ValueError, match=r'Prompt 1 has 32 tokens .* context is 32 tokens'):
    generate.generate_ids(cfg, params, [[1], [1] * 32], max_new_tokens=4)


def test_text_stop_strings_and_streaming():
  tok = ByteTokenizer()
  cfg, params = LLAMA, params_of(LLAMA)
  prompts = ['abc', 'hello there', 'x', 'a longer one']
  free = generate.generate_text(cfg, params, tok, prompts, max_new_tokens=8)
  stop = free[0].text[3:5]
  pieces = dict.fromkeys(range(len(prompts)), '')

  def on_text(i, piece):
    pieces[i] += piece

  gens = generate.generate_text(
    cfg, params, tok, prompts, max_new_tokens=8, stop=[stop], on_text=on_text, chunk_steps=3
  )
  assert gens[0].finish_reason == 'stop'
  assert gens[0].text == free[0].text[: free[0].text.find(stop)]
  for i, g in enumerate(gens):
    assert pieces[i] == g.text
    if stop not in free[i].text:
      assert g.text == free[i].text and g.finish_reason == free[i].finish_reason


def test_stream_holds_back_a_possible_stop_string_start():
  assert text._stream_end('the end\n', ['\n\n']) == len('the end')
  assert text._stream_end('caf\ufffd', []) == 3
  assert text._stream_end('abc', ['xyz']) == 3


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_cli(module, *args):
  """`python -m module args` on one CPU device."""
  env = {**os.environ, 'JAX_PLATFORMS': 'cpu', 'XLA_FLAGS': ''}
  cmd = [sys.executable, '-m', module, *args]
  return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=env, timeout=300)


def test_cli_streams_a_completion_and_names_bad_input(tmp_path):
  export = tmp_path / 'export'
  checkpoint.save_params(str(export), LLAMA, params_of(LLAMA))
  common = [f'--workdir={export}', '--tokenizer=byte', '--temperature=0']
  run = run_cli('llm.generate', *common, '--prompt=Once upon', '--max_new_tokens=5')
  assert run.returncode == 0, run.stderr
  # The prompt, then the completion as it streams, then how it ended.
  assert re.fullmatch(r'Once upon.*\n\[(length, 5|eos, [0-4]) tokens\]\n', run.stdout, re.S)
  run = run_cli('llm.generate', *common, f'--prompt={"x" * 70}')
  assert run.returncode != 0
  assert "Prompt 0 has 71 tokens but the model's context is 32 tokens" in run.stderr
  run = run_cli('llm.generate', f'--workdir={tmp_path / "nothing"}', '--prompt=hi')
  assert run.returncode != 0 and 'is neither a training workdir' in run.stderr
