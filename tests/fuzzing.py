"""How long the hypothesis fuzz tests run: a few seconds in the suite, as long as asked on
demand. ``SHMFAULT_FUZZ_EXAMPLES=N`` gives every fuzz test N examples (docs/security.md §9).

The suite's short run is derandomized (the same examples every time, so a red suite is
reproducible); a long run explores new examples each time. No example database is written.
"""

from __future__ import annotations

import os

from hypothesis import HealthCheck, settings

_ASKED = os.environ.get("SHMFAULT_FUZZ_EXAMPLES", "")


def fuzz_settings(suite_examples: int) -> settings:
    """Hypothesis settings for one fuzz test: ``suite_examples`` examples in the suite, or
    SHMFAULT_FUZZ_EXAMPLES when it is set."""
    examples = int(_ASKED) if _ASKED else suite_examples
    return settings(
        max_examples=examples,
        deadline=None,
        derandomize=not _ASKED,
        database=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
    )
