"""The compare report as Markdown and as one self-contained HTML page (inline CSS, inline SVG).

Both are rendered from one list of sections (paragraphs, tables, charts) built from the report
data, so they always say the same thing; charts appear in the HTML only.
"""

from __future__ import annotations

import html
import json
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

Target = dict[str, Any]


@dataclass
class Table:
    header: list[str]
    rows: list[list[str]]


@dataclass
class Chart:
    """Grouped horizontal bars: per group label, a value per series (a series = one colour)."""

    title: str
    groups: list[tuple[str, dict[str, float]]]
    unit: str


@dataclass
class Section:
    title: str
    blocks: list[str | Table | Chart] = field(default_factory=list)


def _bytes(n: int) -> str:
    return f"{n:,} B"


def _col(t: Target, fn: Callable[[Target], Any]) -> str:
    """A target's cell: a failed compile says so instead of a number."""
    return "compile failed" if t["status"] == "failed" else str(fn(t))


def _keyed_col(path: tuple[str, str], key: str, default: Any) -> Callable[[Target], str]:
    """The column of one key of a per-target table (`t[path[0]][path[1]][key]`), e.g. one phase."""
    return lambda t: _col(t, lambda t: t[path[0]][path[1]].get(key, default))


def _run_cell(t: Target, fn: Callable[[Target], Any]) -> str:
    """A measured cell: only executed targets have numbers; the others say why not."""
    if t["status"] == "failed":
        return "compile failed"
    return str(fn(t)) if t["status"] == "executed" else t["status"]


def _status(t: Target) -> str:
    return f"compile failed: {t['error']}" if t["status"] == "failed" else t["status"]


def _rows(targets: dict[str, Target], spec: list[tuple[str, Callable[[Target], str]]]) -> list[list[str]]:
    return [[label, *(cell(t) for t in targets.values())] for label, cell in spec]


def _compiled(targets: dict[str, Target]) -> dict[str, Target]:
    return {n: t for n, t in targets.items() if t["status"] != "failed"}


def summary(data: dict[str, Any]) -> Section:
    targets = data["targets"]
    spec: list[tuple[str, Callable[[Target], str]]] = [
        ("status", _status),
        ("compile time (s)", lambda t: _col(t, lambda t: t["compile"]["total_s"])),
        ("kernels", lambda t: _col(t, lambda t: t["kernels"]["count"])),
        ("generated code", lambda t: _col(t, lambda t: f"{_bytes(t['code']['bytes'])} ({t['code']['kind']})")),
        ("library", lambda t: _col(t, lambda t: _bytes(t["library_bytes"]))),
        ("weights read per decode token", lambda t: _col(t, lambda t: _bytes(t["weights"]["bytes_per_token"]))),
        ("max abs logit diff", lambda t: _run_cell(t, lambda t: f"{t['numerics']['max_abs_diff']:.3g}")),
        ("top-1 agreement", lambda t: _run_cell(t, lambda t: f"{t['numerics']['top1_agreement']:.3f}")),
        ("vs unquantized: diff / max logit", lambda t: _run_cell(
            t, lambda t: f"{t['numerics']['vs_unquantized']['rel_diff']:.3g}")),
        ("vs unquantized: top-1 agreement", lambda t: _run_cell(
            t, lambda t: f"{t['numerics']['vs_unquantized']['top1_agreement']:.3f}")),
        ("prefill tok/s", lambda t: _run_cell(t, lambda t: t["speed"]["prefill_tok_s"])),
        ("decode tok/s", lambda t: _run_cell(t, lambda t: t["speed"]["decode_tok_s"])),
    ]
    intro = (f"Checkpoint `{data['checkpoint']}` (model hash `{data['model_hash'][:16]}`), profile "
             f"{data['profile']}, passes {data['passes'] if data['passes'] is not None else '(profile)'}, "
             f"quantize {_scheme(data['quantize']['profile'])}; prompt ids {','.join(map(str, data['prompt_ids']))}.")
    return Section("Summary", [intro, Table(["", *targets], _rows(targets, spec))])


