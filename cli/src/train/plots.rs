//! The pictures of `recap experiment` (`frontier.svg`: in-task accuracy against general capability,
//! one point per configuration with its interval, the Pareto front marked) and `recap train`
//! (`curves.svg`: per-objective reward and weight, the general and held-out NLL, pass@k over the
//! steps), drawn with plotters' SVG backend: no fonts or system libraries needed, readable at the
//! README's width.

use super::experiment::{ConfigSummary, Interval};
use super::metrics::StepMetrics;
use super::task::OBJECTIVES;
use plotters::prelude::*;
use recap_kernels::error::{Error, Result};

fn err(e: impl std::fmt::Display) -> Error {
    Error::invalid_argument("out", format!("drawing the picture: {e}"))
}

const PALETTE: [RGBColor; 10] = [
    RGBColor(31, 119, 180),
    RGBColor(255, 127, 14),
    RGBColor(44, 160, 44),
    RGBColor(214, 39, 40),
    RGBColor(148, 103, 189),
    RGBColor(140, 86, 75),
    RGBColor(227, 119, 194),
    RGBColor(127, 127, 127),
    RGBColor(188, 189, 34),
    RGBColor(23, 190, 207),
];

fn color(i: usize) -> RGBColor {
    PALETTE[i % PALETTE.len()]
}

/// A range holding every value of `xs` (and their interval bounds) with a margin; `(0, 1)` when
/// there is nothing finite.
fn span(xs: impl Iterator<Item = f64>) -> (f64, f64) {
    let (mut lo, mut hi) = (f64::INFINITY, f64::NEG_INFINITY);
    for x in xs.filter(|x| x.is_finite()) {
        lo = lo.min(x);
        hi = hi.max(x);
    }
    if lo > hi {
        return (0.0, 1.0); // nothing finite
    }
    let pad = ((hi - lo) * 0.08).max(1e-6);
    (lo - pad, hi + pad)
}

/// The points `(x, y)` of `pts` no other point beats on both (higher y, lower x), in x order.
fn pareto(pts: &[(f64, f64)]) -> Vec<(f64, f64)> {
    let mut front: Vec<(f64, f64)> = pts
        .iter()
        .copied()
        .filter(|&(x, y)| {
            x.is_finite()
                && y.is_finite()
                && !pts
                    .iter()
                    .any(|&(a, b)| (a <= x && b >= y) && (a < x || b > y))
        })
        .collect();
    front.sort_by(|a, b| a.0.total_cmp(&b.0));
    front
}

/// The color of each configuration (one per weighting and scheduler options, whatever the apply)
/// and whether its weights act on the rewards (a triangle) or on the losses (a disc).
fn styles(configs: &[ConfigSummary]) -> Vec<(RGBColor, bool)> {
    let mut names: Vec<&str> = Vec::new();
    configs
        .iter()
        .map(|c| {
            let i = names
                .iter()
                .position(|n| *n == c.config)
                .unwrap_or_else(|| {
                    names.push(&c.config);
                    names.len() - 1
                });
            (color(i), c.apply == super::config::Apply::Reward)
        })
        .collect()
}

