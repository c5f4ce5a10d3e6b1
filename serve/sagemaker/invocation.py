"""What one /invocations call carries past the routes: its live session and its deadline.

The SageMaker route sets the context; ``GenerationService`` reads it when it builds engine requests (the session
id) and when it collects a non-streaming answer (the deadline). Other routes leave it unset.
"""

from __future__ import annotations

import contextvars
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator, Optional

FINISH_HEADER = "X-Finish-Reason"  # "deadline" when the answer was cut short to beat the invocation timeout
DEADLINE = "deadline"


@dataclass
class InvocationContext:
    """``deadline`` is a ``time.monotonic()`` value; ``deadline_hit`` is set when an answer was cut at it."""

    session_id: Optional[str] = None
    deadline: Optional[float] = None
    deadline_hit: bool = False


_current: contextvars.ContextVar[Optional[InvocationContext]] = contextvars.ContextVar("invocation", default=None)


def current() -> Optional[InvocationContext]:
    return _current.get()


@contextmanager
def invocation(context: InvocationContext) -> Iterator[InvocationContext]:
    """Make ``context`` the current one for the duration of the block."""
    token = _current.set(context)
    try:
        yield context
    finally:
        _current.reset(token)
