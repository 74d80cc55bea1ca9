"""Peers of `recap bench` on the same GPU and the same shapes: verl's formulas in PyTorch (eager and
torch.compile) and Liger-Kernel's Triton GRPO loss when the package is importable.

    recap bench --device cuda --json recap.json          # ours (values to check against, and times)
    python3 benches/peers/grpo_peers.py --recap recap.json --json peers.json [--quick]
    python3 benches/peers/merge.py recap.json peers.json  # one markdown table

Each case is computed once and its value compared with ours (`value` in recap.json) before it is
timed: a case whose math differs is reported as a mismatch and not timed. Timing as recap bench:
CUDA events around forward + backward, the L2 cache flushed (a 256 MiB write) before each timed
run, median and min over the timed runs after warm-up; peak extra memory from
torch.cuda.max_memory_allocated beyond the inputs.

The math (verl core_algos.py): log-ratio clamp 20, clipped surrogate with dual-clip c = 3,
token-mean over the mask; K objectives each with their own advantage column, averaged with weight 1
(recap's (1/K) sum_k lambda_k agg_k). Logits: verl-style log_softmax(logits.float()).gather and the
entropy, forward and backward through autograd.
"""
import argparse
import json
import sys

import torch


def grpo_inputs(t, k, seq_len, dev):
    """The same inputs as recap bench (src/bench/mod.rs, inputs::grpo)."""
    i = torch.arange(t, device=dev, dtype=torch.int64)
    b = (t + seq_len - 1) // seq_len
    logp = -0.5 - ((i * 7919) % 1000).float() * 1e-3
    old = logp + ((i * 104729) % 200).float() * 1e-3 - 0.1
    j = torch.arange(b * k, device=dev, dtype=torch.int64)
    adv = (((j * 31) % 17).float() / 8.0 - 1.0).view(b, k)
    mask = ((i % seq_len) < (seq_len * 7 // 8)).float()
    seq = i // seq_len
    return logp, old, adv, mask, seq


def verl_multi_objective_loss(logp, old, adv_tok, mask, clip=0.2, clip_c=3.0):
    """(1/K) sum_k token-mean(verl vanilla policy loss with objective k's advantages)."""
    neg_kl = torch.clamp(logp - old, -20.0, 20.0)
    ratio = torch.exp(neg_kl).unsqueeze(-1)  # [T, 1]
    l1 = -adv_tok * ratio
    l2 = -adv_tok * torch.clamp(ratio, 1 - clip, 1 + clip)
    clipped = torch.maximum(l1, l2)
    l3 = -adv_tok * clip_c
    pg = torch.where(adv_tok < 0, torch.minimum(l3, clipped), clipped)  # [T, K]
    per_objective = (pg * mask.unsqueeze(-1)).sum(0) / mask.sum()
    return per_objective.mean()


def logits_loss(logits, labels):
    """verl: log_softmax(logits.float()).gather, plus the entropy; a scalar to back-propagate."""
    z = logits.float()
    logp = torch.log_softmax(z, dim=-1).gather(-1, labels.unsqueeze(-1)).squeeze(-1)
    entropy = torch.logsumexp(z, dim=-1) - (torch.softmax(z, dim=-1) * z).sum(-1)
    return logp, entropy


class Timer:
    def __init__(self, warm, runs):
        self.flush = torch.empty(256 << 20, dtype=torch.uint8, device="cuda")
        self.warm, self.runs = warm, runs

    def time(self, f):
        for _ in range(self.warm):
            f()
        times = []
        for _ in range(self.runs):
            self.flush.zero_()
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            f()
            b.record()
            b.synchronize()
            times.append(a.elapsed_time(b) * 1e3)
        times.sort()
        return times[len(times) // 2], times[0]


def close(a, b, rel=1e-4):
    return abs(a - b) <= 1e-6 + rel * abs(b)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--recap", help="recap bench --json output (values to check against)")
    ap.add_argument("--json", default="peers.json")
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    out = {"device": None, "torch": torch.__version__, "records": []}
    if not torch.cuda.is_available():
        print("grpo_peers: no CUDA device; nothing measured", file=sys.stderr)
        json.dump(out, open(args.json, "w"), indent=1)
        return
    dev = torch.device("cuda")
    out["device"] = torch.cuda.get_device_name(0)
    ours = {}
    if args.recap:
        for r in json.load(open(args.recap))["records"]:
            ours[(r["op"], r["case"])] = r.get("value")
    timer = Timer(1, 3) if args.quick else Timer(3, 20)
    try:
        import liger_kernel.transformers.grpo_loss as liger_grpo
    except Exception as e:  # the package is optional
        liger_grpo = None
        print(f"grpo_peers: Liger-Kernel not importable ({e}); its cases are skipped", file=sys.stderr)

    def emit(op, case, impl, tm, value, extra, note=""):
        rec = {"op": op, "case": case, "impl": impl, "median_us": tm[0] if tm else None,
               "min_us": tm[1] if tm else None, "value": value, "extra_bytes": extra, "note": note}
        print(f"{op} {case} {impl}: {rec['median_us']} us {note}", file=sys.stderr)
        out["records"].append(rec)

    def measure(op, case, impl, fn, inputs_bytes):
        """fn() -> (loss tensor to backward, value); checks the value, then times fwd + bwd."""
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        loss, value = fn()
        loss.backward()
        torch.cuda.synchronize()
        extra = torch.cuda.max_memory_allocated() - base
        want = ours.get((op, case + (" forward" if op == "logits" else "")))
        if want is not None and not close(value, want):
            emit(op, case, impl, None, value, extra, f"MISMATCH: ours {want}, theirs {value}; not timed")
            return

        def step():
            l, _ = fn()
            l.backward()

        emit(op, case, impl, timer.time(step), value, extra)

    sizes = [16384, 262144] if args.quick else [16384, 262144, 4194304, 16777216]
    ks = [3] if args.quick else [1, 3, 8]
    compiled = torch.compile(verl_multi_objective_loss)
    for t in sizes:
        for k in ks:
            case = f"T={t} K={k}"
            logp, old, adv, mask, seq = grpo_inputs(t, k, min(4096, t), dev)
            adv_tok = adv[seq]  # [T, K]: the per-sequence advantages broadcast to tokens
            for impl, f in [("torch eager", verl_multi_objective_loss), ("torch.compile", compiled)]:
                x = logp.clone().requires_grad_()

                def fn(f=f, x=x):
                    x.grad = None
                    l = f(x, old, adv_tok, mask)
                    return l, l.item()

                measure("fused_loss", case, impl, fn, 0)
    shapes = [(1024, 32768)] if args.quick else [(1024, 32768), (4096, 32768), (16384, 32768),
                                                 (1024, 151936), (4096, 151936), (16384, 151936)]
    for t, v in shapes:
        for dtype, name in [(torch.bfloat16, "bf16"), (torch.float32, "f32")]:
            if name == "f32" and t * v > 4096 * 151936:
                continue
            case = f"T={t} V={v} {name}"
            i = torch.arange(t * v, device=dev, dtype=torch.int64)
            z = (((i * 2654435761) % 1000).float() * 0.01 - 5.0).to(dtype).view(t, v)
            labels = (torch.arange(t, device=dev) * 7919) % v
            zz = z.clone().requires_grad_()

            def fn(zz=zz):
                zz.grad = None
                logp, ent = logits_loss(zz, labels)
                g = ((torch.arange(t, device=dev) % 7).float() - 3.0) * 1e-3
                return (logp * g).sum() + (ent * g).sum(), logp.double().sum().item()

            measure("logits", case, "torch eager (verl)", fn, 0)
            if liger_grpo is not None and name == "bf16":
                # Liger's Triton GRPO loss takes [B, L + 1, V] logits (the last position unused)
                try:
                    bsz = 4
                    ln = t // bsz
                    zl = torch.cat([z.view(bsz, ln, v), z.view(bsz, ln, v)[:, :1]], dim=1).clone().requires_grad_()
                    ids = labels.view(bsz, ln)
                    old_l = torch.full((bsz, ln), -12.0, device=dev)
                    adv_l = torch.linspace(-1, 1, bsz, device=dev)

                    def lfn():
                        zl.grad = None
                        res = liger_grpo.triton_grpo_loss(zl, old_l, None, ids, adv_l, None, 1.0, 0.0, 0.2, 0.2, True)
                        loss = res[0] if isinstance(res, (tuple, list)) else res
                        loss = loss.sum() if loss.dim() else loss
                        return loss, float("nan")

                    torch.cuda.synchronize()
                    base = torch.cuda.memory_allocated()
                    torch.cuda.reset_peak_memory_stats()
                    l, _ = lfn()
                    l.backward()
                    torch.cuda.synchronize()
                    extra = torch.cuda.max_memory_allocated() - base

                    def lstep():
                        l, _ = lfn()
                        l.backward()

                    emit("logits", case, "Liger triton_grpo_loss", timer.time(lstep), None, extra,
                         "GRPO loss from logits (fwd + bwd), value not comparable")
                except Exception as e:
                    emit("logits", case, "Liger triton_grpo_loss", None, None, None, f"failed: {e}")
    json.dump(out, open(args.json, "w"), indent=1)
    print(f"grpo_peers: wrote {args.json}", file=sys.stderr)


if __name__ == "__main__":
    main()
