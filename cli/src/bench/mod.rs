//! `recap bench`: timings of every op and of a training step, beside the machine's own copy
//! bandwidth measured in the same run, as a table and as JSON.
//!
//! On a GPU: CUDA events on the stream around each whole API call (uploads of the small per-batch
//! arrays, launches, read-back of the statistics), the L2 cache flushed before each timed run
//! (llm.c style), median and min over at least 20 timed runs after warm-up; the baseline is a
//! 1 GiB device-to-device copy. Without a GPU the CPU reference backend is timed the same way with
//! the host clock, against a host memcpy, on smaller sizes (and the report says so).
//!
//! Bytes are what the op must move at least: each per-token input read once and each output
//! written once (the logits read once forward, read and written once by the in-place backward).
//! "Extra memory" is what the call allocates beyond its inputs and outputs (from the sizes it
//! allocates: the chunk of logits and per-token work of the logits paths; the fused loss's few
//! per-block statistics are counted too).

mod cpu;
mod cuda;
mod gae;

use crate::train::Device;
use recap_kernels::error::{Error, Result};
use std::io::Write;

/// Settings of a run.
#[derive(Clone, Debug, Default)]
pub struct BenchConfig {
    /// Where to run (`None`: auto, CUDA when usable).
    pub device: Option<Device>,
    /// Only cases whose name contains this text.
    pub filter: Option<String>,
    /// Fewer sizes and runs (a smoke test, not for timing).
    pub quick: bool,
}

impl BenchConfig {
    fn wants(&self, name: &str) -> bool {
        self.filter.as_deref().map_or(true, |f| name.contains(f))
    }

    /// (warm-up, timed) runs.
    fn runs(&self) -> (usize, usize) {
        if self.quick {
            (1, 3)
        } else {
            (3, 20)
        }
    }
}

/// One measured case.
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize, PartialEq)]
pub struct BenchRecord {
    /// `fused_loss`, `logits`, `fused_linear`, `advantages`, `token_baseline`, `rollout_is`, `gae`,
    /// `train_step`, `copy`.
    pub op: String,
    /// The case, e.g. `T=262144 K=3`.
    pub case: String,
    /// Median time of one call, microseconds.
    pub median_us: f64,
    /// Fastest call, microseconds.
    pub min_us: f64,
    /// Timed calls.
    pub runs: usize,
    /// Bytes the op moves at least (0 where not meaningful).
    pub bytes: f64,
    /// `bytes / median`.
    pub gb_s: f64,
    /// `gb_s` as a percentage of the copy bandwidth measured in the same run.
    pub pct_of_copy: f64,
    /// Device (or host) memory the call allocates beyond its inputs and outputs.
    pub extra_bytes: f64,
    /// A result to check peers against: the loss (fused loss, fused-linear), the sum of the
    /// log-probabilities (logits forward); `None` elsewhere.
    #[serde(default)]
    pub value: Option<f64>,
    /// Kernel launches (cuBLAS GEMMs included) per call, counted by the emulated CUDA device
    /// (`scripts/emulated-gpu.sh --bench`); `None` on a GPU or the CPU, which do not count.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub launches: Option<f64>,
    /// Host synchronizations per call (stream, context and event syncs, blocking and pageable
    /// read-back copies), counted by the emulated device; `None` elsewhere.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub syncs: Option<f64>,
}

impl BenchRecord {
    /// The progress line of a finished case.
    pub fn progress_line(&self) -> String {
        let rate = if self.bytes > 0.0 {
            format!(", {:.2} GB/s ({:.1}% of copy)", self.gb_s, self.pct_of_copy)
        } else {
            String::new()
        };
        let calls = match (self.launches, self.syncs) {
            (Some(l), Some(s)) => format!(", {l} launches and {s} syncs per call"),
            _ => String::new(),
        };
        format!(
            "{} {}: median {:.1} us, min {:.1} us{rate}{calls}",
            self.op, self.case, self.median_us, self.min_us
        )
    }
}

