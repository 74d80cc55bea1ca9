"""Hostile inputs: every public function, called validly and then with one argument broken at a time
(a length, a bound, a dtype, a device, a value, an integer at or beyond the int32 / int64 limits, a
wrong type), each call in a forked child with a timeout, so that a crash or a hang is counted, not
fatal. The contract checked: no crash, no hang, no panic; a malformed call raises the package's
error (``RecapError``, a ValueError, or ``RecapTypeError``, also a TypeError) whose message names the
argument; valid calls agree with the float64 references; poison (NaN, inf) at masked tokens leaves
results bitwise unchanged. The number of calls per function is printed (``pytest -s``)."""
import math
import os
import pickle
import random
import time
from collections import Counter

import pytest
import torch

import recap_kernels as rk
from recap_kernels import verl_recap
from reference import verl_vanilla

TIMEOUT_S = 30
CALLS = Counter()


def in_child(fn):
    """``fn()`` in a forked child: ("ok", value) with a picklable value, ("error", type name, base
    names, message), ("crash", wait status) or ("hang",)."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: never returns into pytest
        os.close(r)
        # one thread: the parent's OpenMP pool does not survive a fork (a torch GEMM in the child
        # would wait on it forever)
        torch.set_num_threads(1)
        try:
            out = ("ok", fn())
        except BaseException as e:  # noqa: B036 (a PanicException is a BaseException: counted, not hidden)
            out = ("error", type(e).__name__, [c.__name__ for c in type(e).__mro__], str(e)[:400])
        try:
            data = pickle.dumps(out)
        except Exception as e:  # an unpicklable value
            data = pickle.dumps(("ok", repr(e)))
        with os.fdopen(w, "wb") as f:
            f.write(data)
        os._exit(0)
    os.close(w)
    chunks, deadline = [], time.monotonic() + TIMEOUT_S
    os.set_blocking(r, False)
    status = None
    while status is None:
        try:
            b = os.read(r, 1 << 16)
            if b:
                chunks.append(b)
        except BlockingIOError:
            pass
        done, st = os.waitpid(pid, os.WNOHANG)
        if done:
            status = st
        elif time.monotonic() > deadline:
            os.kill(pid, 9)
            os.waitpid(pid, 0)
            os.close(r)
            return ("hang",)
        else:
            time.sleep(0.001)
    os.set_blocking(r, True)
    while True:
        b = os.read(r, 1 << 16)
        if not b:
            break
        chunks.append(b)
    os.close(r)
    if os.WIFSIGNALED(status) or os.WEXITSTATUS(status) != 0 or not chunks:
        return ("crash", status)
    return pickle.loads(b"".join(chunks))


def check_error(res, args, what):
    """A malformed call: the package's error type, the argument named (one of ``args``: a length
    that disagrees with another array's may be blamed on either)."""
    assert res[0] == "error", f"{what}: accepted, or {res}"
    _, name, bases, msg = res
    assert name != "PanicException", f"{what}: a panic reached Python: {msg}"
    assert "RecapError" in bases and ("ValueError" in bases or "TypeError" in bases), f"{what}: {name}: {msg}"
    named = any(f"`{a}" in msg or f".{a}`" in msg for a in args)
    assert named, f"{what}: the message does not name `{args[0]}`: {msg}"


def check_survived(res, what):
    """A call that may be accepted: no crash, no hang, no panic, and if refused, the package's error."""
    assert res[0] in ("ok", "error"), f"{what}: {res}"
    if res[0] == "error":
        assert res[1] != "PanicException" and "RecapError" in res[2], f"{what}: {res}"


# --- the valid calls ------------------------------------------------------------------------------
T, B, V = 24, 3, 11
CU = [0, 10, 17, 24]


def batch(seed=0):
    g = torch.Generator().manual_seed(seed)
    old = -torch.rand(T, generator=g) * 2 - 0.5
    logp = old + 0.1 * torch.randn(T, generator=g)
    mask = torch.ones(T)
    mask[[3, 12, 20]] = 0
    return dict(logp=logp, old=old, ref=old - 0.05, adv=torch.randn(B, generator=g), mask=mask,
                logits=torch.randn(T, V, generator=g), labels=torch.randint(0, V, (T,), generator=g))


