"""HIR passes, one module each; importing this package registers them all by name."""

from rlx.passes import cse, dce, fold_constants

__all__ = ["cse", "dce", "fold_constants"]
