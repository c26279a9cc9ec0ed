"""The two conversions of `python -m llm.convert`, callable from Python too.

`import_hf` turns a Hugging Face model directory into a params checkpoint
(`llm/checkpoint.py`'s params-only export) with the tokenizer files beside it; `export_hf`
does the reverse. Both hold the model once, in host memory.
"""

import os

import jax
import numpy as np
from absl import logging

from llm import checkpoint
from llm.convert import hf
from llm.convert import tokenizer as tokenizer_lib


def import_hf(hf_dir: str, out_dir: str, **overrides) -> None:
  """HF directory -> `out_dir/{params/, model_config.json, tokenizer/}`.

  `overrides`: ModelConfig fields in `hf.RUNTIME_FIELDS` (e.g. param_dtype, scan_layers).
  """
  if os.path.exists(os.path.join(out_dir, 'params')):  # Before minutes of reading.
    raise ValueError(f'{out_dir} already holds params; choose a new directory.')
  cfg, params = hf.load(hf_dir, **overrides)
  n = sum(int(np.size(x)) for x in jax.tree.leaves(params))
  checkpoint.save_params(out_dir, cfg, params)
  copied = []
  if tokenizer_lib.exists(hf_dir):
    copied = tokenizer_lib.copy_files(hf_dir, os.path.join(out_dir, checkpoint.TOKENIZER_DIR))
  else:
    logging.warning('%s has no tokenizer.json or tokenizer.model; no tokenizer imported.', hf_dir)
  print(f'Wrote {out_dir}: {n:,} parameters, tokenizer files {copied or "none"}.')


def export_hf(
  params_dir: str,
  hf_dir: str,
  *,
  tokenizer: str | None = None,
  dtype: str | None = None,
  max_shard_bytes: int = hf.DEFAULT_MAX_SHARD_BYTES,
) -> None:
  """Params checkpoint -> HF directory; the tokenizer comes from `tokenizer` (a directory
  of Hugging Face tokenizer files) or else from `params_dir/tokenizer/`."""
  cfg, params, _ = checkpoint.load_params(params_dir)
  if tokenizer is None:
    tokenizer = os.path.join(params_dir, checkpoint.TOKENIZER_DIR)
    if not tokenizer_lib.exists(tokenizer):
      logging.warning('No tokenizer in %s; the export will have none.', tokenizer)
      tokenizer = None
  hf.save(cfg, params, hf_dir, tokenizer=tokenizer, dtype=dtype, max_shard_bytes=max_shard_bytes)
  print(f'Wrote {hf_dir}.')