def _scheme(q: dict[str, Any]) -> str:
    """[quantize] in words: `q8 (group 32)`, `q4 (group 32), embed q8, keep layers.*.x.weight`, `none`."""
    extra = "".join(f", {k} {q[k]}" for k in ("embed", "head") if q.get(k))
    extra += "".join(f", {g} {s}" for g, s in q.get("tensors") or ())
    extra += "".join(f", keep {g}" for g in q.get("keep") or ())
    if q["scheme"] in ("none", "gguf") and not extra:
        return q["scheme"]
    return f"{q['scheme']} (group {q['group']}){extra}"


def _rel(n: dict[str, Any]) -> str:
    return f"{n['max_abs_diff']:.3g} / {n['max_abs_logit']:.3g} = {n['rel_diff']:.3g}"


def _tensor_group(key: str) -> str:
    """A weight key with its layer number(s) as `*`: one row per kind of tensor, not per layer."""
    return re.sub(r"layers\.\d+\.", "layers.*.", key)


def weights(data: dict[str, Any]) -> Section:
    targets = data["targets"]
    compiled = _compiled(targets)
    formats = sorted({f for t in compiled.values() for f in t["weights"]["by_format"]})

    def fmt_cell(f: str) -> Callable[[Target], str]:
        def cell(t: Target) -> str:
            b = t["weights"]["by_format"].get(f)
            return "-" if b is None else f"{b['tensors']} tensors, {_bytes(b['bytes'])}"
        return lambda t: _col(t, cell)

    spec: list[tuple[str, Callable[[Target], str]]] = [
        *((f, fmt_cell(f)) for f in formats),
        ("all weights", lambda t: _col(t, lambda t: _bytes(t["weights"]["total_bytes"]))),
        ("read per decode token", lambda t: _col(t, lambda t: _bytes(t["weights"]["bytes_per_token"]))),
    ]
    blocks: list[str | Table | Chart] = [
        f"Quantize: {_scheme(data['quantize']['profile'])}. Each weight's format and bytes, and the bytes "
        "one decode step reads, as the Methods section (weights, bytes_per_token) says.",
        Table(["format", *targets], _rows(targets, spec))]
    shown: list[dict[str, Any]] = []
    for name, t in compiled.items():
        tensors = t["weights"]["tensors"]
        if tensors in shown:
            blocks.append(f"**{name}**: the same tensors as above.")
            continue
        shown.append(tensors)
        rows: dict[tuple[str, str], list[int]] = {}
        for key, w in tensors.items():
            fmt = w["format"] + (f" ({w['reason']})" if w.get("reason") else "")  # f32 (kept): a keep glob's
            row = rows.setdefault((_tensor_group(key), fmt), [0, 0, 0])
            row[0] += 1
            row[1] += w["bytes"]
            row[2] += w["per_token_bytes"]
        blocks += [f"**{name}**: every weight by kind (`layers.*` is each layer's; full list in report.json)",
                   Table(["tensor", "format", "count", "bytes", "read per token"],
                         [[k, f, str(n), _bytes(b), _bytes(r)] for (k, f), (n, b, r) in rows.items()])]
    return Section("Weights and quantization", blocks)


def compile_times(data: dict[str, Any]) -> Section:
    targets = data["targets"]
    compiled = _compiled(targets)
    phases = list(dict.fromkeys(p for t in compiled.values() for p in t["compile"]["phases"]))
    spec = [(p, _keyed_col(("compile", "phases"), p, "-")) for p in phases]
    chart = Chart("Compile time per phase", [(p, {n: t["compile"]["phases"].get(p, 0.0)
                                                  for n, t in compiled.items()}) for p in phases], "s")
    return Section("Compile time per phase (s)", [Table(["phase", *targets], _rows(targets, spec)), chart])


