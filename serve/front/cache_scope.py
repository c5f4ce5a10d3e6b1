"""Which prefix-cache partition a request's blocks belong to, under ``PREFIX_CACHE_SCOPE``.

The engine always keys blocks by their adapter (different weights give different keys and values); the partition
chosen here is what else separates them. Requests share cached blocks only within one adapter and one partition.
See docs/reliability.md (tenant isolation) for what each scope lets one client learn about another.
"""

from __future__ import annotations

import uuid
from typing import Optional

GLOBAL = "global"  # the salt is ignored: every client of one model or adapter shares its cache
ADAPTER = "adapter"  # as SALT, but unsalted base-model requests share nothing (outside their own session)
SALT = "salt"  # the salt partitions the cache; unsalted requests share one partition per adapter


def cache_partition(
    scope: str, salt: Optional[str], adapter: Optional[str], session_id: Optional[str]
) -> Optional[str]:
    """The partition of one client request's engine requests (None: the adapter's shared one).

    A client's salt is honoured under every scope but ``global``. Under ``adapter`` an unsalted request on the base
    model gets its live session as partition, or one of its own. The prefixes keep a client's salt apart from the
    partitions made here."""
    if scope == GLOBAL:
        return None
    if salt is not None:
        return f"salt:{salt}"
    if scope == ADAPTER and adapter is None:
        return f"session:{session_id}" if session_id is not None else f"request:{uuid.uuid4().hex}"
    return None
