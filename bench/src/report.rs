//! Human-readable views of a [`Run`]: the Markdown report, the one-line summary and the CDF plot.

use std::path::Path;
use std::sync::OnceLock;

use anyhow::Context;
use plotters::prelude::*;
use plotters::style::text_anchor::{HPos, Pos, VPos};

use crate::results::{Distribution, Metric, Run, quantile};

/// The font family every text style names; registered from the committed font in [`ensure_font`].
const FONT: &str = "sans-serif";

/// Most points drawn per CDF line: runs can hold ~50 000 samples per distribution, far more
/// than a 1200-pixel-wide plot can show.
const MAX_CDF_POINTS: usize = 1000;

/// Distinct, readable line colours (the "tab10" palette); cycled when there are more lines.
const COLOURS: [RGBColor; 10] = [
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

/// The whole run as a Markdown document: parameters, the metric table, the distributions.
pub fn markdown(run: &Run) -> String {
    let p = &run.params;
    let m = &run.machine;
    let mut out = String::new();

    out.push_str(&format!(
        "# roster-bench — {} run ({} build)\n\n",
        run.mode, run.build
    ));
    if is_debug(run) {
        out.push_str("**Debug build: these numbers are not claims.**\n\n");
    }
    out.push_str(&format!(
        "- Run: started {}; {} instances in {} services; heartbeat: {} every {} ms; TTL {} s\n\
         - Machine: {} cores, {:.1} GiB memory, {}, kernel {}; Roster {}, Kubernetes {}\n\
         - Command: `{}`\n\n",
        run.started,
        p.instances,
        p.services,
        p.heartbeat,
        p.heartbeat_interval_ms,
        p.ttl_seconds,
        m.cores,
        m.memory_gib,
        m.cpu,
        m.kernel,
        run.roster_version,
        run.kubernetes_version,
        run.command,
    ));

    out.push_str("| # | metric | Roster | peer | Roster/peer | target | met | note |\n");
    out.push_str("|---|---|---:|---:|---:|---|---|---|\n");
    for metric in &run.metrics {
        out.push_str(&format!(
            "| {} | {} | {} | {} | {} | {} | {} | {} |\n",
            metric.id,
            cell(&metric.name),
            cell(&value(metric.roster, &metric.unit)),
            cell(&value(metric.peer, &metric.unit)),
            ratio(metric),
            cell(&metric.target),
            match metric.met {
                Some(true) => "yes",
                Some(false) => "**no**",
                None => "—",
            },
            cell(&metric.note),
        ));
    }

    if !run.distributions.is_empty() {
        out.push_str("\n## Latency distributions (ms)\n\n");
        out.push_str("| distribution | n | p50 | p90 | p99 | max |\n");
        out.push_str("|---|---:|---:|---:|---:|---:|\n");
        for d in &run.distributions {
            let q = |q| value(quantile(&d.samples_ms, q), "");
            out.push_str(&format!(
                "| {} | {} | {} | {} | {} | {} |\n",
                cell(&d.name),
                d.samples_ms.len(),
                q(0.5),
                q(0.9),
                q(0.99),
                q(1.0),
            ));
        }
    }
    out
}

/// One line for a terminal or a commit message: targets met, then the headline metrics.
pub fn summary_line(run: &Run) -> String {
    let judged: Vec<&Metric> = run.metrics.iter().filter(|m| m.met.is_some()).collect();
    let met = judged.iter().filter(|m| m.met == Some(true)).count();
    let mut parts = vec![format!(
        "roster-bench {} ({}): {}/{} targets met",
        run.mode,
        run.build,
        met,
        judged.len()
    )];

    // The headline rows: registration latency, expiry lag, write amplification, memory.
    for id in [1, 2, 3, 6] {
        let Some(m) = run.metrics.iter().find(|m| m.id == id) else {
            continue;
        };
        let mut part = format!("{} {}", m.name, value(m.roster, &m.unit));
        if m.peer.is_some() {
            part.push_str(&format!(" (peer {}", value(m.peer, &m.unit)));
            if let Some(r) = m.ratio() {
                part.push_str(&format!(", {r:.2}×"));
            }
            part.push(')');
        }
        parts.push(part);
    }
    parts.push(format!("{} instances", run.params.instances));

    // Names and notes are free text: keep the promise of a single line.
    parts.join("; ").replace(['\n', '\r'], " ")
}

/// Empirical CDFs of every distribution, as a 1200×700 PNG at `path`.
pub fn plot_png(run: &Run, path: &Path) -> anyhow::Result<()> {
    ensure_font()?;

    let lines: Vec<(&str, Vec<(f64, f64)>)> = run
        .distributions
        .iter()
        .filter_map(|d| {
            let cdf = cdf_points(d);
            (!cdf.is_empty()).then_some((d.name.as_str(), cdf))
        })
        .collect();

    // Log x-axis from half the smallest sample (but at least 0.5 ms) to twice the largest.
    let (lo, hi) = if lines.is_empty() {
        (1.0, 1000.0)
    } else {
        let min = lines
            .iter()
            .map(|(_, c)| c[0].0)
            .fold(f64::INFINITY, f64::min);
        let max = lines
            .iter()
            .map(|(_, c)| c[c.len() - 1].0)
            .fold(0.0, f64::max);
        let lo = min.max(1.0) / 2.0;
        // All-zero or all-sub-millisecond samples would otherwise give an empty range.
        (lo, (max * 2.0).max(lo * 4.0))
    };

    let root = BitMapBackend::new(path, (1200, 700)).into_drawing_area();
    root.fill(&WHITE)?;
    let title = format!(
        "Latency distributions — {}, {} instances",
        run.mode, run.params.instances
    );
    let mut chart = ChartBuilder::on(&root)
        .caption(title, (FONT, 28))
        .margin(20)
        .x_label_area_size(50)
        .y_label_area_size(70)
        .build_cartesian_2d((lo..hi).log_scale(), 0.0..1.0)?;

    let x_fmt = |v: &f64| axis_ms(*v);
    let y_fmt = |v: &f64| format!("{v:.1}");
    chart
        .configure_mesh()
        .x_desc("latency (ms, log scale)")
        .y_desc("fraction of samples ≤ latency")
        .x_label_formatter(&x_fmt)
        .y_label_formatter(&y_fmt)
        .label_style((FONT, 15))
        .axis_desc_style((FONT, 17))
        .draw()?;

    let has_lines = !lines.is_empty();
    if !has_lines {
        // In data coordinates: the geometric middle of the log axis, half-way up.
        let style = TextStyle::from((FONT, 22))
            .color(&BLACK)
            .pos(Pos::new(HPos::Center, VPos::Center));
        chart.draw_series(std::iter::once(Text::new(
            "no latency samples in this run",
            ((lo * hi).sqrt(), 0.5),
            style,
        )))?;
    }

    for (i, (name, cdf)) in lines.into_iter().enumerate() {
        let colour = COLOURS[i % COLOURS.len()];
        // Sub-0.5 ms samples sit at the left edge rather than falling off the log axis.
        let points = cdf.into_iter().map(|(x, y)| (x.clamp(lo, hi), y));
        chart
            .draw_series(LineSeries::new(points, colour.stroke_width(2)))?
            .label(name)
            .legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 20, y)], colour.stroke_width(2))
            });
    }

    if has_lines {
        chart
            .configure_series_labels()
            .label_font((FONT, 16))
            .background_style(WHITE.mix(0.85))
            .border_style(BLACK)
            .position(SeriesLabelPosition::LowerRight)
            .draw()?;
    }

    // Dropping the backend also saves, but swallows the error; present() reports it.
    root.present()
        .with_context(|| format!("writing {}", path.display()))?;
    Ok(())
}

