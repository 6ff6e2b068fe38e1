"""What every backend adapter answers, in one small abstract class."""

from __future__ import annotations

import importlib.util
from abc import ABC, abstractmethod
from collections.abc import Callable
from functools import partial
from typing import Any

import numpy as np


def numpy_dtype(name: str) -> Any:
    """The NumPy dtype for a name; bfloat16 comes from ml_dtypes."""
    if name == "bfloat16":
        import ml_dtypes

        return np.dtype(ml_dtypes.bfloat16)
    return np.dtype(name)


def round_to(x: np.ndarray, dtype: str) -> np.ndarray:
    """Round ``x`` to ``dtype`` in NumPy, so every backend receives the same values."""
    return np.asarray(x).astype(numpy_dtype(dtype))


class Backend(ABC):
    """One array library seen through the array API.

    ``name`` is how users and ``REFATTN_BACKENDS`` call it; ``module`` is the
    import name of the library, which the adapter imports only when asked.
    """

    name: str
    module: str
    #: The part of ``refattn verify``'s counts (problems, sequences, histories) this backend
    #: runs when the run does not name it: all of them, but a fifth on a backend that
    #: compiles a program for every new shape (JAX), whose rows would otherwise take as long
    #: as all the others together. Named (``--backends jax``), it runs every one.
    verify_share: float = 1.0

    def importable(self) -> bool:
        return importlib.util.find_spec(self.module) is not None

    def unavailable_reason(self) -> str | None:
        """None if the backend can run here, else why not."""
        if not self.importable():
            return f"{self.module} is not installed"
        return None

    def available(self) -> bool:
        return self.unavailable_reason() is None

    @abstractmethod
    def namespace(self) -> Any:
        """The array-API namespace (array-api-compat's wrapper where there is one)."""

    @abstractmethod
    def devices(self) -> list[str]:
        """Names of the usable devices, the default first."""

    @abstractmethod
    def dtypes(self, device: str) -> tuple[str, ...]:
        """The floating dtypes the spec runs in on this device."""

    @abstractmethod
    def asarray(self, x: np.ndarray, *, dtype: str, device: str) -> Any:
        """A NumPy array as this library's array, rounded to ``dtype`` (integers kept)."""

    @abstractmethod
    def to_numpy(self, x: Any) -> np.ndarray:
        """This library's array as NumPy; bfloat16 comes back as float32 (exactly)."""

    def synchronize(self, device: str) -> None:
        """Wait for queued work on ``device``; a no-op for eager CPU libraries."""
        return None

    def compiled(self, fn: Callable[..., Any], **options: Any) -> Callable[..., Any]:
        """``fn`` with ``options`` (plain Python values) bound, to be called on arrays alone,
        as this library runs a whole function best: here, as it is, one operation at a time.
        """
        return partial(fn, **options)

    def _rounded(self, x: np.ndarray, dtype: str) -> np.ndarray:
        """Floats rounded to ``dtype`` (bfloat16 held exactly as float32); ints and bools kept."""
        if x.dtype.kind in "biu":
            return x
        rounded = round_to(x, dtype)
        return rounded.astype(np.float32) if dtype == "bfloat16" else rounded

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name}>"
