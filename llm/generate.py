r"""Text generation with a KV cache: prefill once, then decode inside a jitted loop.

  python -m llm.generate --workdir=DIR --prompt=TEXT [--max_new_tokens=256] \
      [--temperature=0.8 --top_k=0 --top_p=0.95 --seed=0 --stop=STRING ...]
  python -m llm.generate --workdir=DIR --prompts_file=F.jsonl [--output=OUT.jsonl]

DIR is a training workdir (its newest checkpoint) or a params export.

How a batch is laid out. Prompts of different lengths are right-padded to a
length bucket P (a power of two, at least 16, at most model.max_seq_len), so
one compiled prefill serves every prompt length in the bucket. The cache has
P + max_new_tokens slots per row; slot i of the prompt part holds prompt
token i, and decode step s writes slot P + s for every row at once, while
each row's *position* is its own length + s. Padding slots carry segment id 0
and are never attended to (`Transformer`'s cache mode), so a row's tokens are
the same as if it had been generated alone.

The decode loop is one `lax.while_loop` per call that runs until every row is
done (EOS, max_new_tokens, or the model's context) or a step budget is used:
without stop strings or streaming, one call does all the decoding; with them,
the host takes the tokens every `chunk_steps` steps to print them and to look
for stop strings, which are properties of text and not of token ids. The
step budget is a traced value, so chunking never recompiles, and the key of
step s is fold_in(seed, s), so chunking never changes what is sampled.
"""

import contextlib
import dataclasses
import functools
import json
import math
import sys
from collections.abc import Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from llm import model as model_lib
from llm import sharding
from llm.model import ModelConfig, Transformer

MIN_BUCKET = 16

# Finish reasons, as stored per row in the decode state.
_RUNNING, _EOS, _LENGTH, _CONTEXT, _STOP = range(5)
FINISH_REASONS = {_EOS: 'eos', _LENGTH: 'length', _CONTEXT: 'context', _STOP: 'stop'}


@dataclasses.dataclass(frozen=True)
class Sampling:
  """How the next token is picked: temperature 0 is greedy (argmax).

  Otherwise logits are divided by the temperature, cut to the `top_k` best
  (0: all), then to the nucleus: the fewest best tokens whose probability
  reaches `top_p` (1: all), in that order, as Hugging Face does.
  """

  temperature: float = 0.0
  top_k: int = 0
  top_p: float = 1.0

  def __post_init__(self):
    if not self.temperature >= 0:
      raise ValueError(f'temperature={self.temperature} must be >= 0 (0: greedy).')
    if self.top_k < 0:
      raise ValueError(f'top_k={self.top_k} must be >= 0 (0: no top-k cut).')
    if not 0 < self.top_p <= 1:
      raise ValueError(f'top_p={self.top_p} must be in (0, 1] (1: no nucleus cut).')


GREEDY = Sampling()


def sample(logits_BV: jax.Array, rng: jax.Array, sampling: Sampling) -> jax.Array:
  """Next tokens [B] int32 from logits [B, V]."""
  logits_BV = logits_BV.astype(jnp.float32)
  if sampling.temperature == 0:
    return jnp.argmax(logits_BV, axis=-1).astype(jnp.int32)
  logits_BV = logits_BV / sampling.temperature
  V = logits_BV.shape[-1]
  k = min(sampling.top_k or V, V)
  if k == V and sampling.top_p == 1:
    return jax.random.categorical(rng, logits_BV).astype(jnp.int32)
  # Sorted best first; the nucleus needs the order, top-k only the cut.
  top_BK, ids_BK = jax.lax.top_k(logits_BV, k)
  if sampling.top_p < 1:
    probs_BK = jax.nn.softmax(top_BK, axis=-1)
    mass_before_BK = jnp.cumsum(probs_BK, axis=-1) - probs_BK
    top_BK = jnp.where(mass_before_BK < sampling.top_p, top_BK, -jnp.inf)
  choice_B = jax.random.categorical(rng, top_BK)
  return jnp.take_along_axis(ids_BK, choice_B[:, None], axis=-1)[:, 0].astype(jnp.int32)


