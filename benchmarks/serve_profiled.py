"""``python -m benchmarks.serve_profiled OUT serve ARGS...``: the service, with its fault engine
thread under cProfile; the profile is written to OUT when the engine stops (SIGTERM).

cProfile follows one thread only, so the engine's ``_run`` is wrapped here, from outside the
package: shmfault itself carries no profiling hook. cProfile adds a fixed cost to every Python
call, which inflates functions that make many small calls: read its numbers as where the calls
are, and the sampling profile (py-spy) as where the time is.
"""

from __future__ import annotations

import cProfile
import functools
import sys
from collections.abc import Callable
from typing import Any


def _profiled(run: Callable[[Any], None], output: str) -> Callable[[Any], None]:
    @functools.wraps(run)
    def wrapper(self: Any) -> None:
        profiler = cProfile.Profile()
        profiler.enable()
        try:
            run(self)
        finally:
            profiler.disable()
            profiler.dump_stats(output)

    return wrapper


def main() -> int:
    output, *arguments = sys.argv[1:]
    from shmfault import cli, engine

    engine.FaultEngine._run = _profiled(engine.FaultEngine._run, output)  # type: ignore[method-assign,assignment]
    return cli.main(arguments)


if __name__ == "__main__":
    sys.exit(main())
