"""The conversions of `python -m llm.convert`, callable from Python too.

`write_params` turns any model `llm.io.models` opens (a Hugging Face
directory, a training workdir, another export) into a params export with its
tokenizer copy; `import_hf` is that for a Hugging Face directory. `export_hf`
writes a Hugging Face directory from any of them. A Hugging Face import holds
the model once, in host memory.
"""

import jax
import numpy as np
from absl import logging
from etils import epath

from llm.convert import hf
from llm.data import hf_tokenizer
from llm.io import checkpoint, models


def write_params(path: str, out_dir: str, *, dtype: str | None = None, **hf_overrides) -> None:
  """Any model -> `out_dir/{params/, model_config.json, tokenizer/}`.

  hf_overrides: for a Hugging Face directory, ModelConfig fields in
  `hf.RUNTIME_FIELDS` (e.g. param_dtype, scan_layers).
  """
  if (epath.Path(out_dir) / 'params').exists():  # Before minutes of reading.
    raise ValueError(f'{out_dir} already holds params; choose a new directory.')
  source = models.open(path, **hf_overrides)
  try:
    tok = source.tokenizer()
  except (ValueError, FileNotFoundError) as e:
    logging.warning('No tokenizer copied: %s', e)
    tok = None
  if source.kind == 'hf':
    # hf.load's numpy arrays are moved into the export one by one: held once.
    cfg, params = hf.load(path, **hf_overrides)
  else:
    cfg, params = source.model_cfg, source.read()
  checkpoint.save_params(out_dir, cfg, params, dtype, tokenizer=tok)
  n = sum(int(np.size(x)) for x in jax.tree.leaves(params))
  print(f'Wrote {out_dir}: {n:,} parameters, tokenizer {"copied" if tok else "none"}.')


def import_hf(hf_dir: str, out_dir: str, **overrides) -> None:
  """HF directory -> params export; `overrides` as `write_params`'s hf_overrides."""
  if models.kind_of(hf_dir) not in ('hf', None):
    raise ValueError(
      f'{hf_dir} is a {models.kind_of(hf_dir)}, not a Hugging Face directory; '
      'python -m llm.convert params --source=... writes an export of it.'
    )
  write_params(hf_dir, out_dir, **overrides)


def export_hf(
  path: str,
  hf_dir: str,
  *,
  tokenizer: str | None = None,
  dtype: str | None = None,
  max_shard_bytes: int = hf.DEFAULT_MAX_SHARD_BYTES,
) -> None:
  """Any model `llm.io.models` opens -> HF directory.

  The tokenizer comes from `tokenizer` (a directory of Hugging Face tokenizer
  files), else the model's own when it is a Hugging Face tokenizer; the
  project's byte and sentencepiece tokenizers have no Hugging Face form, so
  the export then has none.
  """
  source = models.open(path)
  if tokenizer is None:
    try:
      own = source.tokenizer()
    except (ValueError, FileNotFoundError):
      own = None
    if isinstance(own, hf_tokenizer.FastTokenizer | hf_tokenizer.SentencePieceTokenizer):
      tokenizer = own
    else:
      logging.warning('%s has no Hugging Face tokenizer; the export will have none.', path)
  hf.save(
    source.model_cfg,
    source.read(),
    hf_dir,
    tokenizer=tokenizer,
    dtype=dtype,
    max_shard_bytes=max_shard_bytes,
  )
  print(f'Wrote {hf_dir}.')