def bucket_length(n: int, limit: int) -> int:
  """The padded prompt length for n tokens: a power of two >= MIN_BUCKET, at most `limit`."""
  return min(max(MIN_BUCKET, 1 << (int(n) - 1).bit_length()), limit)


# ----------------------------------------------------------------------------
# The jitted prefill and decode loop.


def _advance(state: dict, logits_BV, cache: dict, *, cfg: ModelConfig, sampling, pad_id):
  """Samples step `state['step']`'s tokens and records them; finished rows get padding."""
  step = state['step']
  N = state['tokens_BN'].shape[1]
  token_B = sample(logits_BV, jax.random.fold_in(state['rng'], step), sampling)
  was_done_B = state['done_B']
  token_B = jnp.where(was_done_B, pad_id, token_B)
  tokens_BN = jax.lax.dynamic_update_slice_in_dim(state['tokens_BN'], token_B[:, None], step, 1)
  is_eos_B = (token_B[:, None] == state['eos_E'][None, :]).any(-1)
  reason_B = jnp.where(
    is_eos_B,
    _EOS,
    jnp.where(
      step + 1 >= N,
      _LENGTH,
      jnp.where(state['prompt_lengths_B'] + step + 1 >= cfg.max_seq_len, _CONTEXT, _RUNNING),
    ),
  )
  return dict(
    state,
    cache=cache,
    tokens_BN=tokens_BN,
    num_B=jnp.where(was_done_B, state['num_B'], step + 1),
    reason_B=jnp.where(was_done_B, state['reason_B'], reason_B),
    done_B=was_done_B | (reason_B != _RUNNING),
    step=step + 1,
  )


def _prefill(params, tokens_BP, lengths_B, active_B, eos_E, rng, *, cfg, max_new_tokens, **kw):
  """Runs the padded prompts through the model once, filling the cache; samples token 0."""
  B, P = tokens_BP.shape
  cache = model_lib.init_cache(cfg, B, P + max_new_tokens)
  positions_BP = jnp.broadcast_to(jnp.arange(P, dtype=jnp.int32), (B, P))
  segment_ids_BP = (positions_BP < lengths_B[:, None]).astype(jnp.int32)
  logits_B1V, cache = Transformer(cfg).apply(
    {'params': params},
    tokens_BP,
    positions_BP,
    segment_ids_BP,
    cache=cache,
    logits_index_B=lengths_B - 1,
  )
  state = {
    'tokens_BN': jnp.full((B, max_new_tokens), kw['pad_id'], jnp.int32),
    'num_B': jnp.zeros((B,), jnp.int32),
    'prompt_lengths_B': lengths_B,
    'done_B': ~active_B,
    'reason_B': jnp.zeros((B,), jnp.int32),
    'step': jnp.zeros((), jnp.int32),
    'eos_E': eos_E,
    'rng': rng,
  }
  return _advance(state, logits_B1V[:, 0], cache, cfg=cfg, **kw)


def _decode(params, state, num_steps, *, cfg, **kw):
  """Up to `num_steps` more tokens per row in one while loop; ends early once all rows are done."""
  N = state['tokens_BN'].shape[1]
  end = jnp.minimum(state['step'] + num_steps, N)

  def cond(state):
    return (state['step'] < end) & ~jnp.all(state['done_B'])

  def body(state):
    step = state['step']
    last_B = jax.lax.dynamic_index_in_dim(state['tokens_BN'], step - 1, 1, keepdims=False)
    # Finished rows keep stepping (their output is discarded); keep their positions valid.
    positions_B = jnp.minimum(state['prompt_lengths_B'] + step - 1, cfg.max_seq_len - 1)
    logits_B1V, cache = Transformer(cfg).apply(
      {'params': params}, last_B[:, None], positions_B[:, None], cache=state['cache']
    )
    return _advance(state, logits_B1V[:, 0], cache, cfg=cfg, **kw)

  return jax.lax.while_loop(cond, body, state)


