"""Run directory -> report.md and report.html (figures as PNG files beside them).

Reads, each optional: config.json, privacy.json, train_log.jsonl, samples.png, synthetic.npz,
eval.json, audit.json. A run that is not private by `privacy.ledger.run_privacy_status` (a
non-private control by any of config.json, privacy.json or audit.json, or no privacy.json, or no
finite ε) is labelled NOT PRIVATE, with the reason, in the title, first line and privacy
sections. The
report is built as a list of blocks rendered twice, to Markdown and to HTML,
so both always say the same thing. Every file is written to a temporary name and renamed.
"""

from __future__ import annotations

import html
import json
from dataclasses import dataclass
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from dplatent import data  # noqa: E402
from dplatent.config import CONFIG_FILE  # noqa: E402
from dplatent.errors import DataError  # noqa: E402
from dplatent.eval.evaluate import seeds_label  # noqa: E402
from dplatent.io import atomic_write, read_json  # noqa: E402
from dplatent.privacy.ledger import run_privacy_status  # noqa: E402

CURVES_PNG = "training_curves.png"
CLASS_GRID_PNG = "synthetic_grid.png"
PER_CLASS = 10


# ----------------------------------------------------------------------------- reading


@dataclass(frozen=True)
class RunFiles:
    run_dir: Path
    config: dict | None
    privacy: dict | None
    log: list[dict]
    eval: dict | None
    has_samples_png: bool
    synthetic: data.LabelledImages | None
    audit: dict | None = None


def read_jsonl(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    records = []
    for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataError(f"{path}:{lineno}: not valid JSON ({exc})") from exc
        if not isinstance(record, dict):
            raise DataError(f"{path}:{lineno}: expected a JSON object")
        records.append(record)
    return records


def load_run(run_dir: str | Path) -> RunFiles:
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise DataError(f"{run_dir}: run directory not found")
    synthetic_path = run_dir / "synthetic.npz"
    synthetic = data.read_npz(synthetic_path) if synthetic_path.is_file() else None
    return RunFiles(run_dir=run_dir, config=read_json(run_dir / CONFIG_FILE),
                    privacy=read_json(run_dir / "privacy.json"),
                    log=read_jsonl(run_dir / "train_log.jsonl"),
                    eval=read_json(run_dir / "eval.json"),
                    has_samples_png=(run_dir / "samples.png").is_file(), synthetic=synthetic,
                    audit=read_json(run_dir / "audit.json"))


def config_dataset(config: dict | None) -> str | None:
    """The data set a run's config.json names: at the top level, or under 'derived' (where
    `dplatent train` records it) or 'data'."""
    config = config or {}
    for source in (config, config.get("derived"), config.get("data")):
        if isinstance(source, dict) and isinstance(source.get("dataset"), str):
            return source["dataset"]
    return None


def dataset_name(run: RunFiles) -> str | None:
    if run.eval and isinstance(run.eval.get("dataset"), str):
        return run.eval["dataset"]
    return config_dataset(run.config)


# ----------------------------------------------------------------------------- writing


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write(path, lambda p: p.write_text(text, encoding="utf-8"))


def atomic_savefig(fig: plt.Figure, path: Path) -> None:
    atomic_write(path, lambda p: fig.savefig(p, format="png", dpi=100, bbox_inches="tight"))
    plt.close(fig)


# ----------------------------------------------------------------------------- figures


def plot_training_curves(log: list[dict], path: Path) -> bool:
    """Loss vs step, one panel per stage, and epsilon vs step; False if nothing to plot."""
    stages = list(dict.fromkeys(r["stage"] for r in log if "stage" in r and "step" in r))
    if not stages:
        return False
    fig, axes = plt.subplots(1, len(stages) + 1, figsize=(4.2 * (len(stages) + 1), 3.4))
    for ax, stage in zip(axes, stages):
        rows = [r for r in log if r.get("stage") == stage and _finite(r.get("loss"))]
        ax.plot([r["step"] for r in rows], [r["loss"] for r in rows], lw=1)
        ax.set(title=f"{stage}: loss", xlabel="step", ylabel="loss")
        losses = [r["loss"] for r in rows]
        if losses and min(losses) > 0 and max(losses) / min(losses) > 10:
            ax.set_yscale("log")
    eps_ax = axes[-1]
    for stage in stages:
        rows = [r for r in log if r.get("stage") == stage and _finite(r.get("epsilon"))]
        eps_ax.plot([r["step"] for r in rows], [r["epsilon"] for r in rows], lw=1, label=stage)
    eps_ax.set(title="privacy spent", xlabel="step", ylabel="ε")
    eps_ax.legend()
    fig.tight_layout()
    atomic_savefig(fig, path)
    return True


def class_mosaic(images: data.LabelledImages, per_class: int = PER_CLASS,
                 pad: int = 2) -> np.ndarray:
    """uint8 mosaic (rows = classes, first `per_class` images of each; white gaps, blank
    cells where a class has fewer images), (H', W') for grey or (H', W', 3) for RGB."""
    h = images.image_size
    k = images.num_classes
    shape = (k * (h + pad) + pad, per_class * (h + pad) + pad) + images.x.shape[3:]
    mosaic = np.full(shape, 255, dtype=np.uint8)
    for c in range(k):
        for j, idx in enumerate(np.flatnonzero(images.y == c)[:per_class]):
            top, left = pad + c * (h + pad), pad + j * (h + pad)
            mosaic[top:top + h, left:left + h] = images.x[idx]
    return mosaic


def plot_class_grid(images: data.LabelledImages, path: Path, names: list[str],
                    per_class: int = PER_CLASS) -> None:
    """One row per class, labelled with the class names."""
    mosaic = class_mosaic(images, per_class)
    k, h = images.num_classes, images.image_size
    fig, ax = plt.subplots(figsize=(per_class * 0.6 + 1.5, k * 0.6 + 0.3))
    ax.imshow(mosaic, cmap="gray" if mosaic.ndim == 2 else None, vmin=0, vmax=255,
              interpolation="nearest")
    ax.set_xticks([])
    ax.set_yticks([2 + c * (h + 2) + h / 2 for c in range(k)], names[:k], fontsize=8)
    ax.tick_params(length=0)
    for side in ax.spines.values():
        side.set_visible(False)
    atomic_savefig(fig, path)


def _finite(value) -> bool:
    return isinstance(value, (int, float)) and np.isfinite(value)


# ----------------------------------------------------------------------------- content


@dataclass(frozen=True)
class Block:
    kind: str  # 'h1', 'h2', 'p', 'img', 'table', 'code'
    text: str = ""
    rows: tuple[tuple[str, ...], ...] = ()  # for tables: first row is the header


def fmt(value, digits: int = 4) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:.{digits}g}"
    return str(value)


