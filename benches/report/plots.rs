//! The SVG plots of `bench_report`: throughput against connections,
//! open-loop latency against offered load, throughput and p99 against
//! inflight depth, and one plot per ablation.

use std::path::Path;

use plotters::coord::ranged1d::{AsRangedCoord, ValueFormatter};
use plotters::coord::Shift;
use plotters::prelude::*;

use super::{load, points, servers, Point, P50, P99, P999};

/// One panel: lines of (x, y) points, one per series.
struct Panel {
    title: String,
    x_label: String,
    y_label: String,
    log_x: bool,
    log_y: bool,
    /// Categorical x: the labels of x = 0, 1, 2, ...
    x_names: Option<Vec<String>>,
    series: Vec<(String, Vec<(f64, f64)>)>,
}

const COLORS: [RGBColor; 6] = [
    RGBColor(200, 30, 30),
    RGBColor(30, 90, 200),
    RGBColor(20, 150, 60),
    RGBColor(150, 60, 170),
    RGBColor(230, 140, 0),
    RGBColor(60, 60, 60),
];

type Res<T> = Result<T, String>;

fn bounds(panel: &Panel) -> Option<((f64, f64), (f64, f64))> {
    let pts = panel.series.iter().flat_map(|(_, v)| v.iter());
    let (mut x0, mut x1, mut y0, mut y1) = (f64::MAX, f64::MIN, f64::MAX, f64::MIN);
    for &(x, y) in pts {
        x0 = x0.min(x);
        x1 = x1.max(x);
        y0 = y0.min(y);
        y1 = y1.max(y);
    }
    if x0 > x1 {
        return None;
    }
    let pad = |a: f64, b: f64, log: bool| {
        if log {
            (a.max(1e-9) / 1.5, b.max(1e-9) * 1.5)
        } else if a == b {
            (a - 1.0, b + 1.0)
        } else {
            (a - (b - a) * 0.05, b + (b - a) * 0.05)
        }
    };
    let (x0, x1) = if panel.x_names.is_some() {
        (-0.5, x1 + 0.5)
    } else {
        pad(x0, x1, panel.log_x)
    };
    let (y0, y1) = if panel.log_y {
        pad(y0, y1, true)
    } else {
        (0.0, y1 * 1.1 + 1e-9)
    };
    Some(((x0, x1), (y0, y1)))
}

fn draw<DB, X, Y>(area: &DrawingArea<DB, Shift>, p: &Panel, x: X, y: Y) -> Res<()>
where
    DB: DrawingBackend,
    X: AsRangedCoord<Value = f64>,
    Y: AsRangedCoord<Value = f64>,
    X::CoordDescType: ValueFormatter<f64>,
    Y::CoordDescType: ValueFormatter<f64>,
{
    let e = |e: DrawingAreaErrorKind<DB::ErrorType>| format!("{e:?}");
    let mut chart = ChartBuilder::on(area)
        .caption(&p.title, ("sans-serif", 16))
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(70)
        .build_cartesian_2d(x, y)
        .map_err(e)?;
    let names = p.x_names.clone();
    let fmt_x = move |v: &f64| match &names {
        Some(n) if (v - v.round()).abs() < 1e-6 && *v >= 0.0 => n.get(v.round() as usize).cloned().unwrap_or_default(),
        Some(_) => String::new(),
        None => fmt_num(*v),
    };
    let mut mesh = chart.configure_mesh();
    mesh.x_desc(p.x_label.as_str())
        .y_desc(p.y_label.as_str())
        .x_label_formatter(&fmt_x)
        .y_label_formatter(&|v| fmt_num(*v));
    if let Some(n) = &p.x_names {
        mesh.x_labels(n.len());
    }
    mesh.draw().map_err(e)?;
    for (i, (name, pts)) in p.series.iter().enumerate() {
        let c = COLORS[i % COLORS.len()];
        chart
            .draw_series(LineSeries::new(pts.iter().copied(), c.stroke_width(2)))
            .map_err(e)?
            .label(name.as_str())
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 18, y)], c.stroke_width(2)));
        chart
            .draw_series(pts.iter().map(|&pt| Circle::new(pt, 3, c.filled())))
            .map_err(e)?;
    }
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .position(SeriesLabelPosition::UpperLeft)
        .draw()
        .map_err(e)?;
    Ok(())
}

