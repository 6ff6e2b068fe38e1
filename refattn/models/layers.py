"""The pieces of a decoder block, one formula each, on the array API.

Weights follow Hugging Face's layouts so that :func:`refattn.models.from_hf`
copies them as they are: GPT-2's ``Conv1D`` holds ``(in, out)`` (``x @ W``),
a ``torch.nn.Linear`` holds ``(out, in)`` (``x @ W.T``).
"""

from __future__ import annotations

import math

from refattn.namespace import Array, Namespace


def conv1d(xp: Namespace, x: Array, w: Array, b: Array | None) -> Array:
    """GPT-2's projection :math:`x W + b` with ``w`` (in, out)."""
    y = xp.matmul(x, w)
    return y if b is None else y + b


def linear(xp: Namespace, x: Array, w: Array, b: Array | None = None) -> Array:
    """:math:`x W^T + b` with ``w`` (out, in), as ``torch.nn.Linear`` stores it."""
    y = xp.matmul(x, xp.matrix_transpose(w))
    return y if b is None else y + b


def layer_norm(xp: Namespace, x: Array, g: Array, b: Array, eps: float) -> Array:
    """:math:`(x - \\mu) / \\sqrt{\\sigma^2 + \\epsilon} \\cdot g + b` over the last axis."""
    mean = xp.mean(x, axis=-1, keepdims=True)
    var = xp.mean((x - mean) ** 2, axis=-1, keepdims=True)
    return (x - mean) / xp.sqrt(var + eps) * g + b


def rms_norm(xp: Namespace, x: Array, g: Array, eps: float) -> Array:
    """:math:`x / \\sqrt{\\overline{x^2} + \\epsilon} \\cdot g`, in float32 at least (as Llama)."""
    wide = x if x.dtype in (xp.float32, xp.float64) else xp.astype(x, xp.float32)
    scaled = wide / xp.sqrt(xp.mean(wide * wide, axis=-1, keepdims=True) + eps)
    return g * xp.astype(scaled, x.dtype)


def gelu_tanh(xp: Namespace, x: Array) -> Array:
    """GELU in GPT-2's tanh form: :math:`x/2 (1 + \\tanh(\\sqrt{2/\\pi}(x + 0.044715 x^3)))`."""
    return 0.5 * x * (1.0 + xp.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x**3)))


def silu(xp: Namespace, x: Array) -> Array:
    """:math:`x \\sigma(x)`, the gate of SwiGLU."""
    return x / (1.0 + xp.exp(-x))


def split_heads(xp: Namespace, x: Array, heads: int) -> Array:
    """(B, T, H*D) -> (B, H, T, D)."""
    B, T, HD = x.shape
    return xp.permute_dims(xp.reshape(x, (B, T, heads, HD // heads)), (0, 2, 1, 3))


def merge_heads(xp: Namespace, x: Array) -> Array:
    """(B, H, T, D) -> (B, T, H*D)."""
    B, H, T, D = x.shape
    return xp.reshape(xp.permute_dims(x, (0, 2, 1, 3)), (B, T, H * D))
