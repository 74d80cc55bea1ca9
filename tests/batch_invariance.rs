//! Batch invariance of the log-prob kernels (issue: `log_prob != old_log_prob` on-policy when the
//! micro-batch size differs): a row's log-prob, entropy, LSE and logits gradient are the same bits
//! whatever batch holds it — alone, or at any position of a batch of 1 .. 4,097 rows, with any
//! row padding (`ld`) — on the CPU reference and on the device (the kernels are row-local: one
//! block per row, a fixed reduction order inside it). Σπ², from the same read, is checked the same
//! way on the CPU reference and in `tests/sum_pi_squared.rs` against it on the device.

mod common;

use common::Rng;
use half::{bf16, f16};
use recap_kernels::{cpu, Backend, LogitElem, Logits, LogprobConfig};

const V: usize = 37;
const POOL: usize = 4097;

/// The pool of rows: logits `[POOL, V]`, labels (every 9th ignored), upstream gradients.
struct Pool<E> {
    z: Vec<E>,
    y: Vec<i32>,
    g: Vec<f32>,
    ge: Vec<f32>,
}

fn pool<E: LogitElem>(rng: &mut Rng) -> Pool<E> {
    Pool {
        z: (0..POOL * V)
            .map(|_| E::from_f32((rng.normal() * 3.0) as f32))
            .collect(),
        y: (0..POOL)
            .map(|r| {
                if r % 9 == 4 {
                    -100
                } else {
                    rng.below(V) as i32
                }
            })
            .collect(),
        g: (0..POOL).map(|_| rng.normal() as f32).collect(),
        ge: (0..POOL).map(|_| rng.normal() as f32 * 0.5).collect(),
    }
}

/// One row's outputs as bits: logp, entropy, LSE, Σπ² (CPU only, else 0) and its gradient row.
type RowBits = (u32, u32, u32, u32, Vec<u32>);

/// The values' bits (each dtype converts to f32 exactly).
fn bits<E: LogitElem>(x: &[E]) -> Vec<u32> {
    x.iter().map(|v| v.to_f32().to_bits()).collect()
}

/// The batch of `rows` (pool indices) laid out with leading dimension `ld` through `be`: each
/// row's bits.
fn run<E: LogitElem>(be: &Backend, p: &Pool<E>, rows: &[usize], ld: usize) -> Vec<RowBits> {
    let t = rows.len();
    let mut z = vec![E::from_f32(-7.5); if t == 0 { 0 } else { (t - 1) * ld + V }];
    for (i, &r) in rows.iter().enumerate() {
        z[i * ld..i * ld + V].copy_from_slice(&p.z[r * V..(r + 1) * V]);
    }
    let y: Vec<i32> = rows.iter().map(|&r| p.y[r]).collect();
    let g: Vec<f32> = rows.iter().map(|&r| p.g[r]).collect();
    let ge: Vec<f32> = rows.iter().map(|&r| p.ge[r]).collect();
    let cfg = LogprobConfig {
        temperature: 0.7,
        ..LogprobConfig::default()
    };
    let logits = Logits {
        data: &z[..],
        rows: t,
        vocab: V,
        ld,
    };
    let (mut lp, mut h, mut l) = (vec![0f32; t], vec![0f32; t], vec![0f32; t]);
    be.logprob_forward(&logits, &y, &cfg, &mut lp, &mut h, &mut l)
        .unwrap();
    let mut q = vec![0f32; t];
    if matches!(be, Backend::Cpu) {
        cpu::sum_pi_squared(&logits, &cfg, &mut q).unwrap();
    }
    let mut dz = vec![E::from_f32(0.0); z.len()];
    be.logprob_backward(
        &logits,
        &y,
        &cfg,
        &g,
        Some(&ge),
        &mut Logits {
            data: &mut dz[..],
            rows: t,
            vocab: V,
            ld,
        },
    )
    .unwrap();
    (0..t)
        .map(|i| {
            (
                lp[i].to_bits(),
                h[i].to_bits(),
                l[i].to_bits(),
                q[i].to_bits(),
                bits(&dz[i * ld..i * ld + V]),
            )
        })
        .collect()
}

fn assert_same(got: &RowBits, alone: &RowBits, what: &str) {
    for (name, a, b) in [
        ("logp", got.0, alone.0),
        ("entropy", got.1, alone.1),
        ("lse", got.2, alone.2),
        ("sum_pi_squared", got.3, alone.3),
    ] {
        assert_eq!(
            a,
            b,
            "{what}: {name} {} vs {} alone",
            f32::from_bits(a),
            f32::from_bits(b)
        );
    }
    if let Some(j) = (0..V).find(|&j| got.4[j] != alone.4[j]) {
        panic!(
            "{what}: dlogits[{j}] {} vs {} alone",
            f32::from_bits(got.4[j]),
            f32::from_bits(alone.4[j])
        );
    }
}

fn check<E: LogitElem>(be: &Backend) {
    let mut rng = Rng::new(6280);
    let p = pool::<E>(&mut rng);
    let sampled = [0usize, 1, 4, 31, 32, 33, 1000, 4096];
    let alone: Vec<RowBits> = sampled
        .iter()
        .map(|&r| run(be, &p, &[r], V).remove(0))
        .collect();
    let what = |n: usize, ld: usize, pos: usize, r: usize| {
        format!("{}: row {r} at {pos} of {n} (ld {ld})", E::SUFFIX)
    };
    // small batches: the row last, first and in the middle, among other rows of the pool
    for (k, &r) in sampled.iter().enumerate() {
        for (n, ld) in [(2usize, V), (31, V + 3), (32, V), (33, V + 8)] {
            for pos in [0, n / 2, n - 1] {
                let rows: Vec<usize> = (0..n)
                    .map(|i| if i == pos { r } else { (r + 7 * i + 1) % POOL })
                    .collect();
                let out = run(be, &p, &rows, ld);
                assert_same(&out[pos], &alone[k], &what(n, ld, pos, r));
            }
        }
    }
    // the whole pool, rotated (every sampled row elsewhere), with and without row padding
    for (shift, ld) in [(0usize, V), (123, V + 5)] {
        let rows: Vec<usize> = (0..POOL).map(|i| (i + shift) % POOL).collect();
        let out = run(be, &p, &rows, ld);
        for (k, &r) in sampled.iter().enumerate() {
            let pos = (r + POOL - shift) % POOL;
            assert_same(&out[pos], &alone[k], &what(POOL, ld, pos, r));
        }
    }
}

on_every_backend! {
    /// Each dtype: a row's outputs are the same bits alone and in batches of 2, 31, 32, 33 and
    /// 4,097 rows at any position, with any row padding.
    fn a_row_gives_the_same_bits_in_any_batch(be) {
        check::<f32>(&be);
        check::<f16>(&be);
        check::<bf16>(&be);
    }
}
