"""The TFDS dataset `config.data` names: its builder, its preparation, its records.

Datasets live in `data.data_dir` (a local path or `gs://...`) as
`array_record` files and are read with random access, without TensorFlow.
'shakespeare' and 'text_files' are prepared here, on first use or with
`python -m llm.data.prepare`. Any other name is a TFDS catalog dataset
(`c4/en`, `lm1b`, `wikipedia/20230601.en`, ...) that must already be
prepared as array_record in the data directory: building those needs
TensorFlow and often days of downloading, which is not something to start
implicitly. TFDS writes into a temporary directory and renames it when
complete, so an interrupted preparation never looks finished.
"""

import difflib

import tensorflow_datasets as tfds
from absl import logging
from etils import epath
from tensorflow_datasets.core import read_only_builder

from llm.data import shakespeare, text_files
from llm.data.spec import FINETUNE

PREPARABLE = ('shakespeare', 'text_files')
BUILT_IN = ('synthetic', *PREPARABLE, *FINETUNE)


def _catalog_help(name: str, data_dir: str) -> str:
  return (
    f'prepare it once as array_record: `pip install tensorflow-cpu` then `tfds build {name} '
    f'--data_dir={data_dir} --file_format=array_record`, or convert a TFRecord copy with '
    '`tfds convert_format --dataset_dir=DIR --out_file_format=array_record`.'
  )


def builder(data_config) -> tfds.core.DatasetBuilder:
  """The builder of `data.dataset`; it never prepares anything.

  A missing catalog dataset raises with how to prepare it; a name close to a
  built-in or prepared one is taken for a typo of it, since advising a
  `tfds build` of the typo would send the user the wrong way.
  """
  name, data_dir = data_config.dataset, data_config.data_dir
  kwargs = dict(data_dir=data_dir, file_format='array_record')
  if name == 'synthetic':
    raise ValueError("data.dataset='synthetic' has no files; it is generated in memory.")
  if name in FINETUNE:
    raise ValueError(
      f'data.dataset={name!r} reads data.train_files and data.eval_files as they are; it has '
      'no prepared dataset.'
    )
  if name == 'shakespeare':
    return shakespeare.Shakespeare(archive=data_config.shakespeare_archive, **kwargs)
  if name == 'text_files':
    return text_files.TextFiles(
      config=text_files.TextFilesConfig.from_data_config(data_config), **kwargs
    )
  try:
    found = read_only_builder.builder_from_files(name, data_dir=data_dir)
  except tfds.core.DatasetNotFoundError:
    close = difflib.get_close_matches(name, [*BUILT_IN, *prepared_names(data_dir)], n=1)
    if close:
      raise ValueError(
        f'data.dataset={name!r} is neither built in nor prepared in data.data_dir={data_dir!r}; '
        f'did you mean {close[0]!r}?'
      ) from None
    raise FileNotFoundError(
      f'data.dataset={name!r} is not prepared in data.data_dir={data_dir!r}; '
      + _catalog_help(name, data_dir)
    ) from None
  if found.info.file_format != tfds.core.FileFormat.ARRAY_RECORD:
    raise ValueError(
      f'data.dataset={name!r} in {found.data_dir} is stored as '
      f'{found.info.file_format.value}, which cannot be read without TensorFlow; '
      + _catalog_help(name, data_dir)
    )
  return found


def prepared_names(data_dir: str) -> list[str]:
  """The catalog datasets prepared in `data_dir` ('lm1b', 'c4/en'): what a typo may have meant."""
  root = epath.Path(data_dir)
  names = set()
  for pattern in ('*/*/dataset_info.json', '*/*/*/dataset_info.json'):
    for info in root.glob(pattern):
      name = str(info.parent.parent.relative_to(root))
      if name.split('/')[0] not in PREPARABLE:
        names.add(name)
  return sorted(names)


def is_prepared(b: tfds.core.DatasetBuilder) -> bool:
  return epath.Path(b.data_dir, 'dataset_info.json').exists()