/// Registers the committed font under [`FONT`] once per process: plotters' ab_glyph backend
/// has no system fonts, so text fails to draw without it.
fn ensure_font() -> anyhow::Result<()> {
    static REGISTERED: OnceLock<bool> = OnceLock::new();
    let ok = *REGISTERED.get_or_init(|| {
        plotters::style::register_font(
            FONT,
            FontStyle::Normal,
            include_bytes!("../assets/DejaVuSansMono.ttf"),
        )
        // InvalidFont implements neither Debug nor Display, so only success can be kept.
        .is_ok()
    });
    anyhow::ensure!(
        ok,
        "the committed font assets/DejaVuSansMono.ttf could not be parsed"
    );
    Ok(())
}

/// The empirical CDF of a distribution's finite samples as (ms, fraction ≤ ms) points, thinned
/// to at most about [`MAX_CDF_POINTS`] while keeping the first and last (the extremes).
fn cdf_points(d: &Distribution) -> Vec<(f64, f64)> {
    let mut sorted: Vec<f64> = d
        .samples_ms
        .iter()
        .copied()
        .filter(|v| v.is_finite())
        .collect();
    sorted.sort_by(f64::total_cmp);
    let n = sorted.len();
    if n == 0 {
        return Vec::new();
    }
    let step = n.div_ceil(MAX_CDF_POINTS).max(1);
    let mut idx: Vec<usize> = (0..n).step_by(step).collect();
    if idx.last() != Some(&(n - 1)) {
        idx.push(n - 1);
    }
    idx.into_iter()
        .map(|i| (sorted[i], (i + 1) as f64 / n as f64))
        .collect()
}

