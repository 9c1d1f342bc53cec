"""Token injection's tokenization cache (issue 19 item 6b): training encodes the same few prompts
on every pass, so the Python tokenizer must run once per distinct prompt, not once per pass."""
import copy

import torch

from seqlora_core.hosts.token_injection import TokenInjector


class CountingTokenizer:
    """A transformers tokenizer whose calls (one per tokenization) are recorded."""

    def __init__(self, inner):
        self.inner, self.calls = inner, []

    def __call__(self, text, *args, **kwargs):
        self.calls.append(text)
        return self.inner(text, *args, **kwargs)

    def __getattr__(self, name):
        return getattr(self.inner, name)


def test_each_distinct_prompt_is_tokenized_once_across_passes(host):
    tokenizer = CountingTokenizer(copy.deepcopy(host.tokenizer))
    injector = TokenInjector(tokenizer, host.text_encoder.get_input_embeddings())
    vec = torch.zeros(1, host.text_encoder.get_input_embeddings().weight.shape[1])
    prompts = [["a photo of <cachetok>", "a picture of <cachetok>"], ["a photo of <cachetok>"],
               ["<cachetok>", "a picture of <cachetok>"]]
    passes = [injector.input_ids(p, {"<cachetok>": vec}) for _ in range(10) for p in prompts]
    tokenized = [t for call in tokenizer.calls for t in ([call] if isinstance(call, str) else call)]
    assert sorted(tokenized) == sorted({"a photo of <cachetok>", "a picture of <cachetok>", "<cachetok>"})
    direct = tokenizer.inner(prompts[0], padding="max_length", max_length=77, truncation=True,
                             return_tensors="pt").input_ids
    assert torch.equal(passes[0], direct) and torch.equal(passes[3], direct)
    assert (direct == injector.token_id("<cachetok>")).sum() == 2  # the concept token is one piece

    # a new concept token changes how text splits: everything is tokenized again, correctly
    tokenizer.calls.clear()
    again = injector.input_ids(prompts[0], {"<cachetok>": vec, "<cachetwo>": vec})
    assert tokenizer.calls == [prompts[0]]
    assert torch.equal(again, direct)


def test_the_cache_is_bounded(host, monkeypatch):
    from seqlora_core.hosts import token_injection

    monkeypatch.setattr(token_injection, "MAX_CACHED_PROMPTS", 3)
    injector = TokenInjector(CountingTokenizer(copy.deepcopy(host.tokenizer)), host.text_encoder.get_input_embeddings())
    for i in range(10):
        injector.input_ids([f"prompt {i}"], {})
        assert len(injector._cached_ids) <= 3
    assert torch.equal(injector.input_ids(["prompt 9"], {}), injector.input_ids(["prompt 9"], {}))
