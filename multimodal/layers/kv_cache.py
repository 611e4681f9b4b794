"""Key/value cache of one attention layer, for incremental decoding."""

from __future__ import annotations

from torch import Tensor


class KVCache:
    """Keys and values (B, H_kv, T, D) kept between decoding steps.

    Self-attention appends the new step's keys and values and attends to everything so far;
    cross-attention fills the cache once from the encoder output and reuses it.
    Storage is preallocated and doubles when full, so a step costs one copy of the new keys,
    not of the whole history.
    """

    def __init__(self, capacity: int = 64) -> None:
        if capacity <= 0:
            raise ValueError(f"capacity={capacity} must be > 0")
        self.capacity = capacity
        self.length = 0
        self._k: Tensor | None = None
        self._v: Tensor | None = None

    def append(self, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Store k, v (B, H_kv, T, D) after the cached ones; return all keys and values."""
        end = self.length + k.shape[2]
        if self._k is None or self._v is None:
            size = max(self.capacity, end)
            self._k = k.new_empty(*k.shape[:2], size, k.shape[3])
            self._v = v.new_empty(*v.shape[:2], size, v.shape[3])
        elif end > self._k.shape[2]:
            size = max(2 * self._k.shape[2], end)
            self._k = _grow(self._k, size)
            self._v = _grow(self._v, size)
        self._k[:, :, self.length : end] = k
        self._v[:, :, self.length : end] = v
        self.length = end
        return self.keys_values()

    def keys_values(self) -> tuple[Tensor, Tensor]:
        """All cached keys and values, (B, H_kv, length, D) each."""
        if self._k is None or self._v is None:
            raise RuntimeError("the KV cache is empty")
        return self._k[:, :, : self.length], self._v[:, :, : self.length]

    def reorder(self, index: Tensor) -> None:
        """Select batch rows (beam search keeps the surviving beams)."""
        if self._k is not None and self._v is not None:
            self._k = self._k.index_select(0, index)
            self._v = self._v.index_select(0, index)

    def reset(self) -> None:
        self.length = 0
        self._k = self._v = None


def _grow(buffer: Tensor, size: int) -> Tensor:
    grown = buffer.new_empty(*buffer.shape[:2], size, buffer.shape[3])
    grown[:, :, : buffer.shape[2]] = buffer
    return grown
