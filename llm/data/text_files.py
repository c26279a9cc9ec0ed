"""The user's own corpus as a TFDS dataset: `.txt`, `.txt.gz`, `.jsonl`, `.jsonl.gz` files.

A document is a whole `.txt` file, one of its lines, or one of its passages
(`data.text_unit`); always one record of a `.jsonl` file (the string in
`data.text_field`). Each document goes to train or validation by a hash of
its name (file, and line or passage number), so the split never depends on
file order or on how many files there are, and a document stays in its split
when files are added.

Bad records are skipped and counted, never fatal: empty files, binary files
(a NUL byte in the first 8 KiB), jsonl lines that are not JSON objects or lack
the field. Invalid UTF-8 is decoded with replacement characters and counted.
The counts are printed when preparation ends and kept in the dataset's
`metadata.json`. What cannot be skipped stops preparation with one sentence:
a pattern that matches nothing, an unsupported file type, a corrupt gzip
file, a corpus with no documents left, an empty validation split.

A prepared corpus is named after its settings and its files (each one's size
and modification time, in whole seconds): adding, changing or removing a file
prepares it again, into a directory of its own, saying what changed; a corpus
whose files are all gone is read from its last preparation. The tokenizer
trained on a prepared corpus is stored under the corpus's name
(`sources.tokenizer_path`), so a changed corpus trains its own tokenizer too;
to keep the one a model was trained with, set `data.tokenizer` to it (its
`.model` file, or the run's workdir, which holds a copy).
"""

import collections
import contextlib
import dataclasses
import functools
import glob
import gzip
import hashlib
import json
import zlib

import tensorflow_datasets as tfds
from absl import logging
from etils import epath

from llm.data import globs

UNITS = ('file', 'line', 'passage')
SUFFIXES = ('.txt', '.txt.gz', '.jsonl', '.jsonl.gz')
_BINARY_PROBE_BYTES = 8192
_MAX_EXAMPLES = 10  # Skipped records named in the summary.


def in_validation(key: str, fraction: float) -> bool:
  """A stable coin flip per document name: the same on every machine and run."""
  h = int.from_bytes(hashlib.sha256(key.encode('utf-8')).digest()[:8], 'big')
  return h < fraction * 2**64


def passages(text: str, min_chars: int) -> list[str]:
  """Cuts `text` at blank lines into pieces of at least `min_chars` (the last may be shorter).

  Long books become many documents, so shuffling mixes them and the
  validation split samples every book.
  """
  out, start = [], 0
  while start < len(text):
    cut = text.find('\n\n', start + min_chars)
    if cut < 0:
      cut = len(text)
    piece = text[start:cut].strip('\n')
    if piece.strip():
      out.append(piece)
    start = cut
    while start < len(text) and text[start] == '\n':
      start += 1
  return out


def expand(patterns: str) -> list[tuple[epath.Path, str]]:
  """(file, name) for comma-separated globs (`**` recurses locally; `gs://` globs need `*`).

  A file's name is its path below the pattern's fixed prefix, so that moving the
  corpus does not move documents between splits.
  """
  files = {}
  for pattern in (p.strip() for p in patterns.split(',')):
    if not pattern:
      continue
    globs.check_not_directory('text_files', pattern, '.txt')
    parts = pattern.split('/')
    wild = next((i for i, p in enumerate(parts) if any(c in p for c in '*?[')), len(parts) - 1)
    root = '/'.join(parts[:wild])
    if '://' in pattern:
      matched = list(epath.Path(root).glob('/'.join(parts[wild:])))
      matched = [p for p in matched if p.exists()]
    else:
      matched = [epath.Path(p) for p in glob.glob(pattern, recursive=True)]
    if not matched:
      raise FileNotFoundError(f'data.text_files pattern {pattern!r} matches no files.')
    for path in matched:
      if path.is_file():
        files[str(path)] = (path, str(path)[len(root) :].lstrip('/'))
  if not files:
    raise FileNotFoundError(f'data.text_files={patterns!r} matches no files.')
  for path, _ in files.values():
    if not path.name.endswith(SUFFIXES):
      raise ValueError(
        f'{path} is not a supported text file; data.text_files must match only '
        f'{", ".join(SUFFIXES)} files.'
      )
  return [files[k] for k in sorted(files)]


@contextlib.contextmanager
def _open(path: epath.Path):
  """The file's bytes as a stream (decompressed for .gz); a corrupt .gz stops with its name."""
  with path.open('rb') as raw:
    if not path.name.endswith('.gz'):
      yield raw
      return
    try:
      with gzip.GzipFile(fileobj=raw) as f:
        yield f
    except (gzip.BadGzipFile, EOFError, zlib.error) as e:
      raise ValueError(f'{path} is not a valid gzip file ({e}).') from None


def _lines(head: bytes, rest):
  """The lines of `head` followed by the stream `rest`, without line ends: never all in memory."""
  lines = head.split(b'\n')
  tail = lines.pop()
  yield from lines
  for line in rest:
    yield (tail + line).removesuffix(b'\n')
    tail = b''
  if tail:
    yield tail