fn fmt_num(v: f64) -> String {
    let a = v.abs();
    if a >= 1e6 {
        format!("{:.1}M", v / 1e6)
    } else if a >= 1e3 {
        format!("{:.0}k", v / 1e3)
    } else if a >= 10.0 || a == 0.0 {
        format!("{v:.0}")
    } else {
        format!("{v:.2}")
    }
}

/// Writes `panels` side by side into `path`; false when none had data.
fn plot(path: &Path, panels: &[Panel]) -> Res<bool> {
    if panels.iter().all(|p| bounds(p).is_none()) {
        return Ok(false);
    }
    let root = SVGBackend::new(path, (520 * panels.len() as u32, 400)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| format!("{e:?}"))?;
    for (area, p) in root.split_evenly((1, panels.len())).iter().zip(panels) {
        let Some(((x0, x1), (y0, y1))) = bounds(p) else {
            continue;
        };
        match (p.log_x, p.log_y) {
            (false, false) => draw(area, p, x0..x1, y0..y1)?,
            (true, false) => draw(area, p, (x0..x1).log_scale(), y0..y1)?,
            (false, true) => draw(area, p, x0..x1, (y0..y1).log_scale())?,
            (true, true) => draw(area, p, (x0..x1).log_scale(), (y0..y1).log_scale())?,
        }
    }
    root.present()
        .map_err(|e| format!("writing {}: {e:?}", path.display()))?;
    Ok(true)
}

/// One series per server of `f(point)` against `x(point)`, for the runs
/// that `keep` selects.
fn series(
    pts: &[Point],
    keep: impl Fn(&Point) -> bool,
    x: impl Fn(&Point) -> Option<f64>,
    f: impl Fn(&Point) -> Option<f64>,
) -> Vec<(String, Vec<(f64, f64)>)> {
    servers(pts)
        .into_iter()
        .map(|s| {
            let v: Vec<(f64, f64)> = pts
                .iter()
                .filter(|p| p.server == s && keep(p))
                .filter_map(|p| Some((x(p)?, f(p)?)))
                .collect();
            (s, v)
        })
        .filter(|(_, v)| !v.is_empty())
        .collect()
}

fn panel(title: &str, x_label: &str, y_label: &str, log_x: bool, log_y: bool) -> Panel {
    Panel {
        title: title.to_string(),
        x_label: x_label.to_string(),
        y_label: y_label.to_string(),
        log_x,
        log_y,
        x_names: None,
        series: Vec::new(),
    }
}