def _mode_spec(mode: str, patterns: list[str]) -> list[tuple[str, Callable[[Target], str]]]:
    """Rows of one mode's pass table: the pipeline, then hits / misses per fusion pattern."""
    def fusion(p: str) -> Callable[[Target], str]:
        return lambda t: _col(t, lambda t: "{} / {}".format(
            t["passes"][mode]["hits"].get(p, 0), t["passes"][mode]["misses"].get(p, 0)))

    pipeline = ("pipeline", lambda t: _col(t, lambda t: ", ".join(t["passes"][mode]["pipeline"]) or "(none)"))
    return [pipeline, *((f"{p} hits / misses", fusion(p)) for p in patterns)]


def _difference(mode: str, diff: dict[str, Any]) -> str:
    if diff["same"]:
        return f"**{mode}**: every target ran the same pipeline."
    only = "; ".join(f"{n}: {', '.join(s)}" for n, s in diff["only_some"].items())
    return f"**{mode}**: pipelines differ; " + (f"passes not run by every target: {only}." if only
                                                else "same passes in another order.")


def passes(data: dict[str, Any]) -> Section:
    targets = data["targets"]
    compiled = _compiled(targets)
    blocks: list[str | Table | Chart] = []
    for mode, diff in data["pipeline_differences"].items():
        patterns = sorted({p for t in compiled.values() for k in ("hits", "misses") for p in t["passes"][mode][k]})
        blocks += [_difference(mode, diff), Table(["", *targets], _rows(targets, _mode_spec(mode, patterns)))]
    return Section("Passes and fusion", blocks)


def memory(data: dict[str, Any]) -> Section:
    targets = data["targets"]
    act = "activation"
    spec: list[tuple[str, Callable[[Target], str]]] = [
        ("max seq", lambda t: _col(t, lambda t: t["max_seq"])),
        ("weights", lambda t: _col(t, lambda t: _bytes(t["memory"]["weight_bytes"]))),
        ("KV cache at max seq", lambda t: _col(t, lambda t: _bytes(t["memory"]["kv_cache_bytes"]))),
        ("largest activation at max seq", lambda t: _col(t, lambda t: _bytes(t["memory"][act]["bytes"]))),
        ("  that node", lambda t: _col(t, lambda t: "{} ({}) {}".format(
            t["memory"][act].get("node"), t["memory"][act].get("op"), t["memory"][act].get("shape")))),
    ]
    methods = data["methods"]
    return Section("Memory plan", [Table(["", *targets], _rows(targets, spec)),
                                   f"KV cache: {methods['kv_cache_bytes']}.",
                                   f"Activations: {methods['activation_bytes']}."])


def kernels(data: dict[str, Any]) -> Section:
    targets = data["targets"]
    compiled = _compiled(targets)
    ops = sorted({op for t in compiled.values() for op in t["kernels"]["by_op"]})
    spec = [(op, _keyed_col(("kernels", "by_op"), op, 0)) for op in ops]
    blocks: list[str | Table | Chart] = [
        f"Op mix: {data['methods']['op_mix']}. A kernel counts once for each op kind it contains.",
        Table(["op kind", *targets], _rows(targets, spec)),
        Chart("Kernels by op kind", [(op, {n: t["kernels"]["by_op"].get(op, 0) for n, t in compiled.items()})
                                     for op in ops], "kernels"),
    ]
    for name, t in compiled.items():
        blocks += [f"**{name}** ({t['kernels']['count']} kernels)",
                   Table(["kernel", "schedule", "op mix"],
                         [[k["name"], k["schedule"], ", ".join(k["ops"])] for k in t["kernels"]["list"]])]
    return Section("Kernels", blocks)


