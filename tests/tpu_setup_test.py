"""tpu_setup/*.sh against a fake gcloud: the commands they run and babysit.sh's choices.

The fake (tests/fixtures/fake_gcloud/fake_gcloud.py) is first on PATH: it records each
call's arguments and plays back scripted answers (a queued resource's states, a node
preempted, the job's exit statuses), so no test reaches a real project or waits minutes.
"""

import contextlib
import json
import marshal
import os
import pathlib
import re
import shlex
import signal
import subprocess
import sys
import tarfile
import time

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
SCRIPTS = REPO / 'tpu_setup'
FAKE = REPO / 'tests' / 'fixtures' / 'fake_gcloud' / 'fake_gcloud.py'

# Settings a developer's shell may export; the tests start without them (and without
# $USER: the scripts must not need it).
SETTINGS = (
  'PROJECT',
  'ZONE',
  'TPU_NAME',
  'ACCELERATOR',
  'RUNTIME',
  'NUM_SLICES',
  'SPOT',
  'REPO_DIR',
  'COORDINATOR_PORT',
  'PYTHON',
  'DRY_RUN',
  'POLL_S',
  'MAX_RESTARTS',
  'KEEP_TPU',
  'CREATE_TIMEOUT_S',
  'CREATE_POLL_S',
  'LOG_SYNC_S',
  'USER',
  'LOGNAME',
)
NOT_FOUND = {'rc': 1, 'err': 'ERROR: (gcloud.compute.tpus.queued-resources.describe) NOT_FOUND'}
WORKDIR = 'gs://bucket/run'
STATUSES = f'{WORKDIR}/.tpu_setup/*.exit'


class Cloud:
  """A fake gcloud first on PATH: the answers it gives and the calls it got."""

  def __init__(self, tmp_path: pathlib.Path):
    self.tmp = tmp_path
    bin_dir = tmp_path / 'bin'
    bin_dir.mkdir()
    for program in ('gcloud', 'gsutil'):
      path = bin_dir / program
      path.write_text(f'#!/bin/sh\nexec {shlex.quote(sys.executable)} -S {FAKE} {program} "$@"\n')
      path.chmod(0o755)
    self.log = tmp_path / 'calls.jsonl'
    self.log.touch()
    self.script = tmp_path / 'answers.marshal'
    self.gcs = tmp_path / 'gcs'
    self.scp = tmp_path / 'scp'
    self.scp.mkdir()
    self.env = {k: v for k, v in os.environ.items() if k not in SETTINGS}
    self.env.update(
      PATH=f'{bin_dir}{os.pathsep}{os.environ["PATH"]}',
      FAKE_GCLOUD_LOG=str(self.log),
      FAKE_GCLOUD_SCRIPT=str(self.script),
      FAKE_GCS=str(self.gcs),
      FAKE_SCP_DIR=str(self.scp),
      TPU_NAME='llm-test',
      POLL_S='0',
      CREATE_POLL_S='0',
    )
    self.answer({})

  def answer(self, script: dict):
    """Sets the scripted answers; a TPU that exists, ACTIVE and READY, by default."""
    answers = {
      'compute tpus queued-resources describe': ['ACTIVE'],
      'compute tpus tpu-vm describe': ['READY'],
      **script,
    }
    self.script.write_bytes(marshal.dumps(answers))

  def run(self, script: str, *args: str, **settings: str) -> subprocess.CompletedProcess:
    env = {**self.env, **settings}
    for name in [k for k, v in settings.items() if v is None]:
      del env[name]
    return subprocess.run(
      ['bash', str(SCRIPTS / script), *args],
      env=env,
      cwd=self.tmp,
      capture_output=True,
      text=True,
      timeout=60,
    )

  def calls(self) -> list[list[str]]:
    """The argv of each gcloud call, in order (no script may call gsutil)."""
    records = [json.loads(line) for line in self.log.read_text().splitlines()]
    assert [r for r in records if r['program'] != 'gcloud'] == []
    return [r['argv'] for r in records]

  def labels(self) -> list[str]:
    return [label(argv) for argv in self.calls()]