def pct(acc, std=None) -> str:
    if not _finite(acc):
        return "–"
    return f"{100 * acc:.2f}%" + (f" ± {100 * std:.2f}" if _finite(std) else "")


def metrics_rows(ev: dict) -> list[tuple[str, ...]]:
    rows = [("metric", "value", "details")]
    if "fid" in ev:
        detail = (f"{ev.get('fid_samples', '?')} synthetic vs "
                  f"{ev.get('fid_reference_samples', '?')} real ({ev.get('fid_reference', '?')})")
        rows.append(("FID", fmt(ev["fid"], 5), detail))
    for kind, label in (("cnn", "CNN"), ("mlp", "MLP"), ("logreg", "logistic regression")):
        if f"{kind}_acc" in ev:
            rows.append((f"{label} accuracy", pct(ev[f"{kind}_acc"], ev.get(f"{kind}_acc_std")),
                         f"{seeds_label(ev)}, {ev.get(f'{kind}_epochs', '?')} epochs, "
                         f"{fmt(ev.get(f'{kind}_seconds'), 3)} s"))
    return rows


def privacy_blocks(privacy: dict) -> list[Block]:
    name = f" – {privacy['accountant_name']}" if privacy.get("accountant_name") else ""
    head = (f"Accountant: {privacy.get('accountant', '?')}{name}; target ε = "
            f"{fmt(privacy.get('target_epsilon'))}, δ = {fmt(privacy.get('delta'))}; "
            f"total ε spent = {_eps(privacy.get('epsilon'))}.")
    rows = [("stage", "mechanism", "σ (noise multiplier)", "q (sample rate)", "steps",
             "clip norm", "ε alone")]
    for e in privacy.get("entries") or []:
        rows.append((str(e.get("stage", "?")), str(e.get("mechanism", "?")),
                     fmt(e.get("noise_multiplier")), fmt(e.get("sample_rate")),
                     fmt(e.get("steps")), fmt(e.get("clip_norm")), _eps(e.get("epsilon_alone"))))
    rows.append(("**total (composed)**", "", "", "", "", "", _eps(privacy.get("epsilon"))))
    return [Block("p", head), Block("table", rows=tuple(rows))]


