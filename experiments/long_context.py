r"""Long context on a CPU: a small Llama pretrained at 512 positions, then continued at 8,192.

  python -m experiments.long_context   # Writes the corpus (jax's sources) into data/.
  python -m llm.train --config=experiments/long_context.py:short \
      --workdir=workdirs/long_context_short
  XLA_FLAGS=--xla_force_host_platform_device_count=4 python -m llm.train \
      --config=experiments/long_context.py:long --workdir=workdirs/long_context

The recipe of Llama 3 and Code Llama at toy scale: most tokens at a short
length, where attention is cheap, then a short continuation at the long length
with a raised RoPE base. ARG picks the stage:

- `short`: 512 positions, one device, from scratch;
- `long`: 8,192 positions from the short stage's params (`init_from`, fresh
  optimizer), each row split over 4 devices (`mesh.sequence=4`, context
  parallelism: on a CPU the devices come from XLA_FLAGS, set before python
  starts). Attention is the blockwise flash kernel ('auto' from 512 positions).

The corpus is jax's own Python sources, one document per file: they exist
wherever this project is installed (617 files, 12.5M characters, 4.9M tokens),
and a quarter of the files, with 80% of the tokens, are longer than 8k tokens,
so a long context has something to read. `data.text_files` reads
only .txt and .jsonl files, hence the copy as .txt that running this module
writes (once; copies keep their source's modification time, so writing again
changes nothing). `--config.data.text_files=GLOB` trains on other files
instead; give it to both stages.
"""

import importlib.util
import pathlib
import shutil

from experiments import presets
from llm import config as config_lib

CORPUS_DIR = 'data/corpora/jax'
SHORT_WORKDIR = 'workdirs/long_context_short'
VOCAB_SIZE = 4096
_STAGES = ('short', 'long')


def small_llama(*, max_seq_len: int, rope_theta: float):
  """Llama 3's blocks (RMSNorm, SwiGLU, RoPE, GQA), 4 layers of width 256: ~5M parameters."""
  return config_lib.model_config(
    **dict(
      presets.get('llama3_1b'),
      vocab_size=VOCAB_SIZE,
      num_layers=4,
      d_model=256,
      num_heads=4,
      num_kv_heads=2,
      head_dim=64,
      d_ff=768,
      tie_embeddings=False,
      max_seq_len=max_seq_len,
      rope_theta=rope_theta,
      # XLA:CPU runs unrolled layers much faster than a scanned stack (docs/architecture.md);
      # both stages need the same layout for init_from.
      scan_layers=False,
    )
  )


def get_config(arg=None):
  if arg not in _STAGES:
    raise ValueError(f'experiments/long_context.py:ARG is {arg!r}; give one of {_STAGES}.')
  c = config_lib.get_config()
  c.data.dataset = 'text_files'
  c.data.text_files = f'{CORPUS_DIR}/**/*.txt'
  c.data.text_unit = 'file'  # Whole files: passages would cut them below 8k tokens.
  c.data.tokenizer = ''  # Trained on the corpus by the short stage.
  c.data.spm_vocab_size = VOCAB_SIZE
  c.log_every = 5
  c.optim.min_lr_ratio = 0.1
  c.optim.weight_decay = 0.1
  if arg == 'short':
    c.seq_len = 512
    c.batch_size = 8
    c.total_steps = 180  # 0.74M tokens, a sixth of the corpus: minutes on a CPU.
    c.eval_every = 90
    c.eval_steps = 4
    c.checkpoint_every = 90
    c.model = small_llama(max_seq_len=512, rope_theta=10_000.0)
    c.optim.learning_rate = 2e-3
    c.optim.warmup_steps = 20
    return c
  c.seq_len = 8192
  c.batch_size = 1
  c.total_steps = 16  # 131k tokens: ~10 s a step on 2 cores.
  c.log_every = 2
  c.eval_every = 8
  c.eval_steps = 2  # The same 16k validation tokens as the short stage's 4 x 512.
  c.checkpoint_every = 8
  # RoPE rotates dim pair i of queries and keys by position x theta^(-2i/H). At base
  # 10,000 the slowest pair turns 0.07 rad over 512 positions but 1.1 rad over 8k:
  # angles short training never showed the model. At 500,000 it turns 0.03 rad over
  # 8k, and every other pair slows down with it, so long distances look like the
  # short ones it learned ("adjusted base frequency": Code Llama 10k -> 1M, Llama 3
  # 500k); a few long steps adapt the rest.
  c.model = small_llama(max_seq_len=8192, rope_theta=500_000.0)
  c.mesh.sequence = 4
  c.init_from = SHORT_WORKDIR
  # The ids the short stage learned, even if the corpus has changed since (a changed
  # corpus would train a tokenizer of its own). Set it with init_from.
  c.data.tokenizer = SHORT_WORKDIR
  # Where the short stage's schedule ended. A row is about one file, so a step's
  # gradient is noisy: at 5e-4 the validation loss ended above where it started.
  c.optim.learning_rate = 2e-4
  c.optim.warmup_steps = 2
  return c


def write_corpus(out: str = CORPUS_DIR) -> int:
  """jax's sources as .txt files under `out` (the suffix data.text_files reads); their number."""
  package = pathlib.Path(importlib.util.find_spec('jax').submodule_search_locations[0])
  files = sorted(package.rglob('*.py'))
  for path in files:
    dest = pathlib.Path(out, path.relative_to(package.parent)).with_suffix('.py.txt')
    if not dest.exists():
      dest.parent.mkdir(parents=True, exist_ok=True)
      shutil.copy2(path, dest)  # Its mtime too: the corpus's identity includes it.
  return len(files)


if __name__ == '__main__':
  print(f'{write_corpus()} files of jax sources in {CORPUS_DIR}/.')
