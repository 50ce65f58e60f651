"""Tests for pose.py: PoSE positions are strictly increasing from 0, stay below the target, cover it in
distribution, and are reproducible from their seed."""
import random

import pytest
import torch

from pose import pose_positions, sample_rng


@pytest.mark.parametrize("length,target,chunks", [(64, 640, 2), (7, 8, 2), (100, 1000, 3), (1, 5, 2), (5, 5, 2)])
def test_positions_increase_from_zero_and_stay_below_the_target(length, target, chunks):
    rng = random.Random(0)
    for _ in range(200):
        p = pose_positions(length, target, rng, chunks)
        assert p.shape == (length,) and p.dtype == torch.long
        assert p[0] == 0 and int(p.max()) < target
        assert bool((p.diff() > 0).all())
        assert int((p.diff() > 1).sum()) <= chunks - 1  # at most N - 1 skips, contiguous inside chunks


def test_positions_cover_the_target_in_distribution():
    """2000 windows of 64 over a target of 640: every one of 10 equal bins is hit, the last decile
    [576, 640) included, and the largest relative distance reaches the last decile too."""
    L, target = 64, 640
    ps = [pose_positions(L, target, sample_rng(0, i)) for i in range(2000)]
    hist = torch.bincount(torch.cat(ps) * 10 // target, minlength=10)
    assert hist.numel() == 10 and bool((hist > 0).all()), hist
    assert max(int(p[-1] - p[0]) for p in ps) >= 0.9 * target
    assert any(int(p[-1]) == target - 1 for p in ps)  # the largest skip is drawn too


def test_seeded_reproducibility():
    a = [pose_positions(50, 500, sample_rng(3, i)) for i in range(5)]
    b = [pose_positions(50, 500, sample_rng(3, i)) for i in range(5)]
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert not torch.equal(a[0], a[1])  # another sample index
    assert not torch.equal(a[0], pose_positions(50, 500, sample_rng(4, 0)))  # another seed


def test_bad_arguments():
    with pytest.raises(ValueError, match="length"):
        pose_positions(10, 5, random.Random(0))
    with pytest.raises(ValueError, match="chunks"):
        pose_positions(10, 50, random.Random(0), chunks=0)
