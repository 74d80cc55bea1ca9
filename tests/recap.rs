//! The RECAP scheduler: warm-up, hand-computed weights, the ring buffer, the alpha option, guards,
//! and checkpoint/resume.

mod common;

use common::{assert_close, Rng};
use recap_kernels::{Error, Orientation, RecapConfig, RecapScheduler};

fn sched(w: usize) -> RecapScheduler {
    RecapScheduler::new(
        &[Orientation::Loss, Orientation::Reward],
        RecapConfig {
            window: w,
            ..RecapConfig::default()
        },
    )
    .unwrap()
}

#[test]
fn weights_are_one_while_warming_up() {
    let mut s = sched(10);
    for step in 0..19 {
        s.observe(&[1.0 + step as f64, 0.5]).unwrap();
        assert_eq!(s.weights(), vec![1.0, 1.0], "step {step}");
        assert!(s.signals().is_none());
    }
    s.observe(&[0.1, 0.5]).unwrap();
    assert!(s.signals().is_some(), "2W values: signals exist");
    assert_ne!(s.weights(), vec![1.0, 1.0]);
}

#[test]
fn weights_by_hand() {
    // W = 2. Loss [4, 4, 2, 2]: mu = 2, mu_prev = 4, c = 4 / 2 = 2 (improving), sigma = sqrt(4/3),
    // i = sigma / 6. Reward [1, 1, 1, 1]: c = 1, i = 0.
    let mut s = sched(2);
    for (l, r) in [(4.0, 1.0), (4.0, 1.0), (2.0, 1.0), (2.0, 1.0)] {
        s.observe(&[l, r]).unwrap();
    }
    let sig = s.signals().unwrap();
    let i0 = (4.0f64 / 3.0).sqrt() / 6.0;
    assert_close("c loss", sig[0].convergence, 2.0, 1e-12, 0.0);
    assert_close("i loss", sig[0].instability, i0, 1e-12, 0.0);
    assert_close("c reward", sig[1].convergence, 1.0, 1e-12, 0.0);
    assert_eq!(sig[1].instability, 0.0);
    let (s0, s1) = ((2.0 + i0) / 5.0, 1.0f64 / 5.0);
    let want0 = 2.0 * s0.exp() / (s0.exp() + s1.exp());
    let w = s.weights();
    assert_close("lambda 0", w[0] as f64, want0, 1e-6, 0.0);
    assert_close("weights average 1", (w[0] + w[1]) as f64, 2.0, 1e-6, 0.0);
    // a reward that rises is improving too: [1, 1, 2, 2] -> c = 2
    let mut r = sched(2);
    for v in [1.0, 1.0, 2.0, 2.0] {
        r.observe(&[1.0, v]).unwrap();
    }
    assert_close(
        "c rising reward",
        r.signals().unwrap()[1].convergence,
        2.0,
        1e-12,
        0.0,
    );
}

#[test]
fn alpha_option_mixes_the_signals() {
    let mut s = RecapScheduler::new(
        &[Orientation::Loss],
        RecapConfig {
            window: 2,
            alpha: Some(0.5),
            ..RecapConfig::default()
        },
    )
    .unwrap();
    for v in [4.0, 4.0, 2.0, 2.0] {
        s.observe(&[v]).unwrap();
    }
    let sig = s.signals().unwrap()[0];
    assert_close(
        "s = 0.5 c + 0.5 i",
        sig.priority,
        0.5 * sig.convergence + 0.5 * sig.instability,
        1e-12,
        0.0,
    );
    assert_eq!(s.weights(), vec![1.0], "one objective: weight K * 1 = 1");
}

#[test]
fn only_the_last_two_windows_count() {
    let mut rng = Rng::new(2);
    let values: Vec<[f64; 2]> = (0..57)
        .map(|_| [0.5 + rng.uniform(), 0.1 + rng.uniform()])
        .collect();
    let mut long = sched(10);
    values.iter().for_each(|v| long.observe(v).unwrap());
    let mut short = sched(10);
    values[57 - 20..]
        .iter()
        .for_each(|v| short.observe(v).unwrap());
    assert_eq!(long.weights(), short.weights());
    assert_eq!(long.signals(), short.signals());
}

