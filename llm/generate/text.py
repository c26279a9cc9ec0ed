"""Text in, text out: prompts to ids, ids to streamed text, stop strings.

Stop strings are properties of text, not of token ids, so the host decodes
each row's tokens every `chunk_steps` decode steps, streams what is safe to
show, and stops rows whose text holds a stop string (`decode.generate_ids`'s
`on_chunk`).
"""

from collections.abc import Callable, Sequence

import jax
import numpy as np

from llm.generate.decode import Generation, check_prompts, generate_ids
from llm.generate.sampling import GREEDY, Sampling
from llm.model import ModelConfig


def encode_prompt(tokenizer, text: str) -> list[int]:
  """Prompt ids as training saw documents start: BOS first where the tokenizer has one.

  Hugging Face tokenizers add their own specials (Llama: BOS; GPT-2: none),
  as `transformers` does; the project's tokenizers get BOS like the pipeline.
  """
  if hasattr(tokenizer, 'source_dir'):  # llm/data/hf_tokenizer.py's wrappers.
    ids = tokenizer.encode(text, add_special_tokens=True)
    if not ids and tokenizer.bos_id >= 0:
      ids = [tokenizer.bos_id]
    return ids
  ids = tokenizer.encode(text)
  return [tokenizer.bos_id, *ids] if tokenizer.bos_id is not None and tokenizer.bos_id >= 0 else ids


def eos_ids_of(tokenizer) -> tuple[int, ...]:
  """Every id that ends generation (Llama 3 has several)."""
  ids = getattr(tokenizer, 'eos_ids', None)
  if ids:
    return tuple(ids)
  return (tokenizer.eos_id,) if tokenizer.eos_id is not None and tokenizer.eos_id >= 0 else ()


def pad_id_of(tokenizer) -> int:
  """The tokenizer's pad id, or 0 for tokenizers without one (GPT-2): never returned anyway."""
  pad = getattr(tokenizer, 'pad_id', None)
  return pad if pad is not None and pad >= 0 else 0


def _stream_end(text: str, stops: Sequence[str]) -> int:
  """How much of an unfinished row's text is safe to show.

  Holds back an incomplete UTF-8 character (decoded as U+FFFD) and any tail
  that could be the start of a stop string.
  """
  end = len(text)
  while end and text[end - 1] == '\ufffd':
    end -= 1
  for s in stops:
    for n in range(min(len(s) - 1, end), 0, -1):
      if text[end - n : end] == s[:n]:
        end -= n
        break
  return end


class _TextTracker:
  """The on_chunk callback of the text functions: decodes, streams, and finds stop strings."""

  def __init__(self, tokenizer, n: int, stops: Sequence[str], on_text):
    self.tokenizer, self.stops, self.on_text = tokenizer, tuple(stops), on_text
    self.texts = [''] * n
    self.shown = [0] * n
    self.stopped = np.zeros(n, bool)

  def __call__(self, so_far: list[list[int]], done_B: np.ndarray) -> np.ndarray:
    stop_now = np.zeros(len(so_far), bool)
    for b, ids in enumerate(so_far):
      if self.stopped[b]:
        continue
      text = self.tokenizer.decode(ids)
      cuts = [i for i in (text.find(s) for s in self.stops) if i >= 0]
      if cuts:
        text = text[: min(cuts)]
        self.stopped[b] = stop_now[b] = True
      self.texts[b] = text
      if self.on_text is not None:
        end = len(text) if (done_B[b] or stop_now[b]) else _stream_end(text, self.stops)
        if end > self.shown[b]:
          self.on_text(b, text[self.shown[b] : end])
          self.shown[b] = end
    return stop_now


def generate_text(
  cfg: ModelConfig,
  params,
  tokenizer,
  prompts: Sequence[str],
  *,
  max_new_tokens: int,
  sampling: Sampling = GREEDY,
  seed: int = 0,
  stop: Sequence[str] = (),
  mesh: jax.sharding.Mesh | None = None,
  batch_size: int = 16,
  on_text: Callable[[int, str], None] | None = None,
  chunk_steps: int = 16,
) -> list[Generation]:
  """Continues each text prompt, `batch_size` prompts per device call.

  `stop`: strings that end a completion (cut before them). `on_text(i, piece)`
  receives prompt i's completion piece by piece as it is produced.
  """
  if batch_size <= 0:
    raise ValueError(f'batch_size={batch_size} must be positive.')
  ids = [encode_prompt(tokenizer, p) for p in prompts]
  check_prompts(cfg, ids)
  out = []
  for start in range(0, len(ids), batch_size):
    chunk = ids[start : start + batch_size]
    tracker = None
    if stop or on_text is not None:
      shifted = None if on_text is None else (lambda b, s, o=start: on_text(o + b, s))
      tracker = _TextTracker(tokenizer, len(chunk), stop, shifted)
    gens = generate_ids(
      cfg,
      params,
      chunk,
      max_new_tokens=max_new_tokens,
      sampling=sampling,
      seed=seed + start,
      eos_ids=eos_ids_of(tokenizer),
      pad_id=pad_id_of(tokenizer),
      mesh=mesh,
      num_rows=min(batch_size, len(ids)),
      on_chunk=tracker,
      chunk_steps=chunk_steps,
    )
    for b, g in enumerate(gens):
      if tracker is not None and tracker.stopped[b]:
        g.finish_reason, g.text = 'stop', tracker.texts[b]
      else:
        g.text = tokenizer.decode(g.tokens)
        cuts = [i for i in (g.text.find(s) for s in stop) if i >= 0]
        if cuts:
          g.finish_reason, g.text = 'stop', g.text[: min(cuts)]
      out.append(g)
  return out


def read_prompts(path: str) -> list[str]:
  """Prompts from JSON lines: objects with a 'prompt' field, or JSON strings."""
  from llm.data import jsonl

  return [
    row if isinstance(row, str) else jsonl.field(row, where, 'prompt')
    for where, row in jsonl.read(path, kinds=(dict, str))
  ]
