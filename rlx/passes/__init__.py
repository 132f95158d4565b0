"""HIR passes, one module each; importing this package registers them all by name.

`PASS_ORDER` is the one order the passes run in, whoever derives a pipeline (the default, or a
profile's `[passes]` flags and `[fusion]` policy): RoPE tables after constant folding and before
CSE (which merges what they share), shared-input matmuls before GeGLU (so it can read the packed
gate|up), attention and add-norm before the generic epilogue (which would otherwise absorb the
residual adds those patterns need), dce last (it also sweeps what fusion replaced). `precision`,
`quantize` and `specialize` are not in it: a profile appends `precision` to whatever pipeline runs
(its casts would hide the fusion patterns) and puts `quantize` first (fusion must see the weights'
formats, to fuse only weights of one format): both are part of the model the profile asks for, not
a pass choice; specialization binds sizes per engine entry.
"""

from dataclasses import dataclass

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
    quantize,
    specialize,
)

__all__ = ["DEFAULT_PIPELINE", "FUSION_POLICIES", "PASS_ORDER", "PassSlot", "derive_pipeline", "cse", "dce",
           "fold_constants", "fold_rope", "fuse_add_norm", "fuse_attention", "fuse_epilogue", "fuse_geglu",
           "fuse_matmuls", "precision", "quantize", "specialize"]

# "direct": the fusions that replace a whole block by one kernel; "fusable" adds the generic
# epilogue fusion (elementwise tails folded into their producer), which pays off in memory-bound
# decode. Each policy includes the ones before it.
FUSION_POLICIES = ("direct", "fusable")


@dataclass(frozen=True)
class PassSlot:
    """One pass in `PASS_ORDER`: a cleanup pass is switched by a profile `[passes]` flag; a fusion
    pass runs under its `policy` and every policy after it in FUSION_POLICIES."""

    name: str
    flag: str | None = None
    policy: str | None = None


PASS_ORDER: tuple[PassSlot, ...] = (
    PassSlot("fold-constants", flag="constant_folding"),
    PassSlot("fold-rope", flag="constant_folding"),  # a no-op on graphs without a position bound
    PassSlot("cse", flag="cse"),
    PassSlot("fuse-qkv", policy="direct"),
    PassSlot("fuse-gate-up", policy="direct"),
    PassSlot("fuse-geglu", policy="direct"),
    PassSlot("fuse-attention", policy="direct"),
    PassSlot("fuse-add-norm", policy="direct"),
    PassSlot("fuse-lm-head-softcap", policy="direct"),
    PassSlot("fuse-epilogue", policy="fusable"),
    PassSlot("dce", flag="dce"),
)


def derive_pipeline(flags: dict[str, bool] | None = None, policy: str | None = "fusable") -> str:
    """Pipeline text from `PASS_ORDER`: cleanup passes whose flag is on (all, without `flags`),
    fusion passes of `policy` (none when it is None)."""
    level = FUSION_POLICIES.index(policy) if policy is not None else -1
    chosen = [s.name for s in PASS_ORDER
              if (s.flag is not None and (flags or {}).get(s.flag, True))
              or (s.policy is not None and FUSION_POLICIES.index(s.policy) <= level)]
    return ",".join(chosen)


DEFAULT_PIPELINE = derive_pipeline()