#[test]
fn guards_never_give_nan_weights() {
    let mut s = sched(2);
    // zero means: c = 1 (no evidence), i = 0
    for _ in 0..4 {
        s.observe(&[0.0, 0.0]).unwrap();
    }
    let sig = s.signals().unwrap();
    assert_eq!((sig[0].convergence, sig[0].instability), (1.0, 0.0));
    assert_eq!(s.weights(), vec![1.0, 1.0]);
    // a collapse towards 0 and huge values stay finite
    for v in [1e300, 1e300, 1e-300, 1e-300] {
        s.observe(&[v, -v]).unwrap();
    }
    // (an objective can be starved to weight 0: the softmax saturates, it never gives NaN)
    let w = s.weights();
    assert!(w.iter().all(|x| x.is_finite() && *x >= 0.0), "{w:?}");
    assert_close(
        "weights still sum to K",
        w.iter().map(|x| *x as f64).sum(),
        2.0,
        1e-5,
        0.0,
    );
    // non-finite observations are refused and change nothing
    let before = s.clone();
    let e = s.observe(&[f64::NAN, 1.0]).unwrap_err();
    assert!(
        matches!(e, Error::InvalidArgument { arg: "values", .. }),
        "{e}"
    );
    assert!(s.observe(&[1.0]).is_err(), "wrong K");
    assert_eq!(s, before);
    assert!(RecapScheduler::new(&[], RecapConfig::default()).is_err());
    assert!(RecapScheduler::new(
        &[Orientation::Loss],
        RecapConfig {
            temperature: 0.0,
            ..RecapConfig::default()
        }
    )
    .is_err());
    assert!(RecapScheduler::new(
        &[Orientation::Loss],
        RecapConfig {
            alpha: Some(1.5),
            ..RecapConfig::default()
        }
    )
    .is_err());
}

#[test]
fn checkpoint_and_resume_give_identical_weights() {
    let mut rng = Rng::new(9);
    let values: Vec<[f64; 2]> = (0..60)
        .map(|i| {
            [
                2.0 / (1.0 + i as f64 * 0.1) + 0.05 * rng.normal(),
                0.2 + 0.01 * i as f64,
            ]
        })
        .collect();
    let mut straight = sched(10);
    let mut resumed = sched(10);
    let mut ws = Vec::new();
    for (i, v) in values.iter().enumerate() {
        straight.observe(v).unwrap();
        resumed.observe(v).unwrap();
        if i == 31 {
            let json = resumed.to_json().unwrap();
            resumed = RecapScheduler::from_json(&json).unwrap();
        }
        assert_eq!(straight.weights(), resumed.weights(), "step {i}");
        ws.push(straight.weights());
    }
    assert_eq!(straight, resumed);
    assert!(ws.windows(2).any(|w| w[0] != w[1]), "the weights move");
    assert!(RecapScheduler::from_json("{\"config\": 3}").is_err());
}

/// A saturated objective loses weight to an improving one; a volatile one gains instability.
#[test]
fn saturated_improving_and_volatile_objectives() {
    let mut s = RecapScheduler::new(
        &[Orientation::Reward, Orientation::Reward, Orientation::Loss],
        RecapConfig::default(),
    )
    .unwrap();
    let mut rng = Rng::new(4);
    for step in 0..40 {
        let format = 1.0; // saturated
        let accuracy = 0.1 + 0.02 * step as f64; // improving
        let replay = 2.0 + if step % 2 == 0 { 0.8 } else { -0.8 } + 0.05 * rng.normal(); // volatile
        s.observe(&[format, accuracy, replay]).unwrap();
    }
    let sig = s.signals().unwrap();
    let w = s.weights();
    assert_eq!(
        (sig[0].convergence, sig[0].instability),
        (1.0, 0.0),
        "saturated: no change, no noise"
    );
    assert!(sig[1].convergence > 1.0, "improving reward: c > 1");
    assert!(
        sig[2].instability > sig[1].instability,
        "volatile replay is the unstable one"
    );
    assert!(
        w[0] < 1.0 && w[1] > 1.0,
        "the saturated objective's weight falls below 1, the improving one's rises: {w:?}"
    );
}
