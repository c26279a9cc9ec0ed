"""Every command fails on a user's mistake in one sentence, and leaves the files it was given alone.

A table of bad inputs across config, data, workdir and checkpoint, generation,
conversion, fill-mask, evaluation and compilation. Each runs its command in a
subprocess, the way a user would, against its own copies of a trained
workdir (W), a params export (E), Hugging Face directories (H: GPT-2, B:
BERT) and a tiny experiment (C, tests/tiny_experiment.py), and must: exit non-zero; print no
traceback; end stderr with one `error:` line naming the bad value; and leave
every file of its directory as it was (a refused run creates nothing
either). The commands run two at a time; each test checks its own result.
"""

import concurrent.futures
import dataclasses
import hashlib
import os
import pathlib
import shutil
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
FIXTURES = ROOT / 'tests' / 'fixtures' / 'hf'

TINY = ROOT / 'tests' / 'tiny_experiment.py'


@dataclasses.dataclass(frozen=True)
class Case:
  id: str
  module: str
  args: tuple[str, ...]
  expect: tuple[str, ...]  # Substrings of the error line (the bad value, the fix).


def train(id, *args, expect, workdir='{T}/run'):
  return Case(id, 'llm.train', ('--config={C}', f'--workdir={workdir}', *args), expect)


GEN = ('--workdir={W}', '--tokenizer=byte', '--prompt=hi')

