"""Publishable export of a synthetic set: a Hugging Face `datasets` ImageFolder layout and a
short data card.

    DIR/README.md                  data card: a YAML header (the `datasets` metadata: image and
                                   class-label features, the train split) and the text: method,
                                   (epsilon, delta), accountant, dates, metrics, NOT PRIVATE label
    DIR/train/<class>/<i>.png      the images, 8-bit grey (L) or RGB, exact pixels; i is the row
                                   of the npz (sample i was drawn with seed (seed, i))
    DIR/privacy.json               the run's privacy ledger, as it is
    DIR/dplatent.json              the same facts as the card, machine-readable

`datasets.load_dataset("imagefolder", data_dir=DIR)` and `datasets.load_dataset(DIR)` both give
the columns `image` and `label` (a ClassLabel over the class folders). Class folders are the
class names when those are plain, distinct file names already in label order; otherwise
`<label>_<name>` with the label zero-padded, so that sorting them (as ImageFolder does) keeps
the label order. Exporting is post-processing of the synthetic set and costs no privacy.

Metrics are quoted only from an eval.json whose recorded SHA-256 is that of the exported npz.
"""

from __future__ import annotations

import datetime
import json
import re
import shutil
from pathlib import Path

import numpy as np

from dplatent import __version__, data
from dplatent.config import CONFIG_FILE, read_saved
from dplatent.errors import DataError
from dplatent.eval.evaluate import seeds_label
from dplatent.io import atomic_folder, check_empty_target, read_json, sha256_file, write_json
from dplatent.privacy.ledger import FILENAME as LEDGER
from dplatent.privacy.ledger import run_privacy_status
from dplatent.sample import run_fingerprint, safe_name, write_class_folders

CARD = "README.md"
FACTS = "dplatent.json"
SPLIT = "train"
NOT_PRIVATE = "NOT PRIVATE"
_PLAIN = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
METHOD = ("Two-stage differentially private latent diffusion (after Ge, Zhang and Sun, 2024): "
          "a convolutional autoencoder and then a class-conditional denoiser on its latents, "
          "both trained with DP-SGD (per-example clipping, Gaussian noise, Poisson sampling; "
          "Opacus) on the private data, composed by one privacy accountant into one "
          "(epsilon, delta). The images are decoded samples: post-processing of the trained "
          "models, at no further privacy cost.")


def folder_names(class_names: list[str]) -> list[str]:
    """One folder name per class whose sorted order is the label order."""
    names = [str(n) for n in class_names]
    if (all(_PLAIN.fullmatch(n) for n in names) and len(set(names)) == len(names)
            and sorted(names) == names):
        return names
    width = max(2, len(str(len(names) - 1)))
    return [f"{i:0{width}d}_{safe_name(n)[:48]}" for i, n in enumerate(names)]


def _matching_eval(eval_path: Path | None, npz_sha: str) -> dict | None:
    """eval.json's content if it evaluated exactly this npz, else None."""
    result = read_json(eval_path) if eval_path else None
    if result and result.get("synthetic_sha256") == npz_sha:
        return result
    return None


def _mtime_date(path: Path) -> str | None:
    if not path.is_file():
        return None
    stamp = datetime.datetime.fromtimestamp(path.stat().st_mtime, tz=datetime.timezone.utc)
    return stamp.date().isoformat()