def _decode(data: bytes, counts: collections.Counter) -> str:
  try:
    return data.decode('utf-8')
  except UnicodeDecodeError:
    counts['invalid_utf8_replaced'] += 1
    return data.decode('utf-8', errors='replace')


@dataclasses.dataclass(kw_only=True)
class TextFilesConfig(tfds.core.BuilderConfig):
  """What to read and how to cut it.

  Its name is 'SETTINGS-FILES': a hash of these fields, then a hash of the
  files' listing (`globs.listing`), so that a corpus whose files changed is
  prepared again into a directory of its own, beside the earlier ones.
  """

  patterns: str = ''
  unit: str = 'file'
  field: str = 'text'
  passage_chars: int = 2000
  validation_fraction: float = 0.05
  files: tuple = dataclasses.field(default=(), repr=False)  # (path, name) per file, from `expand`.
  listing: dict = dataclasses.field(default_factory=dict, repr=False)

  @classmethod
  def from_data_config(cls, data_config) -> 'TextFilesConfig':
    if not data_config.text_files:
      raise ValueError(
        "data.text_files is empty; set it to a glob of your files, e.g. 'corpus/**/*.txt'."
      )
    if data_config.text_unit not in UNITS:
      raise ValueError(f'data.text_unit={data_config.text_unit!r} is not one of {UNITS}.')
    if not 0 < data_config.validation_fraction < 1:
      raise ValueError(
        f'data.validation_fraction={data_config.validation_fraction} must be between 0 and 1, '
        'both excluded: each split needs documents.'
      )
    if data_config.passage_chars <= 0:
      raise ValueError(f'data.passage_chars={data_config.passage_chars} must be positive.')
    # Local globs are made absolute so that the name does not depend on the working directory.
    patterns = ','.join(
      p if '://' in p else str(epath.Path(p).absolute()) if p else ''
      for p in (p.strip() for p in data_config.text_files.split(','))
    )
    fields = dict(
      patterns=patterns,
      unit=data_config.text_unit,
      field=data_config.text_field,
      passage_chars=data_config.passage_chars,
      validation_fraction=data_config.validation_fraction,
    )
    settings = globs.digest(fields)[:12]
    try:
      found = expand(data_config.text_files)
    except FileNotFoundError as e:
      # The files are gone (deleted after preparing, or not mounted here): what was
      # prepared from them is all there is, and still names the same documents.
      before = previous(data_config.data_dir, settings)
      if before is None:
        raise FileNotFoundError(
          f'{e.args[0].removesuffix(".")} and data.data_dir={data_config.data_dir!r} holds '
          'nothing prepared from it; fix the pattern, then training or `python -m '
          'llm.data.prepare --config=...` prepares it.'
        ) from None
      _note_once(
        f'data.text_files={data_config.text_files!r} matches no files now; reading the '
        f'dataset prepared from it before, in {before}.'
      )
      return cls(name=before.parent.name, description=json.dumps(fields), **fields)
    listing = globs.listing(path for path, _ in found)
    return cls(
      name=f'{settings}-{globs.digest(listing)[:8]}',
      description=json.dumps(fields),
      files=tuple(found),
      listing=listing,
      **fields,
    )


def previous(data_dir: str, settings: str, name: str = '') -> epath.Path | None:
  """The newest dataset prepared with the settings hash `settings`, other than config `name`."""
  found = [
    info.parent
    for info in epath.Path(data_dir, 'text_files').glob(f'{settings}-*/*/dataset_info.json')
    if info.parent.parent.name != name and not info.parent.name.startswith('incomplete')
  ]
  return max(found, key=lambda d: globs.modified(d / 'dataset_info.json'), default=None)


def changed_since(data_dir: str, cfg: TextFilesConfig) -> str:
  """How `cfg`'s files differ from the last preparation of the same globs; '' if there was none.

  For example '12 files added, 1 modified, 0 removed'.
  """
  before = previous(data_dir, cfg.name.partition('-')[0], cfg.name)
  if before is None or not cfg.listing:
    return ''
  path = before / 'metadata.json'
  old = json.loads(path.read_text()).get('files', {}) if path.exists() else {}
  return globs.changes(old, cfg.listing)


@functools.cache
def _note_once(message: str) -> None:
  # The builder is made several times per run (tokenizer, dataset, identity): one line is enough.
  print(message, flush=True)


