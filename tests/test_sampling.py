"""The community's single-positive sampling and split, checked against an independent MT19937.

The reference below re-derives numpy's legacy ``RandomState`` from its definition (spec
baselines.md §1.2): MT19937 seeded with init_genrand, shuffle = Fisher-Yates from the end with masked
rejection sampling. It shares no code with numpy, so agreement is a real check.
"""

from __future__ import annotations

import numpy as np

from pipeline.sampling import sample_observed_labels, train_val_split


class MT19937:
    def __init__(self, seed: int):
        self.state = [0] * 624
        self.state[0] = seed & 0xFFFFFFFF
        for i in range(1, 624):
            prev = self.state[i - 1]
            self.state[i] = (1812433253 * (prev ^ (prev >> 30)) + i) & 0xFFFFFFFF
        self.index = 624

    def next_uint32(self) -> int:
        if self.index >= 624:
            for i in range(624):
                y = (self.state[i] & 0x80000000) | (self.state[(i + 1) % 624] & 0x7FFFFFFF)
                self.state[i] = self.state[(i + 397) % 624] ^ (y >> 1) ^ (0x9908B0DF if y & 1 else 0)
            self.index = 0
        y = self.state[self.index]
        self.index += 1
        y ^= y >> 11
        y ^= (y << 7) & 0x9D2C5680
        y ^= (y << 15) & 0xEFC60000
        y ^= y >> 18
        return y

    def bounded(self, m: int) -> int:
        if m == 0:
            return 0
        mask = m
        for shift in (1, 2, 4, 8, 16):
            mask |= mask >> shift
        while True:
            v = self.next_uint32() & mask
            if v <= m:
                return v

    def shuffle(self, items: list) -> None:
        for i in range(len(items) - 1, 0, -1):
            j = self.bounded(i)
            items[i], items[j] = items[j], items[i]


def reference_observed(labels, seed=1200, skip_negative_shuffle=False):
    rng = MT19937(seed)
    out = np.zeros_like(labels, dtype=np.int8)
    for i, row in enumerate(labels):
        pos = [j for j, v in enumerate(row) if v == 1]
        rng.shuffle(pos)
        out[i, pos[:1]] = 1
        if not skip_negative_shuffle:
            neg = [j for j, v in enumerate(row) if v != 1]
            rng.shuffle(neg)
    return out


def test_mt19937_matches_known_first_output():
    # The first output of MT19937 seeded with 5489 (the reference implementation's default) is 3499211612.
    assert MT19937(5489).next_uint32() == 3499211612


def test_hand_worked_rows_including_the_negative_shuffle():
    labels = np.array([
        [1, 0, 1, 0, 1],   # three positives: the first shuffle picks one of {0, 2, 4}
        [0, 1, 0, 0, 0],   # one positive: no draw for positives, 3 draws (at least) for the negatives
        [1, 1, 0, 0, 0],
        [0, 0, 0, 0, 0],   # no positive: nothing observed, but the negatives are still shuffled
        [0, 1, 1, 1, 0],
    ])
    ours = sample_observed_labels(labels, seed=1200)
    assert np.array_equal(ours, reference_observed(labels))
    assert (ours.sum(1) == [1, 1, 1, 0, 1]).all()
    assert ((ours == 1) <= (labels == 1)).all()


def test_skipping_the_second_shuffle_gives_different_labels():
    labels = (np.random.RandomState(0).rand(300, 20) < 0.15).astype(int)
    labels[np.arange(300), np.random.RandomState(1).randint(0, 20, 300)] = 1
    ours = sample_observed_labels(labels, seed=1200)
    assert np.array_equal(ours, reference_observed(labels))
    assert not np.array_equal(ours, reference_observed(labels, skip_negative_shuffle=True))


def test_split_matches_the_reference_permutation_and_rounding():
    n = 23
    rng = MT19937(1200)
    perm = list(range(n))
    rng.shuffle(perm)
    n_val = round(0.2 * n)  # 4.6 -> 5
    train, val = train_val_split(n, 0.2, 1200)
    assert list(train) == sorted(perm[: n - n_val]) and list(val) == sorted(perm[n - n_val:])
    # round half to even: 0.5 * 5 = 2.5 -> 2 validation rows
    train5, val5 = train_val_split(5, 0.5, 1200)
    assert len(val5) == 2 and len(train5) == 3
    assert sorted(np.concatenate([train5, val5])) == list(range(5))
