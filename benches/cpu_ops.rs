//! Criterion benchmarks of the CPU reference ops (`recap bench` measures both backends).

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use recap_kernels::{
    cpu, Advantages, GrpoConfig, HostGrpoInputs, HostReduceInputs, KlEstimator, Mask, ObjectiveKind,
};
use std::hint::black_box;

fn bench(c: &mut Criterion) {
    let (t, k, seq_len) = (16_384usize, 3usize, 512usize);
    let b = t / seq_len;
    let logp: Vec<f32> = (0..t)
        .map(|i| -0.5 - ((i * 7919) % 1000) as f32 * 1e-3)
        .collect();
    let old: Vec<f32> = logp
        .iter()
        .enumerate()
        .map(|(i, x)| x + ((i * 104_729) % 200) as f32 * 1e-3 - 0.1)
        .collect();
    let adv: Vec<f32> = (0..b * k)
        .map(|i| ((i * 31) % 17) as f32 / 8.0 - 1.0)
        .collect();
    let mask: Vec<u8> = (0..t)
        .map(|i| (i % seq_len < seq_len * 7 / 8) as u8)
        .collect();
    let cu: Vec<i32> = (0..=b).map(|i| (i * seq_len) as i32).collect();
    let lambda = vec![1.0f32; k];
    let objectives = vec![ObjectiveKind::Policy; k];
    let cfg = GrpoConfig::default();
    let mut grad = vec![0f32; t];
    let mut g = c.benchmark_group("cpu");
    g.throughput(Throughput::Elements(t as u64));
    g.bench_function("grpo_loss T=16384 K=3", |bch| {
        let inputs = HostGrpoInputs {
            logp: &logp,
            old_logp: &old,
            ref_logp: Some(&old),
            rollout_logp: None,
            policy_weight: None,
            advantages: Advantages::PerSequence(&adv),
            mask: Mask::U8(&mask),
            cu_seqlens: &cu,
            lambda: &lambda,
            objectives: &objectives,
            membership: None,
            normalizers: None,
        };
        bch.iter(|| black_box(cpu::grpo_loss(black_box(&inputs), &cfg, &mut grad).unwrap()))
    });
    let (mut v, mut gk) = (vec![0f32; t], vec![0f32; t]);
    g.bench_function("kl k3 T=16384", |bch| {
        bch.iter(|| {
            cpu::kl(
                black_box(&logp),
                &old,
                None,
                KlEstimator::K3,
                &mut v,
                &mut gk,
            )
            .unwrap()
        })
    });
    let losses: Vec<f32> = (0..t * k).map(|i| (i % 13) as f32 * 0.1).collect();
    let mut gr = vec![0f32; t * k];
    g.bench_function("weighted_reduce T=16384 K=3", |bch| {
        let inputs = HostReduceInputs {
            losses: &losses,
            mask: Mask::U8(&mask),
            cu_seqlens: &cu,
            lambda: &lambda,
            membership: None,
            normalizers: None,
        };
        bch.iter(|| black_box(cpu::weighted_reduce(black_box(&inputs), &cfg, &mut gr).unwrap()))
    });
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
