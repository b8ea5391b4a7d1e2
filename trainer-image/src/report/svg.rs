//! Line charts as inline SVG, generated here so the report needs no JavaScript, no chart library
//! and no network: the browser only draws paths. One chart = axes with "nice" ticks (1, 2, 5 ×
//! 10ⁿ), grid lines, axis labels, a legend, and one `<path>` per series whose `d` has exactly one
//! `M`/`L` command per finite point (the reference test counts them against the logged steps).

use std::fmt::Write;

use super::html::esc;

/// Drawing size in SVG units, about the CSS pixels of a half-width figure on a 1200 px page (so
/// text keeps its size); a wide chart is twice as wide, not taller.
const HALF_WIDTH: f64 = 540.0;
const WIDE_WIDTH: f64 = 1100.0;
const HEIGHT: f64 = 300.0;
/// Room for the y tick labels (left), the legend (top) and the x labels (bottom).
const LEFT: f64 = 66.0;
const RIGHT: f64 = 14.0;
const TOP: f64 = 34.0;
const BOTTOM: f64 = 46.0;

/// One line of a chart.
pub struct Series {
    /// Shown in the legend.
    pub name: String,
    /// A stable id (`data-series`) for tests and styling.
    pub key: &'static str,
    pub color: &'static str,
    /// (x, y); non-finite points break the line instead of dragging it to infinity.
    pub points: Vec<(f64, f64)>,
    /// Circles on the points: for sparse series (evals) whose points matter one by one.
    pub markers: bool,
    pub dashed: bool,
}

pub struct Chart {
    /// `id` of the `<svg>` element.
    pub id: &'static str,
    pub title: String,
    pub x_label: String,
    pub y_label: String,
    pub series: Vec<Series>,
    /// Spans the page's width (the main curve) instead of half of it.
    pub wide: bool,
    /// Values the y axis must include besides the data, e.g. 0 so a flat throughput does not
    /// look like a swing, or 0 and 1 for a score.
    pub y_include: Vec<f64>,
}

/// Maps a data interval onto a pixel interval.
#[derive(Debug, Clone, Copy)]
pub struct Scale {
    pub d0: f64,
    pub d1: f64,
    pub r0: f64,
    pub r1: f64,
}

impl Scale {
    pub fn at(&self, v: f64) -> f64 {
        self.r0 + (v - self.d0) / (self.d1 - self.d0) * (self.r1 - self.r0)
    }
}

/// Ticks covering `[lo, hi]` at a step of 1, 2 or 5 × 10ⁿ, about `target` of them; the first and
/// last tick enclose the data, so they also serve as the axis bounds. A flat or empty range is
/// widened so the axis still has extent.
pub fn nice_ticks(lo: f64, hi: f64, target: usize) -> Vec<f64> {
    let (lo, hi) = widen(lo, hi);
    let raw = (hi - lo) / target.max(1) as f64;
    // Ranges too wide for f64 arithmetic (±1e308) get just their ends.
    if !(raw.is_finite() && raw > 0.0) {
        return vec![lo, hi];
    }
    let magnitude = 10f64.powf(raw.log10().floor());
    let step = [1.0, 2.0, 5.0, 10.0]
        .iter()
        .map(|m| m * magnitude)
        .find(|s| *s >= raw)
        .unwrap_or(10.0 * magnitude);
    let first = (lo / step).floor();
    let last = (hi / step).ceil();
    // Multiples of the step (not a running sum), so 0.1 + 0.2 drift never shows up in labels.
    (0..=(last - first) as i64)
        .map(|i| (first + i as f64) * step)
        .collect()
}

/// A non-empty interval around `[lo, hi]`.
fn widen(lo: f64, hi: f64) -> (f64, f64) {
    if !(lo.is_finite() && hi.is_finite()) {
        return (0.0, 1.0);
    }
    if hi > lo {
        return (lo, hi);
    }
    let pad = if lo == 0.0 { 1.0 } else { lo.abs() * 0.1 };
    (lo - pad, hi + pad)
}

/// A tick label: as many decimals as the tick step needs, scientific notation for small steps
/// (learning rates) and large values.
pub fn tick_label(v: f64, step: f64) -> String {
    if v == 0.0 {
        return "0".into();
    }
    if step.abs() < 1e-3 || v.abs() >= 1e6 {
        // Round to 4 significant digits first so float noise (3.9999e-4) prints as 4e-4.
        let rounded: f64 = format!("{v:.3e}").parse().unwrap_or(v);
        return format!("{rounded:e}");
    }
    let decimals = (-step.log10().floor()).clamp(0.0, 6.0) as usize;
    format!("{v:.decimals$}")
}

