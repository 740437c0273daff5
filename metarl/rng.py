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


#: elements hashed at a time, over all key rows: 256 KB of int64 per pass (each row takes
#: at least 1,024 elements, so a chunk is larger beyond 32 rows)
_CHUNK = 1 << 15


def _fmix32_(h: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """:func:`_fmix32` in place on ``h`` (``t``: a scratch tensor of its shape)."""
    h.bitwise_and_(_MASK32)
    for shift, mult in ((16, _M1), (13, _M2), (16, None)):
        torch.bitwise_right_shift(h, shift, out=t)
        h.bitwise_xor_(t)
        if mult is not None:
            h.mul_(mult).bitwise_and_(_MASK32)
    return h


def _chunks(keys: torch.Tensor, shape: tuple[int, ...]):
    """``(k [K, 1], n, chunks)``: the keys as rows, the number of elements per key, and
    ``(start, end)`` ranges of them of about :data:`_CHUNK` elements in all, so that every
    pass over a chunk's ``[K, end - start]`` words stays in cache (one range when
    compiled, and off the CPU)."""
    n = 1
    for s in shape:
        n *= s
    k = keys.reshape(-1, 1)
    if torch.compiler.is_compiling() or k.device.type != "cpu":
        return k, n, [(0, n)]  # compiled the passes fuse into one; a GPU wants big kernels
    step = max(1024, _CHUNK // max(1, k.shape[0]))
    return k, n, [(a, min(a + step, n)) for a in range(0, n, step)]


def _bits_range(k: torch.Tensor, a: int, b: int) -> torch.Tensor:
    """The words of elements ``a..b-1`` for key rows ``k [K, 1]``: ``[K, b - a]`` int64
    (in place for a chunk of many rows; a few rows' words take fewer Python calls out of
    place)."""
    h = torch.arange(a, b, dtype=torch.int64, device=k.device).mul_(_GOLDEN).add(k)
    if h.numel() < 4096:
        return _fmix32(_fmix32(h) ^ k)
    t = torch.empty_like(h)
    return _fmix32_(_fmix32_(h, t).bitwise_xor_(k), t)


def bits(keys: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    """32 random bits for every element of ``[*keys.shape, *shape]``: the MurmurHash3
    finaliser of ``fmix(index * golden + key) ^ key``, element ``index`` of the flattened
    ``shape`` (computed a cache-sized chunk at a time, in place)."""
    k, n, chunks = _chunks(keys, tuple(shape))
    if len(chunks) == 1:
        out = _bits_range(k, 0, n) if n else k.new_empty(k.shape[0], 0)
    else:
        out = torch.empty(k.shape[0], n, dtype=torch.int64, device=k.device)
        for a, b in chunks:
            out[:, a:b] = _bits_range(k, a, b)
    return out.reshape(tuple(keys.shape) + tuple(shape))


def _uniform_range(k, a, b, dtype) -> torch.Tensor:
    u = _bits_range(k, a, b).bitwise_right_shift_(8).to(dtype)
    return u.add_(0.5).mul_(1.0 / 16777216.0)


def uniform(keys: torch.Tensor, shape: tuple[int, ...], dtype=torch.float32) -> torch.Tensor:
    """Uniform numbers in (0, 1), shape ``[*keys.shape, *shape]``: the top 24 bits of
    :func:`bits`, ``(b + 0.5) / 2^24``. In float64 the interval is open; in float32 the
    top word (one draw in 2^24) rounds to exactly 1.0."""
    k, n, chunks = _chunks(keys, tuple(shape))
    if len(chunks) == 1:
        out = _uniform_range(k, 0, n, dtype)
    else:
        out = torch.empty(k.shape[0], n, dtype=dtype, device=keys.device)
        for a, b in chunks:
            out[:, a:b] = _uniform_range(k, a, b, dtype)
    return out.reshape(tuple(keys.shape) + tuple(shape))


def normal(keys: torch.Tensor, shape: tuple[int, ...], dtype=torch.float32) -> torch.Tensor:
    """Standard normal numbers, shape ``[*keys.shape, *shape]``: Box-Muller in float64,
    ``sqrt(-2 log u1) * cos(2 pi u2)`` with ``u1``, ``u2`` :func:`uniform` under
    ``fold(keys, 1)`` and ``fold(keys, 2)`` (a cache-sized chunk at a time)."""
    k1, n, chunks = _chunks(fold(keys, 1), tuple(shape))
    k2 = fold(keys, 2).reshape(-1, 1)

    def draw(a, b):
        r = _uniform_range(k1, a, b, torch.float64).log_().mul_(-2.0).sqrt_()
        return r.mul_(_uniform_range(k2, a, b, torch.float64).mul_(2.0 * torch.pi).cos_())

    if len(chunks) == 1:
        out = draw(0, n).to(dtype)
    else:
        out = torch.empty(k1.shape[0], n, dtype=dtype, device=keys.device)
        for a, b in chunks:
            out[:, a:b] = draw(a, b)
    return out.reshape(tuple(keys.shape) + tuple(shape))


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