def specs():
    """name -> (function, valid keyword arguments, {argument: kind}) for every public function."""
    d = batch()
    g = torch.Generator().manual_seed(9)
    hidden = (torch.randn(T, 8, generator=g) * 0.3).bfloat16()
    weight = (torch.randn(V, 8, generator=g) * 0.3).bfloat16()
    loss_args = dict(logp=d["logp"], old_logp=d["old"], advantages=d["adv"], mask=d["mask"], cu_seqlens=CU,
                     ref_logp=d["ref"], kl_coef=0.1)
    multi = dict(loss_args, advantages=torch.stack([d["adv"], -d["adv"]], 1), lambda_=[0.5, 1.5],
                 membership=[3, 1, 2])
    tokens = dict(logp="floats", old_logp="floats", advantages="floats", mask="mask", cu_seqlens="cu",
                  ref_logp="?floats", kl_coef="option")
    logit_args = dict(logits=d["logits"], labels=d["labels"], old_logp=d["old"], advantages=d["adv"],
                      mask=d["mask"], cu_seqlens=CU, temperature=0.9, ignore_index=-100)
    logit_kinds = dict(logits="logits", labels="labels", old_logp="floats", advantages="floats", mask="mask",
                       cu_seqlens="cu", temperature="positive", ignore_index="int32")
    lin_args = dict(hidden=hidden, weight=weight, labels=d["labels"], old_logp=d["old"], advantages=d["adv"],
                    mask=d["mask"], cu_seqlens=CU, chunk_tokens=10, memory_budget=1 << 20)
    lin_kinds = dict(hidden="bf16", weight="bf16", labels="labels", old_logp="floats", advantages="floats",
                     mask="mask", cu_seqlens="cu", chunk_tokens="?count", memory_budget="bytes")
    return {
        "grpo_loss": (rk.grpo_loss, loss_args, tokens),
        "grpo_loss K=2": (rk.grpo_loss, multi, dict(tokens, lambda_="?weights", membership="?membership")),
        "grpo_loss_async": (rk.grpo_loss_async, loss_args, tokens),
        "kl_penalty": (rk.kl_penalty, dict(logp=d["logp"], ref_logp=d["ref"], mask=d["mask"]),
                       dict(logp="values", ref_logp="values", mask="?mask")),
        "weighted_reduce": (rk.weighted_reduce, dict(losses=d["logp"], mask=d["mask"], cu_seqlens=CU),
                            dict(losses="values", mask="mask", cu_seqlens="cu")),
        "count_normalizers": (rk.count_normalizers, dict(mask=d["mask"], cu_seqlens=CU, membership=[1, 3, 2],
                                                         num_objectives=2),
                              dict(mask="mask", cu_seqlens="cu", membership="?membership", num_objectives="count")),
        "rollout_rejection": (rk.rollout_rejection, dict(log_ratio=d["old"] - d["logp"], mask=d["mask"],
                                                         cu_seqlens=CU, rollout_rs_threshold="0.5_2.0"),
                              dict(log_ratio="values", mask="mask", cu_seqlens="cu")),
        "rollout_is_weights": (rk.rollout_is_weights, dict(log_ratio=d["old"] - d["logp"], mask=d["mask"],
                                                           cu_seqlens=CU, rollout_is="sequence"),
                               dict(log_ratio="values", mask="mask", cu_seqlens="cu")),
        "logprobs_from_logits": (rk.logprobs_from_logits, dict(logits=d["logits"], labels=d["labels"],
                                                               temperature=0.7),
                                 dict(logits="logits", labels="labels", temperature="positive")),
        "grpo_loss_from_logits": (rk.grpo_loss_from_logits, logit_args, logit_kinds),
        "grpo_loss_from_logits_async": (rk.grpo_loss_from_logits_async, logit_args, logit_kinds),
        "fused_linear_grpo_loss": (rk.fused_linear_grpo_loss, lin_args, lin_kinds),
        "fused_linear_grpo_loss_async": (rk.fused_linear_grpo_loss_async, lin_args, lin_kinds),
        "fused_linear_logprobs": (rk.fused_linear_logprobs,
                                  dict(hidden=hidden, weight=weight, labels=d["labels"], temperature=0.8,
                                       chunk_tokens=10, mask=d["mask"]),
                                  dict(hidden="bf16", weight="bf16", labels="labels", temperature="positive",
                                       chunk_tokens="?count", mask="?mask")),
        "group_advantages": (rk.group_advantages, dict(rewards=torch.randn(6, 2, generator=g), group_size=3,
                                                       mode=["grpo", "rloo"]),
                             dict(rewards="values", group_size="count", mode="modes")),
        "optimal_token_baseline": (rk.optimal_token_baseline,
                                   dict(token_rewards=torch.randn(T, generator=g), mask=d["mask"], old_logp=d["old"],
                                        sum_pi_squared=torch.rand(T, generator=g), cu_seqlens=CU,
                                        group_ids=[0, 1, 0]),
                                   dict(token_rewards="floats", mask="mask", old_logp="floats",
                                        sum_pi_squared="floats", cu_seqlens="cu")),
        "verl_recap.compute_recap_outcome_advantage": (
            lambda **kw: verl_recap.compute_recap_outcome_advantage(**kw)[0].tolist(),
            dict(token_level_rewards=torch.zeros(B, 8), response_mask=(torch.rand(B, 8, generator=g) > 0.3).float(),
                 index=["a", "a", "b"], config={"recap": {"reward_keys": ["r", "s"], "window": 2}},
                 non_tensor_batch={"r": [1.0, 0.0, None], "s": [0.5, 0.25, 1.0]}, epsilon=1e-6),
            dict(token_level_rewards="values", response_mask="mask", epsilon="positive")),
        "RecapWeights": (lambda **kw: rk.RecapWeights(**kw).weights(),
                         dict(orientations=["reward", "loss"], window=4, temperature=2.0),
                         dict(window="count", temperature="positive")),
    }


