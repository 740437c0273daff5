"""metarl.rng: counter-based draws that depend only on the key."""

import math

import torch

from metarl import rng


def test_permutation_is_each_keys_stable_order_of_its_words():
    """The one-sort permutation equals a per-key stable argsort of the key's words (the
    definition), is a permutation, and a key's permutation does not depend on the other
    keys beside it."""
    keys = rng.fold(rng.seed_keys(list(range(7))), 3)
    for n in (1, 5, 512):
        perm = rng.permutation(keys, n)
        ref = torch.argsort(rng.bits(keys, (n,)), dim=-1, stable=True)
        assert torch.equal(perm, ref)
        assert torch.equal(perm.sort(dim=-1).values, torch.arange(n).expand(7, n))
        assert torch.equal(rng.permutation(keys[3:4], n), perm[3:4])
    grid = keys.reshape(7, 1).expand(7, 2)  # keys of any shape
    assert rng.permutation(grid, 9).shape == (7, 2, 9)
    assert torch.equal(rng.permutation(grid, 9)[:, 1], rng.permutation(keys, 9))



def _bits_by_definition(keys, shape):
    """``fmix(fmix(index * golden + key) ^ key)`` over the whole shape in one pass."""
    n = 1
    for s in shape:
        n *= s
    idx = torch.arange(n, dtype=torch.int64).reshape(shape)
    k = keys.reshape(keys.shape + (1,) * len(shape))
    return rng._fmix32(rng._fmix32(idx * rng._GOLDEN + k) ^ k)


def test_draws_in_chunks_equal_the_one_pass_definition():
    """bits, uniform and normal are computed a cache-sized chunk at a time, in place: the
    same numbers as the definition over the whole shape at once, for shapes of one chunk
    and of many, keys of any shape, and the first words of the stream stay what they
    were (a change would silently change every seeded run)."""
    keys = rng.seed_keys([0, 1])
    assert rng.bits(keys, (3,)).tolist() == [
        [2503594364, 753335246, 2741459107], [2154756318, 3037332886, 428689826]]
    for kshape in [(), (1,), (3,), (64,), (2, 5)]:
        keys = rng.fold(rng.seed_keys(torch.arange(max(1, math.prod(kshape)))), 7)
        keys = keys.reshape(kshape) if kshape else keys[0]
        for shape in [(), (7,), (3, 4, 2), (9155,), (40_000,)]:
            b = _bits_by_definition(keys, shape)
            assert torch.equal(rng.bits(keys, shape), b)
            u1 = ((b >> 8).to(torch.float64) + 0.5) * (1.0 / 16777216.0)
            assert torch.equal(rng.uniform(keys, shape), u1.float())
            if shape == (40_000,) and kshape == (64,):
                assert len(rng._chunks(keys, shape)[2]) > 1  # many chunks
    keys = rng.seed_keys(list(range(64)))
    u1 = rng.uniform(rng.fold(keys, 1), (9155,), torch.float64)
    u2 = rng.uniform(rng.fold(keys, 2), (9155,), torch.float64)
    z = (torch.sqrt(-2.0 * torch.log(u1)) * torch.cos(2.0 * torch.pi * u2)).float()
    assert torch.equal(rng.normal(keys, (9155,)), z)
