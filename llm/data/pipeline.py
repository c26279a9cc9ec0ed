"""Batches of packed token rows from a prepared dataset, with grain; resumable exactly.

The stream, per host:

  this host's contiguous slice of the split's documents (hosts never overlap;
  a finite stream on several hosts is the exception, see `build`)
  -> shuffled with `seed`, reshuffled every epoch   (grain.MapDataset)
  -> tokenized: [bos] + text + [eos]; inputs = all but the last id, targets =
     all but the first, so every target is the next id of its own document
  -> concatenated and cut into rows of seq_len       (ConcatThenSplitIterDataset)
  -> rows_per_host rows per batch; a short last batch is padded with empty rows
  -> prefetched by a background thread (or worker processes)

Masked language modelling (data.objective='mlm', see llm/data/mlm.py): a
document is [bos] + text + [eos] with inputs = targets = those ids (bos and
eos play BERT's [CLS] and [SEP]); each packed row is then masked, with a
generator seeded by (seed, host, row number), and loss_mask marks only the
chosen tokens.

Row layout. Documents follow each other in a row; `segment_ids` number them
1, 2, ... (0 is padding) and `positions` restart at 0 at each, so attention
and the loss never cross documents. A document longer than what is left of a
row continues at the start of the next row, as a new segment with positions
from 0: nothing is dropped, and only the last row of a finite stream is
padded. `loss_mask` is 1 exactly where a segment is (the targets never leave
their document), 0 on padding. Padding ids are 0, the pad id of every
tokenizer here.

State. The iterator's state is a small dict (a few integers: documents read,
the split point of the current document, rows emitted since) plus the
settings that define the stream; restoring it continues with exactly the
batches an uninterrupted iterator would have produced. It is only valid for
the same dataset, split, seed, batch size, sequence length and host layout.
"""

import ast
import functools
import weakref

import grain
import numpy as np
from absl import flags

from llm.data import mlm, sources, tokenizer
from llm.data.spec import Stream

_PACKED = ('inputs', 'targets')


def make_iterator(stream: Stream, *, vocab_size: int | None = None) -> 'Iterator':
  """This host's part of each global batch of a corpus stream (see the module docstring).

  `vocab_size`: the model's vocabulary, checked to hold every token id.
  """
  data_config = stream.data
  objective = mlm.objective(data_config)
  if objective == 'mlm':
    mlm.check(data_config)
  check_reading(data_config)
  sources.builder(data_config)  # A misspelt dataset or glob is the first thing to fix.
  if not data_config.tokenizer:
    tokenizer.check_trainable(data_config, vocab_size)
  tok = tokenizer.load(data_config, train_if_missing=stream.prepare)
  tokenizer.check_fits(tok, vocab_size)
  masking = mlm.settings(data_config, tok) if objective == 'mlm' else None
  if masking is not None and vocab_size is not None:
    mlm.check_vocab(vocab_size, masking)
  split = {'train': data_config.train_split, 'validation': data_config.eval_split}.get(
    stream.split, stream.split
  )
  prepare = stream.prepare and stream.process_count == 1
  source = sources.data_source(data_config, split, allow_prepare=prepare)
  dataset = build(
    source,
    tok,
    field=sources.text_feature(data_config),
    stream=stream,
    read_threads=data_config.read_threads,
    prefetch_batches=data_config.prefetch_batches,
    worker_count=data_config.worker_count,
    masking=masking,
  )
  state_keys = dict(stream.state_keys(), split=split)
  if masking is not None:
    # Only here, so that LM states saved before the objective existed still resume.
    state_keys['objective'] = objective
  return Iterator(dataset, state_keys, copy=data_config.worker_count > 0)


_READING = {
  'read_threads': 'threads reading documents; 0 reads them in the thread that asks',
  'prefetch_batches': 'batches made ahead; 0 makes each when asked',
  'worker_count': 'worker processes; 0 uses threads only',
}


def check_reading(data_config) -> None:
  """Stops on reading settings grain would reject later, or silently misread (workers < 0)."""
  for name, meaning in _READING.items():
    value = data_config[name]
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
      raise ValueError(f'data.{name}={value!r} must be a whole number >= 0 ({meaning}).')


def host_range(n: int, stream: Stream, what: str = 'documents') -> tuple[int, int]:
  """The records [lo, hi) of `n` this host reads: its contiguous slice, or all (`stream.whole`)."""
  if stream.whole:
    return 0, n
  i, count = stream.process_index, stream.process_count
  lo, hi = i * n // count, (i + 1) * n // count
  if hi <= lo:
    raise ValueError(f'Host {i} of {count} gets no {what}: there are only {n}.')
  return lo, hi


