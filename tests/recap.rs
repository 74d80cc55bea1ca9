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
    // W = 2, the paper's equations. Loss [4, 4, 2, 2]: mu = 2, mu_prev = 4, c = 4 / 2 = 2
    // (improving), sigma about mu = sqrt((2^2 + 2^2 + 0 + 0) / 3), i = sigma / 6. Reward
    // [1, 1, 1, 1]: c = 1, i = 0.
    let mut s = sched(2);
    for (l, r) in [(4.0, 1.0), (4.0, 1.0), (2.0, 1.0), (2.0, 1.0)] {
        s.observe(&[l, r]).unwrap();
    }
    let sig = s.signals().unwrap();
    let i0 = (8.0f64 / 3.0).sqrt() / 6.0;
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

/// `K softmax(z)`.
fn softmax(z: &[f64]) -> Vec<f64> {
    let e: Vec<f64> = z.iter().map(|x| x.exp()).collect();
    let sum: f64 = e.iter().sum();
    e.iter().map(|x| z.len() as f64 * x / sum).collect()
}

/// W = 2 and three objectives: a falling loss [4, 4, 2, 2], a rising reward [1, 1, 2, 2] and a
/// falling negative reward [-1, -1, -2, -2] (for the denominators' signs), under `cfg`.
fn three(cfg: RecapConfig) -> RecapScheduler {
    let mut s = RecapScheduler::new(
        &[Orientation::Loss, Orientation::Reward, Orientation::Reward],
        RecapConfig { window: 2, ..cfg },
    )
    .unwrap();
    for (l, r) in [(4.0, 1.0), (4.0, 1.0), (2.0, 2.0), (2.0, 2.0)] {
        s.observe(&[l, r, -r]).unwrap();
    }
    s
}

fn check(what: &str, s: &RecapScheduler, c: [f64; 3], i: [f64; 3], lambda: Vec<f64>) {
    let sig = s.signals().unwrap();
    for k in 0..3 {
        assert_close(
            &format!("{what}: c[{k}]"),
            sig[k].convergence,
            c[k],
            1e-12,
            0.0,
        );
        assert_close(
            &format!("{what}: i[{k}]"),
            sig[k].instability,
            i[k],
            1e-12,
            0.0,
        );
    }
    let w = s.weights();
    for k in 0..3 {
        assert_close(
            &format!("{what}: lambda[{k}]"),
            w[k] as f64,
            lambda[k],
            1e-6,
            0.0,
        );
    }
}

