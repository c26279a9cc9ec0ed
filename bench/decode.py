r"""Decode throughput: our KV-cache generation against Hugging Face `generate`, same weights.

  python bench/decode.py [--preset=gpt2_124m] [--batch_sizes=1,16] [--new_tokens=128] \
      [--hf_python=PYTHON] [--scan_layers]

Random weights of the preset's shape (speed does not depend on their values)
are exported with `llm.convert.hf.save`. For each batch size, both sides
generate greedily exactly --new_tokens tokens (no EOS) after the same random
--prompt_len-token prompts, once to warm up (our compilation), then timed.
Tokens/s = batch x new tokens / wall time of one whole generate call, prefill
included, the same on both sides; float32 on both.

The Hugging Face side runs in another Python (--hf_python) that has torch,
transformers and safetensors, since the project's environment has no torch:
this file imports nothing beyond the standard library at the top so that it
can be that side's script too. It also reports how many rows of greedy
tokens the two sides agree on, a check that they compute the same model.
Prints a Markdown table row per batch size for bench/RESULTS.md and writes
bench/decode.json (which bench/plot.py draws). Our side loads the layers
unrolled (`scan_layers=False`) unless --scan_layers: a scanned stack copies
every layer's KV cache slice in and out of the stacked cache at each token.
"""

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def ours(hf_dir: str, prompts: list[list[int]], batch_sizes, new_tokens: int, scan: bool) -> dict:
  """{batch: (tokens/s, tokens)} for llm.generate on the exported weights."""
  sys.path.insert(0, ROOT)
  import jax

  from llm import generate, sharding
  from llm.convert import hf
  from llm.model import resolve

  cfg, params = hf.load(hf_dir, scan_layers=scan)
  cfg = resolve(cfg, sharding.one_device_mesh())
  params = jax.device_put(params)
  out = {}
  for B in batch_sizes:
    run = lambda B=B: generate.generate_ids(cfg, params, prompts[:B], max_new_tokens=new_tokens)
    run()  # Compiles.
    start = time.perf_counter()
    gens = run()
    seconds = time.perf_counter() - start
    out[B] = (B * new_tokens / seconds, [g.tokens for g in gens])
  return out


def hugging_face(hf_dir: str, prompts, batch_sizes, new_tokens: int, threads: int) -> dict:
  """{batch: (tokens/s, tokens)} for transformers' generate (KV cache on, greedy)."""
  import torch
  import transformers

  torch.set_num_threads(threads)
  model = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
  out = {}
  for B in batch_sizes:
    ids = torch.tensor(prompts[:B])
    kw = dict(
      attention_mask=torch.ones_like(ids),
      max_new_tokens=new_tokens,
      do_sample=False,
      use_cache=True,
      pad_token_id=0,
    )
    with torch.inference_mode():
      model.generate(ids, **dict(kw, max_new_tokens=8))  # Warm-up (nothing to compile).
      start = time.perf_counter()
      tokens = model.generate(ids, **kw)[:, ids.shape[1] :]
      seconds = time.perf_counter() - start
    out[B] = (B * new_tokens / seconds, tokens.tolist())
  return out


def main():
  p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  p.add_argument('--preset', default='gpt2_124m')
  p.add_argument('--batch_sizes', default='1,16')
  p.add_argument('--prompt_len', type=int, default=16)
  p.add_argument('--new_tokens', type=int, default=128)
  p.add_argument('--hf_python', default='', help='A Python with torch and transformers.')
  # On a loaded machine torch's spinning worker threads collapse: try 1 as well as all cores.
  p.add_argument('--hf_threads', type=int, default=os.cpu_count(), help='torch threads.')
  p.add_argument('--scan_layers', action='store_true', help='Scan over layers on our side.')
  p.add_argument('--json', default=os.path.join(ROOT, 'bench', 'decode.json'))
  p.add_argument('--hf_worker', default='', help=argparse.SUPPRESS)  # HF side: the model dir.
  args = p.parse_args()
  batch_sizes = [int(b) for b in args.batch_sizes.split(',')]

  if args.hf_worker:
    with open(os.path.join(args.hf_worker, 'prompts.json')) as f:
      prompts = json.load(f)
    result = hugging_face(args.hf_worker, prompts, batch_sizes, args.new_tokens, args.hf_threads)
    print(json.dumps({'torch': __import__('torch').__version__, 'result': result}))
    return

  sys.path.insert(0, ROOT)
  import jax
  import numpy as np

  from experiments import presets
  from llm.convert import hf
  from llm.model import ModelConfig, Transformer

  cfg = ModelConfig(**presets.get(args.preset))
  rng = np.random.default_rng(0)
  prompts = rng.integers(3, cfg.vocab_size, (max(batch_sizes), args.prompt_len)).tolist()
  with tempfile.TemporaryDirectory() as tmp:
    hf_dir = os.path.join(tmp, 'hf')
    params = jax.jit(Transformer(cfg).init)(jax.random.key(0), np.zeros((1, 8), np.int32))
    hf.save(cfg, params['params'], hf_dir)
    del params
    with open(os.path.join(hf_dir, 'prompts.json'), 'w') as f:
      json.dump(prompts, f)
    mine = ours(hf_dir, prompts, batch_sizes, args.new_tokens, args.scan_layers)
    theirs, torch_version = {}, None
    if args.hf_python:
      cmd = [args.hf_python, os.path.abspath(__file__), f'--hf_worker={hf_dir}']
      cmd += [f'--batch_sizes={args.batch_sizes}', f'--new_tokens={args.new_tokens}']
      cmd += [f'--hf_threads={args.hf_threads}']
      run = subprocess.run(cmd, capture_output=True, text=True, check=False)
      if run.returncode:
        raise SystemExit(f'The Hugging Face side failed:\n{run.stderr[-3000:]}')
      reply = json.loads(run.stdout.strip().splitlines()[-1])
      theirs = {int(b): v for b, v in reply['result'].items()}
      torch_version = reply['torch']

  machine = f'{platform.machine()} CPU, {os.cpu_count()} cores'
  print(
    f'{args.preset}, prompt {args.prompt_len} tokens, {args.new_tokens} new tokens, greedy, '
    f'float32, {machine}; jax {jax.__version__}'
    + (f', torch {torch_version} ({args.hf_threads} threads)' if torch_version else '')
  )
  print('| batch | ours (tokens/s) | HF generate (tokens/s) | ours / HF | rows with equal tokens |')
  print('|---|---|---|---|---|')
  rows = []
  for B in batch_sizes:
    ours_tps, ours_tokens = mine[B]
    if B in theirs:
      hf_tps, hf_tokens = theirs[B]
      same = sum(a == b for a, b in zip(ours_tokens, hf_tokens, strict=True))
      print(f'| {B} | {ours_tps:.1f} | {hf_tps:.1f} | {ours_tps / hf_tps:.2f} | {same}/{B} |')
      rows.append(
        {'batch': B, 'ours_tokens_per_s': ours_tps, 'hf_tokens_per_s': hf_tps, 'same_rows': same}
      )
    else:
      print(f'| {B} | {ours_tps:.1f} | (no --hf_python) | | |')
  if rows:
    with open(args.json, 'w') as f:
      json.dump(
        {
          'preset': args.preset,
          'dtype': 'float32',
          'new_tokens': args.new_tokens,
          'prompt_len': args.prompt_len,
          'scan_layers': args.scan_layers,
          'rows': rows,
          'jax': jax.__version__,
          'torch': torch_version,
          'load': os.getloadavg(),
        },
        f,
        indent=2,
      )


if __name__ == '__main__':
  main()