def numerics(data: dict[str, Any]) -> Section:
    targets = data["targets"]
    spec: list[tuple[str, Callable[[Target], str]]] = [
        ("vs reference: max abs diff / max logit", lambda t: _run_cell(t, lambda t: _rel(t["numerics"]))),
        ("vs reference: top-1 agreement", lambda t: _run_cell(
            t, lambda t: f"{t['numerics']['top1_agreement']:.3f}")),
        ("vs unquantized: max abs diff / max logit", lambda t: _run_cell(
            t, lambda t: _rel(t["numerics"]["vs_unquantized"]))),
        ("vs unquantized: top-1 agreement", lambda t: _run_cell(
            t, lambda t: f"{t['numerics']['vs_unquantized']['top1_agreement']:.3f}")),
        ("logit rows compared", lambda t: _run_cell(t, lambda t: t["numerics"]["rows"])),
        ("prefill tok/s", lambda t: _run_cell(t, lambda t: t["speed"]["prefill_tok_s"])),
        ("decode tok/s", lambda t: _run_cell(t, lambda t: t["speed"]["decode_tok_s"])),
    ]
    ref = data["reference"]
    blocks: list[str | Table | Chart] = [
        f"Numerics: {data['methods']['numerics']}. The reference quantizes as the targets do "
        f"({_scheme(data['quantize']['profile'])}). Vs unquantized: {data['methods']['vs_unquantized']}.",
        f"Speed: {data['methods']['speed']}.",
        Table(["", *targets], _rows(targets, spec))]
    if ref is not None:
        blocks.append(f"Reference interpreter on the same walk: prefill {ref['speed']['prefill_tok_s']} tok/s, "
                      f"decode {ref['speed']['decode_tok_s']} tok/s; greedy tokens "
                      f"{','.join(map(str, ref['tokens']))}; vs unquantized (the quantization error alone): "
                      f"max abs diff / max logit {_rel(ref['vs_unquantized'])}, top-1 agreement "
                      f"{ref['vs_unquantized']['top1_agreement']:.3f}.")
    else:
        blocks.append("No target executed here, so nothing was compared with the reference.")
    return Section("Numerics and speed", blocks)


def bench(data: dict[str, Any]) -> Section | None:
    b = data["bench"]
    if b is None:
        return None
    cpu = data["targets"].get("cpu", {})
    ours = ({"name": "rlx cpu (this report)", **cpu["speed"]} if cpu.get("status") == "executed" else None)
    blocks: list[str | Table | Chart] = [f"From `{b['file']}`."]
    if b["note"]:
        blocks.append(f"Note: {b['note']}.")
    if b["engines"]:
        engines = b["engines"] + ([ours] if ours else [])
        blocks.append(Table(["engine", "prefill tok/s", "decode tok/s"],
                            [[e["name"], str(e.get("prefill_tok_s", "-")), str(e.get("decode_tok_s", "-"))]
                             for e in engines]))
        blocks.append(Chart("CPU speed vs peers", [(k.replace("_tok_s", " tok/s"), {
            e["name"]: e[k] for e in engines if k in e}) for k in ("prefill_tok_s", "decode_tok_s")], "tok/s"))
    if b["found"]:
        blocks.append(Table(["key", "value"], [[f["key"], str(f["value"])] for f in b["found"]]))
        blocks.append(Chart("tok/s numbers in the bench file",
                            [(f["key"], {"value": f["value"]}) for f in b["found"]], "tok/s"))
    if ours is None:
        blocks.append("The cpu target did not execute in this report, so it has no row here.")
    return Section("CPU speed vs peers", blocks)


def methods(data: dict[str, Any]) -> Section:
    return Section("Methods", [Table(["quantity", "how"], [[k, v] for k, v in data["methods"].items()])])


SECTIONS: tuple[Callable[[dict[str, Any]], Section | None], ...] = (
    summary, weights, compile_times, passes, memory, kernels, numerics, bench, methods)


def sections(data: dict[str, Any]) -> list[Section]:
    return [s for build in SECTIONS if (s := build(data)) is not None]


# --- Markdown ---------------------------------------------------------------------------------------

def _md_cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _md_block(block: str | Table | Chart) -> str:
    if isinstance(block, str):
        return block
    if isinstance(block, Chart):
        return f"*(chart in report.html: {block.title})*"
    lines = ["| " + " | ".join(map(_md_cell, block.header)) + " |", "|" + "---|" * len(block.header)]
    return "\n".join(lines + ["| " + " | ".join(map(_md_cell, r)) + " |" for r in block.rows])


