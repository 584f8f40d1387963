//! The soak's curve: one SVG with four panels against minutes — RSS,
//! descriptors and connections, open streams, and what the population
//! completed — with the moment the population stopped marked.

use std::path::Path;

use plotters::prelude::*;

use super::population::ROLES;
use super::sample::{Phase, Sample};

const COLORS: [RGBColor; 5] = [
    RGBColor(200, 30, 30),
    RGBColor(30, 90, 200),
    RGBColor(20, 150, 60),
    RGBColor(150, 60, 170),
    RGBColor(230, 140, 0),
];

struct Panel {
    title: String,
    y_label: &'static str,
    series: Vec<(String, Vec<(f64, f64)>)>,
}

/// One named line of `f(sample)` against minutes.
fn line(name: &str, samples: &[Sample], f: impl Fn(&Sample) -> f64) -> (String, Vec<(f64, f64)>) {
    (name.to_string(), samples.iter().map(|s| (s.t_s / 60.0, f(s))).collect())
}

/// Writes the plot of `samples` to `path` (SVG).
pub fn plot(path: &Path, samples: &[Sample], title: &str) -> Result<(), String> {
    let panel = |title: &str, y_label, series| Panel {
        title: title.to_string(),
        y_label,
        series,
    };
    let passed = ROLES
        .iter()
        .enumerate()
        .map(|(i, r)| line(r.name(), samples, |s| s.ok[i] as f64))
        .collect();
    let base_kib = samples
        .iter()
        .rfind(|s| s.phase == Phase::Baseline)
        .or(samples.first())
        .map_or(0.0, |s| s.server.rss_kib as f64);
    let panels = [
        // Above the baseline, so that a leak of a few pages shows.
        panel(
            &format!("server RSS above its baseline of {:.1} MiB", base_kib / 1024.0),
            "KiB",
            vec![line("VmRSS - baseline", samples, |s| {
                s.server.rss_kib as f64 - base_kib
            })],
        ),
        panel(
            "server descriptors and connections",
            "count",
            vec![
                line("open fds", samples, |s| s.server.fds as f64),
                line("connections", samples, |s| s.server.conns as f64),
            ],
        ),
        panel(
            "streams open in the server",
            "count",
            vec![line("streams", samples, |s| s.server.streams as f64)],
        ),
        panel("passed so far, by actor (log)", "count", passed),
    ];
    let stop_min = samples.iter().find(|s| s.phase == Phase::After).map(|s| s.t_s / 60.0);
    let root = SVGBackend::new(path, (1200, 820)).into_drawing_area();
    let e = |e: DrawingAreaErrorKind<std::io::Error>| format!("{e:?}");
    root.fill(&WHITE).map_err(e)?;
    let root = root.titled(title, ("sans-serif", 18)).map_err(e)?;
    for (i, (area, p)) in root.split_evenly((2, 2)).iter().zip(&panels).enumerate() {
        draw(area, p, stop_min, i == 3).map_err(|e| format!("{e:?}"))?;
    }
    root.present().map_err(|e| format!("writing {}: {e:?}", path.display()))
}

type Area<'a> = DrawingArea<SVGBackend<'a>, plotters::coord::Shift>;

fn draw(
    area: &Area,
    p: &Panel,
    stop_min: Option<f64>,
    log_y: bool,
) -> Result<(), DrawingAreaErrorKind<std::io::Error>> {
    let pts = p.series.iter().flat_map(|(_, v)| v.iter());
    let (x1, y0, y1) = pts.fold((0.0f64, 0.0f64, 0.0f64), |(x, lo, hi), &(a, b)| {
        (x.max(a), lo.min(b), hi.max(b))
    });
    let x1 = x1.max(0.1);
    let mut b = ChartBuilder::on(area);
    b.caption(&p.title, ("sans-serif", 15))
        .margin(10)
        .x_label_area_size(36)
        .y_label_area_size(60);
    if log_y {
        let mut chart = b.build_cartesian_2d(0.0..x1, (1.0..(y1 * 2.0).max(10.0)).log_scale())?;
        chart.configure_mesh().x_desc("minutes").y_desc(p.y_label).draw()?;
        lines(&mut chart, p, stop_min, |y| y.max(1.0))?;
        return chart
            .configure_series_labels()
            .background_style(WHITE.mix(0.85))
            .border_style(BLACK)
            .position(SeriesLabelPosition::UpperLeft)
            .draw();
    }
    // Headroom above the data for the legend.
    let mut chart = b.build_cartesian_2d(0.0..x1, y0 * 1.1..(y1 * 1.45).max(1.0))?;
    chart.configure_mesh().x_desc("minutes").y_desc(p.y_label).draw()?;
    lines(&mut chart, p, stop_min, |y| y)?;
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .position(SeriesLabelPosition::UpperRight)
        .draw()
}

fn lines<'a, X, Y>(
    chart: &mut ChartContext<'a, SVGBackend<'a>, Cartesian2d<X, Y>>,
    p: &Panel,
    stop_min: Option<f64>,
    y_of: impl Fn(f64) -> f64,
) -> Result<(), DrawingAreaErrorKind<std::io::Error>>
where
    X: plotters::coord::ranged1d::Ranged<ValueType = f64>,
    Y: plotters::coord::ranged1d::Ranged<ValueType = f64>,
{
    for (i, (name, pts)) in p.series.iter().enumerate() {
        let c = COLORS[i % COLORS.len()];
        chart
            .draw_series(LineSeries::new(
                pts.iter().map(|&(x, y)| (x, y_of(y))),
                c.stroke_width(2),
            ))?
            .label(name.as_str())
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 18, y)], c.stroke_width(2)));
    }
    if let Some(t) = stop_min {
        let (y0, y1) = {
            let r = chart.plotting_area().get_y_range();
            (r.start, r.end)
        };
        chart
            .draw_series(std::iter::once(PathElement::new(
                vec![(t, y0), (t, y1)],
                BLACK.stroke_width(2),
            )))?
            .label("population stops")
            .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 18, y)], BLACK.stroke_width(2)));
    }
    Ok(())
}
