"""GPT-2 (minGPT's architecture) on the spec: learned positions, LayerNorm, GELU, tied embeddings.

.. math::

    x_0 &= W_{te}[\\text{ids}] + W_{pe}[\\text{positions}] \\\\
    x &\\leftarrow x + \\text{Attn}(\\text{LN}_1(x)) \\qquad
    x \\leftarrow x + \\text{MLP}(\\text{LN}_2(x)) \\qquad \\text{(per layer)} \\\\
    \\text{logits} &= \\text{LN}_f(x)\\, W_{te}^T

Parameter names are Hugging Face's ``GPT2LMHeadModel`` names without the
``transformer.`` prefix (``wte.weight``, ``h.0.attn.c_attn.weight``, ...),
with GPT-2's (in, out) projection layout.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from refattn.models.decoder import Decoder
from refattn.models.layers import conv1d, gelu_tanh, layer_norm, merge_heads, split_heads
from refattn.namespace import Array
from refattn.options import check_integer


@dataclass(frozen=True)
class GPTConfig:
    """The shape of a GPT-2."""

    vocab_size: int = 50257
    n_positions: int = 1024
    d_model: int = 768
    n_layer: int = 12
    n_head: int = 12
    eps: float = 1e-5

    def __post_init__(self) -> None:
        for name in ("vocab_size", "n_positions", "d_model", "n_layer", "n_head"):
            check_integer(f"GPTConfig.{name}", getattr(self, name), minimum=1)
            object.__setattr__(self, name, int(getattr(self, name)))  # NumPy's ints as Python's
        if self.d_model % self.n_head:
            raise ValueError(
                f"GPTConfig.d_model must be a multiple of n_head={self.n_head}; got {self.d_model}"
            )


class GPT(Decoder):
    """A GPT-2 decoder whose attention is ``refattn.attention``.

    >>> model = GPT.random(GPTConfig(vocab_size=16, n_positions=32, d_model=8, n_layer=2,
    ...                              n_head=2), seed=0)
    >>> model([[1, 2, 3]]).shape
    (1, 3, 16)
    >>> a = model.generate([[1, 2, 3], [4]], 5)
    >>> a == model.generate([[1, 2, 3], [4]], 5, use_cache=False)
    True
    """

    def __init__(self, config: GPTConfig, params: dict[str, Array], *, xp: Any = None) -> None:
        import array_api_compat

        self.config, self.params = config, params
        self.xp = xp or array_api_compat.array_namespace(params["wte.weight"])
        self.n_layer, self.kv_heads = config.n_layer, config.n_head
        self.head_dim = config.d_model // config.n_head
        self.vocab_size, self.max_positions = config.vocab_size, config.n_positions

    @classmethod
    def random(cls, config: GPTConfig, *, seed: int = 0, dtype: Any = np.float32) -> GPT:
        """GPT-2's initialisation (normal, std 0.02; LayerNorm at 1 and 0), on NumPy."""
        rng = np.random.default_rng(seed)
        d, V = config.d_model, config.vocab_size

        def normal(*shape: int) -> np.ndarray:
            return (rng.standard_normal(shape) * 0.02).astype(dtype)

        params = {"wte.weight": normal(V, d), "wpe.weight": normal(config.n_positions, d),
                  "ln_f.weight": np.ones(d, dtype), "ln_f.bias": np.zeros(d, dtype)}  # fmt: skip
        for i in range(config.n_layer):
            h = f"h.{i}."
            for ln in ("ln_1", "ln_2"):
                params[h + ln + ".weight"] = np.ones(d, dtype)
                params[h + ln + ".bias"] = np.zeros(d, dtype)
            shapes = {"attn.c_attn": (d, 3 * d), "attn.c_proj": (d, d),
                      "mlp.c_fc": (d, 4 * d), "mlp.c_proj": (4 * d, d)}  # fmt: skip
            for name, (n_in, n_out) in shapes.items():
                params[h + name + ".weight"] = normal(n_in, n_out)
                params[h + name + ".bias"] = normal(n_out)
        return cls(config, params)

    def embed(self, ids: Array, positions: Array) -> Array:
        xp, p = self.xp, self.params
        B, T = ids.shape
        tokens = xp.take(p["wte.weight"], xp.reshape(ids, (-1,)), axis=0)
        where = xp.take(p["wpe.weight"], xp.reshape(positions, (-1,)), axis=0)
        return xp.reshape(tokens + where, (B, T, -1))  # (B, T, d)

    def block(self, i: int, x: Array, positions: Array, attend: Any) -> Array:
        xp, p, c, h = self.xp, self.params, self.config, f"h.{i}."
        a = layer_norm(xp, x, p[h + "ln_1.weight"], p[h + "ln_1.bias"], c.eps)
        qkv = conv1d(xp, a, p[h + "attn.c_attn.weight"], p[h + "attn.c_attn.bias"])  # (B, T, 3d)
        d = c.d_model
        q, k, v = (split_heads(xp, qkv[..., j * d : (j + 1) * d], c.n_head) for j in range(3))
        y = merge_heads(xp, attend(q, k, v))  # (B, T, d)
        x = x + conv1d(xp, y, p[h + "attn.c_proj.weight"], p[h + "attn.c_proj.bias"])
        m = layer_norm(xp, x, p[h + "ln_2.weight"], p[h + "ln_2.bias"], c.eps)
        m = gelu_tanh(xp, conv1d(xp, m, p[h + "mlp.c_fc.weight"], p[h + "mlp.c_fc.bias"]))
        return x + conv1d(xp, m, p[h + "mlp.c_proj.weight"], p[h + "mlp.c_proj.bias"])

    def head(self, x: Array) -> Array:
        xp, p = self.xp, self.params
        x = layer_norm(xp, x, p["ln_f.weight"], p["ln_f.bias"], self.config.eps)
        return xp.matmul(x, xp.matrix_transpose(p["wte.weight"]))  # tied embeddings
