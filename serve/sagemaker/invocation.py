"""What one /invocations call carries past the routes besides its body: its live session and its deadline.

Both travel in the request's ``RequestContext`` (serve.front.context): ``GenerationService`` tags engine requests
with the session id and cuts a non-streamed answer short at the deadline; the route then names the cut in a header.
"""

from __future__ import annotations

from typing import Optional

FINISH_HEADER = "X-Finish-Reason"  # "deadline" when the answer was cut short to beat the invocation timeout
DEADLINE = "deadline"


def invocation_deadline(arrival: float, timeout: Optional[float], margin: float) -> Optional[float]:
    """When an answer must be cut short (``time.monotonic()``): ``margin`` seconds before the invocation ``timeout``
    runs out, counted from the request's ``arrival``; None without a timeout."""
    return None if timeout is None else arrival + timeout - margin
