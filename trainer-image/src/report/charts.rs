//! The run's curves: train and eval loss, learning rate, tokens/s, and the retention score when
//! the probe ran during training. Each becomes an [`svg::Chart`]; a curve without data is left out
//! with a note instead of drawing empty axes.

use super::html::{esc, note, section};
use super::run::Run;
use super::svg::{self, Chart, Series};

/// Colours with enough contrast on white that also survive greyscale printing as distinct shades.
pub const TRAIN_COLOR: &str = "#1f6feb";
pub const EVAL_COLOR: &str = "#e8590c";
pub const LR_COLOR: &str = "#8250df";
pub const TPS_COLOR: &str = "#1a7f37";
pub const RETENTION_COLOR: &str = "#bf3989";

/// The "Curves" section.
pub fn section_html(run: &Run) -> String {
    let figures = [
        loss_chart(run),
        lr_chart(run),
        throughput_chart(run),
        retention_chart(run),
    ];
    let mut body = String::from(r#"<div class="charts">"#);
    let mut missing = Vec::new();
    for chart in &figures {
        match svg::render(chart) {
            Some(svg) => {
                let class = if chart.wide { r#" class="wide""# } else { "" };
                body += &format!(
                    "<figure{class}><figcaption>{}</figcaption>{svg}</figure>",
                    esc(&chart.title)
                );
            }
            None => missing.push(chart.title.clone()),
        }
    }
    body += "</div>";
    if !missing.is_empty() {
        body += &note(&format!("Not in this run: {}.", missing.join(", ")));
    }
    section("curves", "Curves", &body)
}

fn loss_chart(run: &Run) -> Chart {
    let steps = run.steps();
    Chart {
        id: "loss-chart",
        title: "Loss".into(),
        x_label: "optimizer step".into(),
        y_label: "mean token loss".into(),
        series: vec![
            Series {
                name: format!("train loss ({} steps)", steps.len()),
                key: "train-loss",
                color: TRAIN_COLOR,
                points: steps.iter().map(|s| (s.step, s.loss)).collect(),
                markers: false,
                dashed: false,
            },
            Series {
                name: "eval loss (step 0 = before training)".into(),
                key: "eval-loss",
                color: EVAL_COLOR,
                points: run.eval_losses(),
                markers: true,
                dashed: true,
            },
        ],
        wide: true,
        y_include: vec![],
    }
}

fn lr_chart(run: &Run) -> Chart {
    Chart {
        id: "lr-chart",
        title: "Learning rate".into(),
        x_label: "optimizer step".into(),
        y_label: "learning rate".into(),
        series: vec![Series {
            name: "learning rate".into(),
            key: "learning-rate",
            color: LR_COLOR,
            points: run
                .steps()
                .iter()
                .map(|s| (s.step, s.learning_rate))
                .collect(),
            markers: false,
            dashed: false,
        }],
        wide: false,
        y_include: vec![0.0],
    }
}

fn throughput_chart(run: &Run) -> Chart {
    Chart {
        id: "tokens-chart",
        title: "Throughput".into(),
        x_label: "optimizer step".into(),
        y_label: "tokens / s".into(),
        series: vec![Series {
            name: "tokens/s (step tokens ÷ step time)".into(),
            key: "tokens-per-second",
            color: TPS_COLOR,
            points: run
                .steps()
                .iter()
                .map(|s| (s.step, s.tokens_per_second))
                .collect(),
            markers: false,
            dashed: false,
        }],
        wide: false,
        y_include: vec![0.0],
    }
}

/// The probe's score during training; the floor (`minScore`) as a dashed line when set.
fn retention_chart(run: &Run) -> Chart {
    let scores = run.retention_scores();
    let mut series = vec![Series {
        name: "retention score".into(),
        key: "retention-score",
        color: RETENTION_COLOR,
        points: scores.clone(),
        markers: true,
        dashed: false,
    }];
    if let (Some(floor), Some(first), Some(last)) = (
        run.num("retention.min_score"),
        scores.first(),
        scores.last(),
    ) {
        series.push(Series {
            name: "minScore".into(),
            key: "retention-floor",
            color: "#6e7781",
            points: vec![(first.0, floor), (last.0, floor)],
            markers: false,
            dashed: true,
        });
    }
    Chart {
        id: "retention-chart",
        title: "Retention during training".into(),
        x_label: "optimizer step".into(),
        y_label: "score".into(),
        series,
        wide: true,
        y_include: vec![0.0, 1.0],
    }
}
