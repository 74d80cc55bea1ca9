//! The fused-linear loss (synchronous and asynchronous) and the outputs of the losses from logits.

#[allow(unused_imports)]
use crate::prelude::*;

/// The chunked fused-linear GRPO loss: `hidden` `[T, H]` and `weight` `[V, H]` (bf16), per-token
/// `labels`, `old_logp`, `ref_logp` (nullable), `mask` (u8), advantages as in `recap_grpo_loss`;
/// writes `d_hidden` `[T, H]` (bf16) and `d_weight` `[V, H]` (f32, overwritten); arrays on the
/// device, or on the host for `device < 0` (the reference, which ignores the chunking).
/// `chunk_tokens` <= 0: sized from `memory_budget` bytes (<= 0: 512 MiB); `fp32_logits` keeps the
/// logits in f32. `result.loss` includes the entropy bonus; `stats` as in `recap_grpo_loss`. Reads
/// the result back (synchronizes `stream`): `recap_fused_linear_grpo_loss_async` does not. On the
/// device only the rows with `mask` nonzero and a label other than `ignore_index` are computed (their
/// valid mask is read back first; the others' `d_hidden` rows are 0 and their labels are not
/// checked).
///
/// # Safety
/// As `recap_grpo_loss`.
#[no_mangle]
#[allow(clippy::too_many_arguments)]
pub unsafe extern "C" fn recap_fused_linear_grpo_loss(
    device: i32,
    stream: *mut c_void,
    num_tokens: i64,
    hidden_size: i64,
    vocab: i64,
    hidden: *const c_void,
    weight: *const c_void,
    labels: *const i32,
    old_logp: *const f32,
    ref_logp: *const f32,
    advantages: *const f32,
    adv_per_token: i32,
    mask: *const u8,
    cu_seqlens: *const i32,
    num_seqs: i64,
    lambda: *const f32,
    objectives: *const i32,
    membership: *const u32,
    num_objectives: i32,
    normalizers: *const f64,
    cfg: *const RecapGrpoConfig,
    temperature: f32,
    chunk_tokens: i64,
    memory_budget: i64,
    fp32_logits: i32,
    d_hidden: *mut c_void,
    d_weight: *mut f32,
    result: *mut RecapGrpoResult,
    stats: *mut f64,
) -> i32 {
    guard(|| {
        result_outputs(result, stats, objectives_count(num_objectives)?)?;
        let a = LinearArgs::new(
            [num_tokens, hidden_size, vocab, num_seqs],
            (
                cu_seqlens,
                lambda,
                objectives,
                membership,
                num_objectives,
                normalizers,
            ),
            false,
            (cfg, temperature, chunk_tokens, memory_budget, fp32_logits),
        )?;
        let (t, h, v) = (a.t, a.h, a.v);
        let inputs = a.inputs(
            labels,
            old_logp,
            ref_logp,
            (advantages, adv_per_token),
            mask,
        );
        let head = a.head(hidden, weight);
        let out = raw::fused_linear_grpo_loss(
            place(device, stream),
            &head,
            &inputs,
            &a.cfg,
            &a.lc,
            &a.opts,
            out_arr(d_hidden as *mut half::bf16, t * h),
            out_arr(d_weight, v * h),
        )?;
        write_result(&out.grpo, out.loss, result, stats);
        Ok(())
    })
}

/// The checked scalar arguments and host arrays of a fused-linear call.
pub(crate) struct LinearArgs<'a> {
    pub(crate) t: usize,
    pub(crate) h: usize,
    pub(crate) v: usize,
    pub(crate) b: usize,
    pub(crate) k: usize,
    pub(crate) cfg: GrpoConfig,
    pub(crate) lc: LogprobConfig,
    pub(crate) opts: recap::cuda::FusedLinearConfig,
    pub(crate) kinds: Vec<ObjectiveKind>,
    pub(crate) norms: Option<recap::Normalizers>,
    pub(crate) cu: &'a [i32],
    pub(crate) lambda: &'a [f32],
    pub(crate) membership: Option<&'a [u32]>,
}

/// The layout arguments of a C call: `cu_seqlens`, `lambda`, `objectives`, `membership`, K and
/// `normalizers`.
type CLayout = (
    *const i32,
    *const f32,
    *const i32,
    *const u32,
    i32,
    *const f64,
);

