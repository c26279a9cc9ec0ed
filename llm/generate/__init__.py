r"""Text generation with a KV cache: prefill once, then decode inside a jitted loop.

  python -m llm.generate --workdir=DIR --prompt=TEXT [--max_new_tokens=256] \
      [--temperature=0.8 --top_k=0 --top_p=0.95 --seed=0 --stop=STRING ...]
  python -m llm.generate --workdir=DIR --prompts_file=F.jsonl [--output=OUT.jsonl]

DIR is a training workdir (its newest checkpoint), a params export or a
Hugging Face model directory (`llm.io.models`).

Modules: `sampling` (how the next token is picked), `decode` (the jitted
prefill and decode loop on token ids, the KV cache), `text` (prompts, stop
strings, streaming), `__main__` (the command line). The names below are the
Python API.
"""

from llm.generate.decode import (
  FINISH_REASONS,
  Generation,
  bucket_length,
  check_prompts,
  generate_ids,
  place_params,
)
from llm.generate.sampling import GREEDY, Sampling, sample
from llm.generate.text import encode_prompt, eos_ids_of, generate_text, pad_id_of, read_prompts

__all__ = [
  'FINISH_REASONS',
  'GREEDY',
  'Generation',
  'Sampling',
  'bucket_length',
  'check_prompts',
  'encode_prompt',
  'eos_ids_of',
  'generate_ids',
  'generate_text',
  'pad_id_of',
  'place_params',
  'read_prompts',
  'sample',
]