def label(argv: list[str]) -> str:
  """A call in short: 'queued-resources create', 'storage cat', 'ssh launch'..."""
  words = [a for a in argv if not a.startswith('-')]
  if words[:2] == ['compute', 'tpus']:
    words = words[2:]
  if words[:2] == ['tpu-vm', 'ssh']:
    return 'ssh launch' if 'llm.train' in flag(argv, 'command') else 'ssh setup'
  return ' '.join(words[:2]).removeprefix('tpu-vm ')


def flag(argv: list[str], name: str) -> str | None:
  """The value of --name=VALUE in argv (None when absent)."""
  values = [a.split('=', 1)[1] for a in argv if a.startswith(f'--{name}=')]
  assert len(values) <= 1, argv
  return values[0] if values else None


def calls_labelled(cloud: Cloud, name: str) -> list[list[str]]:
  return [argv for argv in cloud.calls() if label(argv) == name]


@pytest.fixture
def cloud(tmp_path):
  return Cloud(tmp_path)


def test_create_queues_a_spot_resource_with_zone_and_project_each_one_argument(cloud):
  cloud.answer(
    {'compute tpus queued-resources describe': [NOT_FOUND, 'WAITING_FOR_RESOURCES', 'ACTIVE']}
  )
  result = cloud.run('create.sh', PROJECT='my project', ZONE='us central1-a', SPOT='1')
  assert result.returncode == 0, result.stderr
  assert (
    cloud.labels()
    == ['queued-resources describe', 'queued-resources create'] + ['queued-resources describe'] * 2
  )
  assert calls_labelled(cloud, 'queued-resources create') == [
    [
      'compute',
      'tpus',
      'queued-resources',
      'create',
      'llm-test',
      '--accelerator-type=v5litepod-16',
      '--runtime-version=v2-alpha-tpuv5-lite',
      '--spot',
      '--node-id=llm-test',
      '--zone=us central1-a',
      '--project=my project',
    ]
  ]
  for argv in cloud.calls():
    assert flag(argv, 'zone') == 'us central1-a' and flag(argv, 'project') == 'my project'


def test_create_takes_a_topology_and_many_slices(cloud):
  cloud.answer({'compute tpus queued-resources describe': [NOT_FOUND, 'ACTIVE']})
  result = cloud.run('create.sh', ACCELERATOR='v5p:8x8x8', NUM_SLICES='2')
  assert result.returncode == 0, result.stderr
  [create] = calls_labelled(cloud, 'queued-resources create')
  assert create[5:] == [
    '--accelerator-type=v5p-1024',
    '--runtime-version=v2-alpha-tpuv5',
    '--node-count=2',
    '--node-prefix=llm-test',
    '--zone=us-central1-a',
  ]


def test_create_stops_in_one_sentence_when_the_resource_failed(cloud):
  cloud.answer({'compute tpus queued-resources describe': [NOT_FOUND, 'ACCEPTED', 'FAILED']})
  result = cloud.run('create.sh')
  assert result.returncode == 1
  [line] = result.stderr.splitlines()
  assert line.startswith('tpu_setup/create.sh: error: queued resource llm-test is FAILED')
  assert 'delete.sh' in line
  assert cloud.labels().count('queued-resources describe') == 3  # No polling after FAILED.


def test_create_gives_up_after_its_timeout(cloud):
  cloud.answer({'compute tpus queued-resources describe': [NOT_FOUND, 'WAITING_FOR_RESOURCES']})
  start = time.monotonic()
  result = cloud.run('create.sh', CREATE_TIMEOUT_S='1', CREATE_POLL_S='0.2')
  assert time.monotonic() - start < 10
  assert result.returncode == 1
  assert 'is still WAITING_FOR_RESOURCES after 1 s' in result.stderr


