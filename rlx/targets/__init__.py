"""TVM backends: target presets, HIR -> Relax lowering, schedules, builds.

`presets` names targets, `lower` turns HIR into one Relax IRModule, `kernels` holds the TE
computes Relax lacks, `schedules` the CPU schedule rules, `build` compiles for a target. Only
this package and `rlx.runtime` import TVM.
"""