def _state_shardings(mesh):
  """The cache sharded by its logical axes (like the activations); the rest replicated."""
  cache_specs = {k: PartitionSpec(*axes) for k, axes in model_lib.CACHE_AXES.items()}
  small = ('tokens_BN', 'num_B', 'prompt_lengths_B', 'done_B', 'reason_B', 'step', 'eos_E', 'rng')
  return {
    'cache': nn.logical_to_mesh_sharding(cache_specs, mesh, sharding.RULES),
    **dict.fromkeys(small, sharding.replicated(mesh)),
  }


@functools.lru_cache(maxsize=32)
def _functions(cfg, sampling, pad_id, max_new_tokens, mesh):
  """The jitted (prefill, decode) for one setting; jax caches their compilations per shape."""
  kw = dict(cfg=cfg, sampling=sampling, pad_id=pad_id)
  prefill = functools.partial(_prefill, max_new_tokens=max_new_tokens, **kw)
  decode = functools.partial(_decode, **kw)
  # The CPU backend cannot reuse donated buffers; donating there only warns.
  donate = () if jax.default_backend() == 'cpu' else (1,)
  if mesh is None:
    return jax.jit(prefill), jax.jit(decode, donate_argnums=donate)
  out = _state_shardings(mesh)
  return (
    jax.jit(prefill, out_shardings=out),
    jax.jit(decode, out_shardings=out, donate_argnums=donate),
  )


# ----------------------------------------------------------------------------
# Host side.


@dataclasses.dataclass
class Generation:
  """One prompt's output. `finish_reason`: 'eos', 'length', 'context' (model.max_seq_len) or 'stop'.

  `tokens` excludes the EOS token; with a stop string it may run past it,
  while `text` (from the text functions) is cut before it.
  """

  tokens: list[int]
  finish_reason: str
  text: str | None = None


def place_params(cfg: ModelConfig, params, mesh):
  """Params onto the mesh, sharded by their logical axes as in training."""
  shardings = sharding.logical_shardings(model_lib.abstract_params(cfg), mesh)
  return jax.device_put(params, shardings)


def check_prompts(cfg: ModelConfig, prompts: Sequence[Sequence[int]]) -> None:
  """Stops on an empty prompt, an id outside the vocabulary, or a prompt that fills the context."""
  for i, ids in enumerate(prompts):
    if not len(ids):
      raise ValueError(f'Prompt {i} is empty; give at least one token (e.g. BOS).')
    if len(ids) >= cfg.max_seq_len:
      raise ValueError(
        f"Prompt {i} has {len(ids)} tokens but the model's context is {cfg.max_seq_len} "
        f'tokens (model.max_seq_len); shorten it to at most {cfg.max_seq_len - 1} tokens.'
      )
    bad = [t for t in ids if not 0 <= t < cfg.vocab_size]
    if bad:
      raise ValueError(
        f'Prompt {i} has token id {bad[0]}, outside the vocabulary [0, {cfg.vocab_size}).'
      )


def _put(x: np.ndarray, mesh, spec: PartitionSpec):
  if mesh is None:
    return jnp.asarray(x)
  return jax.make_array_from_callback(x.shape, NamedSharding(mesh, spec), lambda i: x[i])


