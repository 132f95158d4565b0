"""A child of test_signals: `python tests/signal_child.py PHASE ARGS...` runs `rlx ARGS...` with the
compile phase PHASE held open once it has started (it prints `holding PHASE` and sleeps), so a
signal sent on that line lands inside the phase however fast the phase is on a tiny model."""

from __future__ import annotations

import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager

import rlx.compiler.compile as compile_module
from rlx.cli import main

HOLDING = "holding"


def hold(phase: str) -> None:
    enter = compile_module.Phases.__call__

    @contextmanager
    def held(self: compile_module.Phases, name: str) -> Iterator[None]:
        with enter(self, name):
            if name == phase:
                print(f"{HOLDING} {name}", file=sys.stderr, flush=True)
                time.sleep(120)
            yield

    compile_module.Phases.__call__ = held  # type: ignore[method-assign]


if __name__ == "__main__":
    hold(sys.argv[1])
    sys.exit(main(sys.argv[2:]))
