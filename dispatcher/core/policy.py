"""Retry backoff: how long a failed execution waits before its next try.

The random source is an argument, so a seeded ``random.Random`` (or a fake returning fixed
values) makes every delay reproducible.
"""

from __future__ import annotations

import math
from typing import Protocol, assert_never

from dispatcher.core.errors import InvalidInput
from dispatcher.core.models import BackoffKind, RetryPolicy
from dispatcher.core.validate import is_int

# Raw delays are capped here rather than at max_delay, because jitter is applied before the
# max_delay cap and must see the true (possibly larger) delay. 1e300 is far beyond any
# max_delay, and even doubled by the widest jitter it stays a finite float.
_CEILING = 1e300
_LOG_CEILING = math.log(_CEILING)
# float ** int overflows (OverflowError, not inf) once the result passes ~1.8e308.
_LOG_POW_SAFE = 700.0


class RandomSource(Protocol):
    """Where jitter comes from; ``random.Random`` satisfies it.

    >>> import random
    >>> rng: RandomSource = random.Random(7)
    """

    def random(self) -> float:
        """A float in [0, 1)."""
        ...


def backoff_delay(policy: RetryPolicy, attempt: int, rng: RandomSource) -> float:
    """Seconds to wait after ``attempt`` failed attempts (1 after the first failure).

    The delay grows with the policy's kind (exponential: ``base * factor ** (attempt - 1)``,
    linear: ``base * (1 + factor * (attempt - 1))``, constant: ``base``), is spread by
    ``delay * (1 + jitter * (2u - 1))`` with ``u = rng.random()``, then clamped into
    ``[0, max_delay]``. Exactly one number is drawn from ``rng`` per call.

    >>> import random
    >>> backoff_delay(RetryPolicy(base_delay=1.0, factor=2.0, jitter=0.0), 4, random.Random())
    8.0
    """
    if not is_int(attempt):
        raise InvalidInput("attempt", attempt, "must be an integer")
    if attempt < 1:
        raise InvalidInput("attempt", attempt, "must be at least 1 (the failures so far)")
    raw = _raw_delay(policy, attempt - 1)
    u = rng.random()
    if not 0.0 <= u <= 1.0:
        raise InvalidInput("rng.random()", u, "must return a number between 0 and 1")
    delay = raw * (1.0 + policy.jitter * (2.0 * u - 1.0))
    return min(max(delay, 0.0), policy.max_delay)


def _raw_delay(policy: RetryPolicy, steps: int) -> float:
    base, factor = policy.base_delay, policy.factor
    if base == 0.0:
        # Also keeps 0 * inf (a NaN) out of the linear formula below.
        return 0.0
    match policy.kind:
        case BackoffKind.CONSTANT:
            return base
        case BackoffKind.LINEAR:
            # Past this many steps the delay is beyond the ceiling anyway; the cap keeps
            # float(steps) from overflowing for absurd attempt numbers.
            capped = float(min(steps, 2**1000))
            return min(base * (1.0 + factor * capped), _CEILING)
        case BackoffKind.EXPONENTIAL:
            if factor == 1.0:
                return base
            log_factor = math.log(factor)
            # Compare in log space before exponentiating: int-to-float comparison is exact
            # for any int, so even attempt=10**400 cannot overflow here.
            if steps >= (_LOG_CEILING - math.log(base)) / log_factor:
                return _CEILING
            growth = steps * log_factor
            if growth < _LOG_POW_SAFE:
                return min(base * factor**steps, _CEILING)
            # A tiny base with a huge factor: factor ** steps alone would overflow although
            # the product is still below the ceiling.
            return min(math.exp(math.log(base) + growth), _CEILING)
        case _:
            assert_never(policy.kind)
