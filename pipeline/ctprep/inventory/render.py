"""Presentation of an inventory report: the plain-text table, the PNG, and writing both files."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

INVENTORY_JSON = "inventory.json"
INVENTORY_PNG = "inventory.png"


# --------------------------------------------------------------------- text table
def _fmt_counts(d: dict[str, int], limit: int = 8) -> str:
    if not d:
        return "-"
    items = list(d.items())
    text = ", ".join(f"{k} {v}" for k, v in items[:limit])
    return text + (f", ... ({len(items) - limit} more)" if len(items) > limit else "")


def _fmt_quant(q: dict[str, float], unit: str = "") -> str:
    if not q:
        return "-"
    return f"min {q['min']:.4g}  p5 {q['p5']:.4g}  median {q['median']:.4g}  p95 {q['p95']:.4g}  max {q['max']:.4g}{unit}"


def _fmt_hist(h: dict[str, list], bins: int = 6) -> str:
    """A coarse text histogram: the stored bins merged into at most ``bins`` groups."""
    edges, counts = h.get("edges") or [], h.get("counts") or []
    if not counts:
        return ""
    per = -(-len(counts) // bins)
    parts = []
    for i in range(0, len(counts), per):
        n = sum(counts[i:i + per])
        if n:
            parts.append(f"{edges[i]:.4g}-{edges[min(i + per, len(counts))]:.4g}: {n}")
    return " | ".join(parts)


class _Table:
    def __init__(self) -> None:
        self.lines: list[str] = []

    def head(self, text: str) -> None:
        self.lines.append(text)

    def row(self, label: str, value: Any, indent: int = 2) -> None:
        self.lines.append(f"{' ' * indent}{label:<28} {value}")

    def text(self, s: str, indent: int = 4) -> None:
        if s:
            self.lines.append(" " * indent + s)

    def cont(self, s: str) -> None:
        """A continuation line under the value column of the row above."""
        self.text(s, indent=31)


def _render_problems(t: _Table, title: str, items: list[dict[str, str]], limit: int) -> None:
    if not items:
        return
    t.row(title, len(items))
    for it in items[:limit]:
        t.text(f"{it.get('file') or it.get('case')}: {it['reason']}")
    if len(items) > limit:
        t.text(f"... {len(items) - limit} more in inventory.json")


def _render_quarantine(t: _Table, q: dict[str, Any]) -> None:
    t.row("quarantined at scan", q["total"] or "none")
    for kind, n in q["by_kind"].items():
        ex = q["examples"][kind][0]
        t.text(f"{kind:<20} {n:>6}   e.g. {ex['case']}: {ex['reason']}")


def _render_ctrate(t: _Table, e: dict[str, Any], limit: int) -> None:
    c = e["ctrate"]
    lay = c["layout"]
    t.row("image folders", " " * 6 + "kind      volumes" + ("   (derived from the scan)" if lay.get("derived") else ""))
    for f in lay.get("image_folders", []):
        t.text(f"{f['folder']:<32} {f['kind']:<9} {f['volumes']:>7}")
    trees = lay.get("mask_trees", [])
    t.row("mask trees", " " * 8 + "files    anatomy" if trees else "none")
    for m in trees:
        t.text(f"{m['name']:<32} {m['masks']:>9}    {'yes' if m.get('anatomy') else '-'}")
    if lay.get("tables"):
        t.row("side tables", " " * 25 + "kind         rows")
        for tb in lay["tables"]:
            t.text(f"{tb['file']:<52} {tb['kind']:<9} {tb['rows']:>7}")
    t.row("cases", f"{e['scanned']} found, {e['cases']} kept, {e['quarantined_at_scan']} quarantined at scan")
    anatomy = lay.get("anatomy_tree")
    t.row("kept cases with / without", "")
    for key, label in (("mask", f"mask ({anatomy or 'anatomy tree'})"), ("report", "report row"),
                       ("metadata", "metadata row"), ("labels", "labels row"), ("cot", "CoT record")):
        cov = c["coverage"][key]
        note = ""
        if key == "mask" and cov["without"] and c.get("missing_mask_policy") == "quarantine":
            note = "   (build-shards quarantines these: ctrate.missing_mask is quarantine)"
        t.text(f"{label:<32} {cov['with']:>9} / {cov['without']}{note}")
    d = c["duplicates"]
    dup = f"{d['cases']} cases"
    if d["cases"]:
        dup += f"; rule: {_fmt_counts(d['by_rule'])}; chosen: {_fmt_counts(d['chosen_kind'])}"
    t.row("duplicates (>1 copy)", dup)
    for ex in d["examples"][:limit]:
        t.text(f"{ex['case']}: took {ex['chosen']} ({ex['rule']}) over {', '.join(map(str, ex['others']))}")
    _render_quarantine(t, c["quarantine"])
    v = c["volumes"]
    t.row("headers read", f"{v['read']}: {_fmt_counts(v['header_style'])}, unreadable {len(v['unreadable'])}")
    by_kind = c["style_by_folder_kind"]
    t.row("header style by folder kind", "; ".join(f"{k}: {_fmt_counts(s)}" for k, s in by_kind.items()) or "-")
    t.row("spacing from", _fmt_counts(v["spacing_from"]))
    _render_problems(t, "unreadable files", v["unreadable"], limit)
    _render_problems(t, "implausible/missing spacing", v["spacing_problems"], limit)
    _render_problems(t, "mask header problems", v["mask_problems"], limit)
    t.row("z spacing (mm)", _fmt_quant(v["z_spacing_mm"]["quantiles"]))
    t.cont(_fmt_hist(v["z_spacing_mm"]["histogram"]))
    t.row("in-plane spacing (mm)", _fmt_quant(v["inplane_spacing_mm"]["quantiles"])
          + (f"  ({v['anisotropic_inplane']} anisotropic)" if v["anisotropic_inplane"] else ""))
    t.cont(_fmt_hist(v["inplane_spacing_mm"]["histogram"]))
    t.row("slices", _fmt_quant(v["slices"]["quantiles"]))
    t.cont(_fmt_hist(v["slices"]["histogram"]))
    t.row("matrix (rows x cols)", _fmt_counts(v["matrix_yx"]))
    ob = v["oblique_deg"]
    if ob["over_limit"]:
        t.row(f"oblique > {ob['limit']:g} degree", f"{ob['over_limit']} volumes (max {ob['quantiles']['max']:g} deg; "
              "ctrate.max_oblique_deg: build-shards quarantines them)")


def _render_omni(t: _Table, e: dict[str, Any], limit: int) -> None:
    o = e["omniabnorm"]
    if o["batches"]:
        t.row("batches", ", ".join(o["batches"][:limit]) + (" ..." if len(o["batches"]) > limit else ""))
    t.row("cases", f"{e['scanned']} found, {e['cases']} kept, {e['quarantined_at_scan']} quarantined at scan")
    t.row("by plane", _fmt_counts(o["by_plane"]) + (f"   (plane from: {_fmt_counts(o['plane_from'])})"
                                                       if set(o["plane_from"]) - {"?"} else ""))
    t.row("by split", _fmt_counts(o["by_split"]))
    t.row("by JSON file", _fmt_counts(o["by_json"]))
    t.row("normal / abnormal", f"{o['normal']} / {o['abnormal']}")
    t.row("masks per case", ", ".join(f"{k} masks: {v}" for k, v in o["masks_per_case"].items()) or "-")
    t.row("context slices per case", _fmt_quant(o["context_slices"]["quantiles"]))
    t.row("missing context / mask files", " / ".join(
        f"{o['files_missing'].get(k, 0)} files in {o['cases_missing'].get(k, 0)} cases" for k in ("context", "mask")))
    for ex in o["missing_examples"][:limit]:
        t.text(f"{ex['case']}: {_fmt_counts(ex['missing'])}")
    if o["listed_in_several_json"]:
        t.row("in several JSON files", f"{o['listed_in_several_json']} cases (plane file preferred; see the source)")
    t.row("listed files absent", f"{o['absent_files']['cases']} cases; by role: {_fmt_counts(o['absent_files']['by_role'])}")
    for ex in o["absent_files"]["examples"][:limit]:
        t.text(f"{ex['case']}: {', '.join(ex['roles'])}")
    t.row("image size (h x w)", _fmt_counts(o["image_size_hw"]))
    if o["unreadable_images"]:
        t.row("unreadable key slices", f"{len(o['unreadable_images'])}: {', '.join(o['unreadable_images'][:limit])}")
    _render_quarantine(t, o["quarantine"])


def _render_hu(t: _Table, hu: dict[str, Any], limit: int) -> None:
    if not hu or not (hu.get("volumes") or hu.get("failed")):
        return
    p = hu.get("percentiles") or {}
    what = "HU sample" + (" (approx.)" if hu.get("approximate") else "")
    t.row(what, f"{hu['volumes']} volumes, {hu['voxels']} voxels: "
          + ("  ".join(f"{k} {v:g}" for k, v in p.items()) or "-")
          + (f"; {hu['underflow']} below {hu['edges'][0]:g}, {hu['overflow']} above {hu['edges'][1]:g}"
             if hu.get("underflow") or hu.get("overflow") else "")
          + (f"; {hu['nonfinite']} non-finite" if hu.get("nonfinite") else ""))
    for f in hu.get("failed", [])[:limit]:
        t.text(f"not read: {f['case']}: {f['kind']}: {f['reason']}")


def render_table(report: dict[str, Any], limit: int = 5) -> str:
    """The inventory as the plain-text table ``ctprep inventory`` prints."""
    t = _Table()
    for e in report["sources"]:
        t.head(f"== {e['root']} ({e['source']}; config {report['config']})")
        if "ctrate" in e:
            _render_ctrate(t, e, limit)
        elif "omniabnorm" in e:
            _render_omni(t, e, limit)
        else:
            t.row("cases", f"{e['scanned']} found, {e['cases']} kept, {e['quarantined_at_scan']} quarantined at scan")
            t.row("by split", _fmt_counts(e["generic"]["by_split"]))
            _render_quarantine(t, e["generic"]["quarantine"])
        _render_hu(t, e.get("hu", {}), limit)
        t.head("")
    return "\n".join(t.lines)


# --------------------------------------------------------------------- picture
def _bar_hist(ax: Any, h: dict[str, list], color: str, label: str) -> None:
    edges, counts = h.get("edges") or [], h.get("counts") or []
    if counts:
        widths = [b - a for a, b in zip(edges[:-1], edges[1:])]
        ax.bar(edges[:-1], counts, width=widths, align="edge", color=color, alpha=0.6, label=label,
               edgecolor="black", linewidth=0.3)


def _empty(ax: Any, text: str) -> None:
    ax.text(0.5, 0.5, text, ha="center", va="center", transform=ax.transAxes, fontsize=9, color="gray")
    ax.set_xticks([])
    ax.set_yticks([])


def plot_inventory(report: dict[str, Any], path: Path) -> None:
    """One row of panels per source root: spacing, slice count, matrix size, HU (log y). Agg backend."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    rows = max(1, len(report["sources"]))
    fig, axes = plt.subplots(rows, 4, figsize=(18, 3.6 * rows), squeeze=False)
    for r, e in enumerate(report["sources"]):
        ax_sp, ax_sl, ax_mx, ax_hu = axes[r]
        name = f"{Path(e['root']).name} ({e['source']}, {e['cases']} cases)"
        if "ctrate" in e:
            v = e["ctrate"]["volumes"]
            _bar_hist(ax_sp, v["z_spacing_mm"]["histogram"], "tab:blue", "z (slice)")
            _bar_hist(ax_sp, v["inplane_spacing_mm"]["histogram"], "tab:orange", "in-plane")
            ax_sp.set_xlabel("spacing (mm)")
            if v["z_spacing_mm"]["histogram"]["counts"]:
                ax_sp.legend(fontsize=8)
            else:
                _empty(ax_sp, "no readable spacing")
            _bar_hist(ax_sl, v["slices"]["histogram"], "tab:green", "slices")
            ax_sl.set_xlabel("slices per volume")
            sizes = v["matrix_yx"]
        elif "omniabnorm" in e:
            o = e["omniabnorm"]
            _empty(ax_sp, "no spacing: 8-bit JPEG slices")
            _bar_hist(ax_sl, o["context_slices"]["histogram"], "tab:green", "context")
            ax_sl.set_xlabel("context slices per case")
            sizes = o["image_size_hw"]
        else:
            _empty(ax_sp, "no spacing summary for this source")
            _empty(ax_sl, "")
            sizes = {}
        ax_sp.set_title(f"{name}: spacing", fontsize=10)
        ax_sl.set_title("context slices" if "omniabnorm" in e else "slice count", fontsize=10)
        if sizes:
            top = list(sizes.items())[:12]
            ax_mx.bar(range(len(top)), [n for _, n in top], color="tab:purple")
            ax_mx.set_xticks(range(len(top)))
            ax_mx.set_xticklabels([k for k, _ in top], rotation=45, ha="right", fontsize=8)
        else:
            _empty(ax_mx, "no sizes")
        ax_mx.set_title("image size (h x w)" if "omniabnorm" in e else "matrix size (rows x cols)", fontsize=10)
        hu = e.get("hu") or {}
        if hu.get("voxels"):
            lo, hi = hu["edges"]
            edges = np.arange(lo, hi + hu["bin_hu"], hu["bin_hu"])
            counts = np.asarray(hu["counts"], dtype=float)
            nz = np.nonzero(counts)[0]
            ax_hu.stairs(counts, edges, fill=True, color="tab:red", alpha=0.7)
            ax_hu.set_yscale("log")
            ax_hu.set_xlim(edges[max(0, nz[0] - 2)], edges[min(len(edges) - 1, nz[-1] + 3)])
            ax_hu.set_xlabel("HU" + (" (approx., from JPEG window)" if hu.get("approximate") else ""))
            ax_hu.set_title(f"HU, {hu['volumes']} sampled volumes (log y)", fontsize=10)
        else:
            _empty(ax_hu, "no HU sample")
            ax_hu.set_title("HU", fontsize=10)
        for ax in (ax_sp, ax_sl, ax_mx):
            ax.set_ylabel("count", fontsize=8)
    fig.tight_layout()
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp.png")
    fig.savefig(tmp, dpi=90)
    plt.close(fig)
    tmp.replace(path)


def write_inventory(report: dict[str, Any], out: Path) -> tuple[Path, Path]:
    """Write ``OUT/inventory.json`` and ``OUT/inventory.png`` (each via a temporary name)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    js = out / INVENTORY_JSON
    tmp = js.with_name(js.name + ".tmp")
    tmp.write_text(json.dumps(report, indent=1) + "\n", encoding="utf-8")
    tmp.replace(js)
    png = out / INVENTORY_PNG
    plot_inventory(report, png)
    return js, png