impl<'a> LinearArgs<'a> {
    /// The call's inputs from its per-token pointers (`T` elements each; advantages `[B, K]` or,
    /// with their flag, `[T, K]`).
    pub(crate) fn inputs(
        &self,
        labels: *const i32,
        old_logp: *const f32,
        ref_logp: *const f32,
        (advantages, adv_per_token): (*const f32, i32),
        mask: *const u8,
    ) -> LogitsLossInputs<'_, In<f32>, In<u8>, In<i32>> {
        let t = self.t;
        LogitsLossInputs {
            labels: arr(labels, t),
            old_logp: arr(old_logp, t),
            ref_logp: opt_arr(ref_logp, t),
            rollout_logp: None,
            advantages: adv_arr(advantages, adv_per_token, t, self.b, self.k),
            mask: Mask::U8(arr(mask, t)),
            cu_seqlens: self.cu,
            lambda: self.lambda,
            objectives: &self.kinds,
            membership: self.membership,
            normalizers: self.norms.as_ref(),
        }
    }

    /// The head `hidden [T, H]`, `weight [V, H]` (bf16).
    pub(crate) fn head(&self, hidden: *const c_void, weight: *const c_void) -> raw::RawHead {
        raw::RawHead {
            hidden: arr(hidden as *const half::bf16, self.t * self.h),
            weight: arr(weight as *const half::bf16, self.v * self.h),
            hidden_size: self.h,
        }
    }

    /// `dims`: T, H, V, B; `layout_on_device`: `cu_seqlens`, `lambda` and `membership` are device
    /// pointers (not read here); `opts`: the config, temperature and chunking.
    unsafe fn new(
        dims: [i64; 4],
        (cu_seqlens, lambda, objectives, membership, num_objectives, normalizers): CLayout,
        layout_on_device: bool,
        (cfg, temperature, chunk_tokens, memory_budget, fp32_logits): (
            *const RecapGrpoConfig,
            f32,
            i64,
            i64,
            i32,
        ),
    ) -> Result<Self> {
        let (t, h, v) = (
            len("num_tokens", dims[0])?,
            len("hidden_size", dims[1])?,
            len("vocab", dims[2])?,
        );
        let b = len("num_seqs", dims[3])?;
        let k = objectives_count(num_objectives)?;
        let cfg = config(cfg)?;
        let lc = LogprobConfig {
            temperature,
            ..LogprobConfig::default()
        };
        lc.validate()?;
        let (cu, lambda, membership) = if layout_on_device {
            if cu_seqlens.is_null() || lambda.is_null() {
                return Err(Error::invalid_argument(
                    if cu_seqlens.is_null() {
                        "cu_seqlens"
                    } else {
                        "lambda"
                    },
                    "null pointer (with layout_on_device, a device pointer)",
                ));
            }
            (&[][..], &[][..], None)
        } else {
            host_layout(cu_seqlens, b, lambda, k, membership)?
        };
        let kinds = host_objectives(objectives, k)?;
        let norms = host_normalizers(normalizers, std::ptr::null(), k, b)?;
        if t == 0 || h == 0 || v == 0 {
            return Err(Error::invalid_argument(
                "num_tokens",
                format!("expected T, H, V >= 1, got {t}, {h}, {v}"),
            ));
        }
        let opts = recap::cuda::FusedLinearConfig {
            chunk_tokens: (chunk_tokens > 0).then_some(chunk_tokens as usize),
            memory_budget: if memory_budget > 0 {
                memory_budget as usize
            } else {
                512 << 20
            },
            fp32_logits: fp32_logits != 0,
            // the C ABI keeps its signature: the batch-invariant mode is Rust's and Python's
            ..Default::default()
        };
        Ok(LinearArgs {
            t,
            h,
            v,
            b,
            k,
            cfg,
            lc,
            opts,
            kinds,
            norms,
            cu,
            lambda,
            membership,
        })
    }
}

/// Length (f64s) of the output buffer of `recap_fused_linear_grpo_loss_async` for `num_objectives`
/// objectives (the total loss at index 0, then the fused loss's output and the entropy terms), or
/// -1 for a count outside 1..=16.
#[no_mangle]
pub extern "C" fn recap_logits_output_len(num_objectives: i32) -> i64 {
    match usize::try_from(num_objectives) {
        Ok(k) if (1..=recap::MAX_OBJECTIVES).contains(&k) => {
            recap::cuda::logits_output_len(k) as i64
        }
        _ => -1,
    }
}

/// Bytes of device workspace `recap_fused_linear_grpo_loss_async` needs for these sizes and
/// chunking options (as that call takes them), or -1 for a negative size.
#[no_mangle]
pub extern "C" fn recap_fused_linear_workspace_len(
    num_tokens: i64,
    num_seqs: i64,
    num_objectives: i32,
    vocab: i64,
    chunk_tokens: i64,
    memory_budget: i64,
    fp32_logits: i32,
) -> i64 {
    let (Ok(t), Ok(b), Ok(k), Ok(v)) = (
        usize::try_from(num_tokens),
        usize::try_from(num_seqs),
        usize::try_from(num_objectives),
        usize::try_from(vocab),
    ) else {
        return -1;
    };
    let opts = recap::cuda::FusedLinearConfig {
        chunk_tokens: (chunk_tokens > 0).then_some(chunk_tokens as usize),
        memory_budget: if memory_budget > 0 {
            memory_budget as usize
        } else {
            512 << 20
        },
        fp32_logits: fp32_logits != 0,
        ..Default::default()
    };
    i64::try_from(recap::cuda::fused_linear_workspace_len(t, b, k, v, &opts)).unwrap_or(-1)
}