def export_run(out_dir: str | Path, run_dir: str | Path, npz_path: str | Path, *,
               eval_path: str | Path | None = None) -> dict:
    """Write the export of the synthetic npz `npz_path` drawn from the run in `run_dir`.

    `eval_path` defaults to RUN/eval.json. The sampling settings `dplatent sample` stored in
    the npz are quoted in the card; an npz without this run's model fingerprint among them
    (not drawn from this run's trained models, e.g. real images) is labelled NOT PRIVATE.
    Refuses an existing non-empty `out_dir`; writes into a temporary folder beside it and
    renames it into place at the end. Returns the facts of dplatent.json.
    """
    out_dir, run_dir, npz_path = check_empty_target(out_dir), Path(run_dir), Path(npz_path)
    saved = read_saved(run_dir)
    if saved is None:
        raise DataError(f"{run_dir}: not a run directory (no {CONFIG_FILE})")
    meta = saved.derived
    try:
        class_names = [str(c) for c in meta["class_names"]]
        dataset = str(meta["dataset"])
    except KeyError as exc:
        raise DataError(f"{saved.path}: no {exc} in its derived section") from exc
    synth = data.read_npz(npz_path, num_classes=len(class_names))
    counts = np.bincount(synth.y, minlength=synth.num_classes)
    if (counts == 0).any():
        missing = [class_names[i] for i in np.flatnonzero(counts == 0)]
        raise DataError(f"{npz_path}: no images of class(es) {missing}; an export needs every "
                        f"class (sample at least {synth.num_classes} images)")
    sampling = npz_info(npz_path)
    ledger = read_json(run_dir / LEDGER)
    private, reason = run_privacy_status(saved.raw, ledger)
    if private and (sampling or {}).get("run_fingerprint") != run_fingerprint(run_dir):
        private, reason = False, (f"{npz_path.name} does not carry this run's model fingerprint, "
                                  f"so it is not known to be drawn from the run's DP models")
    npz_sha = sha256_file(npz_path)
    evaluation = _matching_eval(Path(eval_path) if eval_path else run_dir / "eval.json",
                                npz_sha)
    folders = folder_names(class_names)
    facts = {
        "format": 1, "generator": f"dplatent {__version__}", "method": METHOD,
        "private": private, "label": None if private else f"{NOT_PRIVATE}: {reason}",
        "privacy": _privacy_facts(ledger),
        "source_dataset": dataset if dataset in data.BUILTIN else Path(dataset).name,
        "num_images": int(len(synth)), "image_size": synth.image_size,
        "channels": synth.channels, "mode": "L" if synth.channels == 1 else "RGB",
        "classes": [{"label": i, "name": n, "folder": f, "count": int(c)}
                    for i, (n, f, c) in enumerate(zip(class_names, folders, counts))],
        "sampling": sampling, "synthetic_npz_sha256": npz_sha,
        "dates": {"trained": _mtime_date(run_dir / LEDGER),
                  "exported": datetime.datetime.now(datetime.timezone.utc).date().isoformat()},
        "metrics": _metric_facts(evaluation),
    }

    def fill(tmp: Path) -> None:
        write_class_folders(tmp / SPLIT, synth.x, synth.y, folders)
        if ledger is not None:
            shutil.copyfile(run_dir / LEDGER, tmp / LEDGER)
        write_json(tmp / FACTS, facts)
        (tmp / CARD).write_text(data_card(facts), encoding="utf-8")

    atomic_folder(out_dir, fill)
    return facts


def _privacy_facts(ledger: dict | None) -> dict | None:
    if ledger is None:
        return None
    keep = ("stage", "mechanism", "noise_multiplier", "sample_rate", "steps", "clip_norm",
            "epsilon_alone")
    return {"epsilon": ledger.get("epsilon"), "delta": ledger.get("delta"),
            "target_epsilon": ledger.get("target_epsilon"),
            "accountant": ledger.get("accountant_name") or ledger.get("accountant"),
            "entries": [{k: e.get(k) for k in keep if k in e}
                        for e in ledger.get("entries", [])]}


def _metric_facts(result: dict | None) -> dict | None:
    if result is None:
        return None
    keys = ("dataset", "n_synthetic", "fid", "fid_samples", "fid_reference",
            "fid_reference_samples", "fid_warning", "classifier_seeds",
            "classifier_first_seed",
            "cnn_acc", "cnn_acc_std", "mlp_acc", "mlp_acc_std", "logreg_acc", "logreg_acc_std")
    out = {k: result[k] for k in keys if k in result}
    if result.get("fid_reference_split") != "test":
        # FID against the training split is a statistic of the private data, outside the DP
        # guarantee: it stays in the run directory and is not published.
        out = {k: v for k, v in out.items() if not k.startswith("fid")}
    for key in ("dataset", "fid_reference"):  # a user's path: its last part only
        if key in out and str(out[key]).split("/")[0] not in data.BUILTIN:
            out[key] = Path(str(out[key])).name
    return out


def npz_info(path: Path) -> dict | None:
    """The sampling settings `dplatent sample` stores beside x and y (array `info`, JSON)."""
    try:
        with np.load(path, allow_pickle=False) as f:
            if "info" not in f.files:
                return None
            value = json.loads(str(f["info"]))
    except (OSError, ValueError) as exc:
        raise DataError(f"{path}: unreadable sampling info ({exc})") from exc
    return value if isinstance(value, dict) else None


# ----------------------------------------------------------------------------- the card


def _q(text: object) -> str:
    """A YAML scalar: JSON's double-quoted strings are valid YAML."""
    return json.dumps(str(text), ensure_ascii=False)


def _size_category(n: int) -> str:
    for bound, name in ((1_000, "n<1K"), (10_000, "1K<n<10K"), (100_000, "10K<n<100K"),
                        (1_000_000, "100K<n<1M")):
        if n < bound:
            return name
    return "1M<n<10M"