def test_empty_settings_are_left_out_and_no_user_is_needed(cloud):
  result = cloud.run('delete.sh', PROJECT='', ZONE='', TPU_NAME=None)
  assert result.returncode == 0, result.stderr
  user = subprocess.run(['id', '-un'], capture_output=True, text=True).stdout.strip() or 'user'
  name = 'llm-' + re.sub('[^a-z0-9-]', '-', user.lower())
  assert cloud.calls() == [
    ['compute', 'tpus', 'queued-resources', 'delete', name, '--force', '--quiet']
  ]


def test_setup_ships_the_working_tree_to_every_worker_of_every_slice(cloud):
  result = cloud.run('setup.sh', NUM_SLICES='2', PROJECT='p')
  assert result.returncode == 0, result.stderr
  assert cloud.labels() == ['scp', 'scp', 'ssh setup', 'ssh setup']
  scps = calls_labelled(cloud, 'scp')
  assert sorted(argv[5] for argv in scps) == ['llm-test-0:repo.tar.gz', 'llm-test-1:repo.tar.gz']
  sshs = calls_labelled(cloud, 'ssh setup')
  assert sorted(argv[4] for argv in sshs) == ['llm-test-0', 'llm-test-1']
  for argv in scps + sshs:
    assert '--worker=all' in argv and flag(argv, 'project') == 'p'
  [command] = {flag(argv, 'command') for argv in sshs}
  assert 'python3.11 -m venv .venv' in command
  assert 'pip install -q -r requirements.txt -r requirements-tpu.txt' in command
  with tarfile.open(cloud.scp / 'repo.tar.gz') as archive:
    assert {'llm/train.py', 'requirements-tpu.txt'} <= set(archive.getnames())
    shipped = archive.extractfile('tpu_setup/setup.sh').read()
  assert shipped == (SCRIPTS / 'setup.sh').read_bytes()  # Committed or not.


@pytest.mark.parametrize('slices', ['1', '2'])
def test_setup_fails_naming_the_slice_where_ssh_failed(cloud, slices):
  failing = 'llm-test' if slices == '1' else 'llm-test-1'
  cloud.answer({f'compute tpus tpu-vm ssh {failing}': [{'rc': 255, 'err': 'ssh: timeout'}]})
  result = cloud.run('setup.sh', NUM_SLICES=slices)
  assert result.returncode == 1
  assert result.stderr.splitlines()[-1] == (
    f'tpu_setup/setup.sh: error: the command failed on {failing}.'
  )


def run_remotely(tmp_path: pathlib.Path, command: str) -> tuple[list[str], str]:
  """Runs an ssh --command as a worker's shell would, in a home with a checkout.

  Returns the arguments tpu_setup/worker.sh got there and JAX_COORDINATOR_PORT.
  """
  home = tmp_path / 'worker'
  (home / 'llm' / '.venv' / 'bin').mkdir(parents=True)
  (home / 'llm' / '.venv' / 'bin' / 'activate').write_text('')
  (home / 'llm' / 'tpu_setup').mkdir()
  (home / 'llm' / 'tpu_setup' / 'worker.sh').write_text(
    'echo "${JAX_COORDINATOR_PORT}" > port.txt\n'
    f'{shlex.quote(sys.executable)} -c '
    '\'import json, sys; json.dump(sys.argv[1:], open("argv.json", "w"))\' "$@"\n'
  )
  (home / 'llm' / 'a.py').write_text('')  # What an unquoted `*.py` would expand to.
  subprocess.run(['bash', '-c', command], cwd=home, env={**os.environ, 'HOME': str(home)})
  argv = json.loads((home / 'llm' / 'argv.json').read_text())
  return argv, (home / 'llm' / 'port.txt').read_text().strip()


