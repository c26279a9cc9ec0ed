r"""Supervised fine-tuning data: prompt/response and chat examples, packed rows, loss on responses.

Each line of a JSON-lines file is either {"prompt": ..., "response": ...} or
{"messages": [{"role": "system"|"user"|"assistant", "content": ...}, ...]}.
A prompt/response pair is the chat of one user turn and one assistant turn.
A chat is rendered with this template (here `<bos>`/`<eos>` are the
tokenizer's ids, everything else is text):

  <bos><|system|>\n{system}\n<|user|>\n{user}\n<|assistant|>\n{assistant}<eos><|user|>\n...

that is, a system or user turn is `<|{role}|>\n{content}\n`, and an
assistant turn is the header `<|assistant|>\n` followed by its content and
eos. The loss is on every assistant turn's content and its eos, never on
the headers, system or user text: a model fine-tuned this way answers
`render_prompt(question)` (`<|user|>\n{question}\n<|assistant|>\n`) and ends
its answer with eos, where generation stops.

The text between two assistant contents is tokenized as one string, and each
assistant content on its own, so a prompt tokenizes the same way whatever
follows it. Rows are the pretraining layout (inputs, targets, segment_ids,
positions, loss_mask) with `loss_mask` 1 exactly on targets that are
response tokens. Examples are packed first-fit into the rows of a batch
(grain's FirstFitPackIterDataset), each its own segment with positions from
0; an example never splits across rows, and what a row has left is padding.
An example longer than seq_len + 1 tokens follows `data.truncation` (see
`llm/data/examples.py`); one left without any response token stops the run.
"""

import functools

import grain
import numpy as np

from llm.data import examples as examples_lib
from llm.data import jsonl, pipeline
from llm.data.spec import Stream

ROLES = ('system', 'user', 'assistant')
_SEQUENCES = ('inputs', 'targets', 'loss_mask')


def render_prompt(prompt: str) -> str:
  """The text a model fine-tuned on prompt/response pairs continues with its response."""
  return f'<|user|>\n{prompt}\n<|assistant|>\n'


def messages(record: dict, where: str) -> list[dict]:
  """The chat of a record: its `messages`, or its prompt/response as two turns."""
  if 'messages' not in record:
    if 'prompt' not in record and 'response' not in record:
      raise ValueError(
        f"{where} lacks the field 'messages', or 'prompt' and 'response' "
        f'(it has {", ".join(sorted(record))}).'
      )
    prompt = jsonl.field(record, where, 'prompt')
    response = jsonl.field(record, where, 'response')
    return [{'role': 'user', 'content': prompt}, {'role': 'assistant', 'content': response}]
  turns = jsonl.field(record, where, 'messages', list)
  for i, turn in enumerate(turns):
    if not isinstance(turn, dict):
      raise ValueError(f'{where}: messages[{i}] is {turn!r}, not an object with role and content.')
    role = jsonl.field(turn, f'{where}: messages[{i}]', 'role')
    jsonl.field(turn, f'{where}: messages[{i}]', 'content')
    if role not in ROLES:
      raise ValueError(f'{where}: messages[{i}] has role {role!r}, not one of {", ".join(ROLES)}.')
  if not any(t['role'] == 'assistant' for t in turns):
    raise ValueError(f'{where} has no assistant turn, so nothing to learn from.')
  return turns


def encode(turns: list[dict], tok) -> tuple[np.ndarray, np.ndarray]:
  """(tokens, is_response): the rendered chat's ids with bos, and 1 on assistant ids and eos."""
  ids, roles, prompt = [tok.bos_id], [0], ''
  for turn in turns:
    if turn['role'] != 'assistant':
      prompt += f'<|{turn["role"]}|>\n{turn["content"]}\n'
      continue
    prompt += '<|assistant|>\n'
    prompt_ids = tok.encode(prompt)
    response_ids = [*tok.encode(turn['content']), tok.eos_id]
    ids += [*prompt_ids, *response_ids]
    roles += [0] * len(prompt_ids) + [1] * len(response_ids)
    prompt = ''
  if prompt:
    prompt_ids = tok.encode(prompt)  # A trailing user turn: context for nothing, but kept.
    ids += prompt_ids
    roles += [0] * len(prompt_ids)
  return np.asarray(ids, np.int32), np.asarray(roles, np.float32)


def example(record: dict, where: str, tok, *, seq_len: int, truncation: str) -> dict | None:
  """One example's inputs, targets and loss_mask (each <= seq_len long); None if dropped."""
  tokens, is_response = encode(messages(record, where), tok)
  kept = examples_lib.fit(
    {'tokens': tokens, 'is_response': is_response},
    seq_len,
    truncation,
    where,
    'the example',
    extra=1,
  )
  if kept is None:
    return None
  tokens, is_response = kept['tokens'], kept['is_response']
  if not is_response[1:].any():
    raise ValueError(
      f'{where}: after data.truncation={truncation!r} to seq_len={seq_len} no response token '
      "is left; raise seq_len or use data.truncation='left'."
    )
  return {'inputs': tokens[:-1], 'targets': tokens[1:], 'loss_mask': is_response[1:]}


def _pack(it: grain.IterDataset, *, seq_len: int, rows: int) -> grain.IterDataset:
  packed = grain.experimental.FirstFitPackIterDataset(
    it,
    length_struct={k: seq_len for k in _SEQUENCES},
    num_packing_bins=rows,
    shuffle_bins=False,
  )
  return packed.map(_row)


def _row(packed: dict) -> dict:
  return {
    'inputs': packed['inputs'],
    'targets': packed['targets'],
    'segment_ids': packed['inputs_segment_ids'],
    'positions': packed['inputs_positions'],
    'loss_mask': packed['loss_mask'].astype(np.float32),
  }


def make_iterator(stream: Stream, *, vocab_size: int | None = None) -> pipeline.Iterator:
  """This host's batches of packed SFT rows of `stream`."""
  d = stream.data
  examples_lib.files(d, stream.split)  # Missing files are the first thing to fix.
  tok = examples_lib.load_tokenizer(d, vocab_size)
  make = functools.partial(example, tok=tok, seq_len=stream.seq_len, truncation=d.truncation)
  return examples_lib.batches(
    examples_lib.load(d, stream.split, stream.seq_len, make),
    stream,
    pack=lambda it: _pack(it, seq_len=stream.seq_len, rows=stream.rows),
  )
