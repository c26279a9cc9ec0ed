"""The tokenizer travels with the model: a copied workdir generates and evaluates anywhere.

A run trained with a sentencepiece model learned from its corpus (in a data
directory given relative to where it ran) is copied elsewhere, the data
directory is deleted, and generation and evaluation run from a third
directory: they read the workdir's own tokenizer copy, and nothing is trained
or prepared again.
"""

import json
import os
import shutil
import subprocess
import sys

import pytest

from llm import config as config_lib
from llm import train
from llm.data import tokenizer
from llm.io import models

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TEXT = [f'{i}: From fairest creatures we desire increase, {i * i}' for i in range(60)]


def _run(cwd, module, *args):
  # The checkout on the path, as an installed package would be: the cwd is elsewhere.
  env = {**os.environ, 'JAX_PLATFORMS': 'cpu', 'XLA_FLAGS': '', 'PYTHONPATH': ROOT}
  cmd = [sys.executable, '-m', module, *args]
  return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, env=env, timeout=300)


@pytest.fixture(scope='module')
def moved_workdir(tmp_path_factory):
  """A workdir trained in one directory with a relative data_dir, then moved and orphaned."""
  first = tmp_path_factory.mktemp('first')
  (first / 'corpus.txt').write_text('\n'.join(TEXT))
  c = config_lib.get_config()
  c.data.update(
    dataset='text_files',
    data_dir='data',
    text_files='corpus.txt',
    text_unit='line',
    tokenizer='',  # A sentencepiece model trained on the corpus, stored in data/.
    spm_vocab_size=300,
  )
  c.model = config_lib.model_config(
    vocab_size=300, num_layers=1, d_model=32, num_heads=2, num_kv_heads=2, d_ff=64, max_seq_len=32
  )
  c.batch_size, c.seq_len, c.total_steps = 8, 32, 2
  c.log_every, c.eval_every, c.checkpoint_every = 1, 0, 2
  c.optim.warmup_steps = 1
  c.peak_flops = 1e12
  cwd = os.getcwd()
  os.chdir(first)
  try:
    train.train_and_evaluate(c, 'run')
  finally:
    os.chdir(cwd)
  assert (first / 'data' / 'tokenizers').is_dir()
  trained = tokenizer.load_dir(first / 'run' / 'tokenizer')
  assert isinstance(trained, tokenizer.SentencePieceTokenizer)
  moved = tmp_path_factory.mktemp('second') / 'run'
  shutil.copytree(first / 'run', moved)
  shutil.rmtree(first)
  return moved, trained


def test_generate_and_evaluate_use_the_copy_and_prepare_nothing(moved_workdir, tmp_path):
  workdir, trained = moved_workdir
  assert models.open(str(workdir)).tokenizer().__getstate__() == trained.__getstate__()
  elsewhere = tmp_path / 'elsewhere'
  elsewhere.mkdir()
  run = _run(elsewhere, 'llm.generate', f'--workdir={workdir}', '--prompt=From fairest')
  assert run.returncode == 0, run.stderr
  assert run.stdout.startswith('From fairest')
  task = tmp_path / 'mc.jsonl'
  task.write_text(json.dumps({'context': 'From', 'choices': [' fairest', ' x'], 'label': 0}))
  run = _run(elsewhere, 'llm.evaluate', f'--workdir={workdir}', '--split=', f'--choice={task}')
  assert run.returncode == 0, run.stderr
  assert json.loads((workdir / 'eval' / 'step_2' / 'summary.json').read_text())['step'] == 2
  # Its split needs the deleted dataset: one sentence, and nothing is prepared in its place.
  run = _run(elsewhere, 'llm.evaluate', f'--workdir={workdir}')
  assert run.returncode != 0 and 'Traceback' not in run.stderr
  assert 'python -m llm.data.prepare' in run.stderr or 'does not exist' in run.stderr, run.stderr
  assert os.listdir(elsewhere) == []


def test_an_export_carries_the_copy_too(moved_workdir, tmp_path):
  from llm.convert import commands

  workdir, trained = moved_workdir
  commands.write_params(str(workdir), str(tmp_path / 'export'))
  copy = models.open(str(tmp_path / 'export')).tokenizer()
  assert copy.__getstate__() == trained.__getstate__()
