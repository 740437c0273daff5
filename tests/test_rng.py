"""metarl.rng: counter-based draws that depend only on the key."""

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

