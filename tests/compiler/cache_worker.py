"""A child process of test_cache_concurrency: `hit CKPT OUT N` compiles N times into OUT through a
warm compile cache (as `rlx compile` does); `refresh SRC N` replaces the cache's only entry with a
copy of the artifact SRC N times (what a process that just compiled it does). Any exception
propagates: a traceback and a non-zero exit is the failure the test looks for."""

from __future__ import annotations

import sys
from pathlib import Path

from rlx.compiler.compile import _copy_artifact, cache_root, compile_checkpoint, write_artifact
from rlx.progress import reporting


def main(mode: str, *args: str) -> None:
    if mode == "hit":
        ckpt, out, times = args
        with reporting():  # the test reads the cache-hit lines
            for _ in range(int(times)):
                compile_checkpoint(ckpt, ["cpu"], out, max_seq=32)
    else:
        src, times = args
        [entry] = [p for p in cache_root().iterdir() if not p.name.startswith(".")]
        for _ in range(int(times)):
            write_artifact(entry, lambda tmp: _copy_artifact(Path(src), tmp))


if __name__ == "__main__":
    main(*sys.argv[1:])
