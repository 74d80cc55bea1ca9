//! Checkpoints that lose nothing: `checkpoint.safetensors` is replaced atomically (a killed run
//! resumes from its last checkpoint and continues exactly as the uninterrupted run), a partial
//! temporary file is ignored, and a corrupt or truncated checkpoint is a clear error.

use recap_cli::train::{train, StepMetrics, TrainConfig};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

fn tmp(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("recap-ckpt-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    d
}

fn exe() -> PathBuf {
    [env!("CARGO_BIN_EXE_recap"), ".gpu/bin/recap"]
        .into_iter()
        .map(PathBuf::from)
        .find(|p| p.exists())
        .expect("the recap binary (cargo builds it with the tests)")
}

fn records(out: &Path) -> Vec<StepMetrics> {
    std::fs::read_to_string(out.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| {
            serde_json::from_str::<StepMetrics>(l)
                .unwrap()
                .without_timing()
        })
        .collect()
}

const ARGS: [&str; 8] = [
    "train",
    "--device",
    "cpu",
    "--prompts",
    "2",
    "--checkpoint-every",
    "1",
    "--seed",
];

/// Kill a run that checkpoints every step at a moment of its own, resume it: the resumed run
/// loads, its metrics.jsonl has every step once, and they equal the uninterrupted run's.
#[test]
fn a_killed_run_resumes_and_continues_exactly() {
    let (ck, out) = (tmp("kill-ck"), tmp("kill-out"));
    let mut child = Command::new(exe())
        .args(ARGS)
        .arg("7")
        .args(["--steps", "100000", "--checkpoint"])
        .arg(&ck)
        .arg("--out")
        .arg(&out)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let started = Instant::now();
    // wait for some checkpoints, then kill it wherever it is (mid-write, possibly)
    while started.elapsed() < Duration::from_secs(60) {
        let lines = std::fs::read_to_string(out.join("metrics.jsonl"))
            .map(|s| s.lines().count())
            .unwrap_or(0);
        if lines >= 12 {
            break;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    child.kill().unwrap();
    child.wait().unwrap();
    let steps = 40;
    let resumed = Command::new(exe())
        .args(ARGS)
        .arg("7")
        .args(["--steps", &steps.to_string(), "--resume"])
        .arg(&ck)
        .arg("--out")
        .arg(&out)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&resumed.stderr);
    assert!(resumed.status.success(), "{stderr}");
    assert!(stderr.contains("resuming"), "{stderr}");
    let got = records(&out);
    let want: Vec<StepMetrics> = train(&TrainConfig {
        steps,
        seed: 7,
        prompts: 2,
        ..TrainConfig::default()
    })
    .unwrap()
    .iter()
    // through JSON as the file went (serde_json parses floats to within an ulp)
    .map(|m| serde_json::from_str::<StepMetrics>(&serde_json::to_string(m).unwrap()).unwrap())
    .map(|m| m.without_timing())
    .collect();
    assert_eq!(got.len(), steps, "every step once");
    assert_eq!(
        got, want,
        "the killed and resumed run equals the uninterrupted one"
    );
    let _ = std::fs::remove_dir_all(ck);
    let _ = std::fs::remove_dir_all(out);
}

#[test]
fn partial_corrupt_and_truncated_checkpoints() {
    let ck = tmp("corrupt");
    let cfg = TrainConfig {
        steps: 6,
        prompts: 2,
        checkpoint: Some(ck.clone()),
        checkpoint_every: Some(3),
        ..TrainConfig::default()
    };
    train(&cfg).unwrap();
    let file = ck.join("checkpoint.safetensors");
    let bytes = std::fs::read(&file).unwrap();
    // other tools read it: the tensors by name, with their shapes
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    for name in ["weights", "adam_m", "adam_v", "reference"] {
        assert_eq!(st.tensor(name).unwrap().shape(), [cfg.vocab, cfg.hidden]);
    }
    // a half-written temporary file (a write killed before its rename) changes nothing
    std::fs::write(
        ck.join(".checkpoint.safetensors.tmp-1"),
        &bytes[..bytes.len() / 2],
    )
    .unwrap();
    let resume = |steps| {
        train(&TrainConfig {
            steps,
            checkpoint: None,
            resume: Some(ck.clone()),
            ..cfg.clone()
        })
    };
    assert_eq!(resume(8).unwrap().len(), 2);
    // a flipped bit in a tensor: the checksum says so
    let mut bad = bytes.clone();
    let n = bad.len();
    bad[n - 5] ^= 0x10;
    std::fs::write(&file, &bad).unwrap();
    let e = resume(8).unwrap_err().to_string();
    assert!(e.contains("checksum") && e.contains("corrupt"), "{e}");
    // a truncated file
    std::fs::write(&file, &bytes[..bytes.len() - 100]).unwrap();
    let e = resume(8).unwrap_err().to_string();
    assert!(e.contains("truncated or corrupt"), "{e}");
    // no checkpoint at all
    std::fs::remove_file(&file).unwrap();
    let e = resume(8).unwrap_err().to_string();
    assert!(e.contains("checkpoint.safetensors"), "{e}");
    let _ = std::fs::remove_dir_all(ck);
}
