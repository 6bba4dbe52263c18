"""Random streams: item k of a seed s (expert k, evaluation network k) draws from torch seed s * 2**16 + k.

Not s + k, under which seed 1's items are seed 0's shifted by one: `--seed 1` retrained 49 of `--seed 0`'s 50
experts, and evaluated a set with 4 of `--seed 0`'s 5 networks. torch's CPU generator keeps 32 bits of a seed
(2**32 + k seeds what k does), so a seed has 2**16 streams and seeds are in [0, 2**16). Seed 0's item k draws
from k, as it always did.
"""
from __future__ import annotations

STREAMS_PER_SEED = 2**16


def check_seed(seed: object) -> None:
    """A ValueError unless `seed` can number streams (an int in [0, 65536))."""
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < STREAMS_PER_SEED:
        raise ValueError(f"seed must be an int in [0, {STREAMS_PER_SEED}), got {seed!r}")


def stream(seed: int, index: int) -> int:
    """The torch seed of item `index` of `seed`: two seeds share no stream."""
    check_seed(seed)
    if not 0 <= index < STREAMS_PER_SEED:
        raise ValueError(f"item {index} of seed {seed} has no stream: a seed has {STREAMS_PER_SEED}")
    return seed * STREAMS_PER_SEED + index