CASES = [
  # Config and flags.
  train('misspelt key', '--config.totl_steps=3', expect=('totl_steps', 'total_steps')),
  train('misspelt nested key', '--config.optim.lr=1', expect=('optim.lr',)),
  Case('missing config file', 'llm.train', ('--config=nope.py', '--workdir={T}/r'), ('nope.py',)),
  Case(
    'unknown preset',
    'llm.train',
    ('--config=experiments/synthetic.py:bogus', '--workdir={T}/r'),
    ('bogus', 'gpt2_124m'),
  ),
  train('not a number', '--config.total_steps=abc', expect=('abc',)),
  train('unknown flag', '--bogus_flag=1', expect=('bogus_flag',)),
  Case('missing workdir flag', 'llm.train', ('--config={C}',), ('--workdir',)),
  train('total_steps 0', '--config.total_steps=0', expect=('total_steps=0',)),
  train('batch_size 0', '--config.batch_size=0', expect=('batch_size=0',)),
  train('checkpoint_every 0', '--config.checkpoint_every=0', expect=('checkpoint_every=0',)),
  train('log_every 0', '--config.log_every=0', expect=('log_every=0',)),
  train('grad_accum 0', '--config.optim.grad_accum=0', expect=('grad_accum=0',)),
  train('nan learning rate', '--config.optim.learning_rate=nan', expect=('learning_rate=nan',)),
  train('inf learning rate', '--config.optim.learning_rate=inf', expect=('learning_rate=inf',)),
  train('negative warmup', '--config.optim.warmup_steps=-1', expect=('warmup_steps=-1',)),
  train('unknown schedule', '--config.optim.schedule=cosin', expect=("'cosin'", 'cosine')),
  train('unknown remat', '--config.model.remat=fulll', expect=("'fulll'", 'dots_saveable')),
  train('heads do not divide', '--config.model.num_heads=3', expect=('num_heads=3',)),
  train('seq_len over rope max', '--config.model.max_seq_len=8', expect=('max_seq_len=8',)),
  train(
    'grad_accum does not divide batch',
    '--config.optim.grad_accum=3',
    expect=('batch_size=8', 'grad_accum=3'),
  ),
  train('mesh does not divide', '--config.mesh.tensor=3', expect=('tensor',)),
  train(
    'sequence axis does not split seq_len',
    '--config.mesh.data=1',
    '--config.mesh.sequence=8',
    '--config.seq_len=24',
    expect=('seq_len=24', 'mesh.sequence=8'),
  ),
  train(
    'kernel the platform lacks',
    '--config.model.attention_impl=splash',
    expect=('splash', 'TPU'),
  ),
  train(
    'more experts per token than experts',
    '--config.model.num_experts=4',
    '--config.model.experts_per_token=5',
    expect=('experts_per_token=5', 'num_experts=4'),
  ),
  train(
    'expert axis does not divide the experts',
    '--config.model.num_experts=6',
    '--config.mesh.data=2',
    '--config.mesh.expert=4',
    expect=('num_experts=6', 'expert=4'),
  ),
  train(
    'negative capacity factor',
    '--config.model.num_experts=4',
    '--config.model.capacity_factor=-1',
    expect=('capacity_factor=-1',),
  ),
  train(
    'MoE field on a dense model',
    '--config.model.num_shared_experts=1',
    expect=('num_shared_experts=1', 'num_experts=0'),
  ),
  train(
    'vocab smaller than tokenizer',
    '--config.data.dataset=shakespeare',
    '--config.data.tokenizer=',
    expect=('vocab_size=64', 'spm_vocab_size=2048'),
  ),
  train('init_from missing', '--config.init_from=/no/such/model', expect=('/no/such/model',)),
  # Data.
  train('zero synthetic sequences', '--config.data.synthetic_num_sequences=0', expect=('0',)),
  train(
    'misspelt dataset',
    '--config.data.dataset=shakespear',
    '--config.data.data_dir={T}/data',
    expect=('shakespear', 'shakespeare'),
  ),
  train(
    'text_files is a directory',
    '--config.data.dataset=text_files',
    '--config.data.text_files={T}',
    '--config.data.data_dir={T}/data',
    '--config.model.vocab_size=256',
    '--config.data.tokenizer=byte',
    expect=('/*.txt',),
  ),
  train(
    'text_files matches nothing',
    '--config.data.dataset=text_files',
    '--config.data.text_files={T}/none/*.txt',
    '--config.data.data_dir={T}/data',
    '--config.model.vocab_size=256',
    '--config.data.tokenizer=byte',
    expect=('none/*.txt',),
  ),
  train(
    'sft without files',
    '--config.data.dataset=sft',
    '--config.data.tokenizer=byte',
    '--config.model.vocab_size=256',
    expect=('data.train_files',),
  ),
  # Workdirs and checkpoints.
  train('workdir is a Hugging Face dir', expect=('Hugging Face', 'init_from'), workdir='{H}'),
  train('workdir is a params export', expect=('params export', 'init_from'), workdir='{E}'),
  train('workdir is a file', expect=('a file',), workdir='{T}/notes.txt'),
  train('workdir of other files', expect=('other files',), workdir='{T}'),
  train(
    'shape change',
    '--config.model.d_model=64',
    '--config.total_steps=6',
    expect=('d_model',),
    workdir='{W}',
  ),
  train(
    'resume on other data',
    '--config.data.synthetic_num_sequences=32',
    '--config.total_steps=6',
    expect=('resume_on_new_data',),
    workdir='{W}',
  ),
  train(
    'resume_step not saved',
    '--config.resume_step=5',
    '--config.total_steps=9',
    expect=('resume_step=5',),
    workdir='{W}',
  ),
  # Generation.
  Case('generate missing model', 'llm.generate', ('--workdir={T}/none', '--prompt=a'), ('none',)),
  Case('generate empty prompt', 'llm.generate', ('--workdir={W}', '--prompt='), ('--prompt',)),
  Case('generate no prompt', 'llm.generate', ('--workdir={W}',), ('--prompts_file',)),
  Case('negative temperature', 'llm.generate', (*GEN, '--temperature=-1'), ('temperature=-1',)),
  Case('top_p 0', 'llm.generate', (*GEN, '--top_p=0'), ('top_p=0',)),
  Case('top_k negative', 'llm.generate', (*GEN, '--top_k=-2'), ('top_k=-2',)),
  Case('max_new_tokens 0', 'llm.generate', (*GEN, '--max_new_tokens=0'), ('max_new_tokens=0',)),
  Case(
    'prompts file missing',
    'llm.generate',
    ('--workdir={W}', '--prompts_file={T}/p.jsonl'),
    ('p.jsonl',),
  ),
  Case(
    'tokenizer missing',
    'llm.generate',
    ('--workdir={W}', '--prompt=a', '--tokenizer={T}/t.model'),
    ('t.model',),
  ),
  Case('bad mesh flag', 'llm.generate', (*GEN, '--mesh=tensr=2'), ('tensr',)),
  # Conversion.
  Case('convert no command', 'llm.convert', (), ('import, params or export',)),
  Case(
    'convert import missing', 'llm.convert', ('import', '--hf_dir={T}/no', '--out={T}/o'), ('no',)
  ),
  Case(
    'convert import onto an export',
    'llm.convert',
    ('import', '--hf_dir={H}', '--out={E}'),
    ('already holds params',),
  ),
  Case('convert params without out', 'llm.convert', ('params', '--source={W}'), ('--out',)),
  Case(
    'convert export missing',
    'llm.convert',
    ('export', '--params={T}/no', '--hf_dir={T}/o'),
    ('no',),
  ),
  # Fill-mask.
  Case('fill_mask missing model', 'llm.fill_mask', ('--model={T}/no', '--text=a [MASK]'), ('no',)),
  Case('fill_mask no mask', 'llm.fill_mask', ('--model={B}', '--text=plain'), ('[MASK]',)),
  Case(
    'fill_mask top_k 0',
    'llm.fill_mask',
    ('--model={B}', '--text=a [MASK]', '--top_k=0'),
    ('top_k=0',),
  ),
  # Evaluation and compilation.
  Case('evaluate missing model', 'llm.evaluate', ('--workdir={T}/no',), ('no',)),
  Case(
    'evaluate task missing',
    'llm.evaluate',
    ('--workdir={W}', '--generation={T}/task.jsonl'),
    ('task.jsonl',),
  ),
  Case(
    'compile unknown preset', 'llm.compile', ('--config=experiments/synthetic.py:nope',), ('nope',)
  ),
  Case('compile bad topology', 'llm.compile', ('--config={C}', '--topology=v9z:1x1'), ('v9z',)),
  # Data preparation.
  Case(
    'prepare without text_files',
    'llm.data.prepare',
    ('--config=experiments/text_files.py', '--config.data.data_dir={T}/data'),
    ('data.text_files',),
  ),
]


