"""One path -> model function: every entry point reads a workdir, an export and a Hugging Face dir.

From the fixtures: the Hugging Face directory itself, its import (a params
export) and a training workdir started from it with a learning rate of 0, so
all three hold the same weights and every entry point must give the same
answer from each. The workdir's tokenizer is its own copy of the Hugging Face
files, taken when it trained.
"""

import dataclasses
import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
from flax import traverse_util

from llm import config as config_lib
from llm import train
from llm.convert import commands, hf
from llm.io import checkpoint, models

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIXTURES = os.path.join(ROOT, 'tests', 'fixtures', 'hf')
GPT2, BERT = os.path.join(FIXTURES, 'gpt2'), os.path.join(FIXTURES, 'bert_tiny')


def _config(hf_dir: str, data) -> object:
  """A zero-learning-rate run from `hf_dir`: its params change in no step."""
  c = config_lib.get_config()
  c.model = config_lib.model_config(**dataclasses.asdict(hf.config_from_hf(hf_dir)))
  c.data = data
  c.init_from = hf_dir
  c.batch_size, c.seq_len, c.total_steps = 8, 32, 2
  c.log_every, c.eval_every, c.checkpoint_every = 1, 0, 2
  c.optim.learning_rate, c.optim.warmup_steps = 0.0, 0
  c.peak_flops = 1e12  # Skips measuring the CPU's.
  return c


@pytest.fixture(scope='module')
def gpt2_sources(tmp_path_factory):
  """{kind: path} of the GPT-2 fixture as a workdir (an SFT run), an export and itself."""
  tmp = tmp_path_factory.mktemp('gpt2')
  lines = [{'prompt': f'a{i}', 'response': 'b c'} for i in range(16)]
  (tmp / 'sft.jsonl').write_text(''.join(json.dumps(r) + '\n' for r in lines))
  data = config_lib.data_config()
  data.update(dataset='sft', train_files=str(tmp / 'sft.jsonl'), tokenizer=GPT2, truncation='left')
  train.train_and_evaluate(_config(GPT2, data), str(tmp / 'workdir'))
  commands.import_hf(GPT2, str(tmp / 'export'))
  return {'workdir': str(tmp / 'workdir'), 'export': str(tmp / 'export'), 'hf': GPT2}


@pytest.fixture(scope='module')
def bert_sources(tmp_path_factory):
  """{kind: path} of the BERT fixture as a workdir (a masked-LM run), an export and itself."""
  tmp = tmp_path_factory.mktemp('bert')
  (tmp / 'a.txt').write_text('\n'.join(f'my dog is {i} years old' for i in range(40)))
  data = config_lib.data_config()
  data.update(
    dataset='text_files',
    data_dir=str(tmp / 'data'),
    text_files=str(tmp / 'a.txt'),
    text_unit='line',
    tokenizer=BERT,
    objective='mlm',
  )
  train.train_and_evaluate(_config(BERT, data), str(tmp / 'workdir'))
  commands.import_hf(BERT, str(tmp / 'export'))
  return {'workdir': str(tmp / 'workdir'), 'export': str(tmp / 'export'), 'hf': BERT}


def run_cli(module, *args):
  """`python -m module args` on one CPU device; its stdout."""
  env = {**os.environ, 'JAX_PLATFORMS': 'cpu', 'XLA_FLAGS': ''}
  cmd = [sys.executable, '-m', module, *args]
  run = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=env, timeout=300)
  assert run.returncode == 0, run.stderr
  return run.stdout


def test_the_three_kinds_are_told_apart(gpt2_sources, tmp_path):
  for kind, path in gpt2_sources.items():
    assert models.kind_of(path) == kind
    source = models.open(path)
    assert source.kind == kind and source.model_cfg.num_layers == 2
  assert models.open(gpt2_sources['workdir']).step == 2
  assert models.kind_of(str(tmp_path)) is None
  with pytest.raises(ValueError, match='neither a training workdir'):
    models.open(str(tmp_path))


def test_init_from_reads_each_kind_onto_the_runs_shardings(gpt2_sources, tmp_path):
  want = traverse_util.flatten_dict(hf.load(GPT2)[1], sep='/')
  data = config_lib.data_config()
  data.update(dataset='sft', train_files=os.path.join(tmp_path, 'x.jsonl'), tokenizer=GPT2)
  (tmp_path / 'x.jsonl').write_text(json.dumps({'prompt': 'a', 'response': 'b'}) + '\n')
  c = _config(GPT2, data)
  c.mesh.fsdp, c.mesh.data = 2, -1
  for kind, path in gpt2_sources.items():
    c.init_from = path
    trainer = train.Trainer.create(c)
    ckpt = checkpoint.Checkpointer(str(tmp_path / f'run_{kind}'))
    state, _ = trainer.restore_or_init(ckpt)
    ckpt.close()
    got = traverse_util.flatten_dict(state['params'], sep='/')
    places = traverse_util.flatten_dict(trainer.shardings['params'], sep='/')
    assert sorted(got) == sorted(want), kind
    for name, value in got.items():
      assert value.sharding == places[name], f'{kind}: {name}'
      np.testing.assert_array_equal(np.asarray(value), want[name], err_msg=f'{kind}: {name}')
    # fsdp=2 splits the weights: a silent fallback to replication would show here.
    assert not got['embedding'].sharding.is_fully_replicated


def test_generate_gives_the_same_completion_from_each_kind(gpt2_sources):
  outputs = {
    kind: run_cli(
      'llm.generate', f'--workdir={path}', '--prompt=a1', '--max_new_tokens=5', '--temperature=0'
    )
    for kind, path in gpt2_sources.items()
  }
  assert outputs['workdir'] == outputs['export'] == outputs['hf'], outputs
  assert outputs['hf'].startswith('a1')


def test_evaluate_gives_the_same_scores_from_each_kind(gpt2_sources, tmp_path):
  task = tmp_path / 'mc.jsonl'
  task.write_text(json.dumps({'context': 'a1', 'choices': [' b c', ' c b', ' a'], 'label': 0}))
  scores = {}
  for kind, path in gpt2_sources.items():
    out = tmp_path / kind
    run_cli(
      'llm.evaluate', f'--workdir={path}', '--split=', f'--choice={task}', f'--output_dir={out}'
    )
    scores[kind] = json.loads((out / 'mc.jsonl').read_text())['logprobs']
  np.testing.assert_allclose(scores['workdir'], scores['hf'], rtol=1e-6)
  np.testing.assert_allclose(scores['export'], scores['hf'], rtol=1e-6)


def test_fill_mask_gives_the_same_predictions_from_each_kind(bert_sources):
  outputs = {
    kind: run_cli('llm.fill_mask', f'--model={path}', '--text=my dog is [MASK] years old')
    for kind, path in bert_sources.items()
  }
  assert outputs['workdir'] == outputs['export'] == outputs['hf'], outputs
  assert '[MASK] 1 of 1' in outputs['hf']


def test_convert_export_writes_the_same_weights_from_each_kind(gpt2_sources, tmp_path):
  _, want = hf.load(GPT2)
  for kind, path in gpt2_sources.items():
    out = tmp_path / kind
    run_cli('llm.convert', 'export', f'--params={path}', f'--hf_dir={out}')
    assert 'tokenizer.json' in os.listdir(out), kind
    _, got = hf.load(str(out))
    jax.tree.map(np.testing.assert_array_equal, got, want)
