"""Sequence classification data: JSON lines of text and label, one padded example per row.

Each line is {"text": ..., "label": ...}, optionally with "text_pair" (a
second text, as in entailment or paraphrase tasks). `label` is one of the
names in `data.labels` (comma-separated, e.g. 'negative,positive'; a number
in the file matches the name it is written as); its index in that list is
the class id, and `model.num_labels` must equal the number of names.

A row is `[bos] text [eos]`, or `[bos] text [eos] text_pair [eos]`, then
padding (segment id 0): with a BERT tokenizer `[CLS] a [SEP] b [SEP]`.
Batches hold, per row:
  inputs, segment_ids, positions   [B, T] as in pretraining (one segment);
  token_types                      [B, T] 0 up to the first eos, 1 after
                                   (only for a model with token types);
  targets, loss_mask               [B, 1] the class id, and 1 (0 on the
                                   all-padding rows of a short final batch);
  logits_index                     [B] the position the classifier reads:
                                   0 (bos, BERT's [CLS]) for an encoder, the
                                   last eos for a decoder, the one token that
                                   has seen the whole text.
A text longer than seq_len follows `data.truncation` (`llm/data/examples.py`):
'right' keeps its start, 'left' its end (after bos); a pair is cut as one
sequence.
"""

import numpy as np

from llm.data import examples as examples_lib
from llm.data import jsonl, pipeline
from llm.data.spec import Stream


def label_names(data_config) -> list[str]:
  """The class names of `data.labels`, in class-id order."""
  names = [s.strip() for s in data_config.labels.split(',') if s.strip()]
  if len(names) < 2 or len(set(names)) != len(names):
    raise ValueError(
      f'data.labels={data_config.labels!r} must name at least 2 distinct classes, comma-separated, '
      "e.g. 'negative,positive'."
    )
  return names


def check_num_labels(data_config, num_labels: int) -> None:
  names = label_names(data_config)
  if num_labels != len(names):
    raise ValueError(
      f'model.num_labels={num_labels} differs from the {len(names)} classes of data.labels '
      f'({", ".join(names)}); set model.num_labels={len(names)}.'
    )


def example(record, where, tok, *, labels: dict, seq_len: int, truncation: str) -> dict | None:
  """One example's tokens, token types and class id; None if dropped."""
  text = jsonl.field(record, where, 'text')
  label = record.get('label')
  if 'label' not in record:
    jsonl.field(record, where, 'label')  # Raises, naming the fields there are.
  if isinstance(label, bool) or not isinstance(label, (str, int)) or str(label) not in labels:
    raise ValueError(
      f'{where} has the label {label!r}, which is not in data.labels ({", ".join(labels)}).'
    )
  tokens = [tok.bos_id, *tok.encode(text), tok.eos_id]
  types = [0] * len(tokens)
  if 'text_pair' in record:
    pair = [*tok.encode(jsonl.field(record, where, 'text_pair')), tok.eos_id]
    tokens += pair
    types += [1] * len(pair)
  kept = examples_lib.fit(
    {'tokens': np.asarray(tokens, np.int32), 'types': np.asarray(types, np.int32)},
    seq_len,
    truncation,
    where,
    'the text',
  )
  if kept is None:
    return None
  return {**kept, 'label': np.int32(labels[str(label)])}


def row(ex: dict, *, seq_len: int, causal: bool, token_types: bool) -> dict:
  """One padded row (see the module docstring)."""
  n = len(ex['tokens'])
  pad = (0, seq_len - n)
  out = {
    'inputs': np.pad(ex['tokens'], pad),
    'segment_ids': np.pad(np.ones(n, np.int32), pad),
    'positions': np.pad(np.arange(n, dtype=np.int32), pad),
    'targets': np.asarray([ex['label']], np.int32),
    'loss_mask': np.ones((1,), np.float32),
    'logits_index': np.int32(n - 1 if causal else 0),
  }
  if token_types:
    out['token_types'] = np.pad(ex['types'], pad)
  return out


def make_iterator(
  stream: Stream, *, vocab_size: int | None = None, causal: bool = True, token_types: bool = False
) -> pipeline.Iterator:
  """This host's batches of classification rows of `stream`.

  The model decides `causal` (where the classifier reads) and `token_types`
  (whether it has token-type embeddings).
  """
  d = stream.data
  examples_lib.files(d, stream.split)  # Missing files are the first thing to fix.
  tok = examples_lib.load_tokenizer(d, vocab_size)
  labels = {name: i for i, name in enumerate(label_names(d))}

  def make(record, where):
    kept = example(
      record, where, tok, labels=labels, seq_len=stream.seq_len, truncation=d.truncation
    )
    if kept is None:
      return None
    return row(kept, seq_len=stream.seq_len, causal=causal, token_types=token_types)

  return examples_lib.batches(
    examples_lib.load(d, stream.split, stream.seq_len, make), stream, labels=d.labels
  )
