//! Computes the fused GRPO loss of a synthetic batch on the default backend (CUDA when usable, else
//! the CPU reference) and prints the loss, the metrics under verl's names and the gradient norm.
//!
//!   cargo run --release --example fused_loss

use recap_kernels::{Advantages, Backend, GrpoConfig, HostGrpoInputs, Mask, ObjectiveKind};

fn main() -> std::process::ExitCode {
    match run() {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("fused_loss: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn run() -> recap_kernels::Result<()> {
    let (backend, why) = Backend::auto_with_reason();
    println!(
        "backend: {}{}",
        backend.name(),
        why.map(|w| format!(" ({w})")).unwrap_or_default()
    );

    // 8 rollouts of 96 tokens (2 prompts x G = 4), objectives: 2 RL rewards + 1 replay (nll).
    let (b, len, k) = (8usize, 96usize, 3usize);
    let t = b * len;
    let cu: Vec<i32> = (0..=b).map(|i| (i * len) as i32).collect();
    let mut seed = 12345u64;
    let mut rand = move || {
        seed = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        ((seed >> 33) as f64 / (1u64 << 31) as f64) as f32
    };
    let old_logp: Vec<f32> = (0..t).map(|_| -3.0 * rand() - 0.05).collect();
    let logp: Vec<f32> = old_logp.iter().map(|o| o + 0.4 * (rand() - 0.5)).collect();
    let ref_logp: Vec<f32> = logp.iter().map(|l| l + 0.2 * (rand() - 0.5)).collect();
    let advantages: Vec<f32> = (0..b * k).map(|_| 2.0 * rand() - 1.0).collect();
    // responses end early: the last tokens of each sequence are padding
    let mask: Vec<u8> = (0..t)
        .map(|i| (i % len < len - (i / len) * 7) as u8)
        .collect();
    // rollouts 0..6 are RL (objectives 0 and 1), rollouts 6..8 are replay (objective 2)
    let membership: Vec<u32> = (0..b).map(|i| if i < 6 { 0b011 } else { 0b100 }).collect();
    let inputs = HostGrpoInputs {
        logp: &logp,
        old_logp: &old_logp,
        ref_logp: Some(&ref_logp),
        rollout_logp: None,
        policy_weight: None,
        advantages: Advantages::PerSequence(&advantages),
        mask: Mask::U8(&mask),
        cu_seqlens: &cu,
        lambda: &[1.2, 0.9, 0.9],
        objectives: &[
            ObjectiveKind::Policy,
            ObjectiveKind::Policy,
            ObjectiveKind::Nll,
        ],
        membership: Some(&membership),
        normalizers: None,
    };
    let config = GrpoConfig::default().with_kl_coef(0.01);
    let mut grad = vec![0f32; t];
    let out = backend.grpo_loss(&inputs, &config, &mut grad)?;
    println!("loss: {:.6}", out.loss);
    println!("objective losses: {:?}", out.objective_loss);
    println!("actor/kl_loss: {:.6}", out.kl_loss);
    for (name, value) in out.named(Some(&["format", "accuracy", "replay"])) {
        println!("{name}: {value:.6}");
    }
    let norm = grad.iter().map(|g| (*g as f64).powi(2)).sum::<f64>().sqrt();
    println!("gradient norm |dL/dlogp|: {norm:.6e}");
    Ok(())
}
