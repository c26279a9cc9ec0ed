"""Task files in, results out: what `python -m llm.evaluate` reads and writes.

Results go to DIR/eval/step_<step>/ (an export or a Hugging Face directory:
DIR/eval/): `summary.json` with the step and every metric, and one
`<task>.jsonl` of per-example outputs per task.
"""

import json
import os

import jax

from llm.data import jsonl


def read_jsonl(path: str, fields: dict[str, type | tuple]) -> list[dict]:
  """Rows of a JSON-lines task file; stops on the first row lacking a field of the right type."""
  rows = []
  for where, row in jsonl.read(path):
    for name, kind in fields.items():
      jsonl.field(row, where, name, kind)
    rows.append(row)
  return rows


def results_dir(path: str, step: int | None) -> str:
  """Where results of `path`'s checkpoint go: DIR/eval/step_<step>, or DIR/eval for an export."""
  return os.path.join(path, 'eval', f'step_{step}' if step is not None else '')


def write_results(directory: str, summary: dict, per_example: dict[str, list[dict]]) -> None:
  """summary.json plus <task>.jsonl per task; only process 0 writes."""
  if jax.process_index() != 0:
    return
  os.makedirs(directory, exist_ok=True)
  for name, rows in per_example.items():
    with open(os.path.join(directory, f'{name}.jsonl'), 'w') as f:
      f.writelines(json.dumps(r) + '\n' for r in rows)
  tmp = os.path.join(directory, 'summary.json.tmp')
  with open(tmp, 'w') as f:
    json.dump(summary, f, indent=2)
  os.replace(tmp, os.path.join(directory, 'summary.json'))


def task_name(path: str) -> str:
  name = os.path.basename(path)
  return name[: -len('.jsonl')] if name.endswith('.jsonl') else name
