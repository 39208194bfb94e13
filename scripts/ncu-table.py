#!/usr/bin/env python3
"""Per-kernel table of an Nsight Compute CSV (ncu --csv --metrics ...), as
docs/performance.md's "where the step goes" tables are made.

    scripts/ncu-table.py run.csv [--label A]

Reads the rows ncu writes for each kernel launch (ID, Kernel Name, Metric
Name, Metric Value; lines that are not CSV are skipped), names each kernel
by the MoKA function that launched it (or the cuBLAS kernel's name), sorts
it into a part of the layer step (expert GEMMs, the activation pair, the
gate's weight-gradient SGEMM, the other passes) and prints one line per
launch in launch order, then the time of each part. Metrics used when
present: gpu__time_duration.sum (ns), dram__throughput.avg.pct_of_peak_sustained_elapsed,
launch__registers_per_thread, sm__warps_active.avg.pct_of_peak_sustained_active.
"""
import argparse
import csv
import re
import sys

TIME = "gpu__time_duration.sum"
DRAM = "dram__throughput.avg.pct_of_peak_sustained_elapsed"
REGS = "launch__registers_per_thread"
WARPS = "sm__warps_active.avg.pct_of_peak_sustained_active"


def number(text):
    try:
        return float(text.replace(",", ""))
    except ValueError:
        return None


def short_name(name):
    """The MoKA function behind a Kokkos kernel, or the library kernel's name."""
    m = re.search(r"Parallel(?:For|Reduce|Scan)<\s*(?:void|long|int|double|float)?\s*(?:moka::)?(?:impl::)?(\w+)", name)
    if m and m.group(1) not in ("Kokkos", "Impl"):
        inner = m.group(1)
        # Launch helpers: name the kernel by what they run.
        if inner.startswith("for_row_blocks"):
            act = re.search(r"(activation\w*)", name)
            return act.group(1) if act else inner
        return inner
    m = re.search(r"(?:Kokkos::)?Impl::(View\w+|fill_random\w*)|\b(init_lock\w*|query_cuda\w*)", name)
    if m:
        return "kokkos " + (m.group(1) or m.group(2))
    bare = re.sub(r"^void\s+", "", name.strip())
    m = re.match(r"[\w:]*?(\w+)\s*[<(]", bare)
    return m.group(1) if m else bare[:60]


def part(short):
    if "f32f32_f32f32" in short or "sgemm" in short or "splitKreduce" in short:
        return "gate weight gradient (fp32 GEMM)"
    if short.startswith(("nvjet", "cutlass")) or "xmma" in short or "gemm" in short:
        return "expert GEMMs"
    if "activation" in short:
        return "activation pair"
    if short.startswith("kokkos "):
        return "allocation and initialisation"
    return "other passes"


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("csv")
    ap.add_argument("--label", default="")
    a = ap.parse_args()
    rows = [line for line in open(a.csv, errors="replace") if line.startswith('"')]
    if not rows:
        sys.exit(f"ncu-table.py: no kernel rows in {a.csv} (did ncu profile anything? see its stderr)")
    kernels = {}
    for r in csv.DictReader(rows):
        key = (int(r["ID"]), r["Kernel Name"])
        kernels.setdefault(key, {})[r["Metric Name"]] = r["Metric Value"]
    parts = {}
    total = 0.0
    print(f"{a.label + ': ' if a.label else ''}{len(kernels)} kernel launches")
    print(f"{'id':>5}  {'kernel':40s} {'us':>8} {'DRAM %':>7} {'regs':>5} {'warps %':>8}  part")
    for (i, name), m in sorted(kernels.items()):
        s = short_name(name)
        us = (number(m.get(TIME, "")) or 0.0) / 1000.0
        p = part(s)
        parts[p] = parts.get(p, 0.0) + us
        total += us
        dram = number(m.get(DRAM, ""))
        regs = m.get(REGS, "")
        warps = number(m.get(WARPS, ""))
        print(f"{i:5d}  {s[:40]:40s} {us:8.1f} {'' if dram is None else f'{dram:.1f}':>7} {regs:>5} "
              f"{'' if warps is None else f'{warps:.1f}':>8}  {p}")
    print(f"{'total':>5}  {'':40s} {total:8.1f} us")
    for p, us in sorted(parts.items(), key=lambda kv: -kv[1]):
        print(f"       {p:40s} {us:8.1f} us ({100.0 * us / total if total else 0:.0f}%)")


if __name__ == "__main__":
    main()