class TextFiles(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """Documents from the user's files; one builder config per distinct set of settings and files."""

  VERSION = tfds.core.Version('1.0.0')
  # No TFDS checksums file to look for. (Looking for it touches `importlib_resources`,
  # which TFDS requires only on Python < 3.9 but uses on every version.)
  code_path = None

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
      builder=self,
      description='Documents from ' + self.builder_config.patterns,
      features=tfds.features.FeaturesDict({'text': tfds.features.Text()}),
      metadata=tfds.core.MetadataDict(),
    )

  def _split_generators(self, dl_manager):
    del dl_manager
    cfg = self.builder_config
    files = list(cfg.files) or expand(cfg.patterns)
    self._summary = {'files': len(files)}
    # The next preparation of these globs compares its files with these.
    self.info.metadata['files'] = cfg.listing or globs.listing(path for path, _ in files)
    return {
      'train': self._generate_examples(files, 'train'),
      'validation': self._generate_examples(files, 'validation'),
    }

  def _generate_examples(self, files, split):
    cfg = self.builder_config
    # File-level problems are seen by both passes; only the train pass counts them.
    file_counts = collections.Counter() if split == 'train' else None
    counts = collections.Counter()
    examples = []
    for path, name in files:
      for key, raw in self._candidates(path, name, file_counts):
        if in_validation(key, cfg.validation_fraction) != (split == 'validation'):
          counts['in_other_split'] += 1
          continue
        text, problem = _text(raw, '.jsonl' in path.name, cfg.field, counts)
        if problem:
          counts[problem] += 1
          if len(examples) < _MAX_EXAMPLES:
            examples.append(f'{key}: {problem}')
          continue
        counts['documents'] += 1
        yield key, {'text': text}
    if file_counts is not None:
      self._summary.update(file_counts)
    self._summary.setdefault('skipped_examples', []).extend(examples)
    other = counts.pop('in_other_split', 0)
    self._summary[split] = dict(counts)
    self.info.metadata['summary'] = self._summary
    if not counts['documents']:
      raise ValueError(
        f'The {split} split of data.text_files={cfg.patterns!r} has no documents '
        f'({len(files)} files, {other} documents in the other split; '
        f'{_describe(self._summary, split)}); '
        + (
          'add documents, use a finer data.text_unit or change data.validation_fraction.'
          if other
          else 'check the files and data.text_field.'
        )
      )

  def _candidates(self, path: epath.Path, name: str, file_counts: collections.Counter | None):
    """Yields (key, raw) per would-be document: raw bytes are decoded later, by one split only."""
    cfg = self.builder_config
    found = False
    with _open(path) as f:
      head = f.read(_BINARY_PROBE_BYTES)
      if b'\0' in head:
        problem = 'binary_files'
      else:
        problem = 'empty_files'
        if '.jsonl' in path.name or cfg.unit == 'line':
          for i, line in enumerate(_lines(head, f), 1):
            if line.strip():
              found = True
              yield f'{name}:{i}', line
        else:
          data = head + f.read()
          found = bool(data.strip())
          if found and cfg.unit == 'file':
            yield name, data
          elif found:
            counts = file_counts if file_counts is not None else collections.Counter()
            for i, piece in enumerate(passages(_decode(data, counts), cfg.passage_chars)):
              yield f'{name}#{i}', piece
    if not found and file_counts is not None:
      file_counts[problem] += 1
      logging.warning('Skipping %s: %s.', path, problem.replace('_files', ' file'))


def _text(raw: bytes | str, is_jsonl: bool, field: str, counts) -> tuple[str, str]:
  """(text, '') for a good document, else ('', why it is skipped)."""
  if isinstance(raw, str):
    return raw, ''
  if not is_jsonl:
    return _decode(raw.rstrip(b'\r'), counts), ''
  try:
    record = json.loads(_decode(raw, counts))
  except ValueError:
    return '', 'not_json'
  if not isinstance(record, dict) or field not in record:
    return '', 'missing_field'
  text = record[field]
  if not isinstance(text, str):
    return '', 'field_not_text'
  if not text.strip():
    return '', 'empty_text'
  return text, ''


def _describe(summary: dict, split: str) -> str:
  skipped = {k: v for k, v in summary.items() if k.endswith('_files') and v}
  skipped.update({k: v for k, v in summary.get(split, {}).items() if k != 'documents'})
  return 'skipped: ' + (', '.join(f'{k}={v}' for k, v in skipped.items()) or 'nothing')


def skipped_report(summary: dict) -> str:
  """One line on what preparation left out or repaired, from its stored summary; '' if nothing.

  Training prints it at start-up: a run on a corpus that lost records must say
  so where the user looks, not only in the output of the preparation.
  """
  skipped = {k: v for k, v in summary.items() if k.endswith('_files') and v}
  records = collections.Counter()
  for split in ('train', 'validation'):
    records.update(summary.get(split, {}))
  records.pop('documents', None)
  replaced = records.pop('invalid_utf8_replaced', 0) + summary.get('invalid_utf8_replaced', 0)
  n_files = sum(skipped.values())
  skipped.update((k, v) for k, v in records.items() if v)
  n_records = sum(skipped.values()) - n_files
  what = [_count(n, unit) for n, unit in ((n_files, 'file'), (n_records, 'record')) if n]
  replacing = f'read {_count(replaced, "document")} with invalid UTF-8 as replacement characters'
  if what:
    details = ', '.join(f'{k}={v}' for k, v in skipped.items())
    line = f'skipped {" and ".join(what)} of data.text_files ({details})'
    line += f' and {replacing}' if replaced else ''
  elif replaced:
    line = replacing.replace(' with ', ' of data.text_files with ', 1)
  else:
    return ''
  return f'data: {line}; see `python -m llm.data.prepare` for examples.'


def _count(n: int, unit: str) -> str:
  return f'{n} {unit}{"" if n == 1 else "s"}'
