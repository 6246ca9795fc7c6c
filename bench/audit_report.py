"""The per-layer audit figures as a table and a plot: docs/audits.md and docs/audits.svg.

Reads every bench/layer_audit*.json (written by bench/layer_audit.py on this CPU and on an H200)
and, per serving dtype, device pair and model shape, sets the honest distribution of the
statistic that decides each precision against the cheats':

    float32:  the median over positions of e_t (a block's error relative to its own update),
              against the float32 reference (threshold REFERENCE_THRESHOLDS);
    bfloat16: the same median, and, where a same-recipe recompute ran, the fraction of elements
              more than one ulp from round(s) (SAME_RECIPE_THRESHOLDS), for both blocks together
              and, where the run kept them apart, the attention's and the MLP's.

    python bench/audit_report.py            # rewrites docs/audits.md and docs/audits.svg

No plotting library: the plot is a hand-written SVG strip chart on a log axis.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
STATS = {"float32": ("median",), "bfloat16": ("median", "ulp_fraction_same")}
BLOCKS = ("", " attention", " mlp")  # both blocks, then each where the run kept them apart
CHEATS = ("int8", "fp8", "int4", "tamper", "skip-layer", "window", "other-model")


def rows() -> list[dict]:
    """One row per (file, shape, dtype, statistic): honest p99 and max, each cheat's minimum."""
    out = []
    for path in sorted((ROOT / "bench").glob("layer_audit*.json")):
        data = json.loads(path.read_text())
        pair = f"{data.get('device', '?')} → {data.get('reference_device', '?')}"
        for shape, s in data["shapes"].items():
            for (dtype, stats), block in ((d, b) for d in STATS.items() for b in BLOCKS):
                honest = s["honest"].get(f"{dtype} all{block}")
                if not honest:
                    continue
                for stat in stats:
                    if stat not in honest:
                        continue
                    cheats = {c: s["cheats"][f"{dtype} {c}{block}"][stat]["min"] for c in CHEATS
                              if stat in s["cheats"].get(f"{dtype} {c}{block}", {})}
                    out.append(dict(file=path.name, pair=pair, shape=shape, layers=s["layers"], dtype=dtype,
                                    stat=stat + block.replace(" ", ", "),
                                    audits=honest["layer_audits"], failed=honest["failed_ref"] + honest.get("failed_same", 0),
                                    honest_p99=honest[stat]["p99"], honest_max=honest[stat]["max"], cheats=cheats))
    return out


def fmt(x: float) -> str:
    return "—" if x is None or x != x else f"{x:.3g}"


def table(items: list[dict]) -> str:
    lines = ["| file | serve → verify | shape (layers) | dtype | statistic | honest audits (failed) | honest p99 / max | "
             + " | ".join(f"{c} min" for c in CHEATS) + " |",
             "| " + " | ".join(["---"] * (7 + len(CHEATS))) + " |"]
    for r in items:
        lines.append(f"| {r['file']} | {r['pair']} | {r['shape']} ({r['layers']}) | {r['dtype']} | {r['stat']} | "
                     f"{r['audits']} ({r['failed']}) | {fmt(r['honest_p99'])} / {fmt(r['honest_max'])} | "
                     + " | ".join(fmt(r["cheats"].get(c)) for c in CHEATS) + " |")
    return "\n".join(lines)


def svg(items: list[dict]) -> str:
    """A strip per row: the honest maximum (black bar) and each cheat's minimum (coloured dot), log x."""
    colours = dict(zip(CHEATS, ("#d62728", "#ff7f0e", "#9467bd", "#2ca02c", "#8c564b", "#1f77b4", "#7f7f7f")))
    lo, hi = 1e-7, 10.0
    left, width, row_h, top = 470, 560, 18, 40

    def x(v: float) -> float:
        v = min(max(v, lo), hi)
        return left + width * (math.log10(v) - math.log10(lo)) / (math.log10(hi) - math.log10(lo))

    height = top + row_h * len(items) + 40
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{left + width + 20}" height="{height}" '
           'font-family="sans-serif" font-size="11">',
           '<text x="10" y="16" font-size="13">Per-layer audit statistics: honest maximum (bar) against each '
           'cheat\'s minimum (dots), log scale</text>']
    for decade in range(-7, 2):
        px = x(10.0 ** decade)
        out.append(f'<line x1="{px:.1f}" y1="{top - 8}" x2="{px:.1f}" y2="{height - 30}" stroke="#ddd"/>')
        out.append(f'<text x="{px:.1f}" y="{height - 22}" text-anchor="middle">1e{decade}</text>')
    for i, r in enumerate(items):
        y = top + i * row_h
        run = r["file"].removeprefix("layer_audit").removesuffix(".json").lstrip("_") or "cpu"
        label = f"[{run}] {r['pair']} {r['shape']} {r['dtype']} {r['stat']}"
        out.append(f'<text x="10" y="{y + 4}">{label}</text>')
        if r["honest_max"] == r["honest_max"]:
            out.append(f'<rect x="{left}" y="{y - 3}" width="{max(1.0, x(r["honest_max"]) - left):.1f}" height="6" '
                       'fill="#333"/>')
        for c, v in r["cheats"].items():
            if v == v:
                out.append(f'<circle cx="{x(v):.1f}" cy="{y}" r="3.5" fill="{colours[c]}"><title>{c} {v:.3g}</title>'
                           '</circle>')
    legend_x = 10
    for c, colour in colours.items():
        out.append(f'<circle cx="{legend_x + 4}" cy="{height - 5}" r="4" fill="{colour}"/>'
                   f'<text x="{legend_x + 12}" y="{height - 1}">{c}</text>')
        legend_x += 70
    out.append("</svg>")
    return "\n".join(out)


def main() -> None:
    items = rows()
    docs = ROOT / "docs"
    docs.mkdir(exist_ok=True)
    (docs / "audits.svg").write_text(svg(items) + "\n")
    (docs / "audits.md").write_text(
        "# Per-layer audits: honest against cheating, per dtype, device pair, shape\n\n"
        "Generated by `python bench/audit_report.py` from `bench/layer_audit*.json` (`bench/layer_audit.py`).\n"
        "Statistics per block check (a layer's attention or MLP update; verification/layer_compare.py):\n"
        "`median` of e_t against the float32 reference; `ulp_fraction_same`, the elements more than one ulp\n"
        "from a same-recipe recompute (bfloat16, verifier of the stage's hardware class; on CUDA it judges\n"
        "the MLP only). Honest: p99 and max over every honest check; cheats: the minimum over the checks\n"
        "they touch. A cheat is caught where its minimum is over the threshold and the honest maximum at\n"
        "most half of it.\n\n![strip chart](audits.svg)\n\n" + table(items) + "\n")
    print(f"{len(items)} rows: wrote docs/audits.md and docs/audits.svg")


if __name__ == "__main__":
    main()
