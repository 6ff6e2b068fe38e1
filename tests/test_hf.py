"""refattn's decoders against Hugging Face transformers, an implementation written elsewhere.

Small GPT-2, Llama (grouped-query) and Mistral (a sliding window shorter
than the generation) models are built from configs with random weights, no
download. In float32: prefill logits, every decode step's logits and the
cached keys and values of every layer match, and greedy generation is
identical, for one prompt and for a batch of prompts of different lengths.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from refattn.models import from_hf

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

#: float32, after a few layers: a few ulps of logits of size ~1.
ATOL = 2e-5


def _hf_model(family: str, seed: int) -> Any:
    torch.manual_seed(seed)
    ids = {"bos_token_id": 0, "eos_token_id": 0, "pad_token_id": 0}
    if family == "gpt2":
        config = transformers.GPT2Config(n_layer=2, n_embd=32, n_head=4, vocab_size=50,
                                         n_positions=64, **ids)  # fmt: skip
        model = transformers.GPT2LMHeadModel(config)
    else:
        shape = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
                 "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 50,
                 "max_position_embeddings": 64, **ids}  # fmt: skip
        if family == "llama":
            model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**shape))
        else:
            config = transformers.MistralConfig(**shape, sliding_window=4)
            model = transformers.MistralForCausalLM(config)
    for p in model.parameters():  # away from the initialisation, so logits differ clearly
        torch.nn.init.normal_(p, std=0.3 if p.dim() > 1 else 0.1)
    model.generation_config.eos_token_id = None  # generate exactly max_new_tokens, as refattn
    return model.eval()


FAMILIES = ["gpt2", "llama", "mistral"]


def _step(hf: Any, ids: Any, past: Any) -> tuple[np.ndarray, Any]:
    """One forward call with the cache; logits and the cache back (either transformers API)."""
    import inspect

    name = "cache" if "cache" in inspect.signature(hf.forward).parameters else "past_key_values"
    with torch.no_grad():
        out = hf(ids, use_cache=True, **({} if past is None else {name: past}))
    return out.logits.numpy(), out[name] if name in out else out.past_key_values


def _layers(cache: Any) -> list[tuple[np.ndarray, np.ndarray]]:
    if hasattr(cache, "layers"):
        return [(layer.keys.numpy(), layer.values.numpy()) for layer in cache.layers]
    return [(k.numpy(), v.numpy()) for k, v in cache]  # a legacy tuple


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("seed", [0, 1])
def test_prefill_decode_and_cached_keys_match_transformers(family: str, seed: int) -> None:
    hf = _hf_model(family, seed)
    ours = from_hf(hf)
    prompt = torch.tensor([[1, 7, 3, 9, 4, 2, 11]])
    caches = ours.new_caches("dynamic", batch=1, max_len=32)
    logits, past = _step(hf, prompt, None)
    np.testing.assert_allclose(ours(prompt.numpy(), caches), logits, atol=ATOL, rtol=0)
    for token in [5, 8, 13, 21, 34, 1, 2, 3]:
        step = torch.tensor([[token]])
        logits, past = _step(hf, step, past)
        np.testing.assert_allclose(ours(step.numpy(), caches), logits, atol=ATOL, rtol=0)
    for (k, v), (hk, hv) in zip(caches.to_legacy(), _layers(past), strict=True):
        kept = hk.shape[2]  # Mistral's cache keeps only the window's last tokens
        assert kept == (3 if family == "mistral" else k.shape[2])
        np.testing.assert_allclose(k[:, :, -kept:], hk, atol=ATOL, rtol=0)
        np.testing.assert_allclose(v[:, :, -kept:], hv, atol=ATOL, rtol=0)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("kind", ["static", "sliding", "paged"])
def test_greedy_generation_matches_transformers(family: str, kind: str) -> None:
    hf = _hf_model(family, 2)
    ours = from_hf(hf)
    prompt = torch.tensor([[4, 8, 15, 16, 23, 42]])
    with torch.no_grad():
        expected = hf.generate(prompt, max_new_tokens=12, do_sample=False)
    assert ours.generate(prompt.numpy(), 12, cache=kind) == expected.tolist()


@pytest.mark.parametrize("family", FAMILIES)
def test_batched_prompts_of_different_lengths_match_transformers(family: str) -> None:
    hf = _hf_model(family, 3)
    ours = from_hf(hf)
    prompts = [[4, 8, 15, 16, 23], [42, 7], [1, 2, 3]]
    width = max(len(p) for p in prompts)
    # transformers pads on the left and is told which tokens are real.
    ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    with torch.no_grad():
        expected = hf.generate(ids, attention_mask=mask, max_new_tokens=8, do_sample=False)
    got = ours.generate(prompts, 8)
    for row, p in zip(expected.tolist(), prompts, strict=True):
        assert got[prompts.index(p)] == row[width - len(p) :]


def test_unsupported_configurations_are_refused_by_name() -> None:
    torch.manual_seed(0)
    config = transformers.LlamaConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                      num_attention_heads=2, vocab_size=20,
                                      attention_bias=True)  # fmt: skip
    with pytest.raises(ValueError, match="attention_bias"):
        from_hf(transformers.LlamaForCausalLM(config))
    with pytest.raises(TypeError, match="GPT2LMHeadModel"):
        from_hf(torch.nn.Linear(2, 2))
