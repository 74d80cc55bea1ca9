//! The summary table of a run: its first and last window of steps side by side.

use super::metrics::StepMetrics;
use super::task::OBJECTIVES;

/// Mean of `f` over `rs`.
pub(crate) fn mean(rs: &[StepMetrics], f: &dyn Fn(&StepMetrics) -> f64) -> f64 {
    rs.iter().map(f).sum::<f64>() / rs.len().max(1) as f64
}

/// A field of the summary: its name and how it is read off a record.
pub(crate) type Field = (&'static str, fn(&StepMetrics) -> f64);

/// The quality fields of a record, in the order the summary and `recap experiment` show them.
pub(crate) const FIELDS: [Field; 13] = [
    ("format", |m| m.format),
    ("accuracy", |m| m.accuracy),
    ("overlap", |m| m.overlap),
    ("general_nll", |m| m.general_nll.unwrap_or(f64::NAN)),
    ("heldout_nll", |m| m.heldout_nll.unwrap_or(f64::NAN)),
    ("pass@1", |m| m.pass_at_1),
    ("pass@G/2", |m| m.pass_at_half),
    ("pass@G", |m| m.pass_at_g),
    ("support_kept", |m| m.support_kept),
    ("support_lost", |m| m.support_lost),
    ("support_new", |m| m.support_new),
    ("answer_entropy", |m| m.answer_entropy),
    ("pg_clipfrac", |m| m.pg_clipfrac),
];

/// The summary table comparing the first and the last window of `records` (W = 10 steps), with
/// the mean phase times.
pub fn summary(records: &[StepMetrics]) -> String {
    let w = 10.min(records.len().max(1));
    let (first, last) = (
        &records[..w.min(records.len())],
        &records[records.len().saturating_sub(w)..],
    );
    let mut s = format!("{:<18} {:>12} {:>12}\n", "", "first steps", "last steps");
    for (name, f) in FIELDS {
        s += &format!(
            "{name:<18} {:>12.4} {:>12.4}\n",
            mean(first, &f),
            mean(last, &f)
        );
    }
    for (k, name) in OBJECTIVES.iter().enumerate() {
        let lambda = |m: &StepMetrics| m.lambda.get(k).copied().unwrap_or(0.0) as f64;
        s += &format!(
            "{:<18} {:>12.4} {:>12.4}\n",
            format!("lambda {name}"),
            mean(first, &lambda),
            mean(last, &lambda)
        );
    }
    let all = |f: &dyn Fn(&StepMetrics) -> f64| mean(records, f);
    s += &format!(
        "step {:.1} ms (sampling {:.1}, advantages {:.1}, loss {:.1}, optimizer {:.1}), {:.0} tokens/s",
        all(&|m| m.step_time_ms),
        all(&|m| m.sample_ms),
        all(&|m| m.advantages_ms),
        all(&|m| m.loss_ms),
        all(&|m| m.optimizer_ms),
        all(&|m| m.tokens_per_s),
    );
    s
}
