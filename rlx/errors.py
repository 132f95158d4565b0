"""User-facing errors: each names the thing that is wrong and how to fix it.

The CLI turns any `RlxError` into a one-paragraph message and a non-zero exit code;
anything else is a bug and keeps its traceback.
"""

from __future__ import annotations


class RlxError(Exception):
    """An error caused by the user's input, with an optional fix."""

    exit_code = 2

    def __init__(self, message: str, *, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return self.message if not self.hint else f"{self.message}\n  fix: {self.hint}"


class ConfigError(RlxError):
    """A model config (config.json or GGUF metadata) is malformed or unsupported."""


class WeightError(RlxError):
    """A weight file is missing, truncated, or holds a tensor of the wrong shape."""


class FlowError(RlxError):
    """A GemmaFlow recipe asks for an impossible combination."""


class HIRError(RlxError):
    """An HIR graph breaks a verifier rule or cannot be parsed."""


class ProfileError(RlxError):
    """A gemma.rlx.toml profile has an unknown key or a bad value."""


class RunError(RlxError):
    """A generation request cannot be served (e.g. prompt longer than the context)."""
