"""CLIP's BPE vocabulary, built offline from the file shipped in ``data/``.

``data/bpe_simple_vocab_16e6.txt.gz`` is OpenAI CLIP's merge list (MIT licence, as redistributed
by open_clip). From it we rebuild exactly the vocab.json / merges.txt pair that SD-1.5's
tokenizer uses (49408 entries), once, into a cache folder, and load a transformers CLIPTokenizer.
Hosts (ComfyUI, A1111) bring their own tokenizer and never need this.
"""
from __future__ import annotations

import gzip
import json
import os
import tempfile
from functools import lru_cache
from pathlib import Path

DATA = Path(__file__).parent / "data" / "bpe_simple_vocab_16e6.txt.gz"
VOCAB_SIZE = 49408


def bytes_to_unicode() -> dict[int, str]:
    """CLIP's reversible byte → printable-unicode table."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def build_vocab_and_merges() -> tuple[dict[str, int], list[str]]:
    lines = gzip.open(DATA).read().decode("utf-8").split("\n")
    merges = lines[1:49152 - 256 - 2 + 1]
    vocab = list(bytes_to_unicode().values())
    vocab = vocab + [v + "</w>" for v in vocab]
    vocab += ["".join(m.split()) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    assert len(vocab) == VOCAB_SIZE
    return {tok: i for i, tok in enumerate(vocab)}, merges


def cache_dir() -> Path:
    root = os.environ.get("SEQLORA_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "seqlora")
    return Path(root) / "clip_tokenizer"


def tokenizer_files() -> tuple[Path, Path]:
    """Paths of vocab.json and merges.txt, written atomically on first use."""
    folder = cache_dir()
    vocab_path, merges_path = folder / "vocab.json", folder / "merges.txt"
    if not (vocab_path.exists() and merges_path.exists()):
        folder.mkdir(parents=True, exist_ok=True)
        vocab, merges = build_vocab_and_merges()
        for path, text in ((vocab_path, json.dumps(vocab)), (merges_path, "#version: 0.2\n" + "\n".join(merges) + "\n")):
            fd, tmp = tempfile.mkstemp(dir=folder, suffix=".tmp")
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                f.write(text)
            os.replace(tmp, path)
    return vocab_path, merges_path


@lru_cache(maxsize=1)
def clip_tokenizer_paths() -> tuple[str, str]:
    v, m = tokenizer_files()
    return str(v), str(m)


def load_clip_tokenizer():
    """A fresh transformers CLIPTokenizer for SD-1.5 (max length 77)."""
    from transformers import CLIPTokenizer

    vocab, merges = clip_tokenizer_paths()
    return CLIPTokenizer(vocab, merges, model_max_length=77)