def prepare(data_config, *, overwrite: bool = False) -> tfds.core.DatasetBuilder:
  """Prepares 'shakespeare' or 'text_files' (a no-op when done); checks a catalog dataset exists."""
  b = builder(data_config)
  if data_config.dataset not in PREPARABLE:
    return b
  if is_prepared(b) and not overwrite:
    return b
  if overwrite and data_config.dataset == 'text_files':
    text_files.expand(b.builder_config.patterns)  # Never delete the only copy of gone files.
  if overwrite and epath.Path(b.data_dir).exists():
    epath.Path(b.data_dir).rmtree()
  change = _change(data_config, b)
  if change:
    print(
      f'data.text_files changed since it was prepared ({change}): preparing it again into '
      f'{b.data_dir}.',
      flush=True,
    )
  logging.info('Preparing %s into %s.', data_config.dataset, b.data_dir)
  b.download_and_prepare()
  return b


def _change(data_config, b: tfds.core.DatasetBuilder) -> str:
  """What changed in the files of a text_files corpus since its last preparation ('' if none)."""
  if data_config.dataset != 'text_files':
    return ''
  return text_files.changed_since(data_config.data_dir, b.builder_config)


def summary(b: tfds.core.DatasetBuilder) -> dict:
  """Documents per split and, for the datasets prepared here, what was skipped and why."""
  out = {'dataset_dir': str(b.data_dir)}
  out.update({name: {'documents': s.num_examples} for name, s in b.info.splits.items()})
  metadata = b.info.metadata or {}
  out.update(metadata.get('summary', {}))
  return out


def data_source(data_config, split: str, *, allow_prepare: bool = True):
  """Random-access records of `split`, preparing the dataset first if needed and allowed."""
  b = builder(data_config)
  if not is_prepared(b):
    if not allow_prepare:
      change = _change(data_config, b)
      why = (
        f'data.text_files changed since it was prepared ({change})'
        if change
        else f'data.dataset={data_config.dataset!r} is not prepared in {data_config.data_dir!r}'
      )
      raise FileNotFoundError(
        f'{why}; run `python -m llm.data.prepare --config=...` first (once, before starting '
        'several hosts).'
      )
    b = prepare(data_config)
  base = split.split('[')[0]
  if base not in b.info.splits:
    raise ValueError(
      f'Split {split!r} is not in {data_config.dataset!r}; its splits are '
      f'{", ".join(sorted(b.info.splits))} (see data.train_split and data.eval_split).'
    )
  return b.as_data_source(split=split)


def text_feature(data_config) -> str:
  """The record field holding the text.

  'text' for the datasets prepared here, whatever the jsonl field was;
  `data.text_field` for a catalog dataset.
  """
  return 'text' if data_config.dataset in PREPARABLE else data_config.text_field


def record_text(record: dict, field: str) -> str:
  """The text of one record; invalid UTF-8 from a catalog dataset becomes replacement characters."""
  try:
    value = record[field]
  except KeyError:
    raise ValueError(
      f'Records have no field data.text_field={field!r}; their fields are '
      f'{", ".join(sorted(record))}.'
    ) from None
  if isinstance(value, bytes):
    return value.decode('utf-8', errors='replace')
  return str(value)


def tokenizer_path(data_config) -> epath.Path:
  """Where the dataset's sentencepiece model is stored: beside the datasets, named after one."""
  b = builder(data_config)
  relative = epath.Path(b.data_dir).relative_to(epath.Path(data_config.data_dir))
  tag = str(relative).replace('/', '-')
  name = f'{tag}-{data_config.spm_model_type}{data_config.spm_vocab_size}.model'
  return epath.Path(data_config.data_dir, 'tokenizers', name)


def identity(data_config) -> dict:
  """The prepared dataset a run reads: its directory below data_dir, split and sizes.

  Below data_dir, so that the same dataset mounted elsewhere is the same; for
  text_files the directory names the files too (`text_files.TextFilesConfig`).
  """
  b = builder(data_config)
  out = {'prepared': b.info.full_name, 'split': data_config.train_split}
  if is_prepared(b):
    out['documents'] = {name: s.num_examples for name, s in sorted(b.info.splits.items())}
  return out


def skipped_report(data_config) -> str:
  """What the preparation of a text_files corpus skipped, as one line ('' if nothing)."""
  if data_config.dataset != 'text_files':
    return ''
  b = builder(data_config)
  if not is_prepared(b):
    return ''
  return text_files.skipped_report((b.info.metadata or {}).get('summary', {}))
