"""Counter-based random numbers keyed per population member.

Every random draw in the inner loop is a pure function of ``(key, stream, index)``: the
member's key (derived from its seed), a stream number naming the purpose and time of the
draw (update, step, epoch), and the element's position. Member ``i`` therefore sees the same
numbers whether it is trained alone or inside a population of any size, on any device,
which is what makes population training reproducible member by member (the role that
``jax.random`` keys play in purejaxrl).

The hash is the 32-bit MurmurHash3 finaliser applied in int64 arithmetic (masked back to
32 bits after each multiply), which is portable across CPU and CUDA.
"""

from __future__ import annotations

import torch

_MASK32 = 0xFFFFFFFF
_M1 = 0x85EBCA6B
_M2 = 0xC2B2AE35
_GOLDEN = 0x9E3779B9


def _fmix32(h: torch.Tensor) -> torch.Tensor:
    h = h & _MASK32
    h = h ^ (h >> 16)
    h = (h * _M1) & _MASK32
    h = h ^ (h >> 13)
    h = (h * _M2) & _MASK32
    h = h ^ (h >> 16)
    return h


def _mix_int(x: int) -> int:
    x &= _MASK32
    x ^= x >> 16
    x = (x * _M1) & _MASK32
    x ^= x >> 13
    x = (x * _M2) & _MASK32
    x ^= x >> 16
    return x


def seed_keys(seeds, device=None) -> torch.Tensor:
    """Turn integer seeds ``[P]`` into member keys ``[P]`` (int64 holding 32-bit values)."""
    seeds = torch.as_tensor(seeds, dtype=torch.int64, device=device)
    return _fmix32(_fmix32(seeds & _MASK32) ^ ((seeds >> 32) & _MASK32) ^ 0x5BD1E995)


def fold(keys: torch.Tensor, *data: int) -> torch.Tensor:
    """Derive new keys from ``keys`` and some integers (a purpose, a step counter)."""
    for d in data:
        keys = _fmix32(keys ^ ((_mix_int(d) + _GOLDEN) & _MASK32))
    return keys


def bits(keys: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    """32 random bits for every element of ``[P, *shape]``."""
    n = 1
    for s in shape:
        n *= s
    idx = torch.arange(n, dtype=torch.int64, device=keys.device).reshape(shape)
    k = keys.reshape(keys.shape + (1,) * len(shape))
    return _fmix32(_fmix32(idx * _GOLDEN + k) ^ k)


def uniform(keys: torch.Tensor, shape: tuple[int, ...], dtype=torch.float32) -> torch.Tensor:
    """Uniform numbers in the open interval (0, 1), shape ``[*keys.shape, *shape]``."""
    b = bits(keys, tuple(shape)) >> 8
    return ((b.to(dtype) + 0.5) * (1.0 / 16777216.0)).to(dtype)


def normal(keys: torch.Tensor, shape: tuple[int, ...], dtype=torch.float32) -> torch.Tensor:
    """Standard normal numbers (Box-Muller), shape ``[*keys.shape, *shape]``."""
    u1 = uniform(fold(keys, 1), shape, torch.float64)
    u2 = uniform(fold(keys, 2), shape, torch.float64)
    z = torch.sqrt(-2.0 * torch.log(u1)) * torch.cos(2.0 * torch.pi * u2)
    return z.to(dtype)


def permutation(keys: torch.Tensor, n: int) -> torch.Tensor:
    """A random permutation of ``range(n)`` per key, shape ``[*keys.shape, n]``: the
    stable order of ``n`` random 32-bit words per key. All keys' words are sorted as one
    array, each word prefixed by its key's row (one long sort is faster than many short
    ones on CPU; the result is the same)."""
    b = bits(keys, (n,)).reshape(-1, n)
    rows = torch.arange(b.shape[0], dtype=torch.int64, device=b.device).unsqueeze(1)
    order = torch.argsort(((rows << 32) | b).reshape(-1), stable=True).view(-1, n)
    return (order - rows * n).reshape(*keys.shape, n)


def fold_tensor(keys: torch.Tensor, data: torch.Tensor) -> torch.Tensor:
    """Like :func:`fold` with one integer per key (``data`` has the shape of ``keys``)."""
    return _fmix32(keys ^ ((_fmix32(data) + _GOLDEN) & _MASK32))
