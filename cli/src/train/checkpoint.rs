//! Checkpoints of `recap train`: one safetensors file per run directory
//! (`checkpoint.safetensors`: the weights, both AdamW moments and the frozen reference weights as
//! f32 `[V, H]` tensors, bit for bit; the step, AdamW's step count, the scheduler's state and the
//! run's fingerprint as metadata, with a SHA-256 of the tensor bytes checked on resume). A new
//! checkpoint is written to a temporary file in the same directory, fsynced, and made current by
//! one rename (then the directory is fsynced), so a kill at any moment leaves the previous
//! checkpoint loadable. Other tools read the tensors with any safetensors reader.

use super::config::TrainConfig;
use recap_kernels::error::{Error, Result};
use safetensors::tensor::{Dtype, SafeTensors, TensorView};
use sha2::{Digest, Sha256};
use std::collections::HashMap;
use std::path::{Path, PathBuf};

/// The checkpoint's file name in its directory.
pub const FILE: &str = "checkpoint.safetensors";
/// The tensors, in the order of [`Tensors`].
const NAMES: [&str; 4] = ["weights", "adam_m", "adam_v", "reference"];

/// A run's state after a step, enough to continue it exactly.
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize, PartialEq)]
pub(crate) struct State {
    pub next_step: usize,
    pub adam_t: i32,
    pub scheduler: String,
    pub fingerprint: String,
}

/// The weights, AdamW's moments and the reference weights, `[V, H]` each.
pub(crate) type Tensors = [Vec<f32>; 4];

fn io_err(arg: &'static str, path: &Path, e: std::io::Error) -> Error {
    Error::invalid_argument(arg, format!("{}: {e}", path.display()))
}

fn le_bytes(t: &[f32]) -> Vec<u8> {
    t.iter().flat_map(|x| x.to_le_bytes()).collect()
}

fn digest<'a>(tensors: impl Iterator<Item = &'a [u8]>) -> String {
    let mut h = Sha256::new();
    for t in tensors {
        h.update(t);
    }
    h.finalize().iter().map(|b| format!("{b:02x}")).collect()
}

/// Writes `state` and `tensors` (`[v, h]` each) as `dir/checkpoint.safetensors`, atomically.
pub(crate) fn write(
    dir: &Path,
    state: &State,
    tensors: [&[f32]; 4],
    v: usize,
    h: usize,
) -> Result<PathBuf> {
    std::fs::create_dir_all(dir).map_err(|e| io_err("checkpoint", dir, e))?;
    let bytes: Vec<Vec<u8>> = tensors.iter().map(|t| le_bytes(t)).collect();
    let mut meta = HashMap::new();
    meta.insert(
        "recap".to_string(),
        serde_json::to_string(state)
            .map_err(|e| Error::invalid_argument("checkpoint", e.to_string()))?,
    );
    meta.insert("sha256".to_string(), digest(bytes.iter().map(|b| &b[..])));
    let views = NAMES
        .iter()
        .zip(&bytes)
        .map(|(n, b)| {
            TensorView::new(Dtype::F32, vec![v, h], b)
                .map(|t| (n.to_string(), t))
                .map_err(|e| Error::invalid_argument("checkpoint", e.to_string()))
        })
        .collect::<Result<Vec<_>>>()?;
    let file = safetensors::serialize(views, Some(meta))
        .map_err(|e| Error::invalid_argument("checkpoint", e.to_string()))?;
    let path = dir.join(FILE);
    super::write_atomic(&path, &file)
        .map_err(|e| Error::invalid_argument("checkpoint", e.to_string()))?;
    Ok(path)
}

/// Reads `dir/checkpoint.safetensors` of the run `cfg`: its state and tensors, after checking the
/// file's format, the checksum of its tensors, their shapes and the run's fingerprint.
pub(crate) fn read(dir: &Path, cfg: &TrainConfig) -> Result<(State, Tensors)> {
    let path = dir.join(FILE);
    let bytes = std::fs::read(&path).map_err(|e| io_err("resume", &path, e))?;
    let bad =
        |what: String| Error::invalid_argument("resume", format!("{}: {what}", path.display()));
    let st = SafeTensors::deserialize(&bytes).map_err(|e| {
        bad(format!(
            "not a readable checkpoint (truncated or corrupt): {e}"
        ))
    })?;
    let (_, header) =
        SafeTensors::read_metadata(&bytes).map_err(|e| bad(format!("unreadable header: {e}")))?;
    let meta = header
        .metadata()
        .clone()
        .ok_or_else(|| bad("no recap metadata: not a recap train checkpoint".into()))?;
    let state: State = serde_json::from_str(
        meta.get("recap")
            .ok_or_else(|| bad("no recap metadata: not a recap train checkpoint".into()))?,
    )
    .map_err(|e| bad(format!("recap metadata: {e}")))?;
    let (v, h) = (cfg.vocab, cfg.hidden);
    let mut data = Vec::with_capacity(4);
    for name in NAMES {
        let t = st
            .tensor(name)
            .map_err(|e| bad(format!("tensor {name}: {e}")))?;
        if t.dtype() != Dtype::F32 || t.shape() != [v, h] {
            return Err(bad(format!(
                "tensor {name}: expected F32 [{v}, {h}], got {:?} {:?}",
                t.dtype(),
                t.shape()
            )));
        }
        data.push(t.data());
    }
    let want = meta.get("sha256").map(String::as_str).unwrap_or("");
    let got = digest(data.iter().copied());
    if want != got {
        return Err(bad(format!(
            "checksum mismatch (stored {want:.16}..., computed {got:.16}...): the file is corrupt"
        )));
    }
    if state.fingerprint != cfg.fingerprint() {
        return Err(Error::invalid_argument(
            "resume",
            format!(
                "the checkpoint is of another run ({}), this run is {}",
                state.fingerprint,
                cfg.fingerprint()
            ),
        ));
    }
    let f32s = |b: &[u8]| -> Vec<f32> {
        b.chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect()
    };
    Ok((
        state,
        [f32s(data[0]), f32s(data[1]), f32s(data[2]), f32s(data[3])],
    ))
}