/// The `d` attribute of a polyline through `points`: `M` starts a segment, `L` continues it; a
/// non-finite point ends the segment and the next finite one starts a new `M`.
pub fn svg_path(points: &[(f64, f64)], x: Scale, y: Scale) -> String {
    let mut d = String::new();
    let mut pen_down = false;
    for &(px, py) in points {
        if !(px.is_finite() && py.is_finite()) {
            pen_down = false;
            continue;
        }
        let cmd = if pen_down { 'L' } else { 'M' };
        let _ = write!(d, "{cmd}{:.1},{:.1}", x.at(px), y.at(py));
        pen_down = true;
    }
    d
}

/// The whole `<svg>` element, or `None` when no series has a finite point.
pub fn render(chart: &Chart) -> Option<String> {
    let finite = |s: &Series| {
        s.points
            .iter()
            .filter(|(x, y)| x.is_finite() && y.is_finite())
            .copied()
            .collect::<Vec<_>>()
    };
    let all: Vec<(f64, f64)> = chart.series.iter().flat_map(finite).collect();
    if all.is_empty() {
        return None;
    }
    let width = if chart.wide { WIDE_WIDTH } else { HALF_WIDTH };
    // Every x axis starts at step 0 (before training), so charts of one run line up.
    let x_values = all.iter().map(|p| p.0).chain([0.0]);
    let x_ticks = ticks_of(x_values, if chart.wide { 10 } else { 6 });
    let y_values = all
        .iter()
        .map(|p| p.1)
        .chain(chart.y_include.iter().copied());
    let y_ticks = ticks_of(y_values, 5);
    let x = Scale {
        d0: x_ticks[0],
        d1: x_ticks[x_ticks.len() - 1],
        r0: LEFT,
        r1: width - RIGHT,
    };
    let y = Scale {
        d0: y_ticks[0],
        d1: y_ticks[y_ticks.len() - 1],
        r0: HEIGHT - BOTTOM,
        r1: TOP,
    };
    let mut s = format!(
        r#"<svg id="{}" class="chart" viewBox="0 0 {width} {HEIGHT}" role="img" aria-label="{}">"#,
        chart.id,
        esc(&chart.title)
    );
    s += &axes(chart, x, &x_ticks, y, &y_ticks);
    for series in &chart.series {
        s += &series_svg(series, x, y);
    }
    s += &legend(&chart.series);
    s += "</svg>";
    Some(s)
}

fn ticks_of(values: impl Iterator<Item = f64> + Clone, target: usize) -> Vec<f64> {
    let lo = values.clone().fold(f64::INFINITY, f64::min);
    let hi = values.fold(f64::NEG_INFINITY, f64::max);
    nice_ticks(lo, hi, target)
}