/// `frontier.svg`: accuracy (the last window's mean over the seeds, with its 95 % t-interval)
/// against the change of the replay's NLL (left) and of the held-out general NLL (right), one
/// point per configuration (a color) and apply (a disc: weights on the losses; a triangle: on the
/// rewards), the Pareto front (more accuracy, less forgetting) dashed.
pub fn frontier_svg(configs: &[ConfigSummary]) -> Result<String> {
    let style = styles(configs);
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, (1160, 520)).into_drawing_area();
        root.fill(&WHITE).map_err(err)?;
        let (title, body) = root.split_vertically(40);
        title
            .titled(
                "In-task accuracy against forgetting (mean over seeds, 95 % t-intervals)",
                ("sans-serif", 20),
            )
            .map_err(err)?;
        let (panel_area, legend_area) = body.split_horizontally(850);
        let panels = panel_area.split_evenly((1, 2));
        let metric = |c: &ConfigSummary, m: &str| {
            c.metrics.get(m).copied().unwrap_or(Interval {
                mean: f64::NAN,
                ci_low: f64::NAN,
                ci_high: f64::NAN,
                n: 0,
            })
        };
        for (area, (xm, xlabel)) in panels.iter().zip([
            (
                "general_nll change",
                "replay NLL change (nats/token; lower: less forgetting)",
            ),
            (
                "heldout_nll change",
                "held-out NLL change (nats/token; lower: less forgetting)",
            ),
        ]) {
            let pts: Vec<(Interval, Interval)> = configs
                .iter()
                .map(|c| (metric(c, xm), metric(c, "accuracy")))
                .collect();
            let xr = span(pts.iter().flat_map(|(x, _)| [x.mean, x.ci_low, x.ci_high]));
            let yr = span(pts.iter().flat_map(|(_, y)| [y.mean, y.ci_low, y.ci_high]));
            let mut chart = ChartBuilder::on(area)
                .margin(12)
                .x_label_area_size(46)
                .y_label_area_size(60)
                .build_cartesian_2d(xr.0..xr.1, yr.0..yr.1)
                .map_err(err)?;
            chart
                .configure_mesh()
                .x_desc(xlabel)
                .y_desc("accuracy (reward, last window)")
                .x_labels(6)
                .y_labels(6)
                .label_style(("sans-serif", 13))
                .axis_desc_style(("sans-serif", 14))
                .draw()
                .map_err(err)?;
            for (i, (x, y)) in pts.iter().enumerate() {
                let c = style[i].0;
                if x.ci_low.is_finite() {
                    chart
                        .draw_series(LineSeries::new(
                            [(x.ci_low, y.mean), (x.ci_high, y.mean)],
                            c.stroke_width(1),
                        ))
                        .map_err(err)?;
                }
                if y.ci_low.is_finite() {
                    chart
                        .draw_series(LineSeries::new(
                            [(x.mean, y.ci_low), (x.mean, y.ci_high)],
                            c.stroke_width(1),
                        ))
                        .map_err(err)?;
                }
                // a disc: weights on the losses; a triangle: on the rewards
                let p = (x.mean, y.mean);
                match style[i].1 {
                    false => chart.draw_series([Circle::new(p, 5, c.filled())]),
                    true => chart.draw_series([TriangleMarker::new(p, 7, c.filled())]),
                }
                .map_err(err)?;
            }
            let front = pareto(
                &pts.iter()
                    .map(|(x, y)| (x.mean, y.mean))
                    .collect::<Vec<_>>(),
            );
            if front.len() > 1 {
                chart
                    .draw_series(DashedLineSeries::new(
                        front.clone(),
                        6,
                        4,
                        BLACK.stroke_width(1),
                    ))
                    .map_err(err)?;
            }
            chart
                .draw_series(
                    front
                        .iter()
                        .map(|&p| Circle::new(p, 9, BLACK.stroke_width(1))),
                )
                .map_err(err)?;
        }
        // the legend: one line per configuration (its color), then one per marker shape shown
        // (where the weights act), then the Pareto front's ring
        let text = |s: &str, y: i32| Text::new(s.to_string(), (26, y - 8), ("sans-serif", 13));
        let mut y = 20;
        let mut seen: Vec<&str> = Vec::new();
        for (c, (color, _)) in configs.iter().zip(&style) {
            if seen.contains(&c.config.as_str()) {
                continue;
            }
            seen.push(&c.config);
            legend_area
                .draw(&Rectangle::new([(9, y - 5), (19, y + 5)], color.filled()))
                .map_err(err)?;
            legend_area.draw(&text(&c.config, y)).map_err(err)?;
            y += 22;
        }
        y += 8;
        for (triangle, label) in [
            (false, "weights on the losses"),
            (true, "weights on the rewards"),
        ] {
            if !style.iter().any(|s| s.1 == triangle) {
                continue;
            }
            match triangle {
                false => legend_area.draw(&Circle::new((14, y), 5, BLACK.filled())),
                true => legend_area.draw(&TriangleMarker::new((14, y), 7, BLACK.filled())),
            }
            .map_err(err)?;
            legend_area.draw(&text(label, y)).map_err(err)?;
            y += 22;
        }
        legend_area
            .draw(&Circle::new((14, y + 4), 9, BLACK.stroke_width(1)))
            .map_err(err)?;
        legend_area
            .draw(&text("Pareto front", y + 4))
            .map_err(err)?;
        root.present().map_err(err)?;
    }
    Ok(svg)
}

