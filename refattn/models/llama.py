"""Llama (and Mistral) on the spec: RoPE, grouped-query attention, RMSNorm, SwiGLU.

.. math::

    x &\\leftarrow x + W_o\\, \\text{Attn}(\\text{RoPE}(W_q h), \\text{RoPE}(W_k h), W_v h),
        \\quad h = \\text{RMSNorm}_1(x) \\\\
    x &\\leftarrow x + W_{down} \\left(\\text{SiLU}(W_{gate} h) \\odot W_{up} h\\right),
        \\quad h = \\text{RMSNorm}_2(x)

RoPE is applied to queries and keys at their absolute positions before the
keys are cached (NeoX pairing, as in Hugging Face's Llama). With a ``window``
(Mistral's ``sliding_window``) a query sees the keys with
``q_pos - k_pos < window``. Parameter names are Hugging Face's without the
``model.`` prefix (``embed_tokens.weight``, ``layers.0.self_attn.q_proj.weight``,
``norm.weight``, ``lm_head.weight``), with ``torch.nn.Linear``'s (out, in) layout.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from refattn.encodings import rope
from refattn.models.decoder import Decoder
from refattn.models.layers import linear, merge_heads, rms_norm, silu, split_heads
from refattn.namespace import Array
from refattn.options import check_integer


@dataclass(frozen=True)
class LlamaConfig:
    """The shape of a Llama or Mistral."""

    vocab_size: int = 32000
    d_model: int = 4096
    n_layer: int = 32
    n_head: int = 32
    n_kv_head: int = 8
    head_dim: int | None = None  #: default d_model // n_head
    intermediate_size: int = 14336
    rope_theta: float = 10000.0
    eps: float = 1e-6
    window: int | None = None  #: Mistral's sliding window
    tie_embeddings: bool = False

    def __post_init__(self) -> None:
        names = ["vocab_size", "d_model", "n_layer", "n_head", "n_kv_head", "intermediate_size"]
        names += [name for name in ("head_dim", "window") if getattr(self, name) is not None]
        for name in names:
            check_integer(f"LlamaConfig.{name}", getattr(self, name), minimum=1)
            object.__setattr__(self, name, int(getattr(self, name)))  # NumPy's ints as Python's
        if self.n_head % self.n_kv_head:
            raise ValueError(
                f"LlamaConfig.n_head must be a multiple of n_kv_head={self.n_kv_head}; "
                f"got {self.n_head}"
            )

    @property
    def dim(self) -> int:
        return self.head_dim or self.d_model // self.n_head


class Llama(Decoder):
    """A Llama / Mistral decoder whose attention is ``refattn.attention``.

    >>> config = LlamaConfig(vocab_size=16, d_model=8, n_layer=2, n_head=4, n_kv_head=2,
    ...                      intermediate_size=16, window=3)
    >>> model = Llama.random(config, seed=0)
    >>> model([[1, 2, 3]]).shape
    (1, 3, 16)
    >>> ring = model.generate([[1, 2, 3]], 6, cache="sliding")  # keeps 3 keys a layer
    >>> ring == model.generate([[1, 2, 3]], 6, use_cache=False)
    True
    """

    def __init__(self, config: LlamaConfig, params: dict[str, Array], *, xp: Any = None) -> None:
        import array_api_compat

        self.config, self.params = config, params
        self.xp = xp or array_api_compat.array_namespace(params["embed_tokens.weight"])
        self.n_layer, self.kv_heads, self.head_dim = config.n_layer, config.n_kv_head, config.dim
        self.vocab_size, self.window = config.vocab_size, config.window

    @classmethod
    def random(cls, config: LlamaConfig, *, seed: int = 0, dtype: Any = np.float32) -> Llama:
        """Normal weights (std 0.02) and unit norms, on NumPy."""
        rng = np.random.default_rng(seed)
        c, D = config, config.dim

        def normal(*shape: int) -> np.ndarray:
            return (rng.standard_normal(shape) * 0.02).astype(dtype)

        params = {"embed_tokens.weight": normal(c.vocab_size, c.d_model),
                  "norm.weight": np.ones(c.d_model, dtype)}  # fmt: skip
        if not c.tie_embeddings:
            params["lm_head.weight"] = normal(c.vocab_size, c.d_model)
        for i in range(c.n_layer):
            h = f"layers.{i}."
            params[h + "input_layernorm.weight"] = np.ones(c.d_model, dtype)
            params[h + "post_attention_layernorm.weight"] = np.ones(c.d_model, dtype)
            for name, shape in {
                "self_attn.q_proj": (c.n_head * D, c.d_model),
                "self_attn.k_proj": (c.n_kv_head * D, c.d_model),
                "self_attn.v_proj": (c.n_kv_head * D, c.d_model),
                "self_attn.o_proj": (c.d_model, c.n_head * D),
                "mlp.gate_proj": (c.intermediate_size, c.d_model),
                "mlp.up_proj": (c.intermediate_size, c.d_model),
                "mlp.down_proj": (c.d_model, c.intermediate_size),
            }.items():
                params[h + name + ".weight"] = normal(*shape)
        return cls(config, params)

    def embed(self, ids: Array, positions: Array) -> Array:
        xp = self.xp
        B, T = ids.shape
        rows = xp.take(self.params["embed_tokens.weight"], xp.reshape(ids, (-1,)), axis=0)
        return xp.reshape(rows, (B, T, -1))  # (B, T, d)

    def block(self, i: int, x: Array, positions: Array, attend: Any) -> Array:
        xp, p, c, h = self.xp, self.params, self.config, f"layers.{i}."
        a = rms_norm(xp, x, p[h + "input_layernorm.weight"], c.eps)
        q = split_heads(xp, linear(xp, a, p[h + "self_attn.q_proj.weight"]), c.n_head)
        k = split_heads(xp, linear(xp, a, p[h + "self_attn.k_proj.weight"]), c.n_kv_head)
        v = split_heads(xp, linear(xp, a, p[h + "self_attn.v_proj.weight"]), c.n_kv_head)
        q = rope(q, positions, theta=c.rope_theta)  # (B, Hq, T, D)
        k = rope(k, positions, theta=c.rope_theta)  # (B, Hkv, T, D), cached rotated
        y = merge_heads(xp, attend(q, k, v))  # (B, T, Hq*D)
        x = x + linear(xp, y, p[h + "self_attn.o_proj.weight"])
        m = rms_norm(xp, x, p[h + "post_attention_layernorm.weight"], c.eps)
        gate = silu(xp, linear(xp, m, p[h + "mlp.gate_proj.weight"]))
        up = linear(xp, m, p[h + "mlp.up_proj.weight"])
        return x + linear(xp, gate * up, p[h + "mlp.down_proj.weight"])

    def head(self, x: Array) -> Array:
        xp, p = self.xp, self.params
        x = rms_norm(xp, x, p["norm.weight"], self.config.eps)
        w = p["embed_tokens.weight"] if self.config.tie_embeddings else p["lm_head.weight"]
        return xp.matmul(x, xp.matrix_transpose(w))
