"""The autoencoder's floor without privacy: how well a shape of autoencoder can reconstruct.

Trains one autoencoder shape with plain Adam (no clipping, no noise, no privacy) on the real
training split, with the same per-pixel cross-entropy and latent noise as stage 1, then
encodes and decodes a fixed subset of training images and scores the reconstructions by FID
against the training set's statistics, at each decoder sharpness given. No DP-trained
autoencoder of that shape can reconstruct better than this with the same loss, so it bounds
the FID that any stage 2 on top of it can reach. A diagnostic on real data: nothing of it
enters a run, and nothing it learns is released.

    python benchmarks/autoencoder_floor.py --label full --channels 16 32 --latent-channels 2

Writes benchmarks/autoencoder_floor.json (one record per data set and label; a pair with a
record is skipped unless --force) and the floor table of BENCHMARKS.md (between markers).
"""

from __future__ import annotations

import argparse
import datetime as dt
import sys
import time
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

import records
from dplatent import data
from dplatent.config import AutoencoderConfig, RunConfig
from dplatent.eval.evaluate import evaluate
from dplatent.models.autoencoder import Autoencoder, reconstruction_loss
from dplatent.runtime import peak_rss_mb
from dplatent.sample import to_uint8_images
from dplatent.train.stages import build_autoencoder

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "autoencoder_floor.json"


def train(ae: Autoencoder, x: torch.Tensor, *, epochs: int, batch_size: int, lr: float,
          latent_noise: float, seed: int, progress: bool) -> float:
    """Adam on shuffled mini-batches; returns the last epoch's mean loss."""
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed + 1)
    opt = torch.optim.Adam(ae.parameters(), lr=lr)
    ae.train()
    for epoch in range(epochs):
        total, perm = 0.0, torch.randperm(len(x))
        batches = range(0, len(x), batch_size)
        for i in tqdm(batches, desc=f"epoch {epoch + 1}/{epochs}", disable=not progress):
            xb = x[perm[i:i + batch_size]]
            loss = reconstruction_loss(ae, xb, latent_noise, gen).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            total += loss.item() * len(xb)
    return total / len(x)


def reconstruct(ae: Autoencoder, x: torch.Tensor, sharpness: float) -> np.ndarray:
    """uint8 images [N, H, W] (one channel) or [N, H, W, C]."""
    ae.eval()
    with torch.no_grad():
        return to_uint8_images(ae.decode(ae.encode(x), sharpness))


def table(results: list[dict]) -> str:
    rows = ["| data set | label | channels / latent / decoder blocks | parameters | latent noise "
            "| steps (epochs × batch) | final loss | reconstruction FID by sharpness (n) "
            "| train (s) | peak RSS (MB) | date |",
            "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        fids = ", ".join(f"{s}: {f:.1f}" for s, f in r["fid"].items())
        rows.append(f"| {r['dataset']} | {r['label']} | {r['channels']} / {r['latent_channels']}"
                    f" ({r['latent_dim']}-d) / {r['decoder_blocks']} | {r['parameters']:,} | "
                    f"{r['latent_noise']:g} | {r['steps']:,} ({r['epochs']} × "
                    f"{r['batch_size']}) | {r['loss']:.4f} | {fids} ({r['fid_samples']}) | "
                    f"{r['train_s']:.0f} | {r['peak_rss_mb']} | {r['date']} |")
    cmds = list(dict.fromkeys(r["command"] for r in results))  # one command, several records
    return "\n".join(rows) + "\n\nCommands: " + "; ".join(f"`{c}`" for c in cmds) + "\n"


def run_one(args, dataset: str) -> dict:
    shape = AutoencoderConfig(channels=tuple(args.channels), latent_channels=args.latent_channels,
                              decoder_blocks=args.decoder_blocks, upsample=args.upsample,
                              latent_noise=args.latent_noise)
    real = data.load(dataset, "train", args.data_dir)
    x = torch.from_numpy(real.to_float())
    ae = build_autoencoder(RunConfig(autoencoder=shape), real.channels, real.image_size)
    t = time.time()
    loss = train(ae, x, epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
                 latent_noise=args.latent_noise, seed=args.seed, progress=not args.no_progress)
    train_s = time.time() - t
    idx = np.random.default_rng(args.seed).choice(len(real), args.fid_samples, replace=False)
    fids = {}
    for s in args.sharpness:
        recon = data.LabelledImages(reconstruct(ae, x[idx], s), real.y[idx], real.num_classes,
                                    f"{dataset} reconstructions")
        res = evaluate(recon, dataset, args.data_dir, metrics=["fid"],
                       fid_samples=args.fid_samples, threads=args.threads,
                       progress=not args.no_progress)
        fids[f"{s:g}"] = res["fid"]
        print(f"{dataset} {args.label} sharpness {s:g}: FID {res['fid']:.2f}", flush=True)
    return {
        "dataset": dataset, "label": args.label, "channels": list(shape.channels),
        "latent_channels": shape.latent_channels, "decoder_blocks": shape.decoder_blocks,
        "latent_dim": int(np.prod(ae.latent_shape)),
        "parameters": sum(p.numel() for p in ae.parameters()),
        "latent_noise": shape.latent_noise, "epochs": args.epochs, "batch_size": args.batch_size,
        "steps": args.epochs * -(-len(x) // args.batch_size), "lr": args.lr, "loss": loss,
        "fid": fids, "fid_samples": args.fid_samples, "train_s": train_s,
        "peak_rss_mb": peak_rss_mb(),
        "command": args.command,
        "machine": records.machine(), "date": dt.date.today().isoformat(),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--label", help="name of this shape in the table (required unless "
                   "--markdown-only)")
    p.add_argument("--datasets", nargs="+", default=["mnist"])
    p.add_argument("--data-dir", default=None, help="default: $DPLATENT_DATA, else download")
    p.add_argument("--channels", type=int, nargs="+", default=[16, 32])
    p.add_argument("--latent-channels", type=int, default=2)
    p.add_argument("--decoder-blocks", type=int, default=0)
    p.add_argument("--upsample", default="nearest")
    p.add_argument("--latent-noise", type=float, default=0.3)
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--sharpness", type=float, nargs="+", default=[1.0, 1.5])
    p.add_argument("--fid-samples", type=int, default=2000)
    p.add_argument("--seed", type=int, default=0)
    records.add_run_options(p)
    args = p.parse_args()
    if args.label is None and not args.markdown_only:
        p.error("--label is required (the name of this shape in the table)")
    args.command = records.shown_command(Path(__file__).name, sys.argv[1:],
                                         drop=("--force", "--no-progress"))
    results = records.load(RESULTS)
    if not args.markdown_only:
        for dataset in args.datasets:
            if not args.force and any(r["dataset"] == dataset and r["label"] == args.label
                                      for r in results):
                print(f"{dataset} {args.label}: already measured (use --force to redo)")
                continue
            record = run_one(args, dataset)
            results = [r for r in results
                       if (r["dataset"], r["label"]) != (dataset, args.label)] + [record]
            records.save(RESULTS, results)
    records.write_section("autoencoder_floor", table(results),
                          "The autoencoder's floor without privacy "
                          "(benchmarks/autoencoder_floor.py)")


if __name__ == "__main__":
    main()
