"""Joins `recap bench --json` and `grpo_peers.py --json` into one markdown table (times, extra
memory, ratio to ours).

    python3 benches/peers/merge.py recap.json peers.json > table.md
"""
import json
import sys


def fmt_us(x):
    if x is None:
        return "-"
    return f"{x / 1e3:.2f} ms" if x >= 1000 else f"{x:.1f} us"


def fmt_mem(b):
    if not b:
        return "-"
    return f"{b / 2**20:.0f} MiB" if b >= 2**20 else f"{b / 1024:.0f} KiB"


def main():
    ours = json.load(open(sys.argv[1]))
    peers = json.load(open(sys.argv[2])) if len(sys.argv) > 2 else {"records": []}
    print(f"Device: {ours['device']} ({ours['backend']}); copy baseline {ours['copy_gb_s']:.0f} GB/s; "
          f"recap-kernels {ours['crate_version']}, {ours['nvcc']}; torch {peers.get('torch', '-')}")
    print()
    print("| op | case | implementation | median | min | extra memory | ours faster by |")
    print("|---|---|---|---|---|---|---|")
    by_case = {}
    for r in peers["records"]:
        by_case.setdefault((r["op"], r["case"]), []).append(r)
    for r in ours["records"]:
        if r["op"] == "copy":
            continue
        print(f"| {r['op']} | {r['case']} | recap-kernels | {fmt_us(r['median_us'])} | {fmt_us(r['min_us'])} "
              f"| {fmt_mem(r['extra_bytes'])} | |")
        # the peers' rows go under our record of the same work: logits fwd + bwd ("both"), the
        # fused-linear loss with its default chunks
        key_case = r["case"]
        if r["op"] == "logits":
            if not key_case.endswith(" both"):
                continue
            key_case = key_case[: -len(" both")]
        elif r["op"] == "fused_linear":
            if " fused, default chunks" not in key_case:
                continue
            key_case = key_case.split(" fused, default chunks")[0]
        for p in by_case.get((r["op"], key_case), []):
            ratio = (f"{p['median_us'] / r['median_us']:.1f}x" if p.get("median_us") and r["median_us"] else
                     p.get("note", "-"))
            print(f"| {p['op']} | {p['case']} | {p['impl']} | {fmt_us(p.get('median_us'))} | "
                  f"{fmt_us(p.get('min_us'))} | {fmt_mem(p.get('extra_bytes'))} | {ratio} |")


if __name__ == "__main__":
    main()