def training_summary(log: list[dict]) -> list[tuple[str, ...]]:
    rows = [("stage", "records", "last step", "last loss", "last ε", "time (s)")]
    for stage in dict.fromkeys(r.get("stage") for r in log if "stage" in r):
        recs = [r for r in log if r.get("stage") == stage]
        last = recs[-1]
        rows.append((str(stage), str(len(recs)), fmt(last.get("step")), fmt(last.get("loss")),
                     fmt(last.get("epsilon")), fmt(last.get("time"))))
    return rows


def privacy_status(run: RunFiles) -> tuple[bool, str]:
    """(private?, reason) from the run's config.json, privacy.json and audit.json."""
    return run_privacy_status(run.config, run.privacy, run.audit)


def not_private_banner(reason: str) -> str:
    return (f"NOT PRIVATE: {reason}; no differential-privacy guarantee and no ε. Never "
            "publish its models or samples.")


def _eps(value) -> str:
    return fmt(value) if _finite(value) else "none (NOT PRIVATE)"


def audit_blocks(audit: dict, control: bool) -> list[Block]:
    """The membership-inference audit: one row per attack, its empirical ε lower bound beside
    the accounted ε."""
    members, nonmembers = audit.get("members") or {}, audit.get("nonmembers") or {}
    accounted = None if control else audit.get("accounted_epsilon")
    blocks = [Block("p", (
        f"Membership inference on {fmt(members.get('count'))} members "
        f"({members.get('source', '?')}) and {fmt(nonmembers.get('count'))} non-members "
        f"({nonmembers.get('source', '?')}); δ = {fmt(audit.get('delta'))}, "
        f"{fmt(100 * audit['confidence'] if _finite(audit.get('confidence')) else None)}% "
        f"Clopper–Pearson confidence; synthetic samples: {audit.get('synthetic', '?')}. "
        f"Largest empirical ε lower bound: {fmt(audit.get('empirical_epsilon_lower_bound'))}; "
        f"accounted ε: {_eps(accounted)}."))]
    rows = [("attack", "AUC", "TPR @ 0.1% FPR", "TPR @ 1% FPR", "empirical ε lower bound",
             "accounted ε")]
    groups = [("", audit.get("attacks") or {})]
    if isinstance(audit.get("canaries"), dict):
        groups.append(("canary: ", audit["canaries"].get("attacks") or {}))
    for prefix, attacks in groups:
        for name, a in attacks.items():
            a = a if isinstance(a, dict) else {}
            tpr = a.get("tpr_at_fpr") if isinstance(a.get("tpr_at_fpr"), dict) else {}
            rows.append((prefix + str(name).replace("_", " "), fmt(a.get("auc"), 3),
                         fmt(tpr.get("0.001"), 3), fmt(tpr.get("0.01"), 3),
                         fmt(a.get("epsilon_lower_bound"), 3), _eps(accounted)))
    blocks.append(Block("table", rows=tuple(rows)))
    bound = audit.get("empirical_epsilon_lower_bound")
    if _finite(accounted) and _finite(bound) and bound > accounted:
        blocks.append(Block("p", "Warning: the empirical lower bound exceeds the accounted ε; "
                                 "check the members/non-members caveat, then the training code."))
    for note in audit.get("notes") or []:
        blocks.append(Block("p", f"Note: {note}"))
    return blocks


def build_blocks(run: RunFiles) -> list[Block]:
    private, reason = privacy_status(run)
    control = not private
    title = f"dplatent run report: {run.run_dir.name}" + (" — NOT PRIVATE" if control else "")
    blocks = [Block("h1", title)]
    if control:
        blocks.append(Block("p", f"**{not_private_banner(reason)}**"))
    blocks.append(Block("h2", "Samples"))
    if run.has_samples_png:
        blocks.append(Block("img", "samples.png"))
    if run.synthetic is not None:
        blocks.append(Block("p", f"Per-class grid from synthetic.npz ({len(run.synthetic):,} "
                                 "records), first images of each class:"))
        blocks.append(Block("img", CLASS_GRID_PNG))
    if not run.has_samples_png and run.synthetic is None:
        blocks.append(Block("p", "No samples.png or synthetic.npz in the run directory."))

    blocks.append(Block("h2", "Metrics"))
    if run.eval:
        blocks.append(Block("table", rows=tuple(metrics_rows(run.eval))))
        if run.eval.get("fid_warning"):
            blocks.append(Block("p", f"Warning: {run.eval['fid_warning']}."))
        blocks.append(Block("p", "Accuracies: classifiers trained on synthetic data, epoch "
                                 "chosen on a synthetic validation split, tested once on the "
                                 "real test set; mean ± sample std over seeds."))
    else:
        blocks.append(Block("p", "No eval.json; run `dplatent evaluate --run RUN`."))

    blocks.append(Block("h2", "Privacy ledger"))
    if control:
        blocks.append(Block("p", f"**{not_private_banner(reason)}**"))
    blocks += privacy_blocks(run.privacy) if run.privacy else [Block("p", "No privacy.json.")]

    blocks.append(Block("h2", "Privacy audit"))
    if run.audit:
        blocks += audit_blocks(run.audit, control)
    else:
        blocks.append(Block("p", "No audit.json; run `dplatent audit --run RUN`."))

    blocks.append(Block("h2", "Training"))
    if run.log:
        blocks.append(Block("img", CURVES_PNG))
        blocks.append(Block("table", rows=tuple(training_summary(run.log))))
    else:
        blocks.append(Block("p", "No train_log.jsonl."))

    if run.config is not None:
        blocks.append(Block("h2", "Configuration"))
        blocks.append(Block("code", json.dumps(run.config, indent=2, sort_keys=True)))
    return blocks