# --- the mutations --------------------------------------------------------------------------------
BIG = [2 ** 31, 2 ** 32 + 1, 2 ** 63, 2 ** 70, -(2 ** 63) - 1]


def mutations(kind, value):
    """(description, bad value, must it fail?) for one argument of this kind (``?kind``: optional,
    None accepted)."""
    optional = kind.startswith("?")
    kind = kind.lstrip("?")
    passes_nan = kind == "values"  # elementwise values (a NaN in gives a NaN out, as in torch)
    kind = "floats" if passes_nan else kind
    out = [("None", None, not optional and kind != "option"), ("a string", "x", True), ("an object", object(), True)]
    meta = value.to("meta") if isinstance(value, torch.Tensor) else None
    if kind in ("floats", "mask", "logits", "bf16", "labels"):
        out += [("on meta", meta, True), ("0-dim", value.reshape(-1)[:1].reshape(()), True),
                ("one element short", value[:-1] if value.dim() else value, True),
                ("a list", value.tolist(), True), ("complex", value.to(torch.complex64), True)]
    if kind in ("floats",):
        out += [("int32", value.to(torch.int32), True), ("bool", value > 0, True),
                ("float64", value.double(), False), ("float16", value.half(), False),
                ("bfloat16", value.bfloat16(), False), ("int64", value.to(torch.int64), True),
                ("uint8", value.to(torch.uint8), True),
                ("NaN everywhere", torch.full_like(value, math.nan), not passes_nan)]
    if kind == "floats" and value.dim() == 0:
        out = [o for o in out if o[0] not in ("0-dim", "one element short")]
    if kind == "logits":
        out += [("int32", value.to(torch.int32), True), ("V = 0", value[:, :0], True),
                ("float16", value.half(), False), ("bfloat16", value.bfloat16(), False),
                ("float64", value.double(), True)]
    if kind == "bf16":
        out += [("float32", value.float(), True)]
    if kind == "labels":
        big = value.to(torch.int64).clone()
        big[0] = 2 ** 32 + 1
        neg = value.clone()
        neg[1] = -7
        out += [("float", value.float() + 0.5, True), ("2^32 + 1 in int64", big, True), ("-7", neg, True),
                ("int64", value.to(torch.int64), False), ("int16", value.to(torch.int16), False),
                ("uint8", value.to(torch.uint8), False), ("bool", value > 0, True),
                ("-2^63 in int64", torch.full_like(value, -(2 ** 63), dtype=torch.int64), True)]
    if kind == "mask":
        out += [("bool", value > 0, False), ("uint8", (value > 0).to(torch.uint8), False)]
    if kind == "cu":
        out += [("[]", [], True), ("[0, 2.5, ...]", [0, 2.5] + value[2:], True), ("decreasing", value[::-1], True),
                ("last != T", value[:-1] + [value[-1] - 1], True), ("a float tensor", torch.tensor(value).float(), True),
                ("bools", [True] * len(value), True), ("on meta", torch.tensor(value).to("meta"), True)]
        out += [(f"{b} inside", [0, b] + value[2:], True) for b in BIG]
        out += [("negative", [0, -3] + value[2:], True)]
    if kind == "weights":
        out += [("one short", value[:-1], True), ("NaN", [math.nan] + value[1:], True),
                ("negative", [-1.0] + value[1:], True), ("inf", [math.inf] + value[1:], True)]
    if kind == "membership":
        out += [("a bit >= K", [8] + value[1:], True), ("negative", [-1] + value[1:], True),
                ("2^32", [2 ** 32] + value[1:], True), ("floats", [1.5] + value[1:], True),
                ("one short", value[:-1], True)]
    if kind in ("count", "int32"):
        out += [(f"{b}", b, True) for b in BIG] + [("1.5", 1.5, True), ("True", True, True)]
    if kind == "bytes":
        out += [(f"{b}", b, b > 2 ** 62 or b < 0) for b in BIG] + [("-1", -1, True), ("0", 0, True),
                                                                  ("1.5", 1.5, True)]
    if kind == "count":
        out += [("-1", -1, True), ("0", 0, True)]
    if kind in ("positive", "option"):
        out += [("NaN", math.nan, True), ("-1", -1.0, True), ("a [2] tensor", torch.ones(2), True),
                ("a 0-dim tensor", torch.tensor(0.5), False)]
    if kind == "modes":
        out += [("one mode for 2 columns", ["grpo"], True), ("three", ["grpo"] * 3, True),
                ("unknown", ["nope", "grpo"], True)]
    return out