def render_md(data: dict[str, Any]) -> str:
    out = [f"# rlx compare: {data['model']}"]
    for s in sections(data):
        out += [f"## {s.title}", *(_md_block(b) for b in s.blocks)]
    return "\n\n".join(out) + "\n"


# --- HTML + SVG -------------------------------------------------------------------------------------

PALETTE = ("#4e79a7", "#f28e2b", "#59a14f", "#e15759", "#76b7b2", "#edc948", "#b07aa1", "#9c755f")
_CSS = ("body{font-family:system-ui,sans-serif;margin:2em;max-width:70em}"
        "table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:2px 8px;"
        "text-align:left;vertical-align:top}th{background:#f0f0f0}code{background:#f6f6f6}"
        "svg{display:block;margin:1em 0}")


def svg_bars(chart: Chart, *, bar: int = 12, label_w: int = 200, plot_w: int = 420) -> str:
    """A grouped horizontal bar chart as inline SVG (no xmlns: HTML5 inline SVG needs none)."""
    series = list(dict.fromkeys(s for _, vals in chart.groups for s in vals))
    colour = {s: PALETTE[i % len(PALETTE)] for i, s in enumerate(series)}
    vmax = max((v for _, vals in chart.groups for v in vals.values()), default=0.0) or 1.0
    esc = html.escape
    parts = [f'<text x="0" y="14" font-weight="bold">{esc(chart.title)} ({esc(chart.unit)})</text>']
    for i, s in enumerate(series):  # legend
        x = i * 140
        parts.append(f'<rect x="{x}" y="24" width="10" height="10" fill="{colour[s]}"/>'
                     f'<text x="{x + 14}" y="33" font-size="11">{esc(s)}</text>')
    y = 48
    for label, vals in chart.groups:
        parts.append(f'<text x="0" y="{y + bar - 2}" font-size="11">{esc(label)}</text>')
        for s, v in vals.items():
            w = max(plot_w * v / vmax, 0.5)
            parts.append(f'<rect x="{label_w}" y="{y}" width="{w:.1f}" height="{bar - 2}" fill="{colour[s]}">'
                         f'<title>{esc(s)}: {v:g}</title></rect>'
                         f'<text x="{label_w + w + 4:.1f}" y="{y + bar - 3}" font-size="10">{v:g}</text>')
            y += bar
        y += 6
    width = max(label_w + plot_w + 80, 140 * len(series))
    return (f'<svg width="{width}" height="{y + 4}" viewBox="0 0 {width} {y + 4}" role="img">'
            + "".join(parts) + "</svg>")


def _inline(text: str) -> str:
    """Escape, then turn the Markdown bits our blocks use (`code`, **bold**) into HTML."""
    out = html.escape(text)
    out = re.sub(r"`([^`]*)`", r"<code>\1</code>", out)
    return re.sub(r"\*\*([^*]*)\*\*", r"<b>\1</b>", out)


def _html_block(block: str | Table | Chart) -> str:
    if isinstance(block, str):
        return f"<p>{_inline(block)}</p>"
    if isinstance(block, Chart):
        return svg_bars(block)
    head = "".join(f"<th>{html.escape(h)}</th>" for h in block.header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in r) + "</tr>" for r in block.rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def render_html(data: dict[str, Any]) -> str:
    title = f"rlx compare: {data['model']}"
    body = "".join(f"<h2>{html.escape(s.title)}</h2>" + "".join(map(_html_block, s.blocks))
                   for s in sections(data))
    return (f'<!doctype html><html><head><meta charset="utf-8"><title>{html.escape(title)}</title>'
            f"<style>{_CSS}</style></head><body><h1>{html.escape(title)}</h1>{body}</body></html>\n")


def write_reports(out: Path, data: dict[str, Any]) -> None:
    """report.json, report.md and report.html into `out` (a temp dir the caller renames)."""
    (out / "report.json").write_text(json.dumps(data, indent=1) + "\n")
    (out / "report.md").write_text(render_md(data))
    (out / "report.html").write_text(render_html(data))
