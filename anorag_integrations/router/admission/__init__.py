"""Overload control: saturation is not failure, calls wait for room or are shed fast, retries stay in a budget.

``limit.py`` learns each route's useful concurrency, ``queue.py`` holds the calls that find every route
full (by priority, bounded by length and by each call's time) and ``budget.py`` caps retries and failovers at a
share of calls, fleet-wide when replicas share state.
"""

from __future__ import annotations

from .budget import RetryBudget
from .limit import ConcurrencyLimit
from .queue import Admission

__all__ = ["Admission", "ConcurrencyLimit", "RetryBudget"]