@pytest.mark.parametrize("name", list(specs()))
def test_malformed_calls_raise_the_package_error_naming_the_argument(name):
    fn, valid, kinds = specs()[name]
    res = in_child(lambda: (fn(**valid), None)[1])
    CALLS[name] += 1
    assert res == ("ok", None), f"{name}: the valid call failed: {res}"
    failures = []
    shaped = tuple(a for a, k in kinds.items()
                   if k.lstrip("?") in ("floats", "values", "mask", "logits", "bf16", "labels"))
    for arg, kind in kinds.items():
        for what, bad, must_fail in mutations(kind, valid[arg]):
            if bad is None and kind == "option":
                continue
            if what == "NaN everywhere" and "async" in name:
                must_fail = False  # an asynchronous call reports non-finite inputs when its output is read
            kw = dict(valid, **{arg: bad})
            res = in_child(lambda: (fn(**kw), None)[1])
            CALLS[name] += 1
            label = f"{name}({arg} = {what})"
            # a length or vocabulary that disagrees with another array's may be blamed on either
            names = (arg,) + (shaped + ("cu_seqlens", "group_size") if what == "one element short" else ())
            try:
                check_error(res, names, label) if must_fail else check_survived(res, label)
            except AssertionError as e:
                failures.append(str(e).split("\n")[0])
    print(f"\n{name}: {CALLS[name]} calls")
    assert not failures, "\n".join(failures)


