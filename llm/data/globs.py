"""What the data settings' file globs name, told apart from what they meant to name.

`data.text_files`, `data.train_files` and `data.eval_files` are globs; a
directory given instead of a glob would match nothing, so it is caught here
with the glob that was meant. A corpus's listing (each file's size and
modification time) is what says whether it changed since it was prepared.
"""

import hashlib
import json
import os

from etils import epath

WILDCARDS = '*?['


def check_not_directory(key: str, pattern: str, suffix: str) -> None:
  """Stops when the glob `pattern` of `data.{key}` is a directory, suggesting globs of its files."""
  if any(c in pattern for c in WILDCARDS) or not epath.Path(pattern).is_dir():
    return
  base = pattern.rstrip('/')
  raise ValueError(
    f'data.{key}={pattern!r} is a directory, not a glob of files; set it to '
    f"'{base}/*{suffix}' or, with its subdirectories, '{base}/**/*{suffix}'."
  )


def key(path) -> str:
  """The path as a listing names it: absolute when local, whatever the working directory."""
  text = str(path)
  return text if '://' in text else os.path.abspath(text)


def listing(paths) -> dict[str, list[int]]:
  """{path: [size in bytes, modification time in whole seconds]} of each file."""
  out = {}
  for path in paths:
    stat = epath.Path(path).stat()
    out[key(path)] = [int(stat.length), int(stat.mtime)]
  return out


def modified(path) -> float:
  """When the file was last modified, to the nanosecond where the filesystem says so."""
  text = str(path)
  return float(epath.Path(text).stat().mtime) if '://' in text else os.stat(text).st_mtime_ns / 1e9


def digest(value) -> str:
  """The sha256 (hex) of a JSON-serialisable value, the same on every machine."""
  return hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()


def changes(old: dict, new: dict) -> str:
  """'2 files added, 1 modified, 0 removed' between two listings."""
  added = len(new.keys() - old.keys())
  removed = len(old.keys() - new.keys())
  modified = sum(old[k] != new[k] for k in old.keys() & new.keys())
  return f'{added} file{"" if added == 1 else "s"} added, {modified} modified, {removed} removed'