/// Every option, against weights computed by hand from the definitions.
#[test]
fn every_option_by_hand() {
    use recap_kernels::recap::{Alpha, AlphaSchedule, Convergence, Denominator, Priority, Sigma};
    let t = 5.0;
    // the paper's equations: sigma about the current mean mu over 2W - 1; |mu| + |mu_prev|
    // loss: ss about 2 = 8; reward: ss about 2 = 2; negative reward: ss about -2 = 2
    let eq = [
        (8.0f64 / 3.0).sqrt() / 6.0,
        (2.0f64 / 3.0).sqrt() / 3.0,
        (2.0f64 / 3.0).sqrt() / 3.0,
    ];
    // c: loss 4 / 2, reward 2 / 1, negative reward (-2) / (-1) (same sign: the ratio, 2)
    let c = [2.0, 2.0, 2.0];
    let sum = |c: [f64; 3], i: [f64; 3]| {
        softmax(&[(c[0] + i[0]) / t, (c[1] + i[1]) / t, (c[2] + i[2]) / t])
    };
    let d = RecapConfig::default;
    check("paper equation", &three(d()), c, eq, sum(c, eq));
    // the pseudocode's sigma: the unbiased std about the mean of the 2W values
    // loss: about 3 -> 4 / 3; rewards: about 1.5 -> 1 / 3
    let ps = [
        (4.0f64 / 3.0).sqrt() / 6.0,
        (1.0f64 / 3.0).sqrt() / 3.0,
        (1.0f64 / 3.0).sqrt() / 3.0,
    ];
    let cfg = RecapConfig {
        sigma: Sigma::Pseudocode,
        ..d()
    };
    check("pseudocode sigma", &three(cfg), c, ps, sum(c, ps));
    // the population std (over 2W = 4): loss 1, rewards 0.5
    let pop = [1.0 / 6.0, 0.5 / 3.0, 0.5 / 3.0];
    let cfg = RecapConfig {
        sigma: Sigma::Population,
        ..d()
    };
    check("population sigma", &three(cfg), c, pop, sum(c, pop));
    // denominators: mu + mu_prev (the negative reward's is -3), the mean of the 2W values
    let sd = [eq[0], eq[1], -eq[2]];
    let cfg = RecapConfig {
        denominator: Denominator::Sum,
        ..d()
    };
    check("mu + mu_prev", &three(cfg), c, sd, sum(c, sd));
    let md = [eq[0] * 6.0 / 3.0, eq[1] * 3.0 / 1.5, -eq[2] * 3.0 / 1.5];
    let cfg = RecapConfig {
        denominator: Denominator::Mean,
        ..d()
    };
    check("mean of the 2W", &three(cfg), c, md, sum(c, md));
    // c > 1 when getting worse: the ratios inverted
    let cw = [0.5, 0.5, 0.5];
    let cfg = RecapConfig {
        convergence: Convergence::Worsening,
        ..d()
    };
    check("worsening", &three(cfg), cw, eq, sum(cw, eq));
    // the appendix: s = alpha c + (1 - alpha) i
    let a = 0.25;
    let mix: Vec<f64> = (0..3).map(|k| (a * c[k] + (1.0 - a) * eq[k]) / t).collect();
    let cfg = RecapConfig {
        priority: Priority::AlphaMix,
        alpha: Alpha::Constant(a),
        ..d()
    };
    check("alpha mix", &three(cfg), c, eq, softmax(&mix));
    // the authors' mixture of softmaxes: K [alpha softmax(c / T) + (1 - alpha) softmax(i / T)]
    let mixture = |a: f64| {
        let sc = softmax(&c.map(|x| x / t));
        let si = softmax(&eq.map(|x| x / t));
        (0..3)
            .map(|k| a * sc[k] + (1.0 - a) * si[k])
            .collect::<Vec<_>>()
    };
    let cfg = RecapConfig {
        priority: Priority::SoftmaxMixture,
        alpha: Alpha::Constant(a),
        ..d()
    };
    check("softmax mixture", &three(cfg), c, eq, mixture(a));
    // an annealed alpha: 1 - step / max_steps = 1 - 4 / 8 after 4 steps
    let cfg = RecapConfig {
        priority: Priority::SoftmaxMixture,
        alpha: Alpha::Annealed(AlphaSchedule::Annealed),
        max_steps: Some(8),
        ..d()
    };
    check("annealed alpha", &three(cfg), c, eq, mixture(0.5));
    // the authors' code as a whole: population std over the mean, worsening, mixture, alpha 1
    let pm = [1.0 / 3.0, 0.5 / 1.5, -0.5 / 1.5];
    let cfg = RecapConfig::authors_code(Alpha::Constant(1.0));
    check(
        "authors' code",
        &three(cfg),
        cw,
        pm,
        softmax(&cw.map(|x| x / t)),
    );
}

