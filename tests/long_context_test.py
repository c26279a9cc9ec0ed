"""experiments/long_context.py at toy size: the short stage, then the long one from its params."""

import jax
import numpy as np
import pytest

from experiments import long_context
from llm import train
from llm.io import checkpoint, models
from llm.model import flash, kernels

SHORT, LONG = 32, 64  # Positions; the long rows split over 4 sequence shards of 16.


def _corpus(directory) -> str:
  """Twelve code-like files of a few thousand characters: several long rows each."""
  directory.mkdir()
  rng = np.random.default_rng(0)
  words = ['x', 'y', 'total', 'rows', 'jnp.sum', 'lax.scan', 'return', '(', ')', ':', '+', '1']
  for i in range(12):
    lines = [f'def f{i}_{j}(x):\n  ' + ' '.join(rng.choice(words, 12)) for j in range(60)]
    (directory / f'module_{i}.txt').write_text('\n\n'.join(lines) + '\n')
  return str(directory / '*.txt')


def _shrunk(stage: str, tmp_path, corpus: str):
  """The experiment's config for `stage`, with the sizes of a test and every path in tmp_path."""
  c = long_context.get_config(stage)
  c.data.text_files = corpus
  c.data.data_dir = str(tmp_path / 'data')
  c.data.validation_fraction = 0.25
  c.data.spm_vocab_size = 320
  c.model.update(vocab_size=320, num_layers=1, d_model=32, num_heads=4, head_dim=8, d_ff=64)
  c.total_steps, c.log_every, c.eval_every, c.eval_steps = 3, 1, 3, 1
  c.optim.warmup_steps = 1
  if stage == 'short':
    c.seq_len, c.batch_size = SHORT, 8  # One row per device of the 8.
    c.model.max_seq_len = SHORT
  else:
    c.seq_len, c.batch_size = LONG, 2  # Rows over data=2, each row's length over sequence=4.
    c.model.max_seq_len = LONG
    c.init_from = c.data.tokenizer = str(tmp_path / 'short')
    c.seed = 1  # A fresh init then has nothing in common with the short stage's params.
  return c


def test_long_stage_continues_the_short_one_split_over_the_sequence_axis(tmp_path, monkeypatch):
  # The kernel of the real run at 8k: blockwise flash attention, with several key
  # blocks on each of the 4 shards.
  monkeypatch.setattr(kernels, 'CPU_BLOCKWISE_MIN_SEQ_LEN', SHORT)
  monkeypatch.setattr(flash, 'DEFAULT_BLOCK', 8)
  corpus = _corpus(tmp_path / 'corpus')
  short = _shrunk('short', tmp_path, corpus)
  assert short.mesh.sequence == 1 and not short.init_from
  short.eval_every = 0
  train.train_and_evaluate(short, str(tmp_path / 'short'))
  pretrained = jax.device_get(models.open(str(tmp_path / 'short')).read())

  long = _shrunk('long', tmp_path, corpus)
  assert long.mesh.sequence == 4 and long.model.rope_theta > short.model.rope_theta
  # The long stage as train_and_evaluate runs it, with its step-0 state in view.
  trainer = train.Trainer.create(long)
  assert dict(trainer.mesh.shape) == {'data': 2, 'fsdp': 1, 'sequence': 4, 'expert': 1, 'tensor': 1}
  ckpt = checkpoint.Checkpointer(str(tmp_path / 'long'))
  state, batches = trainer.restore_or_init(ckpt)
  ckpt.close()
  assert int(state['step']) == 0
  # The short stage's last params, not a fresh init.
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(state['params']), pretrained)
  losses = []
  for _ in range(long.total_steps):
    state, metrics = trainer.step(state, next(batches))
    losses.append(float(metrics['loss']))
  assert np.all(np.isfinite(losses))
  assert np.isfinite(trainer.evaluate(state['params'])['loss'])


def test_write_corpus_copies_jax_sources_as_txt_once(tmp_path):
  n = long_context.write_corpus(str(tmp_path))
  copies = sorted(tmp_path.rglob('*.py.txt'))
  assert n == len(copies) > 100
  lax = tmp_path / 'jax' / '_src' / 'lax' / 'lax.py.txt'
  assert lax in copies
  stamps = {p: p.stat().st_mtime_ns for p in copies}
  assert long_context.write_corpus(str(tmp_path)) == n
  # Unchanged files, unchanged times: the prepared corpus, named after both, stays valid.
  assert {p: p.stat().st_mtime_ns for p in copies} == stamps


@pytest.mark.parametrize('arg', [None, 'medium'])
def test_a_stage_must_be_named(arg):
  with pytest.raises(ValueError, match="give one of \\('short', 'long'\\)"):
    long_context.get_config(arg)
