"""Concept tokens on a transformers CLIP text encoder, without touching its embedding table.

Each concept token (``<chelsea>``) is added to the tokenizer once; only while ``encode`` runs, a
forward pre-hook on the input-embedding module clamps the new ids into range and a forward hook
swaps the learned vectors in at their positions, keeping the autograd graph to them. The hooks are
removed when ``encode`` returns, so a host's own text encoder (A1111's is the one it generates
with) is left exactly as it was. Used by the diffusers host and by A1111 (whose text encoder is
the same transformers model).

Training encodes the same few prompts (the trainer's templates around one token) on every pass;
their ids are cached per (prompt, concept tokens), so the Python tokenizer runs once per distinct
prompt instead of once per pass. Adding a concept token to the tokenizer changes how text splits
into pieces, so the cache is emptied whenever one is added.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn


# training draws from a handful of prompt templates; the bound only matters when a host encodes
# many different prompts (generation) over a long session
MAX_CACHED_PROMPTS = 256


class TokenInjector:
    def __init__(self, tokenizer, embedding_module: nn.Module):
        self.tokenizer = tokenizer
        self.embedding_module = embedding_module
        table = getattr(embedding_module, "wrapped", embedding_module)  # A1111 wraps nn.Embedding
        self.vocab = table.weight.shape[0]
        self._ids: dict[str, int] = {}  # concept token → id in the tokenizer
        self._active: dict[int, Tensor] = {}  # token id → (1, d) vector during one encode
        self._seen: Tensor | None = None
        self._cached_ids: dict[tuple[str, frozenset[str]], Tensor] = {}  # (prompt, tokens) → (77,) ids

    def token_id(self, token: str) -> int:
        if token not in self._ids:
            self.tokenizer.add_tokens([token])
            self._ids[token] = self.tokenizer.convert_tokens_to_ids(token)
            self._cached_ids.clear()  # the new token changes how prompts split into pieces
        return self._ids[token]

    def _clamp_ids(self, module: nn.Module, inputs: tuple):
        ids = inputs[0]
        self._seen = ids
        if self._active or bool((ids >= self.vocab).any()):
            return (ids.clamp(max=self.vocab - 1), *inputs[1:])
        return None

    def _substitute(self, module: nn.Module, inputs: tuple, output: Tensor) -> Tensor:
        for token_id, vec in self._active.items():
            mask = (self._seen == token_id).unsqueeze(-1)  # (b, 77, 1)
            output = torch.where(mask, vec[0].to(output.dtype), output)
        return output

    def input_ids(self, prompts: list[str], embeddings: dict[str, Tensor]) -> Tensor:
        """(b, 77) ids; prompts seen before with the same concept tokens are not tokenized again."""
        for token in embeddings:
            self.token_id(token)
        tokens = frozenset(embeddings)
        missing = list(dict.fromkeys(p for p in prompts if (p, tokens) not in self._cached_ids))
        if missing:
            if len(self._cached_ids) + len(missing) > MAX_CACHED_PROMPTS:  # a long session of other prompts
                self._cached_ids.clear()
            ids = self.tokenizer(missing, padding="max_length", max_length=77, truncation=True,
                                 return_tensors="pt").input_ids
            self._cached_ids.update({(p, tokens): row for p, row in zip(missing, ids)})
        return torch.stack([self._cached_ids[(p, tokens)] for p in prompts])

    def encode(self, text_encoder: nn.Module, prompts: list[str], embeddings: dict[str, Tensor], device) -> Tensor:
        """(b, 77, d) last hidden state with the concept tokens' vectors in place."""
        ids = self.input_ids(prompts, embeddings)
        self._active = {self._ids[t]: e.to(device) for t, e in embeddings.items()}
        handles = [self.embedding_module.register_forward_pre_hook(self._clamp_ids),
                   self.embedding_module.register_forward_hook(self._substitute)]
        try:
            return text_encoder(ids.to(device))[0]
        finally:
            for handle in handles:
                handle.remove()
            self._active, self._seen = {}, None

    def init_embedding(self, word: str, table: Tensor) -> Tensor:
        """(1, d): the starting vector of a concept token whose class word is ``word``."""
        return mean_piece_embedding(table, self.tokenizer(word, add_special_tokens=False).input_ids)


def mean_piece_embedding(table: Tensor, piece_ids: list[int]) -> Tensor:
    """(1, d) float32 on the CPU: a concept token starts at the mean input embedding of its class
    word's BPE pieces (DESIGN §3). Every host calls this one function. Ids outside the table are
    dropped; a word with no usable piece starts at the mean of the whole table, a neutral vector."""
    ids = [i for i in piece_ids if 0 <= i < table.shape[0]]
    rows = table[ids] if ids else table
    return rows.detach().float().mean(dim=0, keepdim=True).cpu()
