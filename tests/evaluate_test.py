"""Evaluation: bits per byte on a split, BLEU/ROUGE, and tasks that a trained model must pass."""

import functools
import json
import math
import os
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import sacrebleu
from rouge_score import rouge_scorer

from llm import config as config_lib
from llm import generate, sharding
from llm import model as model_lib
from llm.data import sources, streams, tokenizer
from llm.eval import choice, generation, lm, tasks
from llm.io import checkpoint
from llm.model import ModelConfig, Transformer


def _iterator(data, *, vocab_size=None, **stream):
  """`stream`'s batches through the one dispatch training and evaluation use."""
  model_cfg = None if vocab_size is None else ModelConfig(vocab_size=vocab_size)
  return streams.make_iterator(streams.Stream(data, **stream), model_cfg)


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOK = tokenizer.ByteTokenizer()
CFG = ModelConfig(
  vocab_size=260, num_layers=2, d_model=64, num_heads=4, num_kv_heads=2, d_ff=128, max_seq_len=64
)
FACTS = [
  ('The sky is', ' blue and clear all day long'),
  ('Fresh grass is', ' green and soft under bare feet'),
  ('New snow is', ' white and cold in the night'),
  ('Burnt coal is', ' black and dusty in the hand'),
]


@functools.cache
def random_params():
  """Random params from numpy: compiling the real initialisers takes seconds on CPU."""
  rng = np.random.default_rng(0)

  def draw(path, leaf):
    noise = rng.normal(0.0, 0.05, leaf.shape).astype(np.float32)
    return noise + 1 if jax.tree_util.keystr(path).endswith("['scale']") else noise

  return jax.tree_util.tree_map_with_path(draw, nn.unbox(model_lib.abstract_params(CFG)))


@functools.cache
def trained_params():
  """A model that has memorised FACTS: each answer is forced after its context."""
  docs = [[TOK.bos_id, *TOK.encode(c + a), TOK.eos_id] for c, a in FACTS]
  T = max(len(d) for d in docs) - 1
  inputs = np.zeros((len(docs), T), np.int32)
  targets = np.zeros((len(docs), T), np.int32)
  mask = np.zeros((len(docs), T), np.float32)
  for i, d in enumerate(docs):
    inputs[i, : len(d) - 1], targets[i, : len(d) - 1], mask[i, : len(d) - 1] = d[:-1], d[1:], 1
  tx = optax.adam(5e-3)

  def loss(params):
    logits = Transformer(CFG).apply({'params': params}, inputs)
    nll = -jnp.take_along_axis(jax.nn.log_softmax(logits), targets[..., None], -1)[..., 0]
    return jnp.sum(nll * mask) / jnp.sum(mask)

  @jax.jit
  def step(params, opt):
    value, grads = jax.value_and_grad(loss)(params)
    updates, opt = tx.update(grads, opt)
    return optax.apply_updates(params, updates), opt, value

  params = random_params()
  opt = tx.init(params)
  for _ in range(200):
    params, opt, final_loss = step(params, opt)
  assert final_loss < 0.05, final_loss
  return params


def test_multiple_choice_accuracy_on_a_task_forced_by_training():
  answers = [a for _, a in FACTS]
  examples = [{'context': c, 'choices': answers, 'label': i} for i, (c, _) in enumerate(FACTS)]
  summary, rows = choice.choice_task(CFG, trained_params(), TOK, examples, batch_size=8)
  assert summary == {'accuracy': 1.0, 'accuracy_norm': 1.0, 'examples': 4}
  assert [r['prediction'] for r in rows] == [0, 1, 2, 3]
  # The scores are log-likelihoods of the choice's tokens after the context's.
  ctx = generate.encode_prompt(TOK, FACTS[0][0])
  seq = ctx + TOK.encode(answers[1])
  logits = jax.jit(Transformer(CFG).apply)({'params': trained_params()}, jnp.array([seq[:-1]]))
  logp = jax.nn.log_softmax(logits)
  want = sum(float(logp[0, t - 1, seq[t]]) for t in range(len(ctx), len(seq)))
  assert rows[0]['logprobs'][1] == pytest.approx(want, abs=1e-3)


def test_generation_task_scores_the_completions():
  examples = [{'prompt': c, 'reference': a} for c, a in FACTS]
  summary, rows = generation.generation_task(
    CFG, trained_params(), TOK, examples, max_new_tokens=40
  )
  assert [r['output'] for r in rows] == [a for _, a in FACTS]
  assert all(r['finish_reason'] == 'eos' for r in rows)
  assert summary['bleu'] == pytest.approx(100.0) and summary['rougeL'] == pytest.approx(1.0)


def test_bleu_chrf_and_rouge_equal_the_libraries():
  outputs = ['the cat sat on the mat today', 'a quick brown dog', 'hello world', '']
  refs = ['the cat is on the mat', 'the quick brown fox jumps', 'hello there world', 'nothing']
  got = generation.generation_scores(outputs, refs)
  scorer = rouge_scorer.RougeScorer(['rouge1', 'rouge2', 'rougeL'])
  scores = [scorer.score(r, o) for o, r in zip(outputs, refs, strict=True)]
  assert got['bleu'] == sacrebleu.corpus_bleu(outputs, [refs]).score
  assert got['chrf'] == sacrebleu.corpus_chrf(outputs, [refs]).score
  for k in ('rouge1', 'rouge2', 'rougeL'):
    assert got[k] == pytest.approx(np.mean([s[k].fmeasure for s in scores]))
  assert got['examples'] == 4 and 0 < got['bleu'] < 100


