"""Peers of `recap bench` on the same GPU and the same shapes: verl's formulas in PyTorch (eager and
torch.compile), Liger-Kernel's Triton GRPO loss when the package is importable, and our own fused
loss called from PyTorch (`recap_kernels`, when installed), timed as the peers are, so the binding's
overhead shows beside the Rust call of `recap bench`.

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
entropy, forward and backward through autograd. Fused-linear: the unfused PyTorch path (bf16
hidden @ W^T, then the logits and loss math above, autograd back to hidden and W) and Liger's
chunked LigerFusedLinearGRPOLoss, on recap bench's fused-linear inputs.
"""
import argparse
import json
import sys

import torch


def grpo_inputs(t, k, seq_len, dev):
    """The same inputs as recap bench (cli/src/bench/mod.rs, inputs::grpo)."""
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


def fl_inputs(t, h, v, dev):
    """recap bench's fused-linear inputs (cli/src/bench/cuda.rs, fused_linear_cases): bf16 hidden [T, H]
    and weight [V, H], labels, old log-probs -12, 8 sequences with advantages i/4 - 1, mask 1."""
    def q(n, off):
        i = torch.arange(n, device=dev, dtype=torch.int64) + off
        return ((((i * 2654435761) >> 7) % 2001).float() * 1e-5 - 0.01).to(torch.bfloat16)
    hidden = q(t * h, 0).view(t, h)
    weight = q(v * h, 17).view(v, h)
    labels = (torch.arange(t, device=dev) * 7919) % v
    old = torch.full((t,), -12.0, device=dev)
    adv_seq = torch.arange(8, device=dev).float() / 4.0 - 1.0
    adv_tok = adv_seq.repeat_interleave(t // 8).unsqueeze(-1)  # [T, 1]
    mask = torch.ones(t, device=dev)
    return hidden, weight, labels, old, adv_seq, adv_tok, mask


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
    ap.add_argument("--only", choices=["fused_loss", "logits", "fused_linear"],
                    help="run one op's cases")
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
    try:
        import recap_kernels  # ours again, called from PyTorch: the binding's overhead beside the Rust call
    except Exception as e:  # the package is optional here
        recap_kernels = None
        print(f"grpo_peers: recap_kernels not importable ({e}); its PyTorch rows are skipped", file=sys.stderr)
    timer = Timer(1, 3) if args.quick else Timer(3, 20)
    timer_fl = Timer(1, 3) if args.quick else Timer(2, 10)
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

    def measure(op, case, impl, fn, tm_=None):
        try:
            measure_(op, case, impl, fn, tm_)
        except Exception as e:  # out of memory at the largest shapes, say: a row that says so
            emit(op, case, impl, None, None, None, f"failed: {type(e).__name__}: {str(e)[:120]}")
        torch.cuda.empty_cache()

    def measure_(op, case, impl, fn, tm_):
        """fn(check) -> (loss tensor to backward, value tensor when check else None): checks the value
        once, then times forward + backward (no host sync inside the timed runs)."""
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        loss, value = fn(True)
        loss.backward()
        value = float(value) if value is not None else None
        torch.cuda.synchronize()
        extra = torch.cuda.max_memory_allocated() - base
        want = ours.get((op, case + (" forward" if op == "logits" else "")))
        # bf16 matmuls of different libraries round differently: 1e-3 for the fused-linear loss
        if want is not None and value is not None and not close(value, want, 1e-3 if op == "fused_linear" else 1e-4):
            emit(op, case, impl, None, value, extra, f"MISMATCH: ours {want}, theirs {value}; not timed")
            return

        def step():
            l, _ = fn(False)
            l.backward()

        note = "" if want is not None or value is None else "value not checked (no recap value)"
        emit(op, case, impl, (tm_ or timer).time(step), value, extra, note)

    sizes = [16384, 262144] if args.quick else [16384, 262144, 4194304, 16777216]
    ks = [3] if args.quick else [1, 3, 8]
    compiled = torch.compile(verl_multi_objective_loss)
    for t in sizes if args.only in (None, "fused_loss") else []:
        for k in ks:
            case = f"T={t} K={k}"
            logp, old, adv, mask, seq = grpo_inputs(t, k, min(4096, t), dev)
            adv_tok = adv[seq]  # [T, K]: the per-sequence advantages broadcast to tokens
            for impl, f in [("torch eager", verl_multi_objective_loss), ("torch.compile", compiled)]:
                x = logp.clone().requires_grad_()

                def fn(check, f=f, x=x):
                    x.grad = None
                    l = f(x, old, adv_tok, mask)
                    return l, (l.detach() if check else None)

                measure("fused_loss", case, impl, fn)
            if recap_kernels is not None:
                seq_len = min(4096, t)
                cu = torch.tensor(list(range(0, t, seq_len)) + [t], dtype=torch.int32)  # a CPU tensor: no sync
                lam = torch.ones(k)
                x = logp.clone().requires_grad_()

                def fn(check, x=x, cu=cu, lam=lam):
                    x.grad = None
                    l, _ = recap_kernels.grpo_loss(x, old, adv, mask, cu, lambda_=lam)
                    return l, (l.detach() if check else None)

                measure("fused_loss", case, "recap-kernels from PyTorch (torch.ops.recap)", fn)
    shapes = [(1024, 32768)] if args.quick else [(1024, 32768), (4096, 32768), (16384, 32768),
                                                 (1024, 151936), (4096, 151936), (16384, 151936)]
    for t, v in shapes if args.only in (None, "logits") else []:
        for dtype, name in [(torch.bfloat16, "bf16"), (torch.float32, "f32")]:
            if name == "f32" and t * v > 4096 * 151936:
                continue
            case = f"T={t} V={v} {name}"
            i = torch.arange(t * v, device=dev, dtype=torch.int64)
            z = (((i * 2654435761) % 1000).float() * 0.01 - 5.0).to(dtype).view(t, v)
            labels = (torch.arange(t, device=dev) * 7919) % v
            zz = z.clone().requires_grad_()

            g = ((torch.arange(t, device=dev) % 7).float() - 3.0) * 1e-3

            def fn(check, zz=zz, g=g):
                zz.grad = None
                logp, ent = logits_loss(zz, labels)
                return (logp * g).sum() + (ent * g).sum(), (logp.double().sum() if check else None)

            measure("logits", case, "torch eager (verl)", fn)
            del zz
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
                        zl.grad = None  # inplace=True: the backward writes the gradient into zl
                        res = liger_grpo.triton_grpo_loss(zl, old_l, None, ids, adv_l, None, temperature=1.0,
                                                         beta=0.0, eps_low=0.2, eps_high=0.2, inplace=True,
                                                         loss_type="dapo", reduce=True)
                        loss = res[0] if isinstance(res, (tuple, list)) else res
                        loss = loss.sum() if loss.dim() else loss
                        return loss, None

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
                    del zl
                except Exception as e:
                    emit("logits", case, "Liger triton_grpo_loss", None, None, None, f"failed: {e}")

    # fused-linear: unfused PyTorch and Liger's chunked fused-linear GRPO loss
    t, h, v = (1024, 1024, 32768) if args.quick else (8192, 4096, 151936)
    case = f"T={t} H={h} V={v} bf16"
    if args.only in (None, "fused_linear"):
        hidden, weight, labels, old, adv_seq, adv_tok, mask = fl_inputs(t, h, v, dev)
        x = hidden.clone().requires_grad_()
        w = weight.clone().requires_grad_()
        ours_fl = next((val for (op, c), val in ours.items()
                        if op == "fused_linear" and c.startswith(case + " fused, default")), None)
        if ours_fl is not None:
            ours[("fused_linear", case)] = ours_fl

        def unfused(check):
            x.grad = None
            w.grad = None
            logp, _ = logits_loss(x @ w.T, labels)
            loss = verl_multi_objective_loss(logp, old, adv_tok, mask)
            return loss, (loss.detach() if check else None)

        measure("fused_linear", case, "torch unfused (verl)", unfused, timer_fl)
        try:
            from liger_kernel.chunked_loss import LigerFusedLinearGRPOLoss
            liger_fl = LigerFusedLinearGRPOLoss(beta=0.0, use_ref_model=False, loss_type="dapo",
                                                epsilon_low=0.2, epsilon_high=0.2, temperature=1.0)
            b = 8

            def liger(check):
                x.grad = None
                w.grad = None
                res = liger_fl(x.view(b, t // b, h), w, labels.view(b, t // b), mask.view(b, t // b),
                               adv_seq, old_per_token_logps=old.view(b, t // b))
                loss = res[0] if isinstance(res, (tuple, list)) else res
                return loss, (loss.detach() if check else None)

            measure("fused_linear", case, "Liger LigerFusedLinearGRPOLoss", liger, timer_fl)
        except Exception as e:
            emit("fused_linear", case, "Liger LigerFusedLinearGRPOLoss", None, None, None, f"failed: {e}")
    json.dump(out, open(args.json, "w"), indent=1)
    print(f"grpo_peers: wrote {args.json}", file=sys.stderr)


if __name__ == "__main__":
    main()