/// One panel of `curves.svg`: `series` (name, value per step) over the steps.
fn panel(
    area: &DrawingArea<SVGBackend<'_>, plotters::coord::Shift>,
    title: &str,
    ylabel: &str,
    series: &[(String, Vec<f64>)],
) -> Result<()> {
    let n = series.iter().map(|s| s.1.len()).max().unwrap_or(0).max(2);
    let yr = span(series.iter().flat_map(|s| s.1.iter().copied()));
    let mut chart = ChartBuilder::on(area)
        .caption(title, ("sans-serif", 16))
        .margin(10)
        .x_label_area_size(38)
        .y_label_area_size(58)
        .build_cartesian_2d(0f64..(n - 1) as f64, yr.0..yr.1)
        .map_err(err)?;
    chart
        .configure_mesh()
        .x_desc("step")
        .y_desc(ylabel)
        .x_labels(6)
        .y_labels(5)
        .label_style(("sans-serif", 12))
        .axis_desc_style(("sans-serif", 13))
        .draw()
        .map_err(err)?;
    for (i, (name, ys)) in series.iter().enumerate() {
        let c = color(i);
        chart
            .draw_series(LineSeries::new(
                ys.iter()
                    .enumerate()
                    .filter(|(_, y)| y.is_finite())
                    .map(|(x, y)| (x as f64, *y)),
                c.stroke_width(2),
            ))
            .map_err(err)?
            .label(name.clone())
            .legend(move |(x, y)| PathElement::new([(x, y), (x + 18, y)], c.stroke_width(2)));
    }
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK.mix(0.3))
        .label_font(("sans-serif", 12))
        .position(SeriesLabelPosition::UpperRight)
        .draw()
        .map_err(err)?;
    Ok(())
}

/// `curves.svg` of a training run: the RL objectives' batch-mean rewards, every objective's weight
/// lambda, the NLL of the replay and of the held-out general sequences, and pass@k, over the steps.
pub fn curves_svg(records: &[StepMetrics]) -> Result<String> {
    let col = |f: &dyn Fn(&StepMetrics) -> f64| records.iter().map(f).collect::<Vec<f64>>();
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, (1100, 760)).into_drawing_area();
        root.fill(&WHITE).map_err(err)?;
        let areas = root.split_evenly((2, 2));
        panel(
            &areas[0],
            "Rewards of the RL objectives",
            "batch-mean reward",
            &[
                ("format".into(), col(&|m| m.format)),
                ("accuracy".into(), col(&|m| m.accuracy)),
                ("overlap".into(), col(&|m| m.overlap)),
            ],
        )?;
        let lambdas: Vec<(String, Vec<f64>)> = OBJECTIVES
            .iter()
            .enumerate()
            .map(|(k, name)| {
                (
                    name.to_string(),
                    col(&|m| m.lambda.get(k).map_or(f64::NAN, |x| *x as f64)),
                )
            })
            .collect();
        panel(&areas[1], "Objective weights", "lambda", &lambdas)?;
        panel(
            &areas[2],
            "General capability",
            "NLL (nats/token)",
            &[
                (
                    "replay NLL".into(),
                    col(&|m| m.general_nll.unwrap_or(f64::NAN)),
                ),
                (
                    "held-out NLL".into(),
                    col(&|m| m.heldout_nll.unwrap_or(f64::NAN)),
                ),
            ],
        )?;
        panel(
            &areas[3],
            "pass@k (accuracy over each prompt's G rollouts)",
            "pass@k",
            &[
                ("pass@1".into(), col(&|m| m.pass_at_1)),
                ("pass@G/2".into(), col(&|m| m.pass_at_half)),
                ("pass@G".into(), col(&|m| m.pass_at_g)),
            ],
        )?;
        root.present().map_err(err)?;
    }
    Ok(svg)
}

#[cfg(test)]
mod tests {
    use super::pareto;

    #[test]
    fn the_pareto_front_keeps_the_points_nothing_beats() {
        // (forgetting, accuracy): lower forgetting and higher accuracy are better
        let pts = [(0.1, 0.5), (0.2, 0.7), (0.15, 0.4), (0.05, 0.3), (0.3, 0.6)];
        assert_eq!(pareto(&pts), vec![(0.05, 0.3), (0.1, 0.5), (0.2, 0.7)]);
    }
}
