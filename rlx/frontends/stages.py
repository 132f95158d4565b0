"""Stages as values: the crate's `FlowStage`, for `GemmaFlow.before_layers` / `after_layers` /
`layer(fn)`.

A stage is any `fn(ctx, h) -> h'` (`flow.Stage`): it emits nodes on the residual stream through
`ctx.builder` and returns the new hidden value's id. `FlowStage` gives one a name (shown in
`repr`, and what `stock(name)` finds) without changing how it is called, so a list may mix stock
stages, `FlowStage.custom(fn)` and bare functions. The stock stages are the small pieces a user
puts around the layer stack; each decoder layer's own stage stays `ctx.default_stage()`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace

from rlx.errors import FlowError
from rlx.frontends.flow import LayerContext, Stage, identity_stage
from rlx.hir.ops import Op


@dataclass(frozen=True)
class FlowStage:
    """A named stage; called like the function it wraps."""

    name: str
    fn: Stage

    def __call__(self, ctx: LayerContext, h: str) -> str:
        return self.fn(ctx, h)

    @classmethod
    def custom(cls, fn: Stage, name: str | None = None) -> FlowStage:
        """A user's stage (the crate's `FlowStage::Custom`), named after the function by default."""
        return cls(name or str(getattr(fn, "__name__", "custom")), fn)

    def named(self, name: str) -> FlowStage:
        """The same stage under another name (the crate's `FlowStage::Named`)."""
        return replace(self, name=name)


IDENTITY = FlowStage("identity", identity_stage)


def scale(value: float) -> FlowStage:
    """Multiply the hidden state by a constant."""
    return FlowStage(f"scale({value})", lambda ctx, h: ctx.builder.op(Op.SCALE, h, name="stage.scale",
                                                                        value=float(value)))


def rms_norm(weight: str | None = None) -> FlowStage:
    """The model's RMSNorm (its eps and weight offset) over the hidden size; `weight` names a
    checkpoint tensor [hidden] to scale by (e.g. "norm.weight"), None for a plain normalisation."""
    return FlowStage(f"rms_norm({weight or ''})", lambda ctx, h: ctx.builder.norm(
        h, weight, ctx.config.hidden_size, "stage.rms_norm"))


def softcap(cap: float) -> FlowStage:
    """`cap * tanh(h / cap)`, as the model's logit softcaps."""
    if cap <= 0:
        raise FlowError(f"softcap({cap}): the cap must be > 0", hint="use a positive cap, e.g. softcap(30.0)")
    return FlowStage(f"softcap({cap})", lambda ctx, h: ctx.builder.op(Op.SOFTCAP, h, name="stage.softcap",
                                                                        cap=float(cap)))


STOCK: dict[str, Callable[..., FlowStage]] = {
    "identity": lambda: IDENTITY,
    "scale": scale,
    "rms_norm": rms_norm,
    "softcap": softcap,
}
"""The stock stages by name; `stock(name, *args)` makes one."""


def stock(name: str, *args: object, **kwargs: object) -> FlowStage:
    """A stock stage by name: `stock("scale", 2.0)`, `stock("rms_norm", "norm.weight")`."""
    if name not in STOCK:
        raise FlowError(f"no stock stage named {name!r}", hint=f"stock stages: {', '.join(STOCK)}")
    return STOCK[name](*args, **kwargs)


__all__ = ["IDENTITY", "STOCK", "FlowStage", "rms_norm", "scale", "softcap", "stock"]
