"""Counter-based seeds: every random draw is a pure function of (run seed, step, direction, block).

Deriving seeds instead of drawing them from a stateful RNG makes any direction reproducible in
isolation (for restore, update and replay) and makes resuming a run trivial.
"""

_MASK = (1 << 64) - 1


def _splitmix64(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & _MASK
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK
    return x ^ (x >> 31)


def derive(*keys: int) -> int:
    """A 63-bit seed from a sequence of integers (order matters); usable by torch.Generator."""
    h = 0x5EED
    for k in keys:
        h = _splitmix64(h ^ (k & _MASK))
    return h >> 1
