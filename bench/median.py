#!/usr/bin/env python3
"""Median of several runs of bench/swarm.sh with the same parameters.

    bench/median.py bench/results/run-a/results.json bench/results/run-b/results.json ...

Prints a markdown table: per mode, the median over the runs of p50, max, max/T*, bay/direct
(slowest node, against the same run's direct mode) and upstream bytes / S at the registry's
interface, each followed by the individual values. Refuses runs whose parameters differ.
"""

import json
import statistics
import sys

MODES = ("direct", "cold", "warm")
SAME = ("nodes", "size_payload", "layers", "bandwidth_bps", "client")


def load(path):
    with open(path) as f:
        return json.load(f)


def fmt(values, spec):
    med = statistics.median(values)
    return f"**{med:{spec}}** ({', '.join(format(v, spec) for v in values)})"


def main(paths):
    if len(paths) < 2:
        sys.exit("usage: bench/median.py RESULTS_JSON RESULTS_JSON [...]")
    runs = [load(p) for p in paths]
    for r in runs:
        r["params"].setdefault("client", "skopeo")  # runs before --client existed
    first = runs[0]["params"]
    for p, r in zip(paths, runs):
        diff = {k: (first.get(k), r["params"].get(k)) for k in SAME
                if first.get(k) != r["params"].get(k)}
        if diff:
            sys.exit(f"{p}: parameters differ from {paths[0]}: {diff}")
    S = runs[0]["image"]["S"]
    print(f"N={first['nodes']}, S={first['size_payload'] / 2**20:.0f} MiB, "
          f"B={first['bandwidth_bps'] / 1e6:.0f} Mbit/s, client {first['client']}, "
          f"{len(runs)} runs; median **bold**, then each run")
    print()
    print("| mode | p50 s | max s | max/T* | bay/direct | upstream/S | fallbacks |")
    print("|---|---|---|---|---|---|---|")
    for mode in MODES:
        ms = [r["modes"].get(mode) for r in runs]
        if any(m is None or not m.get("max_s") for m in ms):
            continue
        bd = []
        for r, m in zip(runs, ms):
            d = r["modes"].get("direct", {}).get("max_s")
            if d and mode != "direct":
                bd.append(m["max_s"] / d)
        fb = [m.get("proxy_totals", {}).get("fallbacks") for m in ms]
        print(f"| {mode} | {fmt([m['p50_s'] for m in ms], '.1f')} "
              f"| {fmt([m['max_s'] for m in ms], '.1f')} "
              f"| {fmt([m['max_over_tstar'] for m in ms], '.2f')} "
              f"| {fmt(bd, '.3f') if len(bd) == len(ms) else '–'} "
              f"| {fmt([m['upstream_iface_bytes'] / S for m in ms], '.3f')} "
              f"| {'–' if None in fb else ', '.join(map(str, fb))} |")


if __name__ == "__main__":
    main(sys.argv[1:])
