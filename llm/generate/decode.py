"""The decode loop: prefill once, then decode inside a jitted loop, on token ids.

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
import math
from collections.abc import Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from llm import sharding
from llm.generate.sampling import GREEDY, Sampling, sample
from llm.model import CACHE_AXES, ModelConfig, Transformer, init_cache, param_shardings

MIN_BUCKET = 16

# Finish reasons, as stored per row in the decode state.
_RUNNING, _EOS, _LENGTH, _CONTEXT, _STOP = range(5)
FINISH_REASONS = {_EOS: 'eos', _LENGTH: 'length', _CONTEXT: 'context', _STOP: 'stop'}


def bucket_length(n: int, limit: int) -> int:
  """The padded prompt length for n tokens: a power of two >= MIN_BUCKET, at most `limit`."""
  return min(max(MIN_BUCKET, 1 << (int(n) - 1).bit_length()), limit)


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
  cache = init_cache(cfg, B, P + max_new_tokens)
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
  cache_specs = {k: PartitionSpec(*axes) for k, axes in CACHE_AXES.items()}
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
  devices = jax.devices() if mesh is None else mesh.devices.flat
  donate = () if devices[0].platform == 'cpu' else (1,)
  if mesh is None:
    return jax.jit(prefill), jax.jit(decode, donate_argnums=donate)
  out = _state_shardings(mesh)
  return (
    jax.jit(prefill, out_shardings=out),
    jax.jit(decode, out_shardings=out, donate_argnums=donate),
  )


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
  return jax.device_put(params, param_shardings(cfg, mesh))


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
  if sampling.temperature == 0:
    sampling = GREEDY  # top_k and top_p change nothing: share the compilation.
  prefill, decode = _functions(cfg, sampling, pad_id, max_new_tokens, mesh)
  inputs = _prompt_arrays(cfg, prompts, pad_id, eos_ids, mesh, num_rows)
  B = len(prompts)
  with sharding.rules_context(mesh) if mesh is not None else contextlib.nullcontext():
    state = prefill(params, *inputs, jax.random.key(seed))
    if on_chunk is None:
      state = decode(params, state, max_new_tokens)
    else:
      state = _decode_in_chunks(params, state, decode, B, on_chunk, chunk_steps)
  tokens_BN, num_B, reason_B = jax.device_get(
    (state['tokens_BN'], state['num_B'], state['reason_B'])
  )
  return [
    Generation(_row_tokens(tokens_BN[b], num_B[b], reason_B[b]), FINISH_REASONS[int(reason_B[b])])
    for b in range(B)
  ]


def _prompt_arrays(cfg: ModelConfig, prompts, pad_id: int, eos_ids, mesh, num_rows: int):
  """(tokens_BP, lengths_B, active_B, eos_E) on the mesh: prompts right-padded to a bucket."""
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
  batch, replicated = PartitionSpec(sharding.BATCH_AXES), PartitionSpec()
  return (
    _put(tokens_BP, mesh, batch),
    _put(lengths_B, mesh, replicated),
    _put(active_B, mesh, replicated),
    _put(eos_E, mesh, replicated),
  )


def _decode_in_chunks(params, state, decode, B: int, on_chunk, chunk_steps: int):
  """Decodes `chunk_steps` at a time, handing the host each row's tokens between chunks."""
  rows = state['done_B'].shape[0]
  while True:
    tokens_BN, num_B, done_B = jax.device_get((state['tokens_BN'], state['num_B'], state['done_B']))
    reason_B = np.asarray(state['reason_B'])
    so_far = [_row_tokens(tokens_BN[b], num_B[b], reason_B[b]) for b in range(B)]
    stop_B = on_chunk(so_far, done_B[:B])
    if stop_B is not None and np.any(stop_B & ~done_B[:B]):
      stop = np.pad(np.asarray(stop_B, bool), (0, rows - B))
      stop_dev = jnp.asarray(stop)
      state = dict(
        state,
        reason_B=jnp.where(stop_dev & ~state['done_B'], _STOP, state['reason_B']),
        done_B=state['done_B'] | stop_dev,
      )
      done_B = done_B | stop
    if done_B[:B].all():
      return state
    state = decode(params, state, chunk_steps)


def _row_tokens(tokens_N: np.ndarray, num: int, reason: int) -> list[int]:
  """A row's generated ids, without the EOS that ended it."""
  return tokens_N[: num - (reason == _EOS)].tolist()
