"""``from_hf``: a Hugging Face causal LM's weights in a refattn model.

Supported: ``GPT2LMHeadModel`` (as :class:`~refattn.models.GPT`),
``LlamaForCausalLM`` and ``MistralForCausalLM`` (as
:class:`~refattn.models.Llama`, Mistral's ``sliding_window`` as the window).
What refattn's models do not have (RoPE scaling, attention or MLP biases,
activations other than SiLU / tanh-GELU) is refused with an error naming it,
rather than silently computed differently. No framework is imported here:
the model's own tensors are asked for their values.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from refattn.backends import to_numpy
from refattn.models.decoder import Decoder
from refattn.models.gpt import GPT, GPTConfig
from refattn.models.llama import Llama, LlamaConfig


def from_hf(hf_model: Any, *, xp: Any = None, device: Any = None, dtype: Any = None) -> Decoder:
    """The refattn model with ``hf_model``'s configuration and a copy of its weights.

    Parameters
    ----------
    hf_model : a transformers ``GPT2LMHeadModel``, ``LlamaForCausalLM`` or
        ``MistralForCausalLM``
    xp, device : the namespace (and device) to hold the weights; NumPy by default
    dtype : NumPy dtype to convert to first (default: the model's, with
        bfloat16 widened to float32, which holds it exactly)
    """
    kind = type(hf_model).__name__
    if kind not in ("GPT2LMHeadModel", "LlamaForCausalLM", "MistralForCausalLM"):
        raise TypeError(
            "hf_model must be a GPT2LMHeadModel, LlamaForCausalLM or MistralForCausalLM; "
            f"got {kind}"
        )
    config = hf_model.config
    builder: Any
    state = {name: _numpy(t, dtype) for name, t in hf_model.state_dict().items()}
    if kind == "GPT2LMHeadModel":
        model_config: Any = _gpt_config(config)
        prefix, builder = "transformer.", GPT
    else:
        model_config = _llama_config(config, kind)
        prefix, builder = "model.", Llama
    params = {name.removeprefix(prefix): x for name, x in state.items()}
    wanted = set(builder.random(_tiny(model_config), seed=0).params)  # the names it reads
    missing = sorted(wanted - set(params))
    if missing:
        raise ValueError(f"{kind} has no weights named {missing[:3]}")
    params = {name: params[name] for name in sorted(wanted)}
    if xp is not None:
        params = {name: xp.asarray(x, device=device) for name, x in params.items()}
    return builder(model_config, params, xp=xp)


def _gpt_config(config: Any) -> GPTConfig:
    if getattr(config, "activation_function", "gelu_new") not in ("gelu_new", "gelu_pytorch_tanh"):
        raise ValueError(f"GPT-2 activation {config.activation_function!r} is not tanh-GELU")
    if getattr(config, "scale_attn_by_inverse_layer_idx", False) or not getattr(
        config, "scale_attn_weights", True
    ):
        raise ValueError("only GPT-2's default attention scale 1/sqrt(D) is supported")
    return GPTConfig(
        vocab_size=config.vocab_size, n_positions=config.n_positions, d_model=config.n_embd,
        n_layer=config.n_layer, n_head=config.n_head, eps=config.layer_norm_epsilon,
    )  # fmt: skip


def _llama_config(config: Any, kind: str) -> LlamaConfig:
    rope = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    if rope.get("rope_type", rope.get("type", "default")) != "default":
        raise ValueError(f"{kind} uses RoPE scaling {rope!r}, which refattn's Llama has not")
    theta = rope.get("rope_theta", getattr(config, "rope_theta", 10000.0))
    for flag in ("attention_bias", "mlp_bias"):
        if getattr(config, flag, False):
            raise ValueError(f"{kind} has {flag}=True, which refattn's Llama has not")
    if getattr(config, "hidden_act", "silu") != "silu":
        raise ValueError(f"{kind} activation {config.hidden_act!r} is not SiLU")
    window = getattr(config, "sliding_window", None) if kind == "MistralForCausalLM" else None
    return LlamaConfig(
        vocab_size=config.vocab_size, d_model=config.hidden_size,
        n_layer=config.num_hidden_layers, n_head=config.num_attention_heads,
        n_kv_head=config.num_key_value_heads or config.num_attention_heads,
        head_dim=getattr(config, "head_dim", None), intermediate_size=config.intermediate_size,
        rope_theta=float(theta), eps=config.rms_norm_eps, window=window,
        tie_embeddings=bool(getattr(config, "tie_word_embeddings", False)),
    )  # fmt: skip


def _tiny(config: Any) -> Any:
    """The same architecture at the smallest size, to list the parameter names it reads."""
    from dataclasses import replace

    if isinstance(config, GPTConfig):
        return replace(config, vocab_size=1, n_positions=1, d_model=config.n_head)
    return replace(config, vocab_size=1, d_model=config.n_head, head_dim=2, intermediate_size=1)


def _numpy(tensor: Any, dtype: Any) -> np.ndarray:
    """A framework tensor's values as NumPy (bfloat16 widened to float32, exactly)."""
    x = to_numpy(tensor)
    return x if dtype is None else x.astype(dtype)