/// Grid lines, tick labels and the two axis titles.
fn axes(chart: &Chart, x: Scale, x_ticks: &[f64], y: Scale, y_ticks: &[f64]) -> String {
    let mut s = String::from(r#"<g class="axes">"#);
    let x_step = x_ticks.get(1).map_or(1.0, |t| t - x_ticks[0]);
    for &t in x_ticks {
        let px = x.at(t);
        let _ = write!(
            s,
            r#"<line class="grid" x1="{px:.1}" y1="{:.1}" x2="{px:.1}" y2="{:.1}"/><text class="tick" x="{px:.1}" y="{:.1}" text-anchor="middle">{}</text>"#,
            y.r1,
            y.r0,
            y.r0 + 16.0,
            tick_label(t, x_step)
        );
    }
    let y_step = y_ticks.get(1).map_or(1.0, |t| t - y_ticks[0]);
    for &t in y_ticks {
        let py = y.at(t);
        let _ = write!(
            s,
            r#"<line class="grid" x1="{:.1}" y1="{py:.1}" x2="{:.1}" y2="{py:.1}"/><text class="tick" x="{:.1}" y="{:.1}" text-anchor="end">{}</text>"#,
            x.r0,
            x.r1,
            x.r0 - 6.0,
            py + 4.0,
            tick_label(t, y_step)
        );
    }
    let _ = write!(
        s,
        r#"<rect class="frame" x="{:.1}" y="{:.1}" width="{:.1}" height="{:.1}"/>"#,
        x.r0,
        y.r1,
        x.r1 - x.r0,
        y.r0 - y.r1
    );
    let (mid_x, mid_y) = ((x.r0 + x.r1) / 2.0, (y.r0 + y.r1) / 2.0);
    let _ = write!(
        s,
        r#"<text class="axis-label" x="{mid_x:.1}" y="{:.1}" text-anchor="middle">{}</text><text class="axis-label" transform="translate(14 {mid_y:.1}) rotate(-90)" text-anchor="middle">{}</text></g>"#,
        HEIGHT - 8.0,
        esc(&chart.x_label),
        esc(&chart.y_label)
    );
    s
}

/// One series: its path (when it has two points or more) and its markers.
fn series_svg(series: &Series, x: Scale, y: Scale) -> String {
    let d = svg_path(&series.points, x, y);
    let dash = if series.dashed {
        r#" stroke-dasharray="6 4""#
    } else {
        ""
    };
    let mut s = format!(
        r#"<path class="series" data-series="{}" d="{d}" fill="none" stroke="{}" stroke-width="2" stroke-linejoin="round"{dash}/>"#,
        series.key, series.color
    );
    // A lone point draws no line; a marker keeps it visible.
    let lone = series.points.iter().filter(|p| p.1.is_finite()).count() == 1;
    if series.markers || lone {
        for &(px, py) in series
            .points
            .iter()
            .filter(|p| p.0.is_finite() && p.1.is_finite())
        {
            let _ = write!(
                s,
                r#"<circle class="marker" data-series="{}" cx="{:.1}" cy="{:.1}" r="3.5" fill="{}"/>"#,
                series.key,
                x.at(px),
                y.at(py),
                series.color
            );
        }
    }
    s
}

/// Swatch + name per series, left to right above the plot.
fn legend(series: &[Series]) -> String {
    let mut s = String::from(r#"<g class="legend">"#);
    let mut at = LEFT;
    for item in series {
        let dash = if item.dashed {
            r#" stroke-dasharray="6 4""#
        } else {
            ""
        };
        let _ = write!(
            s,
            r#"<line x1="{at:.1}" y1="16" x2="{:.1}" y2="16" stroke="{}" stroke-width="3"{dash}/><text class="legend-text" x="{:.1}" y="20">{}</text>"#,
            at + 22.0,
            item.color,
            at + 28.0,
            esc(&item.name)
        );
        // About 6.5 units per character at the legend's font size.
        at += 44.0 + 6.5 * item.name.chars().count() as f64;
    }
    s + "</g>"
}

#[cfg(test)]
mod tests {
    use super::*;

    const UNIT: Scale = Scale {
        d0: 0.0,
        d1: 10.0,
        r0: 0.0,
        r1: 100.0,
    };
    const FLIP: Scale = Scale {
        d0: 0.0,
        d1: 1.0,
        r0: 100.0,
        r1: 0.0,
    };

    #[test]
    fn path_has_one_command_per_point_and_flips_y() {
        let d = svg_path(&[(0.0, 0.0), (5.0, 0.5), (10.0, 1.0)], UNIT, FLIP);
        assert_eq!(d, "M0.0,100.0L50.0,50.0L100.0,0.0");
    }

    #[test]
    fn non_finite_points_break_the_line() {
        let d = svg_path(
            &[
                (1.0, 0.1),
                (2.0, f64::NAN),
                (3.0, 0.3),
                (4.0, f64::INFINITY),
            ],
            UNIT,
            FLIP,
        );
        assert_eq!(d, "M10.0,90.0M30.0,70.0");
        assert_eq!(svg_path(&[], UNIT, FLIP), "");
    }

    #[test]
    fn ticks_are_round_and_enclose_the_data() {
        assert_eq!(
            nice_ticks(0.0, 10.0, 5),
            vec![0.0, 2.0, 4.0, 6.0, 8.0, 10.0]
        );
        let t = nice_ticks(1.37, 2.91, 5);
        assert_eq!(t, vec![1.0, 1.5, 2.0, 2.5, 3.0]);
        assert_eq!(tick_label(t[1], t[1] - t[0]), "1.5");
        assert_eq!(tick_label(0.30000000000000004, 0.1), "0.3");
        // A flat series still gets an axis with extent.
        let flat = nice_ticks(3.0, 3.0, 5);
        assert!(flat.len() >= 2 && flat[0] < 3.0 && *flat.last().unwrap() > 3.0);
        assert!(nice_ticks(f64::NAN, f64::NAN, 5).len() >= 2);
    }

    #[test]
    fn small_ticks_are_scientific() {
        let t = nice_ticks(0.0, 1e-3, 5);
        let step = t[1] - t[0];
        assert_eq!(tick_label(t[2], step), "4e-4");
        assert_eq!(tick_label(0.0, step), "0");
        assert_eq!(tick_label(1500.0, 500.0), "1500");
    }

    #[test]
    fn a_chart_draws_every_series_and_escapes_names() {
        let chart = Chart {
            id: "c",
            title: "t".into(),
            x_label: "step".into(),
            y_label: "loss".into(),
            series: vec![Series {
                name: "<b>".into(),
                key: "train-loss",
                color: "#123456",
                points: vec![(1.0, 2.0), (2.0, 1.0)],
                markers: false,
                dashed: false,
            }],
            wide: false,
            y_include: vec![0.0],
        };
        let svg = render(&chart).unwrap();
        assert!(svg.contains(">0</text>"), "the y axis includes 0: {svg}");
        assert!(svg.contains(r#"data-series="train-loss""#), "{svg}");
        assert!(svg.contains("&lt;b&gt;") && !svg.contains("<b>"), "{svg}");
        let empty = Chart {
            series: vec![],
            ..chart
        };
        assert!(render(&empty).is_none());
    }
}
