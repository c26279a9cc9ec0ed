"""The package's shape: one-way floors, no cycles, nothing from outside `llm/`, small units.

Read from the source with `ast`, imports inside functions included: a late
import is still a dependency. The floors, bottom to top (docs/architecture.md):

  config -> sharding -> model -> losses -> data -> io -> {training, inference} -> mains

A module may import its own floor and those below. Training and inference are
peers on one floor: neither imports the other; what both need lives lower
(the loss, the data streams, the model sources).
"""

import ast
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
LLM = ROOT / 'llm'

# (floor, group, module prefixes); the longest matching prefix decides.
FLOORS = [
  (0, 'config', ('llm', 'llm.config')),
  (1, 'sharding', ('llm.sharding',)),
  (2, 'model', ('llm.model', 'llm.optim')),
  (3, 'losses', ('llm.losses',)),
  (4, 'data', ('llm.data',)),
  (5, 'io', ('llm.io', 'llm.convert', 'llm.metrics')),
  (6, 'training', ('llm.train', 'llm.resume', 'llm.finetune', 'llm.preemption', 'llm.compile')),
  (6, 'inference', ('llm.eval', 'llm.generate', 'llm.fill_mask')),
  (7, 'mains', ('llm.evaluate',)),
]
MAX_MODULE_LINES = 500
MAX_FUNCTION_LINES = 80


def module_name(path: pathlib.Path, root: pathlib.Path = ROOT) -> str:
  parts = path.relative_to(root).with_suffix('').parts
  return '.'.join(parts[:-1] if parts[-1] == '__init__' else parts)


MODULES = {module_name(p): p for p in sorted(LLM.rglob('*.py'))}


def imports(path: pathlib.Path) -> set[str]:
  """Every module `path` imports (absolute names), wherever the import statement is.

  `from P import x` imports the module P.x when there is one (P's __init__ is
  then only the way in, not a dependency), else the module P.
  """
  found = set()
  for node in ast.walk(ast.parse(path.read_text())):
    if isinstance(node, ast.Import):
      found |= {alias.name for alias in node.names}
    elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
      for alias in node.names:
        submodule = f'{node.module}.{alias.name}'
        found.add(submodule if submodule in MODULES else node.module)
  return found


def project_imports(name: str) -> set[str]:
  """The llm modules that module `name` imports."""
  return {i for i in imports(MODULES[name]) if i in MODULES and i != name}


def floor_of(name: str) -> tuple[int, str]:
  matches = [
    (len(prefix), floor, group)
    for floor, group, prefixes in FLOORS
    for prefix in prefixes
    if name == prefix or name.startswith(prefix + '.')
  ]
  assert matches, f'{name} is on no floor; add it to FLOORS and docs/architecture.md.'
  _, floor, group = max(matches)
  return floor, group


def test_every_module_is_on_a_floor():
  for name in MODULES:
    floor_of(name)


def test_nothing_outside_the_package_is_imported():
  for name, path in MODULES.items():
    outside = {i for i in imports(path) if i.split('.')[0] in ('experiments', 'bench', 'tests')}
    assert not outside, f'{name} imports {sorted(outside)}'


def test_imports_only_point_down_and_training_and_inference_stay_apart():
  for name in MODULES:
    floor, group = floor_of(name)
    for target in project_imports(name):
      if target == 'llm':
        continue
      t_floor, t_group = floor_of(target)
      assert t_floor <= floor, f'{name} ({group}) imports {target} ({t_group}), a floor above.'
      peers = {group, t_group} == {'training', 'inference'}
      assert not peers, f'{name} ({group}) imports {target} ({t_group}): keep them apart.'


def test_no_import_cycles():
  graph = {name: project_imports(name) - {'llm'} for name in MODULES}
  state: dict[str, int] = {}  # 1: on the current path, 2: done.

  def visit(name, path):
    state[name] = 1
    for target in sorted(graph[name]):
      if state.get(target) == 1:
        cycle = path[path.index(target) :] + [target]
        pytest.fail('Import cycle: ' + ' -> '.join(cycle))
      if target not in state:
        visit(target, [*path, target])
    state[name] = 2

  for name in sorted(graph):
    if name not in state:
      visit(name, [name])


def test_the_structure_test_sees_a_cycle_and_an_upward_import(tmp_path, monkeypatch):
  """The checks above must be able to fail: a fake package with both faults."""
  pkg = tmp_path / 'llm'
  pkg.mkdir()
  (pkg / '__init__.py').write_text('')
  (pkg / 'config.py').write_text('from llm import train\n')
  (pkg / 'train.py').write_text('def f():\n  from llm import config\n')
  monkeypatch.setitem(
    globals(), 'MODULES', {module_name(p, tmp_path): p for p in pkg.rglob('*.py')}
  )
  with pytest.raises(AssertionError, match='a floor above'):
    test_imports_only_point_down_and_training_and_inference_stay_apart()
  with pytest.raises(pytest.fail.Exception, match='Import cycle'):
    test_no_import_cycles()


def test_modules_and_functions_are_small():
  long_modules = {
    name: n
    for name, path in MODULES.items()
    if (n := len(path.read_text().splitlines())) > MAX_MODULE_LINES
  }
  assert not long_modules, f'Modules over {MAX_MODULE_LINES} lines: {long_modules}'
  long_functions = []
  for name, path in MODULES.items():
    for node in ast.walk(ast.parse(path.read_text())):
      if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
        n = node.end_lineno - node.lineno + 1
        if n > MAX_FUNCTION_LINES:
          long_functions.append(f'{name}.{node.name} ({n})')
  assert not long_functions, f'Functions over {MAX_FUNCTION_LINES} lines: {long_functions}'
