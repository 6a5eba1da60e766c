"""Evaluate an exported encoder on one split of the shards.

    python -m ctprep_train.eval --encoder runs/NAME/encoder --shards shards/ --split valid --out runs/NAME/eval

Writes ``eval.json`` (retrieval both ways with pool size, dedup rule and a
random baseline for the same pool; zero-shot abnormality AUC/F1/accuracy;
CoT alignment) and ``report.md`` with the pictures inline (PNG beside it).
Protocols are in :mod:`ctprep_train.eval.metrics` and repeated in both outputs.
Needs no DeepSpeed: the encoder folder is ``ctprep_train.model.save_pretrained``
output.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ctprep.schema import ABNORMALITY_LABELS, INDEX_FILE
from ctprep.shards import ShardMismatchError
from ctprep_train import shard_io
from ctprep_train.data import check_tokenizer as check_tokenizer_identity
from ctprep_train.eval import metrics, pictures
from ctprep_train.eval.attention_maps import AttentionRecorder, slice_bias_tables
from ctprep_train.eval.data import batches_by_shape, iter_split, read_index

DEFAULT_PROMPTS = ("{label} is present.", "{label} is not present.")
log = logging.getLogger(__name__)


@dataclass
class EvalConfig:
    encoder: Path  # folder written by ctprep_train.model.save_pretrained
    shards: Path | str  # `ctprep build-shards` output folder (with index.json), or its http(s):// / s3:// URL
    split: str = "valid"
    out: Path = Path("eval")
    batch_size: int = 4  # cases per forward pass
    max_cases: int | None = None  # cap on evaluated cases (None = the whole split)
    source: str | None = None  # evaluate only this source ("ctrate" | "omniabnorm"); None = all
    ks: tuple[int, ...] = metrics.DEFAULT_KS
    prompts: tuple[str, str] = DEFAULT_PROMPTS  # present / absent templates, "{label}" substituted
    picture_cases: int = 3  # cases drawn with attention overlays and CoT step maps
    chunk: int = 1024  # retrieval similarity block (queries)
    device: str = "cpu"
    seed: int = 0
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class Collected:
    """What one pass over the split gathers."""

    image_emb: list[torch.Tensor] = field(default_factory=list)
    text_emb: list[torch.Tensor] = field(default_factory=list)
    ids: list[str] = field(default_factory=list)
    sources: list[str] = field(default_factory=list)
    report_texts: list[str] = field(default_factory=list)
    labels: list[np.ndarray] = field(default_factory=list)
    picture_samples: list[dict[str, Any]] = field(default_factory=list)
    skipped: list[dict[str, str]] = field(default_factory=list)  # damaged samples: {"shard", "key", "error"}


def _json_safe(x: Any) -> Any:
    """NaN/inf -> None so eval.json is strict JSON."""
    if isinstance(x, dict):
        return {str(k): _json_safe(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_json_safe(v) for v in x]
    if isinstance(x, (float, np.floating)):
        return None if not math.isfinite(float(x)) else float(x)
    if isinstance(x, np.integer):
        return int(x)
    return x


def _to_device(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def load_encoder(path: Path, device: torch.device) -> torch.nn.Module:
    from ctprep_train.model import load_pretrained

    model = load_pretrained(str(path))
    return model.to(device).eval()


def check_tokenizer(encoder: Path, shards: Path | str, index: dict[str, Any]) -> None:
    """Refuse shards made with another tokenizer than the encoder's text tower (same hash = same
    tokenizer, whatever its name: ``ctprep_train.data.check_tokenizer``)."""
    from ctprep_train.export import read_tokenizer_identity

    mine = read_tokenizer_identity(encoder)  # tokenizer_identity.json (or an older export's tokenizer.json)
    if mine is None:  # an export that recorded no identity: nothing to compare with
        return
    check_tokenizer_identity(shard_io.join(shards, INDEX_FILE), index.get("tokenizer"), mine,
                             f"Evaluate {encoder} on shards made with its tokenizer (the expected one)")


@torch.no_grad()
def collect(model, cfg: EvalConfig) -> Collected:
    device = torch.device(cfg.device)
    out = Collected()
    samples = iter_split(cfg.shards, cfg.split, cfg.max_cases, cfg.source, skipped=out.skipped)
    for batch in batches_by_shape(samples, cfg.batch_size):
        dev = _to_device(batch, device)
        img = model.encode_image(dev)
        txt = model.encode_text(dev["report_ids"], dev["report_attn"])
        out.image_emb.append(img.float().cpu())
        out.text_emb.append(txt.float().cpu())
        out.ids.extend(batch["ids"])
        for m in batch["meta"]:
            out.sources.append(m.get("source", "?"))
            out.report_texts.append(m.get("report_text", ""))
        out.labels.append(batch["labels"].numpy())
        if len(out.picture_samples) < cfg.picture_cases:
            # keep whole single-case batches for the pictures (volumes are small in eval pools of interest)
            for i in range(len(batch["ids"])):
                if len(out.picture_samples) >= cfg.picture_cases:
                    break
                out.picture_samples.append(_single(batch, i))
    return out


def _single(batch: dict[str, Any], i: int) -> dict[str, Any]:
    return {k: (v[i : i + 1] if isinstance(v, torch.Tensor) else [v[i]]) for k, v in batch.items()}


@torch.no_grad()
def encode_prompts(model, tokenizer, templates: Sequence[str], max_len: int, device) -> list[torch.Tensor]:
    from ctprep.tokenizer import tokenize_padded

    embs = []
    for template in templates:
        texts = [template.format(label=name) for name in ABNORMALITY_LABELS]
        ids, lens = tokenize_padded(tokenizer, texts, max_len)
        ids_t = torch.from_numpy(ids.astype(np.int64)).to(device)
        attn = torch.arange(ids.shape[1], device=device)[None] < torch.from_numpy(lens).to(device)[:, None]
        embs.append(model.encode_text(ids_t, attn).float().cpu())
    return embs


def retrieval_section(col: Collected, cfg: EvalConfig) -> dict[str, Any]:
    img = torch.cat(col.image_emb)
    txt = torch.cat(col.text_emb)
    out = metrics.retrieval_metrics(img, txt, text_keys=col.report_texts, ks=cfg.ks, chunk=cfg.chunk)
    out["random_baseline_simulated"] = metrics.simulated_random_baseline(
        img.shape[0], metrics.unique_text_index(col.report_texts, img.shape[0])[1], cfg.ks, seed=cfg.seed
    )
    sources = sorted(set(col.sources))
    if len(sources) > 1:
        by_source = {}
        for s in sources:
            sel = [i for i, x in enumerate(col.sources) if x == s]
            if len(sel) > 1:
                r = metrics.retrieval_metrics(
                    img[sel], txt[sel], [col.report_texts[i] for i in sel], cfg.ks, cfg.chunk
                )
                by_source[s] = {k: r[k] for k in ("pool_size", "n_unique_texts", "image_to_text", "text_to_image", "random_baseline")}
        out["by_source"] = by_source
    out["split"] = cfg.split
    out["source_filter"] = cfg.source or "all"
    return out


def pictures_and_alignment(model, col: Collected, cfg: EvalConfig, region_names: list[str], out_dir: Path) -> tuple[dict, list[tuple[str, str]]]:
    """Slice-bias heatmap, attention overlays, CoT step maps; CoT alignment over the picture cases
    and (cheaply, same forward) all collected ones. Returns (cot summary, [(caption, png name)])."""
    figs: list[tuple[str, str]] = []
    device = torch.device(cfg.device)
    tables = slice_bias_tables(model)
    pictures.plot_slice_bias(tables, out_dir / "slice_bias.png", "learned slice-distance bias (logit) per layer")
    figs.append(("Learned slice-distance bias per head and layer (CLS column omitted).", "slice_bias.png"))
    cot = metrics.CoTAlignment(region_names)
    recorder = AttentionRecorder(model)
    for n, sample in enumerate(col.picture_samples):
        maps = recorder.run(_to_device(sample, device))
        image = sample["image"][0].numpy()
        mask = sample["mask"][0].numpy()
        cid = sample["ids"][0]
        grid, patch = maps["grid"], maps["patch_size"]
        overlays = {"CLS attention (last layer)": maps["cls"].reshape(grid)}
        if maps.get("region") is not None:
            overlays["region attention"] = maps["region"].reshape(grid)
        name = f"attention_{n}.png"
        pictures.plot_attention_overlays(image, mask, overlays, patch, out_dir / name, title=f"{cid}")
        figs.append((f"Case {cid}: axial/coronal slices, region contours, CLS and region attention.", name))
        steps_text = sample["meta"][0].get("steps_text", [])
        step_regions = list(sample["meta"][0].get("step_regions", []))
        if maps.get("steps") is not None and len(steps_text):
            s_n = min(len(steps_text), maps["steps"].shape[0])
            step_maps = [maps["steps"][s].reshape(grid) for s in range(s_n)]
            named = [region_names[r] if 0 <= r < len(region_names) else None for r in step_regions[:s_n]]
            rid = [r + 1 if 0 <= r < len(region_names) else None for r in step_regions[:s_n]]
            sname = f"cot_steps_{n}.png"
            pictures.plot_step_attention(image, steps_text[:s_n], step_maps, named, patch, out_dir / sname, mask, rid, f"{cid}: CoT steps")
            figs.append((f"Case {cid}: where each CoT step's evidence attends (named region outlined).", sname))
    # CoT alignment over every case of the split (one more pass; the step head is cheap). Damaged
    # samples were reported by collect's pass: skip them quietly here.
    samples = iter_split(cfg.shards, cfg.split, cfg.max_cases, cfg.source, skipped=[])
    for batch in batches_by_shape(samples, cfg.batch_size):
        for i in range(len(batch["ids"])):
            sample = _single(batch, i)
            if not sample["meta"][0].get("step_regions"):
                continue
            maps = recorder.run(_to_device(sample, device), need=("steps",))
            if maps.get("steps") is None:
                continue
            cot.add(maps["steps"], sample["meta"][0]["step_regions"], sample["regions"][0].numpy())
    recorder.close()
    summary = cot.summary()
    if summary["per_region"]:
        pictures.plot_cot_alignment(summary["per_region"], out_dir / "cot_alignment.png")
        figs.append(("CoT alignment: attention mass in the named region vs chance.", "cot_alignment.png"))
    return summary, figs


def _fmt(x: Any, pct: bool = True) -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "n/a"
    return f"{100 * x:.1f}%" if pct else f"{x:.3f}"


def write_report(result: dict[str, Any], figs: list[tuple[str, str]], path: Path) -> None:
    r = result["retrieval"]
    ks = [k for k in r["image_to_text"] if k.startswith("R@")]
    lines = [
        f"# Evaluation: {result['encoder']}",
        "",
        f"Split `{result['split']}` of `{result['shards']}`; {r['n_images']} images, {r['n_unique_texts']} unique "
        f"report texts (retrieval pool: image->text {r['image_to_text']['pool_size']}, "
        f"text->image {r['text_to_image']['pool_size']}).",
        "",
        "## Retrieval",
        "",
        "| direction | " + " | ".join(ks) + " | mean rank | median rank |",
        "|---|" + "---|" * (len(ks) + 2),
    ]
    for d in ("image_to_text", "text_to_image"):
        row = r[d]
        lines.append(
            f"| {d.replace('_', ' ')} | " + " | ".join(_fmt(row[k]) for k in ks)
            + f" | {row['mean_rank']:.1f} | {row['median_rank']:.1f} |"
        )
    for d in ("image_to_text", "text_to_image"):
        rb = r["random_baseline"][d]
        lines.append(f"| random baseline ({d.replace('_', ' ')}) | " + " | ".join(_fmt(rb[k]) for k in ks) + " | | |")
    base5 = r["random_baseline"].get("R@5")
    if base5:
        lines += ["", f"R@5 vs random: image->text {r['image_to_text']['R@5'] / base5:.1f}x, text->image "
                  f"{r['text_to_image']['R@5'] / base5:.1f}x (random R@5 {_fmt(base5)}, the larger of the two "
                  "directions' baselines)."]
    lines += ["", f"Protocol: {r['protocol']}", ""]
    if "by_source" in r:
        lines += ["Per source:", ""]
        for s, v in r["by_source"].items():
            lines.append(
                f"- {s}: pool {v['pool_size']}, i->t R@5 {_fmt(v['image_to_text'].get('R@5'))}, "
                f"t->i R@5 {_fmt(v['text_to_image'].get('R@5'))}, random R@5 {_fmt(v['random_baseline'].get('R@5'))}"
            )
        lines.append("")
    z = result["zero_shot"]
    lines += [
        "## Zero-shot abnormality classification",
        "",
        f"Macro AUC {_fmt(z['macro_auc'], False)}, macro F1 {_fmt(z['macro_f1'], False)}, macro accuracy "
        f"{_fmt(z['macro_accuracy'], False)} over {z['labels_evaluated']} labels with both classes present. "
        f"Prompts: `{result['prompts'][0]}` / `{result['prompts'][1]}`.",
        "",
        "| label | n+ | n- | AUC | F1 | accuracy |",
        "|---|---|---|---|---|---|",
    ]
    for name, e in z["per_label"].items():
        lines.append(
            f"| {name} | {e['n_pos']} | {e['n_neg']} | {_fmt(e.get('auc'), False)} | {_fmt(e.get('f1'), False)} | "
            f"{_fmt(e.get('accuracy'), False)} |"
        )
    lines += ["", f"Protocol: {z['protocol']}", ""]
    c = result.get("cot_alignment", {})
    lines += ["## CoT alignment", ""]
    if c.get("per_region"):
        lines += ["| region | steps | mass in region | chance | ratio | above chance |", "|---|---|---|---|---|---|"]
        for name, e in list(c["per_region"].items()) + [("**overall**", c["overall"])]:
            lines.append(
                f"| {name} | {e['steps']} | {_fmt(e['mean_mass'])} | {_fmt(e['mean_chance'])} | "
                f"{e['mean_ratio']:.2f} | {_fmt(e['frac_above_chance'])} |"
            )
        lines += ["", f"Protocol: {c['protocol']}", ""]
    else:
        lines += [c.get("note", "No step names an anatomy in this split (or the model has no step head)."), ""]
    lines += ["## Pictures", ""]
    for caption, name in figs:
        lines += [f"{caption}", "", f"![{caption}]({name})", ""]
    lines += [f"_Evaluated in {result['seconds']:.1f} s._", ""]
    path.write_text("\n".join(lines))


def evaluate(cfg: EvalConfig) -> dict[str, Any]:
    from ctprep.tokenizer import load_tokenizer

    t0 = time.time()
    torch.manual_seed(cfg.seed)
    cfg.out.mkdir(parents=True, exist_ok=True)
    index = read_index(cfg.shards)
    check_tokenizer(cfg.encoder, cfg.shards, index)
    device = torch.device(cfg.device)
    model = load_encoder(cfg.encoder, device)
    text_path = getattr(getattr(getattr(model, "cfg", None), "text", None), "path", None)
    tokenizer = load_tokenizer(text_path)
    col = collect(model, cfg)
    for bad in col.skipped:
        log.warning("skipped damaged sample %s in %s: %s", bad["key"], bad["shard"], bad["error"])
    if not col.ids:
        raise SystemExit(f"split {cfg.split!r} of {cfg.shards} has no cases" + (f" of source {cfg.source}" if cfg.source else ""))
    result: dict[str, Any] = {
        "encoder": str(cfg.encoder),
        "shards": str(cfg.shards),
        "split": cfg.split,
        "n_cases": len(col.ids),
        "prompts": list(cfg.prompts),
        # samples that failed their checksums or could not be decoded: not evaluated
        "corrupt_skipped": {"count": len(col.skipped), "samples": col.skipped},
    }
    result["retrieval"] = retrieval_section(col, cfg)
    img = torch.cat(col.image_emb)
    max_len = max(16, max(len(p) for p in cfg.prompts) + 32)
    pos, neg = encode_prompts(model, tokenizer, cfg.prompts, max_len, device)
    result["zero_shot"] = metrics.zero_shot_metrics(img, pos, neg, np.concatenate(col.labels), ABNORMALITY_LABELS)
    region_names = list(index.get("region_names", []))
    try:
        cot, figs = pictures_and_alignment(model, col, cfg, region_names, cfg.out)
    except NotImplementedError as err:  # a model without the maps still gets numbers
        cot, figs = {"per_region": {}, "note": f"attention maps unavailable: {err}"}, []
    result["cot_alignment"] = cot
    result["seconds"] = time.time() - t0
    result = _json_safe(result)
    (cfg.out / "eval.json").write_text(json.dumps(result, indent=2))
    write_report(result, figs, cfg.out / "report.md")
    return result


def summary_line(result: dict[str, Any]) -> str:
    r = result["retrieval"]
    f = lambda d, k: _fmt(r[d].get(k))  # noqa: E731
    return (
        f"pool {r['n_images']} images / {r['n_unique_texts']} texts | i->t R@1 {f('image_to_text', 'R@1')} "
        f"R@5 {f('image_to_text', 'R@5')} | t->i R@1 {f('text_to_image', 'R@1')} R@5 {f('text_to_image', 'R@5')} "
        f"| random R@5 {_fmt(r['random_baseline'].get('R@5'))} | zero-shot macro AUC "
        f"{_fmt(result['zero_shot']['macro_auc'], False)}"
        + (f" | {n} damaged sample(s) skipped (eval.json corrupt_skipped)"
           if (n := result.get("corrupt_skipped", {}).get("count", 0)) else "")
    )


def parse_args(argv: Sequence[str] | None = None) -> EvalConfig:
    p = argparse.ArgumentParser(prog="python -m ctprep_train.eval", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--encoder", type=Path, required=True, help="runs/NAME/encoder (save_pretrained folder)")
    p.add_argument("--shards", type=shard_io.as_location, required=True,
                   help="shards folder with index.json, or its http(s):// or s3:// URL")
    p.add_argument("--split", default="valid")
    p.add_argument("--out", type=Path, required=True, help="output folder for eval.json, report.md, PNGs")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--max-cases", type=int, default=None)
    p.add_argument("--source", default=None, help="only this source (ctrate | omniabnorm); default all")
    p.add_argument("--ks", default=",".join(map(str, metrics.DEFAULT_KS)), help="Recall@K cut-offs, comma-separated")
    p.add_argument("--prompt-present", default=DEFAULT_PROMPTS[0])
    p.add_argument("--prompt-absent", default=DEFAULT_PROMPTS[1])
    p.add_argument("--picture-cases", type=int, default=3)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    for t in (a.prompt_present, a.prompt_absent):
        if "{label}" not in t:
            p.error(f"prompt template {t!r} must contain {{label}}")
    return EvalConfig(
        encoder=a.encoder, shards=a.shards, split=a.split, out=a.out, batch_size=a.batch_size,
        max_cases=a.max_cases, source=a.source, ks=tuple(int(k) for k in a.ks.split(",")),
        prompts=(a.prompt_present, a.prompt_absent), picture_cases=a.picture_cases, device=a.device, seed=a.seed,
    )


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    cfg = parse_args(argv)
    try:
        result = evaluate(cfg)
    except ShardMismatchError as exc:  # shards this encoder cannot be evaluated on: one line, no traceback
        raise SystemExit(f"error: {exc}") from None
    print(summary_line(result))
    print(f"wrote {cfg.out / 'eval.json'} and {cfg.out / 'report.md'}")
    return result


