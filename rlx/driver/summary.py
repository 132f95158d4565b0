"""The model summary printed by `rlx inspect`: what the HIR holds and what each layer does."""

from __future__ import annotations

from typing import Any

from rlx.frontends.config import GemmaConfig
from rlx.hir.graph import HIR
from rlx.hir.shapes import dim_numel


def summarize(hir: HIR, config: GemmaConfig) -> dict[str, Any]:
    params = hir.params
    numel = {name: dim_numel(n.type.shape) or 0 for name, n in params.items()}
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