/// A whole run.
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize, PartialEq)]
pub struct BenchReport {
    /// `cuda` or `cpu`.
    pub backend: String,
    /// The GPU's name, or the host's CPU model.
    pub device: String,
    /// Copy bandwidth of the baseline (read + write), GB/s.
    pub copy_gb_s: f64,
    /// Whether the run was a `--quick` smoke run (not for timing).
    pub quick: bool,
    /// The crate version that ran.
    pub crate_version: String,
    /// The nvcc that compiled the kernels (empty without kernels).
    pub nvcc: String,
    /// One record per op and case.
    pub records: Vec<BenchRecord>,
    /// The device was the emulated one (`scripts/emulated-gpu.sh`): the times are the host
    /// emulator's and mean nothing; `launches` and `syncs` are counted.
    #[serde(default)]
    pub emulated: bool,
}

/// One timing: median and fastest call (microseconds) and, on the emulated device, the launches and
/// host synchronizations per call (`None` elsewhere).
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub(crate) struct Timing {
    pub median_us: f64,
    pub min_us: f64,
    pub calls: Option<(f64, f64)>,
}

impl From<(f64, f64)> for Timing {
    /// `(median, min)` of a timing without counts.
    fn from((median_us, min_us): (f64, f64)) -> Timing {
        Timing {
            median_us,
            min_us,
            calls: None,
        }
    }
}

impl Timing {
    /// Two calls one after the other: times and counts added (counts only when both have them).
    fn then(self, next: Timing) -> Timing {
        Timing {
            median_us: self.median_us + next.median_us,
            min_us: self.min_us + next.min_us,
            calls: self
                .calls
                .zip(next.calls)
                .map(|(a, b)| (a.0 + b.0, a.1 + b.1)),
        }
    }
}

/// Median and min of a sample, in the unit given.
pub(crate) fn stats(mut v: Vec<f64>) -> (f64, f64) {
    v.sort_by(|a, b| a.total_cmp(b));
    (v[v.len() / 2], v[0])
}

/// A record from a timing (microseconds) against the copy baseline.
pub(crate) fn record(
    op: &str,
    case: String,
    tm: impl Into<Timing>,
    runs: usize,
    bytes: f64,
    extra_bytes: f64,
    copy_gb_s: f64,
) -> BenchRecord {
    let Timing {
        median_us,
        min_us,
        calls,
    } = tm.into();
    let gb_s = if median_us > 0.0 && bytes > 0.0 {
        bytes / (median_us * 1e-6) / 1e9
    } else {
        0.0
    };
    BenchRecord {
        op: op.into(),
        case,
        median_us,
        min_us,
        runs,
        bytes,
        gb_s,
        pct_of_copy: if copy_gb_s > 0.0 {
            100.0 * gb_s / copy_gb_s
        } else {
            0.0
        },
        extra_bytes,
        value: None,
        launches: calls.map(|c| c.0),
        syncs: calls.map(|c| c.1),
    }
}

/// The records of one logits case: forward (reads the logits once), in-place backward (reads and
/// writes them), and both; `bytes` is the size of the logits, `extra` the forward's extra memory.
pub(crate) fn logits_records(
    case: &str,
    fwd: impl Into<Timing>,
    bwd: impl Into<Timing>,
    runs: usize,
    bytes: f64,
    extra: f64,
    copy_gb_s: f64,
) -> [BenchRecord; 3] {
    let (fwd, bwd) = (fwd.into(), bwd.into());
    let rec = |part: &str, tm: Timing, bytes, extra| {
        record(
            "logits",
            format!("{case} {part}"),
            tm,
            runs,
            bytes,
            extra,
            copy_gb_s,
        )
    };
    let both = fwd.then(bwd);
    [
        rec("forward", fwd, bytes, extra),
        rec("backward", bwd, 2.0 * bytes, 0.0),
        rec("both", both, 3.0 * bytes, extra),
    ]
}

/// Runs the benchmark; `progress` gets a line per case.
pub fn run(cfg: &BenchConfig, progress: &mut dyn FnMut(&str)) -> Result<BenchReport> {
    let device = cfg.device.unwrap_or(Device::Auto);
    let gpu = match device {
        Device::Cpu => None,
        Device::Cuda => Some(recap_kernels::cuda::Gpu::new(0)?),
        Device::Auto => match recap_kernels::cuda::Gpu::new(0) {
            Ok(g) => Some(g),
            Err(e) => {
                progress(&format!(
                    "no usable GPU ({e}): benchmarking the CPU reference backend"
                ));
                None
            }
        },
    };
    match gpu {
        Some(g) => cuda::run(&g, cfg, progress),
        None => cpu::run(cfg, progress),
    }
}

