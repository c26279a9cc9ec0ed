"""How the next token is picked from the logits: greedy, temperature, top-k, nucleus."""

import dataclasses

import jax
import jax.numpy as jnp


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
