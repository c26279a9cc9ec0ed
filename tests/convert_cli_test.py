"""Imported params as params-only checkpoints, and the `python -m llm.convert` command line."""

import os
import subprocess
import sys

import jax
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec

from llm.convert import hf
from llm.io import checkpoint, models

FIXTURES = os.path.join(os.path.dirname(__file__), 'fixtures', 'hf')
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_save_load_round_trip(tmp_path):
  cfg, params = hf.load(os.path.join(FIXTURES, 'llama'))
  checkpoint.save_params(str(tmp_path), cfg, params)
  source = models.open(str(tmp_path))
  cfg2, params2 = source.model_cfg, source.read()
  assert cfg2 == cfg
  jax.tree.map(np.testing.assert_array_equal, params2, params)
  with pytest.raises(ValueError, match='already holds params'):
    checkpoint.save_params(str(tmp_path), cfg, params)


def test_load_onto_a_mesh(tmp_path):
  cfg, params = hf.load(os.path.join(FIXTURES, 'gpt2'))
  checkpoint.save_params(str(tmp_path), cfg, params)
  mesh = jax.make_mesh((8,), ('data',))
  source = models.open(str(tmp_path))
  params2 = source.read(jax.tree.map(lambda _: NamedSharding(mesh, PartitionSpec()), source.shapes))
  assert params2['embedding'].sharding.mesh.shape == {'data': 8}
  np.testing.assert_array_equal(np.asarray(params2['embedding']), params['embedding'])


def test_not_a_checkpoint(tmp_path):
  with pytest.raises(ValueError, match='model_config.json'):
    models.open(str(tmp_path))


def _cli(*args):
  return subprocess.run(
    [sys.executable, '-m', 'llm.convert', *args],
    cwd=ROOT,
    capture_output=True,
    text=True,
    env={**os.environ, 'JAX_PLATFORMS': 'cpu'},
  )


def test_cli_import_then_export(tmp_path):
  ckpt, out = tmp_path / 'ckpt', tmp_path / 'hf'
  run = _cli('import', f'--hf_dir={FIXTURES}/gpt2', f'--out={ckpt}')
  assert run.returncode == 0, run.stderr
  assert sorted(os.listdir(ckpt)) == ['model_config.json', 'params', 'tokenizer']
  assert 'tokenizer.json' in os.listdir(ckpt / 'tokenizer')
  run = _cli('export', f'--params={ckpt}', f'--hf_dir={out}')
  assert run.returncode == 0, run.stderr
  assert {'config.json', 'model.safetensors', 'tokenizer.json'} <= set(os.listdir(out))
  _, want = hf.load(os.path.join(FIXTURES, 'gpt2'))
  _, got = hf.load(str(out))
  jax.tree.map(np.testing.assert_array_equal, got, want)
  run = _cli('export', f'--params={ckpt}', f'--hf_dir={out}')
  assert run.returncode == 1 and 'already holds a model' in run.stderr
  assert 'Traceback' not in run.stderr
