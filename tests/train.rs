//! `recap train` on the CPU: a seed reproduces a run, the rewards improve, metrics.jsonl is written.

use recap_kernels::train::{summary, train, StepMetrics, TrainConfig, Weighting};

fn small(seed: u64, weighting: Weighting) -> TrainConfig {
    TrainConfig {
        steps: 30,
        seed,
        prompts: 4,
        weighting,
        ..TrainConfig::default()
    }
}

fn without_timing(m: &StepMetrics) -> StepMetrics {
    StepMetrics {
        step_time_ms: 0.0,
        tokens_per_s: 0.0,
        ..m.clone()
    }
}

/// metrics.jsonl without the timing fields (the only ones that may differ between two runs).
fn jsonl(dir: &std::path::Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(dir.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| {
            let mut v: serde_json::Value = serde_json::from_str(l).unwrap();
            let o = v.as_object_mut().unwrap();
            assert!(o.remove("step_time_ms").is_some() && o.remove("tokens_per_s").is_some());
            v
        })
        .collect()
}

#[test]
fn a_seed_reproduces_the_run() {
    let base = std::env::temp_dir().join(format!("recap-train-test-{}", std::process::id()));
    let run = |seed: u64, name: &str| {
        let dir = base.join(name);
        let records = train(&TrainConfig {
            out: Some(dir.clone()),
            ..small(seed, Weighting::Recap)
        })
        .unwrap();
        (records, jsonl(&dir))
    };
    let (a, file_a) = run(3, "a");
    let (b, file_b) = run(3, "b");
    let (_, file_c) = run(4, "c");
    assert_eq!(file_a.len(), 30);
    assert_eq!(file_a, file_b, "the same seed gives the same metrics.jsonl");
    assert_ne!(file_a, file_c, "another seed, another run");
    assert_eq!(
        a.iter().map(without_timing).collect::<Vec<_>>(),
        b.iter().map(without_timing).collect::<Vec<_>>()
    );
    let _ = std::fs::remove_dir_all(base);
}

#[test]
fn rewards_improve_and_weights_move() {
    let runs = train(&small(1, Weighting::Recap)).unwrap();
    let first = runs[..5].iter().map(|m| m.format).sum::<f64>() / 5.0;
    let last = runs[25..].iter().map(|m| m.format).sum::<f64>() / 5.0;
    assert!(last > first + 0.3, "format reward {first} -> {last}");
    assert!(
        runs[..20].iter().all(|m| m.lambda == vec![1.0; 4]),
        "weights are 1 while the scheduler warms up"
    );
    assert!(
        runs[20..].iter().any(|m| m.lambda != vec![1.0; 4]),
        "then they move"
    );
    assert!(runs
        .iter()
        .all(|m| m.lambda.iter().all(|x| x.is_finite()) && m.loss.is_finite()));
    let uniform = train(&small(1, Weighting::Uniform)).unwrap();
    assert!(uniform.iter().all(|m| m.lambda == vec![1.0; 4]));
    assert!(summary(&runs).contains("lambda accuracy"));
}
