"""Which array library an input belongs to, and which dtype the spec computes in.

The spec never imports a framework. It asks array-api-compat for the namespace
of its inputs and creates every new array with the ``dtype=`` and ``device=``
of those inputs, so the same lines run on NumPy, CuPy, PyTorch and
array-api-strict.

Precision policy: float16 and bfloat16 inputs are computed in float32 and the
result is cast back to the input dtype; float32 and float64 are computed in
their own dtype.

Floating-point warnings: of the libraries the spec runs on, only NumPy (and
array-api-strict, which computes through NumPy) warns when arithmetic meets
inf or NaN. :func:`unchecked_arithmetic` silences it for the products the
spec takes on trust and checks afterwards.
"""

from __future__ import annotations

import contextlib
import sys
from typing import Any

import array_api_compat

Array = Any
Namespace = Any


def namespace_of(**arrays: Array | None) -> Namespace:
    """Return the array namespace shared by the named arrays (``None`` skipped).

    The first named array decides the namespace; every other one must belong
    to the same library, and the error names the one that does not.

    >>> import numpy as np
    >>> xp = namespace_of(q=np.zeros(2), k=np.ones(2), mask=None)
    >>> xp.__name__
    'array_api_compat.numpy'
    """
    given = {name: x for name, x in arrays.items() if x is not None}
    if not given:
        names = ", ".join(arrays)
        raise TypeError(f"{names} must be arrays; got None")
    first_name, first = next(iter(given.items()))
    xp = _namespace_or_error(first_name, first)
    for name, x in given.items():
        other = _namespace_or_error(name, x)
        if other is not xp:
            raise TypeError(
                f"{name} is a {_library(x)} array but {first_name} is a {_library(first)} array; "
                "all arrays must come from one array library"
            )
    return xp


def _namespace_or_error(name: str, x: Array) -> Namespace:
    try:
        return array_api_compat.array_namespace(x)
    except TypeError:
        raise TypeError(
            f"{name} must be an array of a library supported by array-api-compat "
            f"(numpy, cupy, torch, array_api_strict, ...); got {type(x).__name__}"
        ) from None


def _library(x: Array) -> str:
    return type(x).__module__.split(".")[0]


#: The input dtypes computed in float32.
LOW_PRECISION = ("float16", "bfloat16")


def dtype_name(dtype: Any) -> str:
    """A dtype's plain name, whatever the library: ``float16``, ``bfloat16``, ``int64``...

    >>> import numpy as np
    >>> dtype_name(np.dtype("float16")), dtype_name("float32")
    ('float16', 'float32')
    """
    name = getattr(dtype, "name", None) or getattr(dtype, "__name__", None)  # NumPy, its types
    return name if isinstance(name, str) else str(dtype).rpartition(".")[2]  # torch.float16


def index_dtype(xp: Namespace) -> Any:
    """The integer dtype of positions, lengths and block tables: the library's default
    integer (the array API's ``default_dtypes()["integral"]``), int64 everywhere but in
    JAX without ``jax_enable_x64``, whose widest integer is int32.

    >>> import array_api_compat.numpy as xp
    >>> index_dtype(xp) == xp.int64
    True
    """
    return xp.__array_namespace_info__().default_dtypes()["integral"]


def compute_dtype_name(name: str) -> str:
    """The precision policy, by name: the dtype the spec computes in for inputs of ``name``.

    >>> compute_dtype_name("bfloat16"), compute_dtype_name("float64")
    ('float32', 'float64')
    """
    return "float32" if name in LOW_PRECISION else name


def is_low_precision(dtype: Any) -> bool:
    """True for float16 and bfloat16 (NumPy's bfloat16 comes from ml_dtypes).

    array-api-strict has no float16, so the dtype's name is compared, not an
    attribute of the namespace that may not exist.
    """
    return dtype_name(dtype) in LOW_PRECISION


def is_floating(xp: Namespace, dtype: Any) -> bool:
    """True for the floating dtypes the spec accepts for q, k and v."""
    return dtype in (xp.float32, xp.float64) or is_low_precision(dtype)


def compute_dtype(xp: Namespace, dtype: Any) -> Any:
    """The dtype the spec computes in for inputs of ``dtype`` (:func:`compute_dtype_name`).

    >>> import array_api_compat.numpy as xp
    >>> compute_dtype(xp, xp.float16) == xp.float32, compute_dtype(xp, xp.float64) == xp.float64
    (True, True)
    """
    return xp.float32 if is_low_precision(dtype) else dtype


def unchecked_arithmetic() -> contextlib.AbstractContextManager[Any]:
    """Floating-point warnings off, for a product that is checked after it is taken.

    Attention first multiplies whole blocks of keys and values, the slots
    no query sees included, and looks at the (small) result: if it is not
    finite, the product is thrown away and taken again over only the visible
    pairs. An inf in an unseen slot may make the first product warn
    (``inf - inf``, ``0 * inf``) about a number that is never used; that
    warning is what this turns off. NumPy's error state is thread- and
    context-local. NumPy is looked up, never imported: a caller whose arrays
    are NumPy's (or array-api-strict's) has imported it, and no other
    library warns.

    >>> import numpy as np, warnings
    >>> with warnings.catch_warnings():
    ...     warnings.simplefilter("error")
    ...     with unchecked_arithmetic():
    ...         print(np.array([np.inf]) @ np.array([0.0]))
    nan
    """
    numpy = sys.modules.get("numpy")
    if numpy is None:
        return contextlib.nullcontext()
    return numpy.errstate(invalid="ignore", over="ignore")


def surely(x: Array) -> bool:
    """Whether the 0-d boolean array ``x`` is known to be True.

    The spec takes short cuts where the numbers allow one (every key finite:
    no second product; no query sees a block: skip it). An array traced by
    ``jax.jit`` has no value yet, and the standard lets ``bool`` raise
    ``TypeError`` for it; then this is False and the caller takes the general
    path, which gives the same numbers as the short cut wherever the short cut
    applies.

    >>> import numpy as np
    >>> surely(np.asarray(True)), surely(np.asarray(False))
    (True, False)
    """
    try:
        return bool(x)
    except TypeError:  # no value until the traced function runs
        return False
