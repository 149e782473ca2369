"""An offline CLIP BPE tokenizer for transformers, built from the vocabulary open_clip ships.

Stable Diffusion's tokenizer is CLIP's BPE (49,408 tokens). open_clip ships the same BPE merges, so
``clip_tokenizer()`` writes ``vocab.json`` / ``merges.txt`` once into a cache folder and loads a
transformers ``CLIPTokenizer`` with ``from_pretrained(folder)`` (in transformers 5 the file-path
constructor silently builds a wrong tokenizer, so the folder route is the one used).
"""
from __future__ import annotations

import gzip
import json
import os
from pathlib import Path


def _cache() -> Path:
    return Path(os.environ.get("DIFFMEM_CACHE", Path.home() / ".cache" / "diffmem")) / "clip_tokenizer"


def write_clip_vocab(folder: str | Path) -> Path:
    from open_clip.tokenizer import bytes_to_unicode, default_bpe

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    with gzip.open(default_bpe(), "rt", encoding="utf-8") as f:
        merges = f.read().split("\n")[1:49152 - 256 - 2 + 1]
    pairs = [tuple(m.split()) for m in merges]
    vocab = list(bytes_to_unicode().values())
    vocab = vocab + [v + "</w>" for v in vocab] + ["".join(p) for p in pairs]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(vocab)}, ensure_ascii=False))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(" ".join(p) for p in pairs) + "\n",
                                       encoding="utf-8")
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "CLIPTokenizer", "model_max_length": 77, "bos_token": "<|startoftext|>",
        "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>", "pad_token": "<|endoftext|>"}))
    return folder


def clip_tokenizer(folder: str | Path | None = None):
    from transformers import CLIPTokenizer

    folder = Path(folder) if folder else _cache()
    if not (folder / "merges.txt").is_file():
        write_clip_vocab(folder)
    return CLIPTokenizer.from_pretrained(str(folder))