fn human_bytes(b: f64) -> String {
    if b <= 0.0 {
        "-".into()
    } else if b < 1024.0 * 1024.0 {
        format!("{:.0} KiB", b / 1024.0)
    } else {
        format!("{:.0} MiB", b / (1024.0 * 1024.0))
    }
}

/// The report as a text table.
pub fn table(r: &BenchReport) -> String {
    let mut s = format!(
        "recap bench: {} backend on {}; copy baseline {:.0} GB/s (read + write){}\n",
        r.backend,
        r.device,
        r.copy_gb_s,
        if r.quick {
            "; --quick: not for timing"
        } else {
            ""
        }
    );
    s += &format!(
        "{:<14} {:<40} {:>12} {:>12} {:>9} {:>8} {:>10}\n",
        "op", "case", "median us", "min us", "GB/s", "% copy", "extra mem"
    );
    for x in &r.records {
        let (gbs, pct) = if x.bytes > 0.0 {
            let gbs = if x.gb_s < 10.0 {
                format!("{:.2}", x.gb_s)
            } else {
                format!("{:.0}", x.gb_s)
            };
            (gbs, format!("{:.1}%", x.pct_of_copy))
        } else {
            ("-".into(), "-".into())
        };
        s += &format!(
            "{:<14} {:<40} {:>12.1} {:>12.1} {:>9} {:>8} {:>10}\n",
            x.op,
            x.case,
            x.median_us,
            x.min_us,
            gbs,
            pct,
            human_bytes(x.extra_bytes)
        );
    }
    s
}

/// Writes the report as JSON to `path`, atomically (a temporary file beside it, then a rename).
pub fn write_json(r: &BenchReport, path: &std::path::Path) -> Result<()> {
    let json = serde_json::to_string_pretty(r)
        .map_err(|e| Error::invalid_argument("json", e.to_string()))?;
    let cannot = |e: std::io::Error| {
        Error::invalid_argument("json", format!("cannot write {}: {e}", path.display()))
    };
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    let tmp = std::path::PathBuf::from(tmp);
    let mut f = std::fs::File::create(&tmp).map_err(cannot)?;
    writeln!(f, "{json}").map_err(cannot)?;
    f.sync_all().map_err(cannot)?;
    drop(f);
    std::fs::rename(&tmp, path).map_err(cannot)
}

/// One optimal-token-baseline case of both backends: T tokens in sequences of `seq_len`, groups of
/// `group` consecutive sequences.
pub(crate) struct TokenBaselineCase {
    pub case: String,
    pub t: usize,
    pub seq_len: usize,
    pub group: usize,
}

impl TokenBaselineCase {
    /// The cases `cfg` asks for (one with `--quick`).
    pub fn wanted(cfg: &BenchConfig) -> Vec<TokenBaselineCase> {
        let sizes: &[usize] = if cfg.quick {
            &[65_536]
        } else {
            &[65_536, 524_288]
        };
        let (seq_len, group) = (1024, 16);
        sizes
            .iter()
            .map(|&t| TokenBaselineCase {
                case: format!("T={t} L={seq_len} G={group}"),
                t,
                seq_len,
                group,
            })
            .filter(|c| cfg.wants(&c.case))
            .collect()
    }

    /// Bytes the op moves at least: three f32 inputs and a u8 mask read, two f32 outputs written.
    pub fn bytes(&self) -> f64 {
        (self.t * 21) as f64
    }
}

/// A rollout-IS case (verl's `compute_rollout_correction_weights` with
/// `rollout_is_batch_normalize`), the same on both backends.
#[derive(Clone, Debug)]
pub(crate) struct RolloutIsCase {
    pub case: String,
    pub t: usize,
    pub seq_len: usize,
    pub correction: recap_kernels::RolloutCorrection,
}

