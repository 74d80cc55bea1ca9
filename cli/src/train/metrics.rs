//! What a step reports (one line of `metrics.jsonl`), and the diagnostics of forgetting and of the
//! support of correct answers ("The Invisible Leash", arXiv 2507.14843): pass@k, the support of
//! correct answers relative to the initial policy, and the answer-level entropy.

use super::task::ANSWERS;

/// One step's record (one line of `metrics.jsonl`).
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize, PartialEq)]
pub struct StepMetrics {
    /// The step (0-based).
    pub step: usize,
    /// Batch-mean format reward (the three RL objectives: format, accuracy, overlap).
    pub format: f64,
    /// Batch-mean accuracy reward.
    pub accuracy: f64,
    /// Batch-mean overlap reward.
    pub overlap: f64,
    /// NLL per token of the replay sequences under the current policy (measured whether or not
    /// they are trained on); `None` without replay sequences.
    pub general_nll: Option<f64>,
    /// NLL per token of the held-out general sequences (learnt before RL, never replayed); `None`
    /// without them.
    pub heldout_nll: Option<f64>,
    /// The unbiased pass@k over each prompt's G rollouts (accuracy), for k = 1, G/2 and G.
    pub pass_at_1: f64,
    /// pass@(G/2).
    pub pass_at_half: f64,
    /// pass@G.
    pub pass_at_g: f64,
    /// Fractions of the prompts whose correct answer is in the policy's support (probability at
    /// least [`SUPPORT_EPS`] at the answer slot) and was in the initial policy's (kept), was and is
    /// no longer (lost), or was not and now is (new).
    pub support_kept: f64,
    /// See `support_kept`: lost.
    pub support_lost: f64,
    /// See `support_kept`: new.
    pub support_new: f64,
    /// Mean over prompts of the entropy (nats) of the policy's distribution over the answer tokens
    /// at the answer slot (renormalized over the answers).
    pub answer_entropy: f64,
    /// The objective weights (format, accuracy, overlap, replay).
    pub lambda: Vec<f32>,
    /// The loss of the last epoch.
    pub loss: f64,
    /// verl's `actor/pg_clipfrac` (mean over the policy objectives).
    pub pg_clipfrac: f64,
    /// verl's `actor/ppo_kl`.
    pub ppo_kl: f64,
    /// Mean per-token KL to the reference.
    pub kl: f64,
    /// Mean per-token entropy of the policy.
    pub entropy: f64,
    /// Wall time of the step, milliseconds.
    pub step_time_ms: f64,
    /// Sampling, old and reference log-probs.
    pub sample_ms: f64,
    /// Rewards and group advantages.
    pub advantages_ms: f64,
    /// The fused-linear loss and gradient (GEMMs and loss kernels), all epochs.
    pub loss_ms: f64,
    /// AdamW, all epochs.
    pub optimizer_ms: f64,
    /// Loss tokens per second of the step.
    pub tokens_per_s: f64,
}

impl StepMetrics {
    /// The record without its timing fields (the only ones two runs of one seed may differ in).
    pub fn without_timing(&self) -> StepMetrics {
        StepMetrics {
            step_time_ms: 0.0,
            sample_ms: 0.0,
            advantages_ms: 0.0,
            loss_ms: 0.0,
            optimizer_ms: 0.0,
            tokens_per_s: 0.0,
            ..self.clone()
        }
    }
}

/// The probability from which an answer is in a policy's support.
pub const SUPPORT_EPS: f64 = 1e-3;

/// The unbiased estimator of pass@k from `c` correct of `n` samples: `1 - C(n - c, k) / C(n, k)`,
/// as the product `1 - prod_{i = n - c + 1}^{n} (1 - k / i)`.
pub fn pass_at_k(n: usize, c: usize, k: usize) -> f64 {
    if k == 0 || n == 0 {
        return 0.0;
    }
    if n - c < k {
        return 1.0;
    }
    1.0 - ((n - c + 1)..=n)
        .map(|i| 1.0 - k as f64 / i as f64)
        .product::<f64>()
}

/// Mean pass@k over prompts of `correct[q]` correct of `n` rollouts each.
pub fn mean_pass_at_k(correct: &[usize], n: usize, k: usize) -> f64 {
    correct.iter().map(|&c| pass_at_k(n, c, k)).sum::<f64>() / correct.len().max(1) as f64
}

/// The support diagnostics from the answer probes' log-probabilities (`[P, 16]`, every answer token
/// at each prompt's answer slot) under the current and the initial policy: `(kept, lost, new,
/// answer entropy)`.
pub fn support(current: &[f32], initial: &[f32], answer: &[usize]) -> (f64, f64, f64, f64) {
    let n = ANSWERS.len();
    let p = answer.len().max(1) as f64;
    let (mut kept, mut lost, mut new, mut entropy) = (0.0, 0.0, 0.0, 0.0);
    for (q, &a) in answer.iter().enumerate() {
        let j = q * n + (a - ANSWERS.start);
        let now = (current[j] as f64).exp() >= SUPPORT_EPS;
        let before = (initial[j] as f64).exp() >= SUPPORT_EPS;
        match (before, now) {
            (true, true) => kept += 1.0,
            (true, false) => lost += 1.0,
            (false, true) => new += 1.0,
            (false, false) => {}
        }
        let probs: Vec<f64> = current[q * n..(q + 1) * n]
            .iter()
            .map(|x| (*x as f64).exp())
            .collect();
        let z: f64 = probs.iter().sum();
        if z > 0.0 {
            entropy -= probs
                .iter()
                .filter(|x| **x > 0.0)
                .map(|x| (x / z) * (x / z).ln())
                .sum::<f64>();
        }
    }
    (kept / p, lost / p, new / p, entropy / p)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pass_at_k_by_hand() {
        // 2 correct of 4: pass@1 = 1/2, pass@2 = 1 - C(2,2)/C(4,2) = 5/6, pass@4 = 1
        assert!((pass_at_k(4, 2, 1) - 0.5).abs() < 1e-12);
        assert!((pass_at_k(4, 2, 2) - 5.0 / 6.0).abs() < 1e-12);
        assert_eq!(pass_at_k(4, 2, 4), 1.0);
        assert_eq!(pass_at_k(4, 0, 4), 0.0);
        assert_eq!(pass_at_k(8, 8, 1), 1.0);
        assert!((mean_pass_at_k(&[0, 2], 4, 1) - 0.25).abs() < 1e-12);
    }

    #[test]
    fn support_by_hand() {
        // two prompts: the first's answer (token 2) keeps its mass; the second's (token 3) falls
        // from 1/16 to 1e-5: kept 1/2, lost 1/2, new 0; entropies: uniform ln 16, then the first
        // prompt collapsed onto one answer (entropy 0)
        let uniform = vec![(1.0f32 / 16.0).ln(); 32];
        let mut now = vec![-30.0f32; 32];
        now[0] = 0.0;
        now[16] = 0.0;
        now[17] = (1e-5f32).ln();
        let (kept, lost, new, h) = support(&now, &uniform, &[2, 3]);
        assert_eq!((kept, lost, new), (0.5, 0.5, 0.0));
        assert!((0.0..1e-3).contains(&h), "{h}");
        let (.., h0) = support(&uniform, &uniform, &[2, 3]);
        assert!((h0 - 16f64.ln()).abs() < 1e-5);
    }
}