/// The chunked fused-linear GRPO loss without a host synchronization: on a device it enqueues every
/// kernel and GEMM of the call on `stream` (writing `d_hidden` and `d_weight` as
/// `recap_fused_linear_grpo_loss` does, intermediates in `workspace`, `workspace_bytes` >=
/// `recap_fused_linear_workspace_len`, and the results in `out`, `recap_logits_output_len(K)`
/// f64 of device memory; `out[0]` is the total loss) and returns; on the host (`device < 0`) the
/// reference fills the same layout at once. With `layout_on_device != 0`, `cu_seqlens`, `lambda`
/// and `membership` are device pointers checked on the device, nothing is copied from the host and
/// the call can be captured in a CUDA graph (after one eager call of its size). Read the result
/// with `recap_logits_output_read`.
///
/// # Safety
/// As `recap_fused_linear_grpo_loss`; `workspace` and `out` device memory of the call's device.
#[no_mangle]
#[allow(clippy::too_many_arguments)]
pub unsafe extern "C" fn recap_fused_linear_grpo_loss_async(
    device: i32,
    stream: *mut c_void,
    num_tokens: i64,
    hidden_size: i64,
    vocab: i64,
    hidden: *const c_void,
    weight: *const c_void,
    labels: *const i32,
    old_logp: *const f32,
    ref_logp: *const f32,
    advantages: *const f32,
    adv_per_token: i32,
    mask: *const u8,
    cu_seqlens: *const i32,
    num_seqs: i64,
    lambda: *const f32,
    objectives: *const i32,
    membership: *const u32,
    num_objectives: i32,
    normalizers: *const f64,
    layout_on_device: i32,
    cfg: *const RecapGrpoConfig,
    temperature: f32,
    chunk_tokens: i64,
    memory_budget: i64,
    fp32_logits: i32,
    workspace: *mut c_void,
    workspace_bytes: i64,
    d_hidden: *mut c_void,
    d_weight: *mut f32,
    out: *mut f64,
) -> i32 {
    guard(|| {
        let on_device = layout_on_device != 0;
        let a = LinearArgs::new(
            [num_tokens, hidden_size, vocab, num_seqs],
            (
                cu_seqlens,
                lambda,
                objectives,
                membership,
                num_objectives,
                normalizers,
            ),
            on_device,
            (cfg, temperature, chunk_tokens, memory_budget, fp32_logits),
        )?;
        let (t, h, v, b, k) = (a.t, a.h, a.v, a.b, a.k);
        let inputs = a.inputs(
            labels,
            old_logp,
            ref_logp,
            (advantages, adv_per_token),
            mask,
        );
        let head = a.head(hidden, weight);
        let dev = on_device.then(|| raw::DeviceBatchArrays {
            cu_seqlens: arr(cu_seqlens, b + 1),
            membership: opt_arr(membership, b),
            lambda: Some(arr(lambda, k)),
        });
        let ws = len("workspace_bytes", workspace_bytes)?;
        raw::fused_linear_grpo_loss_async(
            place(device, stream),
            &head,
            &inputs,
            dev.as_ref(),
            &a.cfg,
            &a.lc,
            &a.opts,
            out_arr(workspace as *mut u8, ws),
            out_arr(d_hidden as *mut half::bf16, t * h),
            out_arr(d_weight, v * h),
            out_arr(out, recap::cuda::logits_output_len(k)),
        )?;
        Ok(())
    })
}

/// Reads the output `out` of a `recap_fused_linear_grpo_loss_async` call back (this synchronizes
/// `stream`) into `result` and `stats` (nullable), as `recap_fused_linear_grpo_loss` writes them.
/// `num_objectives`, `cfg`, `has_ref_logp` and `vocab` describe the call. Fails, naming the
/// argument, on labels outside [0, V), a check made on the device that failed, and non-finite
/// inputs unless the config allows them.
///
/// # Safety
/// `out` must hold `recap_logits_output_len(num_objectives)` f64 of `device`'s memory; `result`
/// must be writable; `stats` null or `recap_grpo_stats_len(K)` writable f64.
#[no_mangle]
#[allow(clippy::too_many_arguments)]
pub unsafe extern "C" fn recap_logits_output_read(
    device: i32,
    stream: *mut c_void,
    num_objectives: i32,
    cfg: *const RecapGrpoConfig,
    has_ref_logp: i32,
    vocab: i64,
    out: *const f64,
    result: *mut RecapGrpoResult,
    stats: *mut f64,
) -> i32 {
    guard(|| {
        let k = objectives_count(num_objectives)?;
        let v = len("vocab", vocab)?;
        let cfg = config(cfg)?;
        result_outputs(result, stats, k)?;
        if !(1..=recap::MAX_OBJECTIVES).contains(&k) {
            return Err(Error::invalid_argument(
                "num_objectives",
                format!("expected 1 <= K <= {}", recap::MAX_OBJECTIVES),
            ));
        }
        let pending = recap::cuda::PendingLogitsLoss::new(
            k,
            has_ref_logp != 0,
            false,
            &cfg,
            &LogprobConfig::default(),
            v,
        );
        let n_out = recap::cuda::logits_output_len(k);
        let o = raw::read_logits_output(place(device, stream), &pending, arr(out, n_out))?;
        write_result(&o.grpo, o.loss, result, stats);
        Ok(())
    })
}
