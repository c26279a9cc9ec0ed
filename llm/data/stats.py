"""The bar a language model must clear: the unigram entropy of a split under its tokenizer.

A model that ignores context can at best predict each token with its
frequency in the text, for a loss equal to the entropy of that frequency
distribution. Counting the same targets as the training loss (every token of
every document and its closing eos; never bos or padding), in nats per token,
makes it directly comparable with the validation loss; a model that learned
anything beyond word frequencies is far below it.
"""

import numpy as np

from llm.data import sources, tokenizer


def unigram_entropy(
  data_config, tok: tokenizer.Tokenizer, split: str, *, max_documents: int = 20_000
) -> dict:
  """{'tokens', 'documents', 'unigram_entropy'} of the first `max_documents` of `split`."""
  source = sources.data_source(data_config, split)
  field = sources.text_feature(data_config)
  counts = np.zeros(tok.vocab_size, np.int64)
  n = min(len(source), max_documents)
  for i in range(n):
    ids = tok.encode_array(sources.record_text(source[i], field))
    counts += np.bincount(ids, minlength=tok.vocab_size)
  counts[tok.eos_id] += n
  return {'documents': n, 'tokens': int(counts.sum()), 'unigram_entropy': entropy(counts)}


def entropy(counts: np.ndarray) -> float:
  """Entropy in nats of the distribution proportional to `counts`."""
  p = counts[counts > 0] / counts.sum()
  return float(-(p * np.log(p)).sum())
