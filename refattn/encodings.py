r"""Positional encodings at absolute positions: rotary (RoPE) and ALiBi slopes.

Both depend only on a token's absolute position, which is why a KV cache may
store keys already rotated: the key of token :math:`p` is the same whether it
was computed in a prefill or in a decode step, and a query at position
:math:`m` scores :math:`\langle R_m q, R_p k \rangle = \langle q, R_{p - m} k \rangle`,
a function of the distance alone.
"""

from __future__ import annotations

import math

from array_api_compat import device

from refattn.namespace import Array, compute_dtype, namespace_of


def rope(
    x: Array,
    pos: Array,
    *,
    theta: float = 10000.0,
    style: str = "neox",
    rotary_dim: int | None = None,
) -> Array:
    r"""Rotate each pair of features of ``x`` by an angle proportional to its position.

    For pair :math:`i` of the first ``rotary_dim`` features (:math:`r`) at
    position :math:`p`, with :math:`\omega_i = \theta^{-2i/r}`:

    .. math::

        \begin{pmatrix} y_a \\ y_b \end{pmatrix} =
        \begin{pmatrix}
            \cos p\omega_i & -\sin p\omega_i \\ \sin p\omega_i & \cos p\omega_i
        \end{pmatrix}
        \begin{pmatrix} x_a \\ x_b \end{pmatrix}

    ``style="neox"`` pairs feature :math:`i` with :math:`i + r/2` (GPT-NeoX,
    Llama in Hugging Face); ``style="interleaved"`` pairs :math:`2i` with
    :math:`2i + 1` (GPT-J, Meta's original Llama). Features past ``rotary_dim``
    pass through unchanged.

    Parameters
    ----------
    x : (B, H, S, D) array
    pos : (B, S) or (S,) integer array of absolute positions
    theta : base of the frequencies
    style : "neox" or "interleaved"
    rotary_dim : even number of leading features to rotate (default D)

    Returns
    -------
    (B, H, S, D) array in x's dtype; angles and products are computed in
    float32 (float64 for float64 input), then cast back.

    Examples
    --------
    Rotation keeps the norm, and position 0 is the identity.

    >>> import numpy as np
    >>> x = np.random.default_rng(0).standard_normal((1, 1, 3, 4))
    >>> y = rope(x, np.arange(3))
    >>> bool(np.allclose(np.linalg.norm(y, axis=-1), np.linalg.norm(x, axis=-1)))
    True
    >>> bool(np.allclose(y[0, 0, 0], x[0, 0, 0]))
    True
    """
    xp = namespace_of(x=x, pos=pos)
    if x.ndim != 4:
        raise ValueError(f"x must have 4 dimensions (B, H, S, D); got shape {tuple(x.shape)}")
    B, H, S, D = x.shape
    r = D if rotary_dim is None else rotary_dim
    if isinstance(r, bool) or not isinstance(r, int) or r % 2 or not 0 < r <= D:
        raise ValueError(f"rotary_dim must be an even integer in [2, {D}]; got {rotary_dim!r}")
    if style not in ("neox", "interleaved"):
        raise ValueError(f"style must be 'neox' or 'interleaved'; got {style!r}")
    if not xp.isdtype(pos.dtype, "integral"):
        raise TypeError(f"pos must have an integer dtype; got {pos.dtype}")
    if tuple(pos.shape) not in ((B, S), (1, S), (S,)):
        raise ValueError(
            f"pos must have shape ({B}, {S}), (1, {S}) or ({S},); got {tuple(pos.shape)}"
        )
    if not (isinstance(theta, (int, float)) and math.isfinite(theta) and theta > 1):
        raise ValueError(f"theta must be a finite number > 1; got {theta!r}")

    dtype = compute_dtype(xp, x.dtype)
    half = r // 2
    i = xp.arange(half, dtype=dtype, device=device(x))
    inv_freq = xp.exp(i * (-2.0 * math.log(theta) / r))  # (r/2,) theta^(-2i/r)
    p = xp.astype(xp.reshape(pos, (-1, 1, S, 1)), dtype)  # (B or 1, 1, S, 1)
    angle = p * inv_freq  # (B or 1, 1, S, r/2)
    cos, sin = xp.cos(angle), xp.sin(angle)

    xc = xp.astype(x, dtype)
    rot, rest = xc[..., :r], xc[..., r:]
    if style == "neox":
        a, b = rot[..., :half], rot[..., half:]  # (B, H, S, r/2) each
        rotated = xp.concat([a * cos - b * sin, b * cos + a * sin], axis=-1)
    else:
        pairs = xp.reshape(rot, (B, H, S, half, 2))
        a, b = pairs[..., 0], pairs[..., 1]  # (B, H, S, r/2) each
        rotated = xp.reshape(
            xp.stack([a * cos - b * sin, b * cos + a * sin], axis=-1), (B, H, S, r)
        )
    return xp.astype(xp.concat([rotated, rest], axis=-1), x.dtype)


def alibi_slopes(n_heads: int, *, xp: object = None, device: object = None) -> Array:
    r"""The ALiBi slopes of Press et al. (2022): a geometric sequence per head.

    For :math:`n` a power of two, :math:`m_h = 2^{-8h/n}` for :math:`h = 1..n`.
    Otherwise the slopes of the largest power of two :math:`n' < n` come first,
    followed by every other slope of :math:`2n'`, as in the reference code.

    Returns
    -------
    (n_heads,) float32 array of the namespace ``xp`` (NumPy by default).

    >>> [float(s) for s in alibi_slopes(4)]
    [0.25, 0.0625, 0.015625, 0.00390625]
    """
    if isinstance(n_heads, bool) or not isinstance(n_heads, int) or n_heads < 1:
        raise ValueError(f"n_heads must be a positive integer; got {n_heads!r}")
    if xp is None:
        import array_api_compat.numpy as xp  # NumPy, the readable default

    def geometric(n: int) -> list[float]:
        return [2.0 ** (-8.0 * h / n) for h in range(1, n + 1)]

    base = 1 << (n_heads.bit_length() - 1)  # the largest power of two <= n_heads
    slopes = geometric(base) + geometric(2 * base)[0::2][: n_heads - base]
    return xp.asarray(slopes, dtype=xp.float32, device=device)  # type: ignore[attr-defined]