def data_card(facts: dict) -> str:
    """README.md: the `datasets` YAML header, then the card in Markdown."""
    private = facts["private"]
    priv = facts["privacy"] or {}
    title = f"Synthetic {facts['source_dataset']}"
    if private:
        title += f" (differentially private, epsilon = {priv['epsilon']:.3g})"
    else:
        title = f"{NOT_PRIVATE}: {title} (no differential-privacy guarantee)"
    names = "\n".join(f"          '{c['label']}': {_q(c['folder'])}" for c in facts["classes"])
    tags = ["synthetic", "differential-privacy" if private else "not-private"]
    header = "\n".join([
        "---",
        f"pretty_name: {_q(title)}",
        "tags:", *[f"- {t}" for t in tags],
        "task_categories:", "- image-classification",
        "size_categories:", f"- {_size_category(facts['num_images'])}",
        "dataset_info:", "  features:", "  - name: image", "    dtype: image",
        "  - name: label", "    dtype:", "      class_label:", "        names:", names,
        "configs:", "- config_name: default", "  data_files:", f"  - split: {SPLIT}",
        f"    path: {_q(SPLIT + '/**')}",
        "---", ""])
    lines = [f"# {title}", ""]
    if not private:
        lines += [f"> **{facts['label']}.** These images carry no differential-privacy "
                  "guarantee and may reveal the training records. Do not publish them.", ""]
    lines += [f"{facts['num_images']:,} labelled {facts['image_size']}x{facts['image_size']} "
              f"{'greyscale' if facts['channels'] == 1 else 'RGB'} PNG images in "
              f"{len(facts['classes'])} classes, generated by {facts['generator']} from a model "
              f"trained on the private data set `{facts['source_dataset']}`.", "",
              "## Method", "", facts["method"], "", "## Privacy", ""]
    if priv:
        eps = priv.get("epsilon")
        lines += [f"- epsilon: {'none (NOT PRIVATE)' if eps is None else f'{eps:.4f}'}"
                  + (f" (target {priv['target_epsilon']:g})"
                     if priv.get("target_epsilon") is not None else ""),
                  f"- delta: {priv['delta']:g}",
                  f"- accountant: {priv['accountant']}", "",
                  "| stage | noise multiplier | sampling rate | steps | clip norm | "
                  "epsilon of the stage alone |", "|---|---|---|---|---|---|"]
        for e in priv["entries"]:
            alone = e.get("epsilon_alone")
            lines.append(f"| {e.get('stage')} | {e.get('noise_multiplier', 0):.4g} | "
                         f"{e.get('sample_rate', 0):.4g} | {e.get('steps')} | "
                         f"{e.get('clip_norm', 0):g} | "
                         f"{'-' if alone is None else f'{alone:.4f}'} |")
        lines += ["", "The guarantee is record-level: it bounds what the images reveal about "
                  "any one training record. Public by assumption and not protected: the list "
                  "of classes, the number of training records and the image size. "
                  "`privacy.json` is the run's full privacy ledger.", ""]
    else:
        lines += ["No privacy ledger: no guarantee is claimed.", ""]
    lines += ["## Contents", "", "| label | folder | class | images |", "|---|---|---|---|"]
    lines += [f"| {c['label']} | `{c['folder']}` | {c['name'].replace('|', '&#124;')} | "
              f"{c['count']:,} |"
              for c in facts["classes"]]
    lines.append("")
    if facts["sampling"]:
        lines += ["Sampling: " + ", ".join(f"{k} {v}" for k, v in facts["sampling"].items()
                                            if v is not None) + ". Image `i` is row `i` of "
                  "the synthetic npz.", ""]
    lines += ["## Metrics", ""]
    lines += _metric_lines(facts["metrics"])
    dates = facts["dates"]
    lines += ["## Dates", "", f"- trained: {dates['trained'] or 'unknown'}",
              f"- exported: {dates['exported']}", "", "## Loading", "", "```python",
              "from datasets import load_dataset",
              'ds = load_dataset("imagefolder", data_dir="THIS_FOLDER")  # image, label',
              "```", ""]
    return header + "\n".join(lines)


def _metric_lines(m: dict | None) -> list[str]:
    if not m:
        return ["Not evaluated (no eval.json of exactly these images).", ""]
    fid = ("FID against its real test split" if m.get("fid") is not None else
           "no FID (only an FID against the real test split is published; one against the "
           "private training split stays with the data holder)")
    out = [f"Computed by `dplatent evaluate` against the real data set `{m.get('dataset')}`: "
           f"classifiers trained on these images and tested once on its real test split; {fid}. "
           "These numbers come from real data and carry no privacy guarantee of their own.", ""]
    for kind, name in (("cnn", "CNN"), ("mlp", "MLP"), ("logreg", "logistic regression")):
        if f"{kind}_acc" in m:
            out.append(f"- {name} accuracy on the real test split: {100 * m[f'{kind}_acc']:.2f} % "
                       f"(± {100 * m.get(f'{kind}_acc_std', 0):.2f}, "
                       f"{seeds_label(m)})")
    if m.get("fid") is not None:
        out.append(f"- FID: {m['fid']:.2f} ({m.get('fid_samples')} synthetic vs "
                   f"{m.get('fid_reference_samples')} real images, {m.get('fid_reference')})"
                   + (f"; {m['fid_warning']}" if m.get("fid_warning") else ""))
    return out + [""]
