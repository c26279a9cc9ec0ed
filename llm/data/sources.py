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

import tensorflow_datasets as tfds
from absl import logging
from etils import epath
from tensorflow_datasets.core import read_only_builder

from llm.data import shakespeare, text_files

PREPARABLE = ('shakespeare', 'text_files')


def _catalog_help(name: str, data_dir: str) -> str:
  return (
    f'prepare it once as array_record: `pip install tensorflow-cpu` then `tfds build {name} '
    f'--data_dir={data_dir} --file_format=array_record`, or convert a TFRecord copy with '
    '`tfds convert_format --dataset_dir=DIR --out_file_format=array_record`.'
  )


def builder(data_config) -> tfds.core.DatasetBuilder:
  """The builder of `data.dataset`; a missing catalog dataset raises with how to prepare it."""
  name, data_dir = data_config.dataset, data_config.data_dir
  kwargs = dict(data_dir=data_dir, file_format='array_record')
  if name == 'synthetic':
    raise ValueError("data.dataset='synthetic' has no files; it is generated in memory.")
  if name == 'shakespeare':
    return shakespeare.Shakespeare(archive=data_config.shakespeare_archive, **kwargs)
  if name == 'text_files':
    return text_files.TextFiles(
      config=text_files.TextFilesConfig.from_data_config(data_config), **kwargs
    )
  try:
    found = read_only_builder.builder_from_files(name, data_dir=data_dir)
  except tfds.core.DatasetNotFoundError:
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


def is_prepared(b: tfds.core.DatasetBuilder) -> bool:
  return epath.Path(b.data_dir, 'dataset_info.json').exists()


def prepare(data_config, *, overwrite: bool = False) -> tfds.core.DatasetBuilder:
  """Prepares 'shakespeare' or 'text_files' (a no-op when done); checks a catalog dataset exists."""
  b = builder(data_config)
  if data_config.dataset not in PREPARABLE:
    return b
  if is_prepared(b) and not overwrite:
    return b
  if overwrite and epath.Path(b.data_dir).exists():
    epath.Path(b.data_dir).rmtree()
  if data_config.dataset == 'text_files':
    text_files.expand(b.builder_config.patterns)  # Missing files fail before TFDS starts.
  logging.info('Preparing %s into %s.', data_config.dataset, b.data_dir)
  b.download_and_prepare()
  return b


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
      raise FileNotFoundError(
        f'data.dataset={data_config.dataset!r} is not prepared in {data_config.data_dir!r}; '
        'run `python -m llm.data.prepare --config=...` first (once, before starting several hosts).'
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
    raise KeyError(
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