def _snapshot(root: pathlib.Path) -> dict:
  """Every path below `root` with a digest of its bytes: what "left alone" compares."""
  out = {}
  for path in sorted(root.rglob('*')):
    rel = str(path.relative_to(root))
    out[rel] = hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else 'dir'
  return out


@pytest.fixture(scope='module')
def sources(tmp_path_factory):
  """A trained workdir, an export, HF directories and the tiny experiment, made once."""
  from llm.io import checkpoint, models

  root = tmp_path_factory.mktemp('sources')
  run = subprocess.run(
    [sys.executable, '-m', 'llm.train', f'--config={TINY}', f'--workdir={root}/W'],
    cwd=ROOT,
    capture_output=True,
    text=True,
    timeout=600,
  )
  assert run.returncode == 0, run.stderr
  source = models.open(str(root / 'W'))
  checkpoint.save_params(str(root / 'E'), source.model_cfg, source.read())
  shutil.copytree(FIXTURES / 'gpt2', root / 'H')
  shutil.copytree(FIXTURES / 'bert_tiny', root / 'B')
  return root


def _run(case: Case, sources: pathlib.Path, base: pathlib.Path):
  case_dir = base / case.id.replace(' ', '_')
  for name in ('W', 'E', 'H', 'B'):
    shutil.copytree(sources / name, case_dir / name)
  (case_dir / 'notes.txt').write_text('my notes\n')
  places = {k: str(case_dir / k) for k in ('W', 'E', 'H', 'B')}
  places.update(T=str(case_dir), C=str(TINY))
  args = [a.format(**places) for a in case.args]
  before = _snapshot(case_dir)
  run = subprocess.run(
    [sys.executable, '-m', case.module, *args],
    cwd=ROOT,
    capture_output=True,
    text=True,
    timeout=600,
    env={**os.environ, 'JAX_PLATFORMS': 'cpu'},
  )
  return run, before, _snapshot(case_dir)


@pytest.fixture(scope='module')
def results(sources, tmp_path_factory):
  base = tmp_path_factory.mktemp('cases')
  with concurrent.futures.ThreadPoolExecutor(2) as pool:
    futures = {c.id: pool.submit(_run, c, sources, base) for c in CASES}
    return {k: f.result() for k, f in futures.items()}


def test_the_table_covers_every_command():
  modules = {c.module for c in CASES}
  assert modules == {
    'llm.train',
    'llm.generate',
    'llm.convert',
    'llm.fill_mask',
    'llm.evaluate',
    'llm.compile',
    'llm.data.prepare',
  }
  assert len(CASES) >= 40
  assert len({c.id for c in CASES}) == len(CASES)


@pytest.mark.parametrize('case', CASES, ids=[c.id for c in CASES])
def test_fails_in_one_sentence_and_changes_nothing(case, results):
  run, before, after = results[case.id]
  shown = f'stdout:\n{run.stdout[-2000:]}\nstderr:\n{run.stderr[-3000:]}'
  assert run.returncode != 0, shown
  assert 'Traceback' not in run.stdout + run.stderr, shown
  last = run.stderr.strip().splitlines()[-1] if run.stderr.strip() else ''
  assert ' error: ' in last, shown
  for part in case.expect:
    assert part in last, f'{part!r} not in the error line {last!r}'
  assert after == before, 'the command changed files: ' + str(
    sorted(set(after.items()) ^ set(before.items()))
  )
