"""The model summary printed by `rlx inspect`: what the HIR holds and what each layer does; and
the weights summary `rlx compile` writes into an artifact's report.json (`weight_report`)."""

from __future__ import annotations

import re
from typing import Any

from rlx.frontends.config import GemmaConfig
from rlx.hir.graph import HIR
from rlx.hir.shapes import dim_numel, eval_dim


def summarize(hir: HIR, config: GemmaConfig) -> dict[str, Any]:
    params = hir.params
    numel = {name: eval_dim(dim_numel(n.type.shape) or 0, {}) for name, n in params.items()}  # params are static
    layers = []
    for i in range(config.num_layers):
        rope = config.layer_rope(i)
        layers.append({
            "layer": i,
            "attention": config.layer_type(i),
            "window": config.window(i),
            "head_dim": config.layer_head_dim(i),
            "kv_heads": config.layer_kv_heads(i),
            "kv_source": config.kv_source_layer(i),  # != layer: Gemma 4 KV sharing
            "rope": {"theta": rope.theta, "kind": rope.kind, "factor": rope.factor},
        })
    return {
        "graph": hir.name,
        "nodes": len(hir),
        "nodes_per_op": hir.op_counts(),
        "inputs": {name: str(n.type) for name, n in hir.inputs.items()},
        "outputs": {name: str(hir.node(nid).type) for name, nid in hir.outputs.items()},
        "params": len(params),
        "param_elements": sum(numel.values()),
        "param_bytes_f32": 4 * sum(numel.values()),
        "layers": layers,
    }


def summary_lines(s: dict[str, Any]) -> list[str]:
    lines = [f"graph {s['graph']}: {s['nodes']} nodes, {s['params']} params, "
             f"{s['param_elements']:,} weights ({s['param_bytes_f32'] / 2**20:.1f} MiB as f32)"]
    lines.append("nodes per op: " + ", ".join(f"{op}={n}" for op, n in s["nodes_per_op"].items()))
    lines.append("inputs: " + ", ".join(f"{k}: {v}" for k, v in s["inputs"].items()))
    lines.append("outputs: " + ", ".join(f"{k}: {v}" for k, v in list(s["outputs"].items())[:4])
                 + (" ..." if len(s["outputs"]) > 4 else ""))
    for layer in s["layers"]:
        rope = layer["rope"]
        window = f"window {layer['window']}" if layer["window"] else "no window"
        lines.append(f"layer {layer['layer']:>2}: {layer['attention']:<17} {window:<12} head_dim {layer['head_dim']} "
                     f"kv_heads {layer['kv_heads']} rope {rope['kind']} theta {rope['theta']:g}"
                     + (f" x{rope['factor']:g}" if rope["factor"] != 1 else "")
                     + (f" kv of layer {layer['kv_source']}" if layer["kv_source"] != layer["layer"] else ""))
    return lines


# --- the weights an artifact stores: format per tensor, and what one decode step reads -------------

WEIGHT_METHODS = {
    "format": "each weight param of the compiled functions (a stored tensor, or a weight-only value "
              "such as a fused q|k|v concat) with its HIR type's quantized format (rlx.hir.quant), "
              "or its float dtype when it is not quantized; `reason` \"kept\" marks a float weight that "
              "a linear or an embedding reads (one quantize would store in blocks) and a [quantize] "
              "keep glob matches",
    "bytes": "the tensor's bytes in weights.safetensors (its physical layout: packed blocks for a "
             "quantized weight)",
    "bytes_per_token": "sum over the decode entry's weight params of the bytes one decode step "
                       "reads: the whole tensor, except a table read only by `embed` (a lookup), of "
                       "which one row; a tied embedding / LM head is one param, counted once, whole",
}


def weight_report(specs: dict[str, Any], decode_keys: set[str], decode_readers: dict[str, set[Any]],
                  quantize: dict[str, Any]) -> dict[str, Any]:
    """The artifact report's `weights`: see WEIGHT_METHODS. `specs` are the lowered functions'
    ParamSpecs by key, `decode_readers` the (op, position) pairs reading each key in the decode
    graph (`rlx.targets.lower.weight_readers`)."""
    from rlx.hir.ops import OPS, Op
    from rlx.passes.quantize import KEPT, matches

    keep = tuple(quantize.get("keep") or ())

    def kept(key: str) -> bool:  # a key names its stored tensors: `name`, `name*s+b`, `op{..}(name,name)`
        block_read = any(pos in OPS[op].quantized_inputs for op, pos in decode_readers.get(key, ()))
        return block_read and any(matches(n, keep) for n in re.findall(r"[^(),*+]+", key))

    tensors: dict[str, dict[str, Any]] = {}
    for key, spec in sorted(specs.items()):
        physical = spec.physical
        nbytes = eval_dim(dim_numel(physical.shape) or 0, {}) * physical.dtype.itemsize
        rows = spec.type.shape[0] if spec.type.shape else 1
        lookup = bool(decode_readers.get(key)) and all(op is Op.EMBED for op, _ in decode_readers[key])
        per_token = 0 if key not in decode_keys else (nbytes // int(rows) if lookup else nbytes)
        tensors[key] = {"format": spec.type.quant or spec.type.dtype.value,
                        "shape": [int(d) for d in spec.type.shape], "bytes": nbytes,
                        "per_token_bytes": per_token}
        if keep and not spec.type.is_quantized and kept(key):
            tensors[key]["reason"] = KEPT
    by_format: dict[str, dict[str, int]] = {}
    for t in tensors.values():
        entry = by_format.setdefault(t["format"], {"tensors": 0, "bytes": 0, "per_token_bytes": 0})
        entry["tensors"] += 1
        entry["bytes"] += t["bytes"]
        entry["per_token_bytes"] += t["per_token_bytes"]
    return {"quantize": quantize, "tensors": tensors, "by_format": dict(sorted(by_format.items())),
            "total_bytes": sum(t["bytes"] for t in tensors.values()),
            "bytes_per_token": sum(t["per_token_bytes"] for t in tensors.values()),
            "methods": WEIGHT_METHODS}
