"""Hugging Face interoperability: weights and tokenizers in and out.

`from llm.convert import hf`: `hf.load(dir) -> (ModelConfig, params)`,
`hf.save(cfg, params, dir)`, `hf.load_tokenizer(dir)`, `hf.save_tokenizer`.
`python -m llm.convert import|params|export` converts to and from params
exports (`llm/io/checkpoint.py`). Tokenizer files are read by
`llm/data/hf_tokenizer.py`. Safetensors only: pickles are never loaded.
"""