#[test]
fn without_warm_up_the_history_so_far_counts() {
    use recap_kernels::recap::Sigma;
    let cfg = RecapConfig {
        window: 2,
        warmup: false,
        ..RecapConfig::default()
    };
    let mut s = RecapScheduler::new(&[Orientation::Loss, Orientation::Reward], cfg).unwrap();
    assert!(s.signals().is_none() && s.weights() == vec![1.0, 1.0]);
    s.observe(&[4.0, 1.0]).unwrap();
    // one value: no previous window (c = 1), no spread (i = 0): equal weights
    let sig = s.signals().unwrap();
    assert_eq!((sig[0].convergence, sig[0].instability), (1.0, 0.0));
    assert_eq!(s.weights(), vec![1.0, 1.0]);
    s.observe(&[4.0, 1.0]).unwrap();
    s.observe(&[2.0, 2.0]).unwrap();
    // [4, 4, 2]: current [4, 2] (mu 3), previous [4]: c = 4 / 3; sigma about 3 over 3 - 1
    let sig = s.signals().unwrap();
    assert_close("c", sig[0].convergence, 4.0 / 3.0, 1e-12, 0.0);
    assert_close(
        "i",
        sig[0].instability,
        (3.0f64 / 2.0).sqrt() / 7.0,
        1e-12,
        0.0,
    );
    // reward [1, 1, 2]: current [1, 2] (1.5), previous [1]: c = 1.5
    assert_close("c reward", sig[1].convergence, 1.5, 1e-12, 0.0);
    let pop = RecapScheduler::new(
        &[Orientation::Loss],
        RecapConfig {
            sigma: Sigma::Population,
            ..s.config().clone()
        },
    );
    assert!(pop.is_ok());
}

#[test]
fn options_round_trip_through_json_and_checkpoints() {
    use recap_kernels::recap::{Alpha, AlphaSchedule, Priority};
    let cfg = RecapConfig::from_json(
        r#"{"window": 3, "priority": "softmax_mixture", "alpha": "annealed", "max_steps": 50,
            "sigma": "population", "denominator": "mean", "warmup": false, "convergence": "worsening"}"#,
    )
    .unwrap();
    assert_eq!(cfg.priority, Priority::SoftmaxMixture);
    assert_eq!(cfg.alpha, Alpha::Annealed(AlphaSchedule::Annealed));
    assert_eq!(
        RecapConfig::from_json(r#"{"alpha": 0.3}"#).unwrap().alpha,
        Alpha::Constant(0.3)
    );
    for bad in [
        r#"{"windw": 3}"#,
        r#"{"alpha": 1.5}"#,
        r#"{"alpha": "annealed"}"#,
        r#"{"sigma": "sample"}"#,
    ] {
        assert!(RecapConfig::from_json(bad).is_err(), "{bad}");
    }
    let mut s =
        RecapScheduler::new(&[Orientation::Loss, Orientation::Reward], cfg.clone()).unwrap();
    for i in 0..7 {
        s.observe(&[1.0 + i as f64, 0.5]).unwrap();
    }
    let back = RecapScheduler::from_json(&s.to_json().unwrap()).unwrap();
    assert_eq!(back.config(), &cfg);
    assert_eq!(back.weights(), s.weights());
}

#[test]
fn presets_and_options_over_them() {
    use recap_kernels::recap::Alpha;
    assert_eq!(
        RecapConfig::preset("paper").unwrap(),
        RecapConfig::default()
    );
    let authors = RecapConfig::preset("authors").unwrap();
    assert_eq!(authors, RecapConfig::authors_code(Alpha::Constant(1.0)));
    assert_ne!(authors, RecapConfig::default());
    // the options given replace the preset's, the rest stays the preset's
    let cfg =
        RecapConfig::preset_with_json("authors", r#"{"temperature": 0.25, "alpha": 0.5}"#).unwrap();
    assert_eq!(
        cfg,
        RecapConfig {
            temperature: 0.25,
            ..RecapConfig::authors_code(Alpha::Constant(0.5))
        }
    );
    assert_eq!(
        RecapConfig::preset_with_json("paper", "{}").unwrap(),
        RecapConfig::default()
    );
    for (name, json, names) in [
        ("nope", "{}", "preset"),
        ("authors", r#"{"windw": 3}"#, "windw"),
        ("authors", "[1]", "config"),
        ("paper", r#"{"window": 0}"#, "window"),
    ] {
        let e = RecapConfig::preset_with_json(name, json)
            .unwrap_err()
            .to_string();
        assert!(e.contains(names), "{name} {json}: {e}");
    }
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
            alpha: recap_kernels::recap::Alpha::Constant(1.5),
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