def test_launch_starts_the_same_command_on_every_worker_each_argument_intact(cloud, tmp_path):
  pattern = '--config.data.text_files.pattern=/data/my corpus/*.txt'
  result = cloud.run(
    'launch.sh', 'synthetic:gpt2_124m', 'gs://bucket/my run/', pattern, '*.py', NUM_SLICES='2'
  )
  assert result.returncode == 0, result.stderr
  # The previous job's exit statuses go first: they would read as this job's.
  assert cloud.labels() == ['storage rm', 'ssh launch', 'ssh launch']
  assert cloud.calls()[0] == ['storage', 'rm', '--quiet', 'gs://bucket/my run/.tpu_setup/*.exit']
  sshs = calls_labelled(cloud, 'ssh launch')
  assert sorted(argv[4] for argv in sshs) == ['llm-test-0', 'llm-test-1']
  assert all('--worker=all' in argv for argv in sshs)
  [command] = {flag(argv, 'command') for argv in sshs}
  argv, port = run_remotely(tmp_path, command)
  assert port == '8482'
  assert argv == [
    'start',
    'gs://bucket/my run',
    'python',
    '-m',
    'llm.train',
    '--multihost',
    '--config=experiments/synthetic.py:gpt2_124m',
    '--workdir=gs://bucket/my run',
    pattern,
    '*.py',
  ]


def test_launch_takes_a_config_path_and_a_coordinator_port(cloud, tmp_path):
  result = cloud.run('launch.sh', 'experiments/tiny.py:x', WORKDIR, COORDINATOR_PORT='9999')
  assert result.returncode == 0, result.stderr
  [ssh] = calls_labelled(cloud, 'ssh launch')
  argv, port = run_remotely(tmp_path, flag(ssh, 'command'))
  assert port == '9999'
  assert '--config=experiments/tiny.py:x' in argv and f'--workdir={WORKDIR}' in argv


@pytest.mark.parametrize('script', ['launch.sh', 'babysit.sh'])
def test_a_workdir_the_workers_do_not_share_is_refused_before_any_command(cloud, script):
  result = cloud.run(script, 'synthetic', 'workdirs/run')
  assert result.returncode == 1
  assert 'WORKDIR must be a gs:// path' in result.stderr
  assert cloud.calls() == []


def wait_for(path_glob: str, root: pathlib.Path, text: str = '') -> pathlib.Path:
  """The first file under root matching path_glob (and holding text), within 10 s."""
  deadline = time.monotonic() + 10
  while time.monotonic() < deadline:
    for path in root.glob(path_glob):
      if text in path.read_text():
        return path
    time.sleep(0.05)
  raise AssertionError(f'no {path_glob} holding {text!r} under {root}')


JOB = """
import os, signal, sys, time
def on_term(signum, frame):
  print('saved; preempted', flush=True)
  sys.exit(75)
signal.signal(signal.SIGTERM, on_term)
open('job.pid.new', 'w').write(str(os.getpid()))
os.rename('job.pid.new', 'job.pid')
print('step 1', flush=True)
time.sleep(30)
"""


def test_worker_copies_the_log_and_the_exit_status_to_the_workdir(cloud):
  start = [str(SCRIPTS / 'worker.sh'), 'start', WORKDIR, sys.executable, '-c', JOB]
  env = {**cloud.env, 'LOG_SYNC_S': '0.1'}
  result = subprocess.run(['bash', *start], cwd=cloud.tmp, env=env, capture_output=True, text=True)
  assert result.returncode == 0 and 'started' in result.stdout, result.stderr
  pids = [int((cloud.tmp / 'worker.pid').read_text())]
  try:
    again = subprocess.run(['bash', *start], cwd=cloud.tmp, env=env, capture_output=True, text=True)
    assert 'still runs; left as it is' in again.stdout
    status_dir = cloud.gcs / 'bucket' / 'run' / '.tpu_setup'
    wait_for('*.log', status_dir, 'step 1')  # Copied while the job runs.
    pids.append(int(wait_for('job.pid', cloud.tmp).read_text()))
    # A preempted VM: every process gets SIGTERM; the job saves and exits 75.
    for pid in pids:
      os.kill(pid, signal.SIGTERM)
    assert wait_for('*.exit', status_dir, '\n').read_text() == '75\n'
    assert 'saved; preempted' in wait_for('*.log', status_dir, 'saved').read_text()
  finally:
    for pid in pids:
      with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)


LAUNCH = ['storage rm', 'ssh launch']
RECREATE = [
  'queued-resources delete',
  'queued-resources describe',
  'queued-resources create',
  'queued-resources describe',
  'scp',
  'ssh setup',
  *LAUNCH,
]


