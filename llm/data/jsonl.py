"""JSON-lines files: every reader of task, prompt and fine-tuning files goes through here,
so a bad line always stops with the same kind of sentence, naming its file and line."""

import json

from etils import epath


def read(paths, kinds: tuple[type, ...] = (dict,)) -> list[tuple[str, object]]:
  """('file:line', record) for every non-blank line of `paths` (local or gs://).

  Stops on a line that is not JSON or whose value is not one of `kinds`
  (objects only, by default), and on files that hold no records at all.
  """
  paths = [paths] if isinstance(paths, (str, epath.Path)) else paths
  records = []
  for path in paths:
    for n, line in enumerate(epath.Path(path).read_text().splitlines(), 1):
      if not line.strip():
        continue
      try:
        record = json.loads(line)
      except json.JSONDecodeError as e:
        raise ValueError(f'{path}:{n} is not valid JSON ({e.msg}).') from None
      if not isinstance(record, kinds):
        valid = ' or '.join('an object' if k is dict else f'a {k.__name__}' for k in kinds)
        raise ValueError(f'{path}:{n} is a JSON {type(record).__name__}, not {valid}.')
      records.append((f'{path}:{n}', record))
  if not records:
    raise ValueError(f'{", ".join(map(str, paths))} hold no records.')
  return records


def field(record: dict, where: str, name: str, kind: type | tuple[type, ...] = str):
  """record[name], which must be of type `kind`; stops naming the file, line and field."""
  if name not in record:
    raise ValueError(f'{where} lacks the field {name!r} (it has {", ".join(sorted(record))}).')
  value = record[name]
  if not isinstance(value, kind):
    kinds = kind if isinstance(kind, tuple) else (kind,)
    raise ValueError(
      f'{where}: the field {name!r} is {value!r}, not a {" or ".join(k.__name__ for k in kinds)}.'
    )
  return value