# ----------------------------------------------------------------------------- rendering


def _md_cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def render_markdown(blocks: list[Block]) -> str:
    out = []
    for b in blocks:
        if b.kind == "h1":
            out.append(f"# {b.text}")
        elif b.kind == "h2":
            out.append(f"## {b.text}")
        elif b.kind == "p":
            out.append(b.text)
        elif b.kind == "img":
            out.append(f"![{b.text}]({b.text})")
        elif b.kind == "code":
            out.append(f"```json\n{b.text}\n```")
        elif b.kind == "table":
            header, *body = b.rows
            lines = ["| " + " | ".join(map(_md_cell, header)) + " |",
                     "|" + "---|" * len(header)]
            lines += ["| " + " | ".join(map(_md_cell, row)) + " |" for row in body]
            out.append("\n".join(lines))
    return "\n\n".join(out) + "\n"


def _html_cell(text: str) -> str:
    bold = text.startswith("**") and text.endswith("**") and len(text) > 4
    inner = html.escape(text[2:-2] if bold else text)
    return f"<strong>{inner}</strong>" if bold else inner


def render_html(blocks: list[Block]) -> str:
    title = html.escape(blocks[0].text if blocks and blocks[0].kind == "h1" else "report")
    body = []
    for b in blocks:
        if b.kind in ("h1", "h2"):
            body.append(f"<{b.kind}>{html.escape(b.text)}</{b.kind}>")
        elif b.kind == "p":
            body.append(f"<p>{_html_cell(b.text)}</p>")
        elif b.kind == "img":
            src = html.escape(b.text, quote=True)
            body.append(f'<p><img src="{src}" alt="{src}"></p>')
        elif b.kind == "code":
            body.append(f"<pre><code>{html.escape(b.text)}</code></pre>")
        elif b.kind == "table":
            header, *rows = b.rows
            lines = ["<table>", "<tr>" + "".join(f"<th>{html.escape(h)}</th>" for h in header)
                     + "</tr>"]
            lines += ["<tr>" + "".join(f"<td>{_html_cell(c)}</td>" for c in row) + "</tr>"
                      for row in rows]
            body.append("\n".join(lines + ["</table>"]))
    style = ("body{font-family:sans-serif;max-width:60em;margin:2em auto;padding:0 1em}"
             "table{border-collapse:collapse}td,th{border:1px solid #bbb;padding:.25em .6em}"
             "img{max-width:100%}pre{background:#f4f4f4;padding:1em;overflow:auto}")
    return (f"<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n"
            f"<title>{title}</title>\n<style>{style}</style>\n</head>\n<body>\n"
            + "\n".join(body) + "\n</body>\n</html>\n")


def write_report(run_dir: str | Path) -> tuple[Path, Path]:
    """Write report.md, report.html and their figures into `run_dir`; return the two paths."""
    run = load_run(run_dir)
    if run.log:
        plot_training_curves(run.log, run.run_dir / CURVES_PNG)
    if run.synthetic is not None:
        k = run.synthetic.num_classes
        names = data.class_names(dataset_name(run) or "", k)
        plot_class_grid(run.synthetic, run.run_dir / CLASS_GRID_PNG,
                        names if len(names) >= k else [str(c) for c in range(k)])
    blocks = build_blocks(run)
    md, page = run.run_dir / "report.md", run.run_dir / "report.html"
    atomic_write_text(md, render_markdown(blocks))
    atomic_write_text(page, render_html(blocks))
    return md, page