def generate_ids(
  cfg: ModelConfig,
  params,
  prompts: Sequence[Sequence[int]],
  *,
  max_new_tokens: int,
  sampling: Sampling = GREEDY,
  seed: int = 0,
  eos_ids: Sequence[int] = (),
  pad_id: int = 0,
  mesh: jax.sharding.Mesh | None = None,
  num_rows: int = 0,
  on_chunk: Callable[[list[list[int]], np.ndarray], np.ndarray | None] | None = None,
  chunk_steps: int = 16,
) -> list[Generation]:
  """Continues each prompt (a list of token ids) by up to `max_new_tokens` tokens.

  Args:
    cfg, params: the model; under `mesh`, params placed by `place_params`.
    prompts: token ids, of any lengths below model.max_seq_len.
    eos_ids: ids that end a row (not included in its tokens).
    pad_id: what finished rows and padding hold; never returned.
    mesh: run sharded on this mesh (rows split over data x fsdp, heads over
      tensor); rows are padded to a multiple of the data-parallel ways.
    num_rows: pad the batch to at least this many rows, so that batches of
      different sizes share one compilation.
    on_chunk: called after the prefill and every `chunk_steps` decode steps
      with each row's tokens so far and its done flags; may return a bool
      array of rows to stop now (stop strings). Without it the whole decode
      is one device call.
  """
  if cfg.head != 'lm' or not cfg.causal:
    raise ValueError(
      f'The model (model.head={cfg.head!r}, model.causal={cfg.causal}) is not a left-to-right '
      "language model (head='lm', causal=True), so it cannot generate text; a masked-LM "
      'encoder fills in [MASK] with `python -m llm.fill_mask`.'
    )
  if max_new_tokens <= 0:
    raise ValueError(f'max_new_tokens={max_new_tokens} must be positive.')
  check_prompts(cfg, prompts)
  B = len(prompts)
  ways = 1 if mesh is None else sharding.batch_divisor(mesh)
  rows = math.ceil(max(B, num_rows) / ways) * ways
  P = bucket_length(max(len(p) for p in prompts), cfg.max_seq_len)
  tokens_BP = np.full((rows, P), pad_id, np.int32)
  lengths_B = np.ones((rows,), np.int32)
  for b, ids in enumerate(prompts):
    tokens_BP[b, : len(ids)] = ids
    lengths_B[b] = len(ids)
  active_B = np.arange(rows) < B

  # Never a token: a row without EOS ids never ends on one.
  eos_E = np.asarray([int(i) for i in eos_ids] or [-1], np.int32)
  if sampling.temperature == 0:
    sampling = GREEDY  # top_k and top_p change nothing: share the compilation.
  prefill, decode = _functions(cfg, sampling, pad_id, max_new_tokens, mesh)
  batch, replicated = PartitionSpec(sharding.BATCH_AXES), PartitionSpec()
  with sharding.rules_context(mesh) if mesh is not None else contextlib.nullcontext():
    state = prefill(
      params,
      _put(tokens_BP, mesh, batch),
      _put(lengths_B, mesh, replicated),
      _put(active_B, mesh, replicated),
      _put(eos_E, mesh, replicated),
      jax.random.key(seed),
    )
    while True:
      if on_chunk is None:
        state = decode(params, state, max_new_tokens)
        break
      tokens_BN, num_B, done_B = jax.device_get(
        (state['tokens_BN'], state['num_B'], state['done_B'])
      )
      reason_B = np.asarray(state['reason_B'])
      so_far = [_row_tokens(tokens_BN[b], num_B[b], reason_B[b]) for b in range(B)]
      stop_B = on_chunk(so_far, done_B[:B])
      if stop_B is not None and np.any(stop_B & ~done_B[:B]):
        stop = jnp.asarray(np.pad(np.asarray(stop_B, bool), (0, rows - B)))
        state = dict(
          state,
          reason_B=jnp.where(stop & ~state['done_B'], _STOP, state['reason_B']),
          done_B=state['done_B'] | stop,
        )
        done_B = done_B | np.pad(np.asarray(stop_B, bool), (0, rows - B))
      if done_B[:B].all():
        break
      state = decode(params, state, chunk_steps)
  tokens_BN, num_B, reason_B = jax.device_get(
    (state['tokens_BN'], state['num_B'], state['reason_B'])
  )
  return [
    Generation(_row_tokens(tokens_BN[b], num_B[b], reason_B[b]), FINISH_REASONS[int(reason_B[b])])
    for b in range(B)
  ]


def _row_tokens(tokens_N: np.ndarray, num: int, reason: int) -> list[int]:
  """A row's generated ids, without the EOS that ended it."""
  return tokens_N[: num - (reason == _EOS)].tolist()


# ----------------------------------------------------------------------------
# Text.


def encode_prompt(tokenizer, text: str) -> list[int]:
  """Prompt ids as training saw documents start: BOS first where the tokenizer has one.

  Hugging Face tokenizers add their own specials (Llama: BOS; GPT-2: none),
  as `transformers` does; the project's tokenizers get BOS like the pipeline.
  """
  if hasattr(tokenizer, 'source_dir'):  # llm.convert's Hugging Face tokenizers.
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


