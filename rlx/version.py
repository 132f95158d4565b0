"""The rlx version (recorded in artifacts: one compiled by another version is refused)."""

__version__ = "0.1.0"
