#!/usr/bin/env python3
"""The markdown table of scripts/gateway-bench.sh: for each connection count
and path, the medians over the rounds of TTFT p50/p99, what each adds over
the direct path of the same round, inter-token gap p50/p99, tokens/s and the
proxy's CPU per streamed token and the kernel's share of it; then the
issue 13 ratios, cnse-dp's HTTP front and binary protocol against nginx and
HAProxy (added TTFT p99 and CPU per token; the target is <= 0.5), with the
no-code bound of the CPU ratio: cnse-dp's kernel time alone per token over
the peer's whole CPU per token, the lowest ratio a gateway with no code of
its own on cnse-dp's kernel path would reach.

    python3 scripts/gateway-table.py bench-results/gateway/gateway.csv
"""
import csv
import statistics
import sys
from collections import defaultdict

PEERS = ["direct", "nginx", "haproxy"]


def us(v):
    if v != v:  # NaN
        return "-"
    if abs(v) < 1000:
        return f"{v:+.0f} µs" if v < 0 else f"{v:.0f} µs"
    return f"{v / 1000:.2f} ms"


def main(path):
    rows = list(csv.DictReader(open(path)))
    # The peers, then cnse-dp's paths in the order the run first took them.
    mine = list(dict.fromkeys(r["path"] for r in rows if r["path"].startswith("cnse")))
    paths = PEERS + mine
    by = defaultdict(list)  # (conns, path) -> rows
    direct = {}  # (round, conns) -> row
    for r in rows:
        by[(int(r["connections"]), r["path"])].append(r)
        if r["path"] == "direct":
            direct[(r["round"], int(r["connections"]))] = r

    def med(rs, f):
        vals = [v for v in (f(r) for r in rs) if v == v]
        return statistics.median(vals) if vals else float("nan")

    def added(q):
        def f(r):
            d = direct.get((r["round"], int(r["connections"])))
            return float(r[q]) - float(d[q]) if d else float("nan")
        return f

    def per_token(r):
        t = int(r["tokens"])
        return int(r["proxy_cpu_ns"]) / t / 1000 if t and int(r["proxy_cpu_ns"]) else float("nan")

    def kernel(r):
        # Runs recorded before the column existed have no kernel share.
        total, sys = int(r["proxy_cpu_ticks"] or 0), r.get("proxy_sys_ticks")
        return int(sys) / total if total and sys not in (None, "") else float("nan")

    print("| conns | path | TTFT p50 | TTFT p99 | added p50 | added p99 | gap p50 | gap p99 | tokens/s | CPU µs/token | kernel | problems |")
    print("|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|")
    summary = {}
    for c in sorted({k[0] for k in by}):
        for p in paths:
            rs = by.get((c, p))
            if not rs:
                continue
            a50, a99 = med(rs, added("ttft_p50_us")), med(rs, added("ttft_p99_us"))
            cpu = med(rs, per_token)
            k = med(rs, kernel)
            summary[(c, p)] = (a99, cpu, k)
            probs = "; ".join(sorted({r["problems"] for r in rs if r["problems"]})) or "none"
            print(
                f"| {c} | {p} | {us(med(rs, lambda r: float(r['ttft_p50_us'])))} | "
                f"{us(med(rs, lambda r: float(r['ttft_p99_us'])))} | "
                f"{'' if p == 'direct' else us(a50)} | {'' if p == 'direct' else us(a99)} | "
                f"{us(med(rs, lambda r: float(r['gap_p50_us'])))} | {us(med(rs, lambda r: float(r['gap_p99_us'])))} | "
                f"{med(rs, lambda r: float(r['tokens_per_s'])):,.0f} | "
                f"{'' if cpu != cpu else f'{cpu:.2f}'} | {'' if k != k else f'{100 * k:.0f} %'} | {probs} |"
            )
    print()
    print("Ratios cnse-dp / peer (issue 13 target: <= 0.5 for both). Added TTFT p99")
    print("ratios are only meaningful where the peer adds more than the histogram's")
    print("resolution (3 significant digits: 16 µs at 20 ms).")
    print()
    print("| conns | cnse-dp path | peer | added TTFT p99 (cnse / peer) | CPU per token (cnse / peer) | no-code bound |")
    print("|---:|---|---|---:|---:|---:|")
    for c in sorted({k[0] for k in summary}):
        for m in mine:
            for peer in ["nginx", "haproxy"]:
                if (c, m) not in summary or (c, peer) not in summary:
                    continue
                (ma, mc, mk), (pa, pc, _) = summary[(c, m)], summary[(c, peer)]
                # A ratio needs both above zero: an added p99 at or below
                # zero is within the run-to-run noise of the direct path.
                lat = f"{us(ma)} / {us(pa)}" + (f" = {ma / pa:.2f}" if pa > 0 and ma > 0 else " (no ratio: one is <= 0)")
                cpu = f"{mc:.2f} / {pc:.2f} µs" + (f" = {mc / pc:.2f}" if pc > 0 else "")
                bound = f"{mc * mk / pc:.2f}" if pc > 0 and mk == mk else "-"
                print(f"| {c} | {m} | {peer} | {lat} | {cpu} | {bound} |")


if __name__ == "__main__":
    main(sys.argv[1])