TEXTS = [
  'plain ascii text',
  'naïve café, 東京, Привет, 🙂',
  '  two  spaces\n\ttab and newline\n',
  'From fairest creatures we desire increase',
]


def test_token_bytes_count_the_text_bytes():
  spm = tokenizer.train_sentencepiece(TEXTS * 20, vocab_size=300, model_type='bpe', max_lines=200)
  for tok in (TOK, spm):
    table = tokenizer.token_bytes(tok, 512)
    assert table[[tok.pad_id, tok.bos_id, tok.eos_id]].tolist() == [0, 0, 0]
    for text in TEXTS:
      assert table[tok.encode(text)].sum() == len(text.encode('utf-8')), (tok, text)


def text_files_config(tmp_path, tok='byte'):
  (tmp_path / 'a.txt').write_text('\n'.join(f'{i}: {TEXTS[i % 4]} {i * i}' for i in range(40)))
  cfg = config_lib.data_config()
  cfg.update(
    dataset='text_files',
    data_dir=str(tmp_path / 'data'),
    text_files=str(tmp_path / 'a.txt'),
    text_unit='line',
    validation_fraction=0.3,
    tokenizer=tok,
  )
  return cfg


def test_perplexity_and_bits_per_byte_over_a_split_on_a_mesh(tmp_path):
  data = text_files_config(tmp_path)
  mesh = sharding.make_mesh({'data': 2, 'fsdp': 2, 'tensor': 2})
  params = generate.place_params(CFG, random_params(), mesh)
  got = lm.evaluate_split(
    CFG, params, data, split='validation', batch_size=4, seq_len=32, mesh=mesh, prepare=True
  )
  # The same sums, computed batch by batch on one device.
  nll = tokens = 0.0
  for b in _iterator(
    data, split='validation', batch_size=4, seq_len=32, seed=0, shuffle=False, num_epochs=1
  ):
    logits = jax.jit(Transformer(CFG).apply)(
      {'params': random_params()}, b['inputs'], b['positions'], b['segment_ids']
    )
    logp = jax.nn.log_softmax(logits)
    nll -= float(
      jnp.sum(jnp.take_along_axis(logp, b['targets'][..., None], -1)[..., 0] * b['loss_mask'])
    )
    tokens += float(b['loss_mask'].sum())
  source = sources.data_source(data, 'validation')
  text_bytes = sum(len(source[i]['text']) for i in range(len(source)))
  assert got['tokens'] == tokens and got['bytes'] == text_bytes
  assert got['loss'] == pytest.approx(nll / tokens, rel=1e-5)
  assert got['perplexity'] == pytest.approx(math.exp(nll / tokens), rel=1e-5)
  assert got['bits_per_byte'] == pytest.approx(nll / math.log(2) / text_bytes, rel=1e-5)


def test_task_files_are_checked(tmp_path):
  path = tmp_path / 'task.jsonl'
  path.write_text(
    json.dumps({'prompt': 'a', 'reference': 'b'}) + '\n' + json.dumps({'prompt': 'c'})
  )
  with pytest.raises(ValueError, match=r"task.jsonl:2 lacks the field 'reference'"):
    tasks.read_jsonl(str(path), {'prompt': str, 'reference': str})
  bad_label = [{'context': 'x', 'choices': ['a', 'b'], 'label': 2}]
  with pytest.raises(ValueError, match='label 2 is not an index into its 2 choices'):
    choice.choice_task(CFG, random_params(), TOK, bad_label)


def test_cli_writes_summary_and_examples_next_to_the_checkpoint(tmp_path):
  export = tmp_path / 'export'
  checkpoint.save_params(str(export), CFG, random_params())
  gen, mc = tmp_path / 'gen.jsonl', tmp_path / 'mc.jsonl'
  gen.write_text(''.join(json.dumps({'prompt': c, 'reference': a}) + '\n' for c, a in FACTS))
  mc.write_text(json.dumps({'context': 'The sky is', 'choices': [' blue', ' red'], 'label': 0}))
  env = {**os.environ, 'JAX_PLATFORMS': 'cpu', 'XLA_FLAGS': ''}
  cmd = [sys.executable, '-m', 'llm.evaluate', f'--workdir={export}', '--tokenizer=byte']
  cmd += [f'--generation={gen}', f'--choice={mc}', '--max_new_tokens=4']
  run = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=env, timeout=300)
  assert run.returncode == 0, run.stderr
  summary = json.loads((export / 'eval' / 'summary.json').read_text())
  assert summary['step'] is None and summary['checkpoint'] == str(export)
  assert set(summary['generation/gen']) == {
    'bleu',
    'chrf',
    'rouge1',
    'rouge2',
    'rougeL',
    'examples',
  }
  assert summary['choice/mc']['examples'] == 1
  assert len((export / 'eval' / 'gen.jsonl').read_text().splitlines()) == 4
  assert json.loads((export / 'eval' / 'mc.jsonl').read_text())['label'] == 0
