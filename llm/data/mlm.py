"""Masked-language-model inputs (BERT): which tokens to predict, and what the model sees there.

Every eligible token (inside a segment and not a special id) is chosen
independently with probability `probability`, as Hugging Face's MLM collator
does (BERT's own data script instead takes exactly 15% of each sequence; over
a batch the two agree). A chosen token becomes the mask id with probability
`mask_fraction`, a random regular id with probability `random_fraction`, and
stays itself otherwise: the 80/10/10 of the paper, which keeps the encoder from
learning that only [MASK] positions matter. The loss is on chosen positions
only, against the original token: L = -sum_{i in S} log p(x_i | x without S).

The mask id is the tokenizer's own `mask_id` when it has one (WordPiece
[MASK]); otherwise it is one id past the tokenizer's vocabulary, so byte and
sentencepiece tokenizers need no retraining, and the model needs
vocab_size >= tokenizer ids + 1.

Randomness comes only from the generator passed in; the pipeline seeds it from
(seed, host, row number in the stream), so a restored iterator masks exactly
as an uninterrupted one.
"""

import dataclasses

import numpy as np

OBJECTIVES = ('lm', 'mlm')


@dataclasses.dataclass(frozen=True, eq=False)
class MlmSettings:
  """What `mask_tokens` needs: the 80/10/10 split and the tokenizer's id ranges."""

  probability: float
  mask_fraction: float
  random_fraction: float
  mask_id: int
  special_ids: np.ndarray  # Never chosen.
  regular_ids: np.ndarray  # Random replacements are drawn from these.


def objective(data_config) -> str:
  """`data.objective`, checked; configs saved before it existed mean 'lm'."""
  name = data_config.get('objective', 'lm')
  if name not in OBJECTIVES:
    raise ValueError(f'data.objective={name!r} is not one of {", ".join(OBJECTIVES)}.')
  if name == 'mlm' and data_config.dataset == 'synthetic':
    raise ValueError(
      "data.objective='mlm' needs text, but data.dataset='synthetic' is a stream for "
      "data.objective='lm' only; set data.dataset to a text dataset (e.g. 'shakespeare')."
    )
  return name


def mask_id(tok) -> int:
  """The tokenizer's [MASK] id, or one past its vocabulary when it has none."""
  found = getattr(tok, 'mask_id', None)
  return tok.vocab_size if found is None or found < 0 else int(found)


def check(data_config) -> None:
  """Stops on masking probabilities no run can use, before a dataset or tokenizer is made."""
  p = data_config.mlm_probability
  masked, rand = data_config.mlm_mask_fraction, data_config.mlm_random_fraction
  if not 0 < p <= 1:
    raise ValueError(f'data.mlm_probability={p} must be in (0, 1].')
  for name, value in (('mlm_mask_fraction', masked), ('mlm_random_fraction', rand)):
    if not 0 <= value <= 1:
      raise ValueError(f'data.{name}={value} must be in [0, 1].')
  if masked + rand > 1:
    raise ValueError(
      f'data.mlm_mask_fraction={masked} + data.mlm_random_fraction={rand} exceeds 1; '
      'the rest of the chosen tokens is kept, so the two must sum to at most 1.'
    )


def settings(data_config, tok) -> MlmSettings:
  """The masking settings of `data_config` for tokenizer `tok`, checked."""
  check(data_config)
  p = data_config.mlm_probability
  masked, rand = data_config.mlm_mask_fraction, data_config.mlm_random_fraction
  mask = mask_id(tok)
  named = [getattr(tok, f'{n}_id', -1) for n in ('pad', 'bos', 'eos', 'unk')]
  special = {int(i) for i in (*named, mask, *getattr(tok, 'special_ids', ())) if i >= 0}
  special_ids = np.array(sorted(special), np.int32)
  regular_ids = np.setdiff1d(np.arange(tok.vocab_size, dtype=np.int32), special_ids)
  if not regular_ids.size:
    raise ValueError(f'The tokenizer has only special ids ({tok.vocab_size}); nothing to mask.')
  return MlmSettings(p, masked, rand, mask, special_ids, regular_ids)


def check_vocab(vocab_size: int, s: MlmSettings) -> None:
  """The model must have a row for the mask id (one past the tokenizer's ids, without one)."""
  if s.mask_id >= vocab_size:
    raise ValueError(
      f'model.vocab_size={vocab_size} has no row for the [MASK] id {s.mask_id} that '
      f"data.objective='mlm' feeds the model; set model.vocab_size >= {s.mask_id + 1}."
    )


def mask_tokens(
  tokens: np.ndarray, segment_ids: np.ndarray, rng: np.random.Generator, s: MlmSettings
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """(inputs, targets, loss_mask) for tokens of any shape; segment id 0 is padding.

  inputs: tokens with the chosen ones masked, randomised or kept; targets: the
  tokens unchanged; loss_mask: float32, 1 exactly on the chosen positions.
  """
  tokens = np.asarray(tokens, np.int32)
  eligible = (np.asarray(segment_ids) > 0) & ~np.isin(tokens, s.special_ids)
  chosen = eligible & (rng.random(tokens.shape) < s.probability)
  action = rng.random(tokens.shape)
  to_mask = chosen & (action < s.mask_fraction)
  to_random = chosen & (action >= s.mask_fraction) & (action < s.mask_fraction + s.random_fraction)
  random_ids = s.regular_ids[rng.integers(0, len(s.regular_ids), tokens.shape)]
  inputs = np.where(to_mask, s.mask_id, np.where(to_random, random_ids, tokens))
  return inputs.astype(np.int32), tokens, chosen.astype(np.float32)


def stream_seed(seed: int, process_index: int) -> int:
  """The masking seed of one host's stream: hosts reading different documents mask differently."""
  return int(np.random.SeedSequence([seed, process_index, 0x4D4C4D]).generate_state(1)[0])