def babysit(cloud: Cloud, **settings: str) -> subprocess.CompletedProcess:
  return cloud.run('babysit.sh', 'synthetic', WORKDIR, '--config.total_steps=10', **settings)


@pytest.mark.parametrize('how', ['node PREEMPTED', 'queued resource SUSPENDED'])
def test_babysit_recreates_and_relaunches_a_preempted_tpu_then_stops_when_done(cloud, how):
  if how == 'node PREEMPTED':
    resource = ['ACTIVE', 'ACTIVE', NOT_FOUND, 'ACTIVE']
    nodes = ['READY', 'PREEMPTED', 'READY']
    preempted_poll = ['queued-resources describe', 'describe']
  else:
    resource = ['ACTIVE', 'SUSPENDED', NOT_FOUND, 'ACTIVE']
    nodes = ['READY']
    preempted_poll = ['queued-resources describe']
  cloud.answer(
    {
      'compute tpus queued-resources describe': resource,
      'compute tpus tpu-vm describe': nodes,
      f'storage cat {STATUSES}': ['0\n'],
    }
  )
  result = babysit(cloud)
  assert result.returncode == 0, result.stderr
  assert 'the job finished' in result.stdout
  first_poll = ['queued-resources describe', 'describe', *LAUNCH]
  last_poll = ['queued-resources describe', 'describe', 'storage cat']
  assert cloud.labels() == [
    *first_poll,
    *preempted_poll,
    *RECREATE,
    *last_poll,
    'queued-resources delete',  # Done: the TPU is not left up and billed.
  ]
  first, again = [flag(argv, 'command') for argv in calls_labelled(cloud, 'ssh launch')]
  assert first == again  # The same workdir and arguments: training resumes.
  assert f'--workdir={WORKDIR} --config.total_steps=10' in first


def test_babysit_relaunches_after_exit_status_75_without_recreating(cloud):
  cloud.answer({f'storage cat {STATUSES}': ['75\n75\n', '0\n0\n']})
  result = babysit(cloud)
  assert result.returncode == 0, result.stderr
  assert 'exited 75' in result.stdout
  status_poll = ['queued-resources describe', 'describe', 'storage cat']
  assert cloud.labels() == [
    *['queued-resources describe', 'describe', *LAUNCH],
    *status_poll,
    *LAUNCH,
    *status_poll,
    'queued-resources delete',
  ]


@pytest.mark.parametrize(
  'statuses, keep',
  [('1\n', '0'), ('0\n137\n', '0'), ('75\n2\n', '1')],  # One line per worker.
)
def test_babysit_stops_when_the_job_crashed(cloud, statuses, keep):
  cloud.answer({f'storage cat {STATUSES}': [statuses]})
  result = babysit(cloud, KEEP_TPU=keep)
  assert result.returncode == 1
  code = [s for s in statuses.split() if s not in ('0', '75')][0]
  assert result.stderr.splitlines()[-1].startswith(
    f'tpu_setup/babysit.sh: error: the job crashed with exit status {code}; not relaunched.'
  )
  labels = cloud.labels()
  assert labels.count('ssh launch') == 1
  assert labels[-1] == ('storage cat' if keep == '1' else 'queued-resources delete')


def test_babysit_gives_up_after_max_restarts(cloud):
  cloud.answer({f'storage cat {STATUSES}': ['75\n']})
  result = babysit(cloud, MAX_RESTARTS='2')
  assert result.returncode == 1
  assert 'relaunched or recreated 2 times (MAX_RESTARTS); stopping.' in result.stderr
  labels = cloud.labels()
  assert labels.count('ssh launch') == 3
  assert labels[-1] == 'queued-resources delete'


def test_babysit_stops_retrying_a_launch_that_keeps_failing(cloud):
  cloud.answer({'compute tpus tpu-vm ssh': [{'rc': 255, 'err': 'ssh: connection refused'}]})
  result = babysit(cloud, MAX_RESTARTS='1')
  assert result.returncode == 1
  assert 'launch failed; retrying at the next poll' in result.stdout
  assert cloud.labels().count('ssh launch') == 2


