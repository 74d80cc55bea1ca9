//! `recap bench --quick` on the CPU backend: every op family is timed, the report names the
//! backend and baseline, the table and the JSON carry the same records.

use recap_cli::bench::{run, table, write_json, BenchConfig, BenchReport};
use recap_cli::train::Device;

#[test]
fn quick_cpu_bench_reports_every_op() {
    let mut lines = Vec::new();
    let report = run(
        &BenchConfig {
            device: Some(Device::Cpu),
            filter: None,
            quick: true,
        },
        &mut |l| lines.push(l.to_string()),
    )
    .unwrap();
    assert_eq!(report.backend, "cpu");
    assert!(report.copy_gb_s > 0.0 && report.quick);
    for op in [
        "copy",
        "fused_loss",
        "logits",
        "advantages",
        "token_baseline",
        "rollout_is",
        "gae",
        "train_step",
    ] {
        assert!(
            report.records.iter().any(|r| r.op == op),
            "{op} missing from {:?}",
            report.records.iter().map(|r| &r.op).collect::<Vec<_>>()
        );
    }
    for r in &report.records {
        assert!(
            r.median_us > 0.0 && r.min_us <= r.median_us && r.runs >= 1,
            "{r:?}"
        );
        if r.bytes > 0.0 {
            assert!(r.gb_s > 0.0 && r.pct_of_copy > 0.0, "{r:?}");
        }
    }
    assert_eq!(
        lines.len(),
        report.records.len(),
        "a progress line per case"
    );
    let text = table(&report);
    assert!(text.contains("median us") && text.contains("cpu backend"));
    let path = std::env::temp_dir().join(format!("recap-bench-{}.json", std::process::id()));
    write_json(&report, &path).unwrap();
    let back: BenchReport = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    assert_eq!(back.records.len(), report.records.len());
    for (a, b) in back.records.iter().zip(&report.records) {
        assert_eq!((&a.op, &a.case, a.runs), (&b.op, &b.case, b.runs));
        assert!((a.median_us - b.median_us).abs() <= 1e-9 * b.median_us.abs());
    }
    let _ = std::fs::remove_file(path);
    // a filter keeps only the matching cases (and the baseline)
    let only = run(
        &BenchConfig {
            device: Some(Device::Cpu),
            filter: Some("B=4096".into()),
            quick: true,
        },
        &mut |_| {},
    )
    .unwrap();
    assert!(only
        .records
        .iter()
        .all(|r| r.op == "copy" || r.case.contains("B=4096")));
    assert!(only.records.iter().any(|r| r.op == "advantages"));
}