impl RolloutIsCase {
    /// The cases `cfg` asks for: token and sequence level, truncated at 2, normalized (one size
    /// with `--quick`).
    pub fn wanted(cfg: &BenchConfig) -> Vec<RolloutIsCase> {
        let sizes: &[usize] = if cfg.quick {
            &[65_536]
        } else {
            &[262_144, 2_097_152]
        };
        let seq_len = 1024;
        let levels = [
            recap_kernels::IsLevel::Token,
            recap_kernels::IsLevel::Sequence,
        ];
        sizes
            .iter()
            .flat_map(|&t| {
                levels.iter().map(move |&level| RolloutIsCase {
                    case: format!("T={t} L={seq_len} {level:?} normalized"),
                    t,
                    seq_len,
                    correction: recap_kernels::RolloutCorrection {
                        level,
                        ..Default::default()
                    },
                })
            })
            .filter(|c| cfg.wants(&c.case))
            .collect()
    }

    /// Bytes the op moves at least: the f32 log-ratios and the u8 mask read, the weights written.
    pub fn bytes(&self) -> f64 {
        (self.t * 9) as f64
    }

    /// `[T]` log-ratios `old - rollout` (within ±0.1), `[T]` mask, `[B + 1]` cu_seqlens.
    pub fn inputs(&self) -> (Vec<f32>, Vec<u8>, Vec<i32>) {
        let (logp, old, _, mask, cu) = inputs::grpo(self.t, 1, self.seq_len);
        let lr = old.iter().zip(&logp).map(|(o, l)| o - l).collect();
        (lr, mask, cu)
    }
}

/// Deterministic pseudo-random inputs shared by both backends' cases.
pub(crate) mod inputs {
    /// `[T]` log-probs, `[T]` old log-probs, `[B, K]` advantages, `[T]` mask, `[B + 1]` cu_seqlens.
    #[allow(clippy::type_complexity)]
    pub fn grpo(
        t: usize,
        k: usize,
        seq_len: usize,
    ) -> (Vec<f32>, Vec<f32>, Vec<f32>, Vec<u8>, Vec<i32>) {
        let b = t.div_ceil(seq_len);
        let logp: Vec<f32> = (0..t)
            .map(|i| -0.5 - ((i * 7919) % 1000) as f32 * 1e-3)
            .collect();
        let old = logp
            .iter()
            .enumerate()
            .map(|(i, x)| x + ((i * 104_729) % 200) as f32 * 1e-3 - 0.1)
            .collect();
        let adv = (0..b * k)
            .map(|i| ((i * 31) % 17) as f32 / 8.0 - 1.0)
            .collect();
        let mask = (0..t)
            .map(|i| (i % seq_len < seq_len * 7 / 8) as u8)
            .collect();
        let cu = (0..=b).map(|i| (i * seq_len).min(t) as i32).collect();
        (logp, old, adv, mask, cu)
    }

    /// A logit value in [-5, 5).
    pub fn logit(i: usize) -> f32 {
        ((i.wrapping_mul(2_654_435_761)) % 1000) as f32 * 0.01 - 5.0
    }

    /// verl's optimal token baseline inputs of T tokens in sequences of `seq_len`: `[T]` token
    /// rewards (sparse), old log-probs, `sum_pi_squared` of a real distribution, mask (7/8 of each
    /// sequence), `[B + 1]` cu_seqlens.
    #[allow(clippy::type_complexity)]
    pub fn token_baseline(
        t: usize,
        seq_len: usize,
    ) -> (Vec<f32>, Vec<f32>, Vec<f32>, Vec<u8>, Vec<i32>) {
        let (old, _, _, mask, cu) = grpo(t, 1, seq_len);
        let rewards = (0..t)
            .map(|i| if (i * 7919) % 97 == 0 { 1.0 } else { 0.0 })
            .collect();
        let spp = old
            .iter()
            .map(|o| {
                let pi = o.exp();
                pi * pi + 0.5 * (1.0 - pi) * (1.0 - pi)
            })
            .collect();
        (rewards, old, spp, mask, cu)
    }

    /// Rewards `[B, K]` (0/1 and fractions).
    pub fn rewards(b: usize, k: usize) -> Vec<f32> {
        (0..b * k).map(|i| ((i * 7919) % 5) as f32 / 4.0).collect()
    }
}