# ----------------------------------------------------------------------------
# The command line.


def read_prompts(path: str) -> list[str]:
  """Prompts from JSON lines: objects with a 'prompt' field, or JSON strings."""
  from llm.data import jsonl

  return [
    row if isinstance(row, str) else jsonl.field(row, where, 'prompt')
    for where, row in jsonl.read(path, kinds=(dict, str))
  ]


def main(argv):
  del argv
  from absl import logging

  logging.set_verbosity(logging.WARNING)  # Keep orbax's restore chatter off the output.
  from absl import flags

  FLAGS = flags.FLAGS
  if bool(FLAGS.prompt) == bool(FLAGS.prompts_file):
    raise SystemExit('Give exactly one of --prompt and --prompts_file.')
  try:
    from llm import checkpoint  # Late: orbax is slow to import and unused by the core.

    mesh = sharding.mesh_from_spec(FLAGS.mesh)
    cfg, params, tok = checkpoint.load_model(FLAGS.workdir, mesh=mesh, tokenizer=FLAGS.tokenizer)
    prompts = [FLAGS.prompt] if FLAGS.prompt else read_prompts(FLAGS.prompts_file)
    sampling = Sampling(FLAGS.temperature, FLAGS.top_k, FLAGS.top_p)
    single = len(prompts) == 1

    def on_text(i, piece):
      sys.stdout.write(piece)
      sys.stdout.flush()

    if single:
      sys.stdout.write(prompts[0])
    gens = generate_text(
      cfg,
      params,
      tok,
      prompts,
      max_new_tokens=FLAGS.max_new_tokens,
      sampling=sampling,
      seed=FLAGS.seed,
      stop=FLAGS.stop or (),
      mesh=mesh,
      batch_size=FLAGS.batch_size,
      on_text=on_text if single else None,
    )
  except (ValueError, FileNotFoundError) as e:
    raise SystemExit(f'{type(e).__name__}: {e}') from None
  if single:
    sys.stdout.write(f'\n[{gens[0].finish_reason}, {len(gens[0].tokens)} tokens]\n')
  else:
    for i, (p, g) in enumerate(zip(prompts, gens, strict=True)):
      print(f'=== {i} [{g.finish_reason}, {len(g.tokens)} tokens]\n{p}{g.text}')
  if FLAGS.output:
    with open(FLAGS.output, 'w') as f:
      for p, g in zip(prompts, gens, strict=True):
        row = dict(prompt=p, completion=g.text, finish_reason=g.finish_reason, tokens=g.tokens)
        f.write(json.dumps(row) + '\n')


if __name__ == '__main__':
  from absl import app, flags

  flags.DEFINE_string('workdir', None, 'Training workdir (newest checkpoint) or params export.')
  flags.DEFINE_string('prompt', '', 'One prompt; its completion is printed as it is produced.')
  flags.DEFINE_string('prompts_file', '', 'JSON lines with a "prompt" field each.')
  flags.DEFINE_string('output', '', 'Optional JSON-lines file for the completions.')
  flags.DEFINE_integer('max_new_tokens', 256, 'Tokens to generate per prompt, at most.')
  flags.DEFINE_float('temperature', 0.8, '0: greedy.')
  flags.DEFINE_integer('top_k', 0, 'Sample from the k best tokens only; 0: all.')
  flags.DEFINE_float('top_p', 0.95, 'Nucleus sampling mass; 1: off.')
  flags.DEFINE_integer('seed', 0, 'Sampling seed.')
  flags.DEFINE_multi_string('stop', [], 'A string that ends a completion (repeatable).')
  flags.DEFINE_integer('batch_size', 16, 'Prompts decoded together.')
  flags.DEFINE_string('tokenizer', '', "'byte', a .model file or a Hugging Face tokenizer dir.")
  flags.DEFINE_string('mesh', '', "Mesh sizes, e.g. 'tensor=4' or 'data=2,tensor=4'.")
  flags.mark_flags_as_required(['workdir'])
  app.run(main)
