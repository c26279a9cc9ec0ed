"""Safetensors checkpoints in and out, one tensor at a time, never a pickle.

Reading parses the format directly (an 8-byte header length, a JSON header,
then raw little-endian bytes) and memory-maps each file, so a tensor is read
only when asked for and a model never sits in memory twice. The `safetensors`
package's numpy reader cannot return bfloat16, the dtype most Llama releases
ship in; `ml_dtypes` (a JAX dependency) can. Writing uses the `safetensors`
package, one shard at a time.
"""

import json
import os
import struct
from collections.abc import Iterator

import ml_dtypes
import numpy as np
import safetensors.numpy

SINGLE_FILE = 'model.safetensors'
INDEX_FILE = 'model.safetensors.index.json'
# Pickle-based checkpoints: loading them runs arbitrary code, so they are refused.
PICKLE_FILES = ('pytorch_model.bin', 'pytorch_model.bin.index.json', 'model.pt', 'model.pth')

_DTYPES = {
  'F64': np.dtype(np.float64),
  'F32': np.dtype(np.float32),
  'F16': np.dtype(np.float16),
  'BF16': np.dtype(ml_dtypes.bfloat16),
  'F8_E4M3': np.dtype(ml_dtypes.float8_e4m3fn),
  'F8_E5M2': np.dtype(ml_dtypes.float8_e5m2),
  'I64': np.dtype(np.int64),
  'I32': np.dtype(np.int32),
  'I16': np.dtype(np.int16),
  'I8': np.dtype(np.int8),
  'U8': np.dtype(np.uint8),
  'BOOL': np.dtype(np.bool_),
}


def checkpoint_files(hf_dir: str) -> list[str]:
  """The safetensors files of a model directory, sharded or not.

  Stops on pickle checkpoints with a sentence saying why and what to do instead.
  """
  index_path = os.path.join(hf_dir, INDEX_FILE)
  if os.path.exists(index_path):
    with open(index_path) as f:
      weight_map = json.load(f)['weight_map']
    files = sorted(set(weight_map.values()))
    missing = [n for n in files if not os.path.exists(os.path.join(hf_dir, n))]
    if missing:
      raise FileNotFoundError(f'{index_path} names shards that are not in {hf_dir}: {missing}.')
    return [os.path.join(hf_dir, n) for n in files]
  single = os.path.join(hf_dir, SINGLE_FILE)
  if os.path.exists(single):
    return [single]
  pickles = [n for n in PICKLE_FILES if os.path.exists(os.path.join(hf_dir, n))]
  if pickles:
    raise ValueError(
      f'{hf_dir} holds only pickle checkpoints ({", ".join(pickles)}), which are refused because '
      'unpickling can run arbitrary code; convert them to safetensors first, in a trusted '
      'environment, with transformers: '
      'AutoModelForCausalLM.from_pretrained(dir).save_pretrained(out, safe_serialization=True).'
    )
  raise FileNotFoundError(f'{hf_dir} has neither {SINGLE_FILE} nor {INDEX_FILE}.')


def read_header(path: str) -> tuple[dict, int]:
  """(header without '__metadata__', byte offset where tensor data starts)."""
  with open(path, 'rb') as f:
    head = f.read(8)
    if len(head) != 8:
      raise ValueError(f'{path} is not a safetensors file: it is shorter than 8 bytes.')
    (n,) = struct.unpack('<Q', head)
    size = os.path.getsize(path)
    if n > size - 8:
      raise ValueError(f'{path} is not a safetensors file: header length {n} exceeds its size.')
    header = json.loads(f.read(n))
  header.pop('__metadata__', None)
  return header, 8 + n


def tensor_names(files: list[str]) -> dict[str, str]:
  """Tensor name -> the file holding it, from the headers alone (no tensor data read)."""
  where = {}
  for path in files:
    for name in read_header(path)[0]:
      if name in where:
        raise ValueError(f'Tensor {name!r} appears in both {where[name]} and {path}.')
      where[name] = path
  return where


def iter_tensors(path: str) -> Iterator[tuple[str, np.ndarray]]:
  """(name, read-only memory-mapped array) for every tensor of one file."""
  header, start = read_header(path)
  size = os.path.getsize(path)
  mm = np.memmap(path, dtype=np.uint8, mode='r')
  try:
    for name, info in header.items():
      if info['dtype'] not in _DTYPES:
        raise ValueError(
          f'Tensor {name!r} in {path} has dtype {info["dtype"]}; supported: {", ".join(_DTYPES)}.'
        )
      dtype = _DTYPES[info['dtype']]
      begin, end = info['data_offsets']
      shape = tuple(info['shape'])
      if start + end > size or end - begin != int(np.prod(shape)) * dtype.itemsize:
        raise ValueError(f'Tensor {name!r} in {path} has data offsets that do not fit its shape.')
      yield name, mm[start + begin : start + end].view(dtype).reshape(shape)
  finally:
    del mm


def write_shards(
  tensors: Iterator[tuple[str, np.ndarray]], hf_dir: str, max_shard_bytes: int
) -> list[str]:
  """Writes tensors into `model.safetensors`, or shards plus an index past `max_shard_bytes`.

  Only one shard's tensors are held at a time. Shards are written under
  temporary names and renamed once their count is known, as Hugging Face names
  them `model-00001-of-00003.safetensors`. Returns the written file names.
  """
  shards, current, current_bytes = [], {}, 0

  def flush():
    tmp = f'model-{len(shards) + 1:05d}.tmp'
    # transformers refuses safetensors files without this metadata.
    safetensors.numpy.save_file(current, os.path.join(hf_dir, tmp), metadata={'format': 'pt'})
    shards.append((tmp, list(current), sum(a.nbytes for a in current.values())))

  for name, array in tensors:
    if current and current_bytes + array.nbytes > max_shard_bytes:
      flush()
      current, current_bytes = {}, 0
    current[name] = np.ascontiguousarray(array)
    current_bytes += array.nbytes
  if current or not shards:
    flush()

  if len(shards) == 1:
    os.replace(os.path.join(hf_dir, shards[0][0]), os.path.join(hf_dir, SINGLE_FILE))
    return [SINGLE_FILE]
  weight_map, names = {}, []
  for i, (tmp, tensor_names_, _) in enumerate(shards):
    final = f'model-{i + 1:05d}-of-{len(shards):05d}.safetensors'
    os.replace(os.path.join(hf_dir, tmp), os.path.join(hf_dir, final))
    weight_map.update(dict.fromkeys(tensor_names_, final))
    names.append(final)
  index = {'metadata': {'total_size': sum(s[2] for s in shards)}, 'weight_map': weight_map}
  with open(os.path.join(hf_dir, INDEX_FILE), 'w') as f:
    json.dump(index, f, indent=2, sort_keys=True)
  return names