def build(
  source,
  tok: tokenizer.Tokenizer,
  *,
  field: str,
  stream: Stream,
  read_threads: int = 4,
  prefetch_batches: int = 4,
  worker_count: int = 0,
  masking: mlm.MlmSettings | None = None,
) -> grain.IterDataset:
  """The grain dataset of this host's batches from any random-access `source` of records.

  An endless stream (training) reads only this host's slice of the documents;
  a finite one on several hosts is read whole by every host (`Stream.whole`).
  With `masking` settings the rows are masked for masked language modelling.
  The masking seed leaves out the host when every host reads the whole
  stream, so all of them mask each row alike.
  """
  lo, hi = host_range(len(source), stream)
  sources.record_text(source[lo], field)  # Fails now, with the field names, if absent.
  ds = grain.MapDataset.source(source).slice(slice(lo, hi))
  if stream.shuffle:
    ds = ds.shuffle(stream.seed)
  if stream.num_epochs != 1:
    ds = ds.repeat(stream.num_epochs)
  ds = ds.map(functools.partial(_tokenize, tok=tok, field=field, shift=masking is None))
  it = ds.to_iter_dataset(
    grain.ReadOptions(num_threads=read_threads, prefetch_buffer_size=max(64, 4 * stream.rows))
  )
  it = grain.experimental.ConcatThenSplitIterDataset(
    it, length_struct={k: stream.seq_len for k in _PACKED}
  )
  it = it.map(_row)
  if masking is not None:
    # grain seeds each row's generator from (seed, row number) and checkpoints the number.
    seed = mlm.stream_seed(stream.seed, 0 if stream.whole else stream.process_index)
    it = it.random_map(functools.partial(_mask_row, settings=masking), seed=seed)
  it = batch_rows(it, stream)
  if worker_count > 0:
    # grain's workers are spawned processes; outside absl.app.run, flags must look parsed.
    if not flags.FLAGS.is_parsed():
      flags.FLAGS.mark_as_parsed()
    return it.mp_prefetch(grain.MultiprocessingOptions(num_workers=worker_count))
  return grain.experimental.ThreadPrefetchIterDataset(it, prefetch_buffer_size=prefetch_batches)


def _tokenize(record, *, tok, field: str, shift: bool = True) -> dict[str, np.ndarray]:
  ids = tok.encode_array(sources.record_text(record, field))
  tokens = np.concatenate([[tok.bos_id], ids, [tok.eos_id]]).astype(np.int32)
  if not shift:  # Masked LM: the model sees (a masked copy of) the tokens it predicts.
    return {'inputs': tokens, 'targets': tokens}
  return {'inputs': tokens[:-1], 'targets': tokens[1:]}


def _row(packed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  segment_ids = packed['inputs_segment_ids']
  return {
    'inputs': packed['inputs'],
    'targets': packed['targets'],
    'segment_ids': segment_ids,
    'positions': packed['inputs_positions'],
    'loss_mask': (segment_ids > 0).astype(np.float32),
  }


def _mask_row(row: dict[str, np.ndarray], rng, *, settings) -> dict[str, np.ndarray]:
  inputs, targets, loss_mask = mlm.mask_tokens(row['targets'], row['segment_ids'], rng, settings)
  return {**row, 'inputs': inputs, 'targets': targets, 'loss_mask': loss_mask}


def batch_rows(it: grain.IterDataset, stream: Stream) -> grain.IterDataset:
  """Batches of this host's rows; a short final batch gets all-zero rows.

  All-zero rows are padding everywhere: segment 0, loss mask 0. When every
  host reads the whole stream (`Stream.whole`) the batches are global and each
  host keeps its slice of every one.
  """
  total = stream.batch_size if stream.whole else stream.rows
  it = it.batch(total, batch_fn=functools.partial(_stack, rows=total))
  if stream.whole:
    i = stream.process_index
    it = it.map(functools.partial(_take_rows, rows=slice(i * stream.rows, (i + 1) * stream.rows)))
  return it


def _take_rows(batch: dict[str, np.ndarray], *, rows: slice) -> dict[str, np.ndarray]:
  return {k: v[rows] for k, v in batch.items()}


def _stack(row_list, *, rows: int) -> dict[str, np.ndarray]:
  batch = {k: np.stack([r[k] for r in row_list]) for k in row_list[0]}
  missing = rows - len(row_list)
  if missing:
    batch = {k: np.pad(v, [(0, missing)] + [(0, 0)] * (v.ndim - 1)) for k, v in batch.items()}
  return batch


class Iterator:
  """Batches of host-local numpy arrays, with `get_state` / `set_state` for checkpoints."""

  def __init__(self, dataset: grain.IterDataset, stream: dict, *, copy: bool = False):
    self._stream = stream
    # Batches from worker processes live in shared memory until every view of them is
    # gone; copies let the training loop keep a batch without pinning the segment.
    self._copy = copy
    # grain's iterators close themselves when collected, which fails once interpreter
    # shutdown has torn down their modules. Holding ours in a list that `close` (or exit)
    # empties lets it be collected while everything still works.
    self._holder = [iter(dataset)]
    self._finalizer = weakref.finalize(self, _release, self._holder)

  def __iter__(self):
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    batch = next(self._holder[0])
    return {k: np.array(v) for k, v in batch.items()} if self._copy else batch

  def get_state(self) -> dict:
    """JSON-serialisable: the stream's settings and grain's state as a Python literal.

    grain's state holds tuples that JSON would turn into lists, which grain then
    misreads; a literal string round-trips them exactly.
    """
    return {**self._stream, 'grain': repr(self._holder[0].get_state())}

  def set_state(self, state: dict) -> None:
    for key, value in self._stream.items():
      if state.get(key) != value:
        raise ValueError(
          f'The saved data state is for {key}={state.get(key)!r}, but this pipeline has '
          f'{key}={value!r}; resuming it would not continue the same stream.'
        )
    self._holder[0].set_state(ast.literal_eval(state['grain']))

  def close(self) -> None:
    """Stops background reading; the iterator cannot be used afterwards."""
    self._finalizer()


def _release(holder: list) -> None:
  holder.pop().close()
