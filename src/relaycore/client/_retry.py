"""Automatic reconnect's retry policies: how long to wait before each attempt, or to give up.

The JS client's ``IRetryPolicy`` in Python terms: a callable given a ``RetryContext`` that
returns seconds or ``None``. A list of delays is the policy of ``withAutomaticReconnect([...])``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Final, TypeAlias

__all__ = ["DEFAULT_RECONNECT_DELAYS", "RetryContext", "RetryPolicy", "retry_policy"]

#: ``withAutomaticReconnect()``'s delays, in seconds: then it gives up.
DEFAULT_RECONNECT_DELAYS: Final = (0.0, 2.0, 10.0, 30.0)


@dataclass(frozen=True, slots=True)
class RetryContext:
    """What a retry policy is told before each reconnect attempt."""

    #: Attempts that failed so far in this round of reconnecting (0 before the first).
    previous_retry_count: int
    #: Seconds since the connection was lost.
    elapsed: float
    #: Why the connection was lost (first attempt), else why the last attempt failed.
    retry_reason: BaseException


#: Seconds to wait before the next reconnect attempt, or ``None`` to give up.
RetryPolicy: TypeAlias = Callable[[RetryContext], "float | None"]


def retry_policy(spec: Sequence[float] | RetryPolicy | bool | None) -> RetryPolicy | None:
    """A retry policy from what the caller gave: delays, a policy, ``True`` (the defaults)."""
    if spec is None or spec is False:
        return None
    if spec is True:
        spec = DEFAULT_RECONNECT_DELAYS
    if callable(spec):
        return spec
    delays = tuple(spec)
    for delay in delays:
        if isinstance(delay, bool) or not isinstance(delay, int | float) or not delay >= 0:
            raise ValueError(f"reconnect delays must be numbers of seconds >= 0, got {delay!r}")

    def from_list(context: RetryContext) -> float | None:
        count = context.previous_retry_count
        return float(delays[count]) if count < len(delays) else None

    return from_list
