"""Fold the attention chain into one `attention` op.

    matmul(q, transpose(repeat_kv?(k))) -> scale? -> softcap? -> (causal_mask | add(custom))
      -> add(media)? -> softmax -> matmul(., repeat_kv?(v))

becomes `attention(q, k, v, positions[, bias...]) {scale, softcap, window, mask}` with the
un-repeated KV heads (GQA is the kernel's business). Every softmax left over is a miss.
"""

from __future__ import annotations

from dataclasses import dataclass

from rlx.hir import conventions as cv
from rlx.hir.graph import HIR
from rlx.hir.ops import Op
from rlx.hir.pass_infra import register
from rlx.hir.patterns import Match, Opt, Pat, Pattern, Rule, Var
from rlx.passes.fusion import RuleFusion

_KT = (0, 1, 3, 2)


def _chain() -> Pattern:
    # KV views may be shared: KV-sharing layers (Gemma 4) read the same cache, and CSE merges them
    scores = Pat(Op.MATMUL, Var("q"), Pat(Op.TRANSPOSE, Opt(Op.REPEAT_KV, Var("k"), "krep", shared=True),
                                          where=lambda n: n.attr("perm") == _KT, shared=True))
    return Opt(Op.SOFTCAP, Opt(Op.SCALE, scores, "scale"), "softcap")


def _masked(kind: str, media: bool) -> Pattern:
    inner: Pattern = (Pat(Op.CAUSAL_MASK, _chain(), Var("pos"), name="mask") if kind == "causal"
                      else Pat(Op.ADD, _chain(), Var("custom_bias"), name="custom"))
    return Pat(Op.ADD, inner, Var("media_bias"), name="media") if media else inner


def _pattern(kind: str, media: bool) -> Pattern:
    probs = Pat(Op.SOFTMAX, _masked(kind, media))
    return Pat(Op.MATMUL, probs, Opt(Op.REPEAT_KV, Var("v"), "vrep", shared=True))


def _fuse(hir: HIR, m: Match) -> str | None:
    scale = hir.node(m["scale"]).attr("value") if m.get("scale") else 1.0
    softcap = hir.node(m["softcap"]).attr("cap") if m.get("softcap") else 0.0
    if m.get("mask"):
        mask = hir.node(m["mask"])
        kind, window, pos = ("bidirectional" if mask.attr("bidirectional") else "causal"), mask.attr("window"), m["pos"]
    else:
        positions = hir.inputs.get(cv.POSITIONS)
        if positions is None:
            return None
        kind, window, pos = "none", 0, positions.id
    bias = [m[b] for b in ("custom_bias", "media_bias") if m.get(b)]
    k, v = hir.node(m["k"]), hir.node(m["v"])
    if k.type != v.type:
        return None
    return hir.add(Op.ATTENTION, [m["q"], m["k"], m["v"], pos, *bias],
                   {"scale": scale, "softcap": softcap, "window": window, "mask": kind},
                   name=m.root + ".fused")


RULES = tuple(Rule(f"attention-{kind}{'-media' if media else ''}", _pattern(kind, media), _fuse)
              for kind in ("causal", "custom") for media in (True, False))


@register
@dataclass(frozen=True)
class FuseAttention(RuleFusion):
    name = "fuse-attention"
    pattern = "attention"
    rules = RULES
    anchor = Op.SOFTMAX
    miss_reason = "softmax outside a recognised attention block"