def test_babysit_creates_a_missing_tpu_and_waits_out_errors(cloud):
  network = {'rc': 1, 'err': 'ERROR: (gcloud) There was a problem refreshing your credentials'}
  cloud.answer(
    {
      'compute tpus queued-resources describe': [NOT_FOUND, NOT_FOUND, 'ACTIVE', network, 'ACTIVE'],
      f'storage cat {STATUSES}': ['0\n'],
    }
  )
  result = babysit(cloud)
  assert result.returncode == 0, result.stderr
  # An error that is not NOT_FOUND only waits: it deletes nothing.
  assert cloud.labels() == [
    'queued-resources describe',
    *RECREATE,
    'queued-resources describe',
    'queued-resources describe',
    'describe',
    'storage cat',
    'queued-resources delete',
  ]


@pytest.mark.parametrize(
  'script, args, expected',
  [
    (
      'create.sh',
      [],
      ['queued-resources describe', 'queued-resources create', 'queued-resources describe'],
    ),
    ('setup.sh', [], ['scp', 'ssh setup']),
    ('launch.sh', ['synthetic', WORKDIR], LAUNCH),
    ('babysit.sh', ['synthetic', WORKDIR], ['queued-resources describe', 'describe', *LAUNCH]),
    ('delete.sh', [], ['queued-resources delete']),
  ],
)
def test_dry_run_prints_each_gcloud_command_and_runs_none(cloud, script, args, expected):
  result = cloud.run(script, *args, DRY_RUN='1', PROJECT='my project', SPOT='1')
  assert result.returncode == 0, result.stderr
  assert cloud.calls() == []
  printed = [shlex.split(line) for line in result.stdout.splitlines() if line.startswith('gcloud ')]
  assert all(argv[0] == 'gcloud' for argv in printed)
  assert [label(argv[1:]) for argv in printed] == expected
  for argv in printed:
    if argv[1] == 'compute':
      assert '--project=my project' in argv
  if script == 'create.sh':
    assert '--spot' in printed[1]


def test_the_readme_shows_the_commands_the_scripts_run(cloud):
  readme = (REPO / 'README.md').read_text()
  section = readme[readme.index('## Cloud TPU') :].split('\n## ')[0]
  shown = [line for line in section.splitlines() if line.startswith('gcloud ')]
  settings = {'TPU_NAME': 'my-run', 'PROJECT': 'my-project', 'SPOT': '1', 'DRY_RUN': '1'}
  printed = []
  for script, args in [
    ('create.sh', []),
    ('launch.sh', ['synthetic:gpt2_124m', 'gs://my-bucket/gpt2', '--config.total_steps=20000']),
    ('delete.sh', []),
  ]:
    result = cloud.run(script, *args, **settings, ZONE='us-central1-a')
    printed += [line for line in result.stdout.splitlines() if line.startswith('gcloud ')]
  assert len(shown) == 3
  for line in shown:
    assert line in printed


@pytest.mark.parametrize(
  'accelerator, topology',
  [
    ('v5litepod-16', 'v5e:4x4'),
    ('v5litepod-256', 'v5e:16x16'),
    ('v6e-8', 'v6e:2x4'),
    ('v5p-8', 'v5p:2x2x1'),
    ('v5p-1024', 'v5p:8x8x8'),
    ('v4-32', 'v4:2x2x4'),
  ],
)
def test_topology_translates_both_ways(cloud, accelerator, topology):
  assert cloud.run('topology.sh', accelerator).stdout == f'{topology}\n'
  assert cloud.run('topology.sh', topology).stdout == f'{accelerator}\n'


def test_an_unknown_size_is_one_sentence(cloud):
  result = cloud.run('topology.sh', 'v5p-6')
  assert result.returncode == 1
  assert result.stderr == (
    'tpu_setup/topology.sh: error: no topology known for v5p-6; the table in'
    ' tpu_setup/env.sh lists the common sizes.\n'
  )