def test_masked_poison_leaves_results_bitwise_unchanged():
    """NaN / inf at masked tokens of every per-token input (and of the logits' rows there): the same
    loss, metrics and gradient, bit for bit."""
    d = batch(3)
    masked = d["mask"] == 0

    def run(poison):
        def call():
            out = []
            for fn, kw in [
                (rk.grpo_loss, dict(old_logp=d["old"], advantages=d["adv"], cu_seqlens=CU, ref_logp=d["ref"],
                                    kl_coef=0.1)),
                (rk.grpo_loss, dict(old_logp=d["old"], advantages=d["adv"], cu_seqlens=CU, ref_logp=d["ref"],
                                    kl_coef=0.1, agg_mode="seq-mean-token-mean", policy_loss="gspo")),
            ]:
                x = d["logp"].clone()
                kw = dict(kw)
                if poison is not None:
                    x[masked] = poison
                    kw["old_logp"] = kw["old_logp"].clone()
                    kw["old_logp"][masked] = poison
                    kw["ref_logp"] = kw["ref_logp"].clone()
                    kw["ref_logp"][masked] = -poison
                x.requires_grad_()
                loss, m = fn(x, mask=d["mask"], **kw)
                loss.backward()
                out.append((loss.double().item(), x.grad.tolist(), {k: v.tolist() for k, v in m.items()}))
            z = d["logits"].clone()
            if poison is not None:
                z[masked] = poison
            z.requires_grad_()
            loss, m = rk.grpo_loss_from_logits(z, d["labels"], d["old"], d["adv"], d["mask"], CU, entropy_coef=0.01,
                                               ref_logp=d["ref"], kl_coef=0.05)
            loss.backward()
            out.append((loss.double().item(), z.grad.tolist(), {k: v.tolist() for k, v in m.items()}))
            kl = rk.kl_penalty(torch.where(masked, torch.tensor(poison or 0.0), d["logp"]), d["ref"], mask=d["mask"])
            out.append(kl.tolist())
            total, per = rk.weighted_reduce(torch.where(masked, torch.tensor(poison or 0.0), d["logp"]), d["mask"], CU)
            out.append((total.item(), per.tolist()))
            return out
        return in_child(call)

    clean = run(None)
    assert clean[0] == "ok", clean
    for poison in (math.nan, math.inf, -math.inf, 1e38):
        got = run(poison)
        assert got[0] == "ok", (poison, got)
        assert pickle.dumps(got[1]) == pickle.dumps(clean[1]), f"poison {poison} at masked tokens changed a result"


@pytest.mark.parametrize("seed", range(12))
def test_random_valid_calls_match_the_float64_reference(seed):
    """Random shapes, masks, advantages and clip ranges: the loss and gradient of verl's vanilla
    policy loss (token-mean, seq-mean-token-mean), computed in float64 by the reference."""
    rng = random.Random(seed)
    lens = [rng.choice([0, 1, 5, 31, 32, 33, 70]) for _ in range(rng.randint(1, 5))]
    if sum(lens) == 0:
        lens[0] = 3
    t = sum(lens)
    g = torch.Generator().manual_seed(seed)
    old = -torch.rand(t, generator=g, dtype=torch.float64) * 3
    logp = old + 0.3 * torch.randn(t, generator=g, dtype=torch.float64)
    mask = (torch.rand(t, generator=g) > 0.2).double()
    adv = torch.randn(len(lens), generator=g, dtype=torch.float64)
    cu = [0]
    for n in lens:
        cu.append(cu[-1] + n)
    agg = rng.choice(["token-mean", "seq-mean-token-mean"])
    clip = rng.choice([0.1, 0.2, 0.28])

    def call():
        x = logp.float().requires_grad_()
        loss, _ = rk.grpo_loss(x, old.float(), adv.float(), mask.float(), cu, agg_mode=agg, clip_low=clip,
                               clip_high=clip, dual_clip=None)
        loss.backward()
        return loss.double().item(), x.grad.double().tolist()

    res = in_child(call)
    assert res[0] == "ok", res
    got_loss, got_grad = res[1]
    seq = torch.repeat_interleave(torch.arange(len(lens)), torch.tensor(lens))
    y = logp.clone().requires_grad_()
    pg = verl_vanilla(old, y, adv[seq], mask, lo=clip, hi=clip, c=1e9)[0]
    if agg == "token-mean":
        want = (pg * mask).sum() / mask.sum()
    else:  # the mean over sequences with a token of each sequence's token mean
        per = [((pg * mask)[a:b].sum() / mask[a:b].sum()) for a, b in zip(cu, cu[1:]) if mask[a:b].sum() > 0]
        want = torch.stack(per).mean()
    want.backward()
    assert abs(got_loss - want.item()) <= 1e-5 * (1 + abs(want.item())), (got_loss, want.item())
    torch.testing.assert_close(torch.tensor(got_grad, dtype=torch.float64), y.grad, rtol=1e-4, atol=1e-6)
