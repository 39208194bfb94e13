#!/usr/bin/python3
"""Pictures of expert load balance (docs/balance.md), with Debian's matplotlib.

  scripts/plot-balance.py replay.csv [--metrics run.metrics.csv ...] [--layer 0] [--policy moka] [--out docs/img]

From a moka-replay CSV (replay.csv_file):
  balance-ratio.png       busiest / mean rank load over the run, one line per
                          policy (mean over the replayed layers)
  expert-load.png         heatmap of each expert's share of the load over the
                          iterations (one layer)
  expert-placement.png    where each expert lived over the iterations under
                          one policy (one layer; a replicated expert shows on
                          several ranks)
From moka-train metrics CSVs (io.metrics_file), with --metrics:
  training-balance.png    busiest / mean rank load per step, one line per run
"""
import argparse
import csv
import os
import sys
from collections import defaultdict

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def read_replay(path):
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    need = {"policy", "iteration", "layer", "imbalance", "placement", "loads"}
    if not rows or not need.issubset(rows[0].keys()):
        sys.exit(f"plot-balance: {path} is not a moka-replay CSV (needs the columns {sorted(need)})")
    return rows


def select(rows, layer, policy):
    """The rows of one layer under one policy, by iteration."""
    sel = sorted((r for r in rows if int(r["layer"]) == layer and r["policy"] == policy),
                 key=lambda r: int(r["iteration"]))
    if not sel:
        sys.exit(f"plot-balance: no rows for layer {layer} and policy {policy}")
    return sel


def finish(fig, ax, xlabel, ylabel, title, path):
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def ratio_plot(rows, out):
    by = defaultdict(lambda: defaultdict(list))
    for r in rows:
        by[r["policy"]][int(r["iteration"])].append(float(r["imbalance"]))
    fig, ax = plt.subplots(figsize=(8, 4))
    for policy, its in by.items():
        xs = sorted(its)
        ys = [sum(its[i]) / len(its[i]) for i in xs]
        ax.plot(xs, ys, label=f"{policy} (mean {sum(ys) / len(ys):.2f})", lw=1)
    ax.axhline(1.0, color="grey", lw=0.5)
    ax.legend()
    finish(fig, ax, "trace iteration", "busiest / mean rank load", "Rank balance per policy (mean over layers)",
           os.path.join(out, "balance-ratio.png"))


def load_heatmap(rows, layer, policy, out):
    sel = select(rows, layer, policy)
    loads = [[float(v) for v in r["loads"].split()] for r in sel]
    share = [[v / max(sum(l), 1.0) * len(l) for v in l] for l in loads]  # relative to the mean expert
    E = len(share[0])
    fig, ax = plt.subplots(figsize=(8, 4))
    im = ax.imshow(list(map(list, zip(*share))), aspect="auto", origin="lower", cmap="viridis",
                   extent=[int(sel[0]["iteration"]), int(sel[-1]["iteration"]) + 1, -0.5, E - 0.5])
    fig.colorbar(im, ax=ax, label="load / mean expert load")
    finish(fig, ax, "trace iteration", "expert", f"Expert load, layer {layer}", os.path.join(out, "expert-load.png"))


def placement_plot(rows, layer, policy, out):
    sel = select(rows, layer, policy)
    xs, ys, cs = [], [], []
    ranks = len(sel[0]["placement"].split("|"))
    for r in sel:
        for rank, experts in enumerate(r["placement"].split("|")):
            for e in experts.split():
                xs.append(int(r["iteration"]))
                ys.append(int(e) + 0.8 * (rank / max(ranks - 1, 1) - 0.5))  # replicas side by side
                cs.append(rank)
    fig, ax = plt.subplots(figsize=(8, 4))
    sc = ax.scatter(xs, ys, c=cs, s=2, cmap="tab10" if max(cs, default=0) < 10 else "tab20", marker="s")
    fig.colorbar(sc, ax=ax, label="rank")
    finish(fig, ax, "trace iteration", "expert", f"Where each expert lives: {policy}, layer {layer} (replicas: several ranks)",
           os.path.join(out, "expert-placement.png"))


def training_plot(paths, out):
    fig, ax = plt.subplots(figsize=(8, 4))
    for p in paths:
        with open(p, newline="") as f:
            rows = list(csv.DictReader(f))
        if not rows or "rank_imbalance" not in rows[0]:
            sys.exit(f"plot-balance: {p} is not a moka-train metrics CSV with rank_imbalance")
        ax.plot([int(r["step"]) for r in rows], [float(r["rank_imbalance"]) for r in rows],
                label=os.path.basename(p), lw=1)
    ax.legend()
    finish(fig, ax, "step", "busiest / mean rank load", "Rank balance during training (worst MoE layer)",
           os.path.join(out, "training-balance.png"))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("replay_csv")
    ap.add_argument("--metrics", nargs="*", default=[])
    ap.add_argument("--layer", type=int, default=0)
    ap.add_argument("--policy", default="moka")
    ap.add_argument("--out", default=".")
    a = ap.parse_args()
    os.makedirs(a.out, exist_ok=True)
    rows = read_replay(a.replay_csv)
    ratio_plot(rows, a.out)
    load_heatmap(rows, a.layer, a.policy, a.out)
    placement_plot(rows, a.layer, a.policy, a.out)
    if a.metrics:
        training_plot(a.metrics, a.out)
    print(f"plot-balance: pictures in {a.out}")


if __name__ == "__main__":
    main()
