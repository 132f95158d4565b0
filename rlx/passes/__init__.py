"""HIR passes, one module each; importing this package registers them all by name."""

from rlx.passes import (
    cse,
    dce,
    fold_constants,
    fold_rope,
    fuse_add_norm,
    fuse_attention,
    fuse_epilogue,
    fuse_geglu,
    fuse_matmuls,
    precision,
    specialize,
)

__all__ = ["cse", "dce", "fold_constants", "fold_rope", "fuse_add_norm", "fuse_attention", "fuse_epilogue",
           "fuse_geglu", "fuse_matmuls", "precision", "specialize"]

# The default pipeline, in dependency order: RoPE tables after constant folding and before CSE
# (which merges what they share), shared-input matmuls before GeGLU (so it can read the packed
# gate|up), attention and add-norm before the generic epilogue (which would otherwise absorb the
# residual adds those patterns need).
DEFAULT_PIPELINE = ("fold-constants,fold-rope,cse,fuse-qkv,fuse-gate-up,fuse-geglu,fuse-attention,fuse-add-norm,"
                    "fuse-lm-head-softcap,fuse-epilogue,dce")
