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
    ax.set_xlabel("trace iteration")
    ax.set_ylabel("busiest / mean rank load")
    ax.set_title("Rank balance per policy (mean over layers)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(os.path.join(out, "balance-ratio.png"), dpi=120)
    plt.close(fig)


def load_heatmap(rows, layer, policy, out):
    sel = [r for r in rows if int(r["layer"]) == layer and r["policy"] == policy]
    sel.sort(key=lambda r: int(r["iteration"]))
    if not sel:
        sys.exit(f"plot-balance: no rows for layer {layer} and policy {policy}")
    loads = [[float(v) for v in r["loads"].split()] for r in sel]
    share = [[v / max(sum(l), 1.0) * len(l) for v in l] for l in loads]  # relative to the mean expert
    E = len(share[0])
    fig, ax = plt.subplots(figsize=(8, 4))
    im = ax.imshow(list(map(list, zip(*share))), aspect="auto", origin="lower", cmap="viridis",
                   extent=[int(sel[0]["iteration"]), int(sel[-1]["iteration"]) + 1, -0.5, E - 0.5])
    fig.colorbar(im, ax=ax, label="load / mean expert load")
    ax.set_xlabel("trace iteration")
    ax.set_ylabel("expert")
    ax.set_title(f"Expert load, layer {layer}")
    fig.tight_layout()
    fig.savefig(os.path.join(out, "expert-load.png"), dpi=120)
    plt.close(fig)


def placement_plot(rows, layer, policy, out):
    sel = [r for r in rows if int(r["layer"]) == layer and r["policy"] == policy]
    sel.sort(key=lambda r: int(r["iteration"]))
    xs, ys, cs = [], [], []
    ranks = len(sel[0]["placement"].split("|")) if sel else 1
    for r in sel:
        for rank, experts in enumerate(r["placement"].split("|")):
            for e in experts.split():
                xs.append(int(r["iteration"]))
                ys.append(int(e) + 0.8 * (rank / max(ranks - 1, 1) - 0.5))  # replicas side by side
                cs.append(rank)
    fig, ax = plt.subplots(figsize=(8, 4))
    sc = ax.scatter(xs, ys, c=cs, s=2, cmap="tab10" if max(cs, default=0) < 10 else "tab20", marker="s")
    fig.colorbar(sc, ax=ax, label="rank")
    ax.set_xlabel("trace iteration")
    ax.set_ylabel("expert")
    ax.set_title(f"Where each expert lives: {policy}, layer {layer} (replicas: several ranks)")
    fig.tight_layout()
    fig.savefig(os.path.join(out, "expert-placement.png"), dpi=120)
    plt.close(fig)


def training_plot(paths, out):
    fig, ax = plt.subplots(figsize=(8, 4))
    for p in paths:
        with open(p, newline="") as f:
            rows = list(csv.DictReader(f))
        if not rows or "rank_imbalance" not in rows[0]:
            sys.exit(f"plot-balance: {p} is not a moka-train metrics CSV with rank_imbalance")
        ax.plot([int(r["step"]) for r in rows], [float(r["rank_imbalance"]) for r in rows],
                label=os.path.basename(p), lw=1)
    ax.set_xlabel("step")
    ax.set_ylabel("busiest / mean rank load")
    ax.set_title("Rank balance during training (worst MoE layer)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(os.path.join(out, "training-balance.png"), dpi=120)
    plt.close(fig)


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
