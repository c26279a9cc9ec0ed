"""Converts between Hugging Face model directories, training workdirs and params exports.

  python -m llm.convert import --hf_dir=D --out=DIR [--param_dtype=bfloat16]
  python -m llm.convert params --source=WORKDIR --out=DIR [--dtype=bfloat16]
  python -m llm.convert export --params=DIR --hf_dir=D [--dtype=bfloat16]

`import` writes DIR/params (orbax), DIR/model_config.json and DIR/tokenizer/,
which training (fine-tuning), generation and evaluation start from; `params`
writes the same from a training workdir's newest checkpoint (or any other
model). `export` writes config.json, safetensors and tokenizer files that
transformers' `from_pretrained` loads, from an export, a workdir or a
Hugging Face directory. Only safetensors are read: pickles are refused.
"""

from absl import app, flags, logging

from llm import cli
from llm.convert import commands

_HF_DIR = flags.DEFINE_string('hf_dir', None, 'Hugging Face model directory (read or written).')
_OUT = flags.DEFINE_string('out', None, 'import: directory for the params checkpoint.')
_PARAMS = flags.DEFINE_string(
  'params', None, 'export: the model to export (params export, training workdir or HF dir).'
)
_SOURCE = flags.DEFINE_string('source', None, 'params: the model to write an export of.')
_PARAM_DTYPE = flags.DEFINE_enum(
  'param_dtype', 'float32', ['float32', 'bfloat16'], 'import: dtype of the stored params.'
)
_SCAN_LAYERS = flags.DEFINE_bool(
  'scan_layers', True, 'import: stack layers on a leading axis (the default model layout).'
)
_DTYPE = flags.DEFINE_enum(
  'dtype', None, ['float32', 'bfloat16', 'float16'], 'export, params: dtype of the weights.'
)
_TOKENIZER = flags.DEFINE_string(
  'tokenizer', None, 'export: tokenizer files directory (default: PARAMS/tokenizer).'
)
_MAX_SHARD_GB = flags.DEFINE_float('max_shard_gb', 5.0, 'export: size past which to shard.')

_USAGE = (
  'Usage: python -m llm.convert import --hf_dir=D --out=DIR | '
  'python -m llm.convert params --source=WORKDIR --out=DIR | '
  'python -m llm.convert export --params=DIR --hf_dir=D'
)
_NEEDED = {'import': ('hf_dir', 'out'), 'params': ('source', 'out'), 'export': ('params', 'hf_dir')}


def main(argv):
  if len(argv) != 2 or argv[1] not in _NEEDED:
    raise app.UsageError(
      f'Expected one command, import, params or export, got {argv[1:]}. {_USAGE}'
    )
  needed = _NEEDED[argv[1]]
  missing = [f'--{n}' for n in needed if not flags.FLAGS[n].value]
  if missing:
    raise app.UsageError(f'{argv[1]} needs {" and ".join(missing)}. {_USAGE}')
  logging.set_verbosity(logging.WARNING)  # orbax logs every step of a save at INFO.
  if argv[1] == 'import':
    commands.import_hf(
      _HF_DIR.value, _OUT.value, param_dtype=_PARAM_DTYPE.value, scan_layers=_SCAN_LAYERS.value
    )
  elif argv[1] == 'params':
    commands.write_params(_SOURCE.value, _OUT.value, dtype=_DTYPE.value)
  else:
    commands.export_hf(
      _PARAMS.value,
      _HF_DIR.value,
      tokenizer=_TOKENIZER.value,
      dtype=_DTYPE.value,
      max_shard_bytes=int(_MAX_SHARD_GB.value * 10**9),
    )


if __name__ == '__main__':
  cli.run(main)
