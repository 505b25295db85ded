"""Dequantise a GGUF chat model into a Hugging Face directory vLLM can load (run in vLLM's virtualenv).

``python gguf_to_hf.py MODEL.gguf OUT_DIR``. transformers loads GGUF (with ``gguf`` installed) but
``save_pretrained`` refuses a GGUF-loaded model, so the weights go into a fresh model of the same
config. Standalone on purpose: it imports nothing from this package (vLLM's environment has none of it).
"""

from __future__ import annotations

import sys
from pathlib import Path


def convert(gguf: Path, out: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    folder, name = str(gguf.parent), gguf.name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.architectures = ["LlamaForCausalLM"]
    clean = LlamaForCausalLM(config)  # type: ignore[arg-type]  # a LlamaConfig at run time
    clean.load_state_dict(loaded.state_dict())
    clean.save_pretrained(out)
    tokenizer.save_pretrained(out)


if __name__ == "__main__":
    convert(Path(sys.argv[1]), Path(sys.argv[2]))
