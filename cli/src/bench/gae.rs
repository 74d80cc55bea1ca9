//! GAE (`ops::gae`): padded batches of L-token responses with an outcome reward at each one's end,
//! 20 % of the tokens masked (tool spans), whitened as verl does.

use super::OpBench;
use recap_kernels::error::Result;
use recap_kernels::ops::gae::{gae_at, GaeConfig, GaeInputs};
use recap_kernels::Mask;

pub(super) fn bench(b: &mut OpBench<'_>) -> Result<()> {
    let sizes: &[usize] = if b.small || b.cfg.quick {
        &[65_536]
    } else {
        &[65_536, 1_048_576]
    };
    let len = 1024;
    for &t in sizes {
        let seqs = t / len;
        let cu: Vec<i32> = (0..=seqs).map(|s| (s * len) as i32).collect();
        let rewards: Vec<f32> = (0..t)
            .map(|i| {
                if i % len == len - 1 {
                    (i / len % 3) as f32 - 1.0
                } else {
                    0.0
                }
            })
            .collect();
        let values: Vec<f32> = (0..t)
            .map(|i| ((i * 37 % 101) as f32 - 50.0) / 50.0)
            .collect();
        let mask: Vec<u8> = (0..t).map(|i| (i * 7 % 10 >= 2) as u8).collect();
        let (r, v, m) = (b.array(&rewards)?, b.array(&values)?, b.array(&mask)?);
        let (mut adv, mut ret) = (b.array(&vec![0f32; t])?, b.array(&vec![0f32; t])?);
        let x = GaeInputs {
            token_rewards: r.input(),
            values: v.input(),
            mask: Mask::U8(m.input()),
            cu_seqlens: &cu,
        };
        let (config, place) = (GaeConfig::default(), b.place);
        // reads rewards, values (f32) and the mask (u8), writes advantages and returns, and reads
        // and writes the advantages again to whiten them
        let bytes = (t * (4 + 4 + 1 + 4 + 4 + 8)) as f64;
        // scratch: the sequences' statistics and the scale (double), the bad slots, cu_seqlens
        let extra = ((3 * seqs + 2) * 8 + 8 + (seqs + 1) * 4) as f64;
        b.measure(
            "gae",
            format!("T={t} L={len} whitened"),
            bytes,
            extra,
            || gae_at(place, &x, &config, adv.output(), ret.output()),
        )?;
    }
    Ok(())
}
