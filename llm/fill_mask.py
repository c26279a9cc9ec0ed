"""Fill in [MASK] with a masked-LM encoder: the most probable tokens for each mask.

  python -m llm.fill_mask --model=DIR --text="Hello, my dog is [MASK]." [--top_k=5]

DIR is a Hugging Face BertForMaskedLM directory (read on the fly, with its
tokenizer), a params export (`python -m llm.convert import` writes one) or a
training workdir of a model.head='mlm' model (its newest checkpoint and its
tokenizer copy): anything `llm.io.models` opens.

The text is encoded as masked-LM training framed documents: [bos] text [eos],
which for BERT's tokenizer is [CLS] text [SEP], the framing transformers adds.
Each literal '[MASK]' becomes the tokenizer's mask id, or for the project's
byte and sentencepiece tokenizers, which have none, the id one past their
vocabulary that `llm/data/mlm.py` trains with.
"""

import dataclasses

import jax
import numpy as np

from llm.data import mlm
from llm.io import models
from llm.model import ModelConfig, Transformer

MASK = '[MASK]'


@dataclasses.dataclass(frozen=True)
class Prediction:
  """One candidate for one mask."""

  token: str
  token_id: int
  probability: float


def encode(tokenizer, text: str) -> list[int]:
  """[bos] + ids of `text` + [eos], each '[MASK]' replaced by the mask id."""
  mask_id = mlm.mask_id(tokenizer)
  ids = []
  for i, part in enumerate(text.split(MASK)):
    if i:
      ids.append(mask_id)
    ids += [int(t) for t in tokenizer.encode(part)]
  bos, eos = (getattr(tokenizer, f'{n}_id', -1) for n in ('bos', 'eos'))
  return [bos] * (bos is not None and bos >= 0) + ids + [eos] * (eos is not None and eos >= 0)


def token_text(tokenizer, i: int) -> str:
  """How a predicted id reads: its vocabulary entry where the tokenizer has one."""
  if i == mlm.mask_id(tokenizer):
    return MASK
  text = None
  if hasattr(tokenizer, 'id_to_token'):  # Hugging Face fast tokenizers: '##ing' stays visible.
    text = tokenizer.id_to_token(i)
  elif hasattr(tokenizer, 'id_to_piece') and i < tokenizer.vocab_size:
    text = tokenizer.id_to_piece(i)
  else:
    text = tokenizer.decode([i])
  if not text:
    return f'<id {i}>'
  return text if text.strip() else repr(text)


def fill_mask(
  cfg: ModelConfig, params, tokenizer, text: str, top_k: int = 5
) -> list[list[Prediction]]:
  """The `top_k` most probable tokens for each [MASK] in `text`, best first."""
  if cfg.head != 'mlm':
    raise ValueError(
      f"model.head={cfg.head!r}: filling in [MASK] needs a masked-LM model (model.head='mlm')."
    )
  if MASK not in text:
    raise ValueError(f'The text {text!r} has no {MASK} to fill in.')
  if top_k <= 0:
    raise ValueError(f'top_k={top_k} must be positive.')
  ids = encode(tokenizer, text)
  if len(ids) > cfg.max_seq_len:
    raise ValueError(
      f'The text is {len(ids)} tokens long; the model reads at most {cfg.max_seq_len} '
      '(model.max_seq_len).'
    )
  bad = [i for i in ids if not 0 <= i < cfg.vocab_size]
  if bad:
    raise ValueError(
      f'Token id {bad[0]} (the mask id is {mlm.mask_id(tokenizer)}) is outside the model '
      f'vocabulary [0, {cfg.vocab_size}); the tokenizer does not belong to this model.'
    )
  logits_BTV = jax.jit(Transformer(cfg).apply)({'params': params}, np.asarray([ids], np.int32))
  logits_TV = np.asarray(logits_BTV[0], np.float64)
  out = []
  for t in np.flatnonzero(np.asarray(ids) == mlm.mask_id(tokenizer)):
    probs_V = np.exp(logits_TV[t] - logits_TV[t].max())
    probs_V /= probs_V.sum()
    best = np.argsort(-probs_V, kind='stable')[:top_k]
    out.append([Prediction(token_text(tokenizer, int(i)), int(i), float(probs_V[i])) for i in best])
  return out


def main(argv):
  del argv
  from absl import flags, logging

  logging.set_verbosity(logging.WARNING)  # Keep orbax's restore chatter off the output.
  FLAGS = flags.FLAGS
  if MASK not in FLAGS.text:
    raise ValueError(f'--text={FLAGS.text!r} has no {MASK}; put one where a word is to be guessed.')
  if FLAGS.top_k <= 0:
    raise ValueError(f'--top_k={FLAGS.top_k} must be positive.')
  cfg, params, tok = models.load(FLAGS.model, tokenizer=FLAGS.tokenizer)
  results = fill_mask(cfg, params, tok, FLAGS.text, FLAGS.top_k)
  print(FLAGS.text)
  for n, predictions in enumerate(results, 1):
    print(f'{MASK} {n} of {len(results)}:')
    for p in predictions:
      print(f'  {p.probability:7.4f}  {p.token}')


if __name__ == '__main__':
  from absl import flags

  from llm import cli

  flags.DEFINE_string('model', None, 'Hugging Face directory, params export or training workdir.')
  flags.DEFINE_string('text', None, f'Text with one or more {MASK}.')
  flags.DEFINE_integer('top_k', 5, 'Predictions shown per mask.')
  flags.DEFINE_string('tokenizer', '', "'byte', a .model file or a Hugging Face tokenizer dir.")
  flags.mark_flags_as_required(['model', 'text'])
  cli.run(main)
