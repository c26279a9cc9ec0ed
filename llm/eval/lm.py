"""A split's loss metrics: perplexity and bits per byte, masked-LM accuracy, classification.

The split is read like training data (`llm.data.streams`: packed rows, every
host its own documents, all of it unless `max_batches`) and summed over all
hosts by the training loss (`llm/losses.py`), so the numbers are the ones the
training loop logs. Loss is the mean NLL in nats over the loss tokens,
perplexity exp(loss). Bits per byte divides the summed NLL (in bits) by the
UTF-8 bytes of text the target tokens stand for, so models with different
tokenizers compare on the same text; EOS targets count in the NLL but stand
for no bytes. With data.objective='mlm' the loss is over the masked tokens
(the masks are the same at every evaluation), `accuracy` is the fraction of
them predicted exactly, and there are no bits per byte: a masked token is
predicted from both sides, not from the text before it. SFT reports the
response-token loss; classification accuracy and macro-F1.
"""

from llm import losses
from llm.data import streams
from llm.model import ModelConfig


def evaluate_split(
  cfg: ModelConfig,
  params,
  data_config,
  *,
  split: str = 'validation',
  batch_size: int,
  seq_len: int,
  mesh=None,
  seed: int = 0,
  max_batches: int = 0,
  tokenizer=None,
  prepare: bool = False,
  progress: bool = False,
) -> dict:
  """The metrics of `params` on a split of `data_config` (`losses.evaluate`).

  Args:
    cfg, params: the model; params sharded for `mesh` as in training (none: one device).
    data_config: a run's `config.data`.
    split: 'validation' (data.eval_split or data.eval_files), 'train' or a TFDS split name.
    batch_size: global rows per batch; seq_len: tokens per row.
    max_batches: stop after this many batches; 0 reads the whole split.
    tokenizer: the model's tokenizer, for bits per byte (default: the data's).
    prepare: build the dataset (and train its tokenizer) if missing; by default
      a missing one is an error, as evaluating other text or ids would be wrong.
  """
  stream = streams.Stream(
    data_config, split, batch_size, seq_len, seed, shuffle=False, num_epochs=1, prepare=prepare
  )
  batches = streams.make_iterator(stream, cfg)
  if tokenizer is None:
    tokenizer = streams.tokenizer_of(data_config, train_if_missing=prepare)
  try:
    return losses.evaluate(
      cfg,
      params,
      batches,
      mesh=mesh,
      max_batches=max_batches,
      progress=split if progress else '',
      **streams.eval_options(data_config, tokenizer, cfg.vocab_size),
    )
  finally:
    if hasattr(batches, 'close'):
      batches.close()
