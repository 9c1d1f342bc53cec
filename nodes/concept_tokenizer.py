"""Concept tokens inside ComfyUI prompts, through the CLIP object's own tokenizer.

ComfyUI's SD-1.5 tokenizer already accepts tensors in place of token ids (that is how
``embedding:name`` works). ``ConceptTokenizer`` wraps a CLIP's tokenizer so that a concept token
such as ``<chelsea>`` in any prompt — a stock CLIPTextEncode included — becomes the concept's
learned vectors. It rewrites ``<chelsea>`` to ``embedding:seqlora-chelsea`` and answers that
name from the bank instead of the embeddings folder; during training the vectors are the live
tensors being learned, so the autograd graph reaches them. The wrapped tokenizer is copied, never
modified: other CLIP clones keep behaving as before.
"""
from __future__ import annotations

import copy
import re

from torch import Tensor

PREFIX = "seqlora-"


class ConceptTokenizer:
    def __init__(self, inner, embeddings: dict[str, Tensor]):
        self.inner = inner.inner if isinstance(inner, ConceptTokenizer) else inner
        previous = dict(inner.embeddings) if isinstance(inner, ConceptTokenizer) else {}
        self.embeddings = {**previous, **embeddings}  # token such as '<chelsea>' → (k, d)
        # a token matches whatever its case in the prompt (<Chelsea>, <chelsea>): ids are lower case
        self._by_name = {PREFIX + t.strip("<>").lower(): e for t, e in self.embeddings.items()}
        self._pattern = re.compile("|".join(re.escape(t) for t in sorted(self.embeddings, key=len, reverse=True)),
                                   re.IGNORECASE) if self.embeddings else None
        self._tokenizer = self._patched_copy(self.inner)

    def _patched_copy(self, inner):
        outer = copy.copy(inner)
        for attr, value in vars(inner).items():  # SD1Tokenizer keeps its SDTokenizer in e.g. .clip_l
            if hasattr(value, "_try_get_embedding"):
                setattr(outer, attr, self._patch_sd_tokenizer(value))
        if hasattr(inner, "_try_get_embedding"):
            outer = self._patch_sd_tokenizer(inner)
        return outer

    def _patch_sd_tokenizer(self, sd_tokenizer):
        patched = copy.copy(sd_tokenizer)
        original = sd_tokenizer._try_get_embedding
        by_name = self._by_name

        def try_get_embedding(name: str):
            first, _, leftover = name.partition(" ")
            if first in by_name:
                return by_name[first], leftover
            return original(name)

        patched._try_get_embedding = try_get_embedding
        if getattr(patched, "embedding_directory", None) is None:
            patched.embedding_directory = []  # the embedding: branch only runs with a directory set
        return patched

    def rewrite(self, text: str) -> str:
        if self._pattern is None:
            return text
        return self._pattern.sub(lambda m: f" embedding:{PREFIX}{m.group(0).strip('<>').lower()} ", text)

    def tokenize_with_weights(self, text: str, return_word_ids: bool = False, **kwargs):
        return self._tokenizer.tokenize_with_weights(self.rewrite(text), return_word_ids, **kwargs)

    def __getattr__(self, name):  # untokenize, state_dict, … behave as the wrapped tokenizer's
        return getattr(self._tokenizer, name)