fn is_debug(run: &Run) -> bool {
    run.build.eq_ignore_ascii_case("debug")
}

/// A number with its unit: no decimals when integral, one otherwise; `—` when absent.
fn value(v: Option<f64>, unit: &str) -> String {
    let Some(v) = v else {
        return "—".to_string();
    };
    let num = if v.fract() == 0.0 && v.abs() < 1e15 {
        format!("{v:.0}")
    } else {
        format!("{v:.1}")
    };
    match unit {
        "" => num,
        "%" => format!("{num}%"),
        _ => format!("{num} {unit}"),
    }
}

fn ratio(m: &Metric) -> String {
    m.ratio().map_or("—".to_string(), |r| format!("{r:.2}×"))
}

/// Free text made safe for one Markdown table cell.
fn cell(text: &str) -> String {
    text.replace('|', "\\|").replace(['\n', '\r'], " ")
}

/// Log-axis tick labels: the log range's key points carry floating-point noise.
fn axis_ms(v: f64) -> String {
    if v >= 10.0 {
        format!("{v:.0}")
    } else if v >= 1.0 {
        format!("{v:.1}")
    } else {
        format!("{v:.2}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::results::{Machine, Params};

    fn metric(
        id: u8,
        name: &str,
        unit: &str,
        roster: f64,
        peer: Option<f64>,
        met: Option<bool>,
    ) -> Metric {
        Metric {
            id,
            name: name.to_string(),
            unit: unit.to_string(),
            roster: Some(roster),
            peer,
            target: "p99 ≤ 1000 ms".to_string(),
            met,
            note: "measured from the watch".to_string(),
        }
    }

    fn run(distributions: Vec<Distribution>) -> Run {
        Run {
            started: "2025-01-01T00:00:00Z".to_string(),
            mode: "quick".to_string(),
            build: "release".to_string(),
            roster_version: "0.1.0".to_string(),
            kubernetes_version: "v1.33.1".to_string(),
            machine: Machine {
                cores: 8,
                memory_gib: 31.3,
                cpu: "Test CPU".to_string(),
                kernel: "6.8.0".to_string(),
            },
            params: Params {
                instances: 1000,
                services: 10,
                heartbeat: "lease".to_string(),
                heartbeat_interval_ms: 2000,
                ttl_seconds: 10,
            },
            metrics: vec![
                metric(1, "registration p99", "ms", 812.0, Some(640.0), Some(true)),
                metric(2, "expiry lag p99", "ms", 1410.5, None, Some(false)),
                metric(
                    3,
                    "writes per steady heartbeat",
                    "",
                    0.0,
                    Some(1.0),
                    Some(true),
                ),
                metric(5, "restart recovery", "s", 3.0, None, None),
                metric(6, "RSS", "MiB", 38.0, None, Some(true)),
            ],
            distributions,
            command: "roster-bench --quick".to_string(),
        }
    }

    fn samples(n: usize, scale: f64) -> Vec<f64> {
        // A deterministic, skewed spread of latencies.
        (0..n)
            .map(|i| scale * (1.0 + (i as f64 / n as f64).powi(3) * 50.0))
            .collect()
    }

    fn temp_png(name: &str) -> std::path::PathBuf {
        std::env::temp_dir().join(format!("report-test-{}-{name}.png", std::process::id()))
    }

    #[test]
    fn markdown_has_table_values_and_misses() {
        let md = markdown(&run(vec![Distribution {
            name: "registration → routable (Roster)".to_string(),
            samples_ms: samples(100, 10.0),
        }]));
        assert!(md.contains("| # | metric | Roster | peer | Roster/peer | target | met | note |"));
        assert!(
            md.contains("| 1 | registration p99 | 812 ms | 640 ms | 1.27× | p99 ≤ 1000 ms | yes |")
        );
        assert!(md.contains("| 2 | expiry lag p99 | 1410.5 ms | — | — | p99 ≤ 1000 ms | **no** |"));
        assert!(md.contains("| 5 | restart recovery | 3 s | — | — | p99 ≤ 1000 ms | — |"));
        assert!(md.contains("| distribution | n | p50 | p90 | p99 | max |"));
        assert!(md.contains("| registration → routable (Roster) | 100 |"));
        assert!(!md.contains("not claims"));

        let mut debug = run(Vec::new());
        debug.build = "debug".to_string();
        assert!(markdown(&debug).contains("**Debug build: these numbers are not claims.**"));
    }

    #[test]
    fn summary_is_one_line_with_met_count() {
        let line = summary_line(&run(Vec::new()));
        assert!(!line.contains('\n'), "{line}");
        assert!(
            line.starts_with("roster-bench quick (release): 3/4 targets met; "),
            "{line}"
        );
        assert!(
            line.contains("registration p99 812 ms (peer 640 ms, 1.27×)"),
            "{line}"
        );
        assert!(line.contains("RSS 38 MiB"), "{line}");
        assert!(!line.contains("restart recovery"), "{line}");
    }

    #[test]
    fn cdf_is_thinned_but_keeps_extremes() {
        let d = Distribution {
            name: "big".to_string(),
            samples_ms: samples(50_000, 1.0),
        };
        let cdf = cdf_points(&d);
        assert!(cdf.len() <= MAX_CDF_POINTS + 1, "{}", cdf.len());
        assert_eq!(cdf[0].0, 1.0);
        assert_eq!(cdf.last().unwrap().1, 1.0);
    }

    #[test]
    fn plot_writes_a_png() {
        let path = temp_png("cdf");
        let r = run(vec![
            Distribution {
                name: "registration → routable (Roster)".to_string(),
                samples_ms: samples(50_000, 5.0),
            },
            Distribution {
                name: "registration → routable (peer)".to_string(),
                samples_ms: samples(2_000, 8.0),
            },
            Distribution {
                name: "empty".to_string(),
                samples_ms: Vec::new(),
            },
        ]);
        plot_png(&r, &path).unwrap();
        let bytes = std::fs::read(&path).unwrap();
        std::fs::remove_file(&path).ok();
        assert!(bytes.starts_with(b"\x89PNG\r\n\x1a\n"));
        assert!(bytes.len() > 8 * 1024, "{} bytes", bytes.len());
    }

    #[test]
    fn plot_without_distributions_still_writes_a_png() {
        let path = temp_png("empty");
        plot_png(&run(Vec::new()), &path).unwrap();
        let bytes = std::fs::read(&path).unwrap();
        std::fs::remove_file(&path).ok();
        assert!(bytes.starts_with(b"\x89PNG\r\n\x1a\n"));
        assert!(bytes.len() > 2 * 1024, "{} bytes", bytes.len());
    }
}