/// Every plot the results allow; returns the files written (names only).
pub fn write_all(dir: &Path) -> Res<Vec<String>> {
    let mut written = Vec::new();
    let mut emit = |name: &str, panels: Vec<Panel>| -> Res<()> {
        if plot(&dir.join(name), &panels)? {
            written.push(name.to_string());
        }
        Ok(())
    };
    let conns = points(&load(dir, "connections.csv"));
    let mut v = Vec::new();
    for mode in ["ping", "generate"] {
        let mut p = panel(
            &format!("{mode}: throughput vs connections (closed loop)"),
            "connections",
            "requests/s",
            true,
            false,
        );
        p.series = series(&conns, |p| p.mode() == mode, Point::x, |p| p.rate("requests"));
        v.push(p);
        // Per second of the server's own CPU: what holds when the servers
        // did not get the same share of a shared machine.
        let mut p = panel(
            &format!("{mode}: frames per server CPU-second"),
            "connections",
            "frames sent / server CPU-s",
            true,
            false,
        );
        p.series = series(&conns, |p| p.mode() == mode, Point::x, Point::frames_per_server_cpu_s);
        v.push(p);
    }
    emit("throughput_vs_connections.svg", v)?;

    let lat = points(&load(dir, "load.csv"));
    let open = |p: &Point| p.value != "peak";
    let frac = |p: &Point| p.x().map(|f| f * 100.0);
    let mut v = Vec::new();
    for (i, name) in [(P50, "p50"), (P99, "p99"), (P999, "p99.9")] {
        let mut p = panel(
            &format!("open loop {name} (every request)"),
            "offered load, % of the server's own closed-loop peak",
            "latency, µs",
            false,
            true,
        );
        p.series = series(&lat, open, frac, move |p| p.pct(i));
        v.push(p);
    }
    emit("latency_vs_load.svg", v)?;

    let inf = points(&load(dir, "inflight.csv"));
    let mut a = panel(
        "throughput vs inflight depth",
        "streams in flight per connection",
        "requests/s",
        true,
        false,
    );
    a.series = series(&inf, |_| true, Point::x, |p| p.rate("requests"));
    let mut b = panel(
        "p99 vs inflight depth (closed loop)",
        "streams in flight per connection",
        "p99, µs",
        true,
        true,
    );
    b.series = series(&inf, |_| true, Point::x, |p| p.pct(P99));
    emit("inflight.svg", vec![a, b])?;

    for (file, what) in [
        ("ablation_threads", "server threads"),
        ("ablation_defer_taskrun", "DEFER_TASKRUN"),
        ("ablation_recv_buffer", "provided receive buffer, bytes"),
        ("ablation_send_buffer", "send buffer limit, bytes"),
        ("ablation_recv_mode", "receive: provided-buffer ring or plain RECV"),
        ("ablation_frames_per_send", "stream frames per send at most (0: no cap)"),
        ("ablation_send_mode", "send mode / PING payload, bytes"),
    ] {
        let pts = points(&load(dir, &format!("{file}.csv")));
        let mut values: Vec<String> = Vec::new();
        for p in &pts {
            if !values.contains(&p.value) {
                values.push(p.value.clone());
            }
        }
        let idx = |p: &Point| values.iter().position(|v| *v == p.value).map(|i| i as f64);
        let mut v = Vec::new();
        for (title, f) in [
            (
                "requests/s",
                (|p: &Point| p.rate("requests")) as fn(&Point) -> Option<f64>,
            ),
            ("p99, µs", |p: &Point| p.pct(P99)),
        ] {
            let mut p = panel(&format!("{what}: {title}"), what, title, false, false);
            p.x_names = Some(values.clone());
            p.series = ["ping", "generate"]
                .iter()
                .map(|m| {
                    let pts: Vec<(f64, f64)> = pts
                        .iter()
                        .filter(|p| p.mode() == *m)
                        .filter_map(|p| Some((idx(p)?, f(p)?)))
                        .collect();
                    (format!("cnse-dp {m}"), pts)
                })
                .filter(|(_, v)| !v.is_empty())
                .collect();
            v.push(p);
        }
        emit(&format!("{file}.svg"), v)?;
    }
    emit("ablation_send_mode_cpu.svg", send_mode_panels(dir))?;
    Ok(written)
}

/// Server CPU per request of each send mode against the PONG payload, and
/// each mode's ratio to plain SEND's.
fn send_mode_panels(dir: &Path) -> Vec<Panel> {
    let sm = crate::SendModes::of(&points(&load(dir, "ablation_send_mode.csv")));
    let x = "PONG payload, bytes";
    let mut cpu = panel("send mode: server CPU per request", x, "server CPU-µs per request", true, true);
    let mut ratio = panel("send mode: CPU per request / plain SEND's", x, "ratio", true, false);
    for m in &sm.modes {
        let at = |f: &dyn Fn(u64) -> Option<f64>| -> Vec<(f64, f64)> {
            sm.payloads.iter().filter_map(|&p| Some((p as f64, f(p)?))).collect()
        };
        cpu.series.push((m.clone(), at(&|p| sm.cpu_us(m, p))));
        ratio.series.push((m.clone(), at(&|p| sm.ratio(m, p))));
    }
    cpu.series.retain(|(_, v)| !v.is_empty());
    ratio.series.retain(|(_, v)| !v.is_empty());
    vec![cpu, ratio]
}