/// One op's benchmark: its cases, run on either backend through the op's pointer-level entry point
/// (`ops::<op>::*_at`) with the arrays of [`OpBench::array`]. An op benchmarked this way is its own
/// file here plus one line in [`OP_BENCHES`].
pub(crate) type OpBenchFn = fn(&mut OpBench<'_>) -> Result<()>;

/// The ops benchmarked through [`OpBench`], in the report's order (after the ops above).
const OP_BENCHES: &[OpBenchFn] = &[gae::bench];

/// A backend's timer: warm-up and timed runs of a call, `(timing, runs)`.
pub(crate) type TimeFn<'a> =
    dyn FnMut(&mut dyn FnMut() -> Result<()>) -> Result<(Timing, usize)> + 'a;

/// What an [`OpBenchFn`] gets from the backend that runs it.
pub(crate) struct OpBench<'a> {
    pub cfg: &'a BenchConfig,
    /// The small shapes only (the emulated device).
    pub small: bool,
    /// Where the arrays live and the op runs: the host, or the timed stream of the device.
    pub place: recap_kernels::raw::Place,
    stream: Option<std::sync::Arc<cudarc::driver::CudaStream>>,
    time: &'a mut TimeFn<'a>,
    push: &'a mut dyn FnMut(BenchRecord),
    copy_gb_s: f64,
}

/// An array of a benchmark case, in the memory of the case's place.
pub(crate) enum BenchArray<T: cudarc::driver::DeviceRepr> {
    Host(Vec<T>),
    Device(
        cudarc::driver::CudaSlice<T>,
        std::sync::Arc<cudarc::driver::CudaStream>,
    ),
}

impl<T: cudarc::driver::DeviceRepr> BenchArray<T> {
    fn addr(&self) -> (usize, usize) {
        match self {
            BenchArray::Host(v) => (v.as_ptr() as usize, v.len()),
            BenchArray::Device(d, s) => {
                let (p, _sync) = cudarc::driver::DevicePtr::device_ptr(d, s);
                (p as usize, d.len())
            }
        }
    }

    /// The array as an op's input.
    pub fn input(&self) -> recap_kernels::raw::In<T> {
        let (a, n) = self.addr();
        // SAFETY: the array's own memory at the place it was made for, alive while `self` is; the
        // benchmark passes each array once per call.
        unsafe { recap_kernels::raw::In::new(a, n) }
    }

    /// The array as an op's output.
    pub fn output(&mut self) -> recap_kernels::raw::Out<T> {
        let (a, n) = self.addr();
        // SAFETY: as `input`; `&mut self` keeps other uses out while the op writes it.
        unsafe { recap_kernels::raw::Out::new(a, n) }
    }
}

impl OpBench<'_> {
    /// `values` as an array at this benchmark's place.
    pub fn array<T: cudarc::driver::DeviceRepr + cudarc::driver::ValidAsZeroBits + Clone>(
        &self,
        values: &[T],
    ) -> Result<BenchArray<T>> {
        Ok(match &self.stream {
            None => BenchArray::Host(values.to_vec()),
            Some(s) => BenchArray::Device(s.clone_htod(values)?, s.clone()),
        })
    }

    /// Times `f` (warm-up and timed runs as configured) and records it as `op` / `case`, with the
    /// bytes it moves at least and the extra memory it allocates.
    pub fn measure(
        &mut self,
        op: &str,
        case: String,
        bytes: f64,
        extra_bytes: f64,
        mut f: impl FnMut() -> Result<()>,
    ) -> Result<()> {
        if !self.cfg.wants(&case) && !self.cfg.wants(op) {
            return Ok(());
        }
        let (tm, runs) = (self.time)(&mut f)?;
        (self.push)(record(
            op,
            case,
            tm,
            runs,
            bytes,
            extra_bytes,
            self.copy_gb_s,
        ));
        Ok(())
    }
}

/// Runs every [`OP_BENCHES`] entry at `place`.
#[allow(clippy::too_many_arguments)]
pub(crate) fn run_op_benches(
    cfg: &BenchConfig,
    small: bool,
    place: recap_kernels::raw::Place,
    stream: Option<std::sync::Arc<cudarc::driver::CudaStream>>,
    time: &mut TimeFn<'_>,
    push: &mut dyn FnMut(BenchRecord),
    copy_gb_s: f64,
) -> Result<()> {
    let mut b = OpBench {
        cfg,
        small,
        place,
        stream,
        time,
        push,
        copy_gb_s,
    };
    OP_BENCHES.iter().try_for_each(|f| f(&mut b))
}
