//! The loss and learning-rate curves of a training run as SVG and PNG
//! (plotters), written beside the checkpoints and shown inline in the
//! notebooks. Text is drawn with a small font shipped in the crate
//! (`assets/plot-sans.ttf`, DejaVu Sans cut to ASCII), so a PNG renders the
//! same on a machine without system fonts. Grey lines mark where each epoch
//! ends.

use std::path::Path;

use plotters::prelude::*;

use super::state::TrainerState;

/// Make the shipped font plotters' "sans-serif" (once per process).
fn register_font() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let font = include_bytes!("../../assets/plot-sans.ttf");
        if plotters::style::register_font("sans-serif", FontStyle::Normal, font).is_err() {
            panic!("the shipped font assets/plot-sans.ttf does not parse");
        }
    });
}

/// `(step, value)` of every log entry that has `key`. Steps are whole
/// numbers, so the x axis is an integer axis and its ticks are too.
fn series(state: &TrainerState, key: &str) -> Vec<(i64, f64)> {
    state
        .log_history
        .iter()
        .filter_map(|e| Some((e.get("step")?.as_i64()?, e.get(key)?.as_f64()?)))
        .collect()
}

/// The steps where an epoch ends (the logged epoch crosses a whole number),
/// before `max_step`.
fn epoch_ends(state: &TrainerState, max_step: i64) -> Vec<(i64, usize)> {
    let Some(per_step) = state.log_history.iter().find_map(|e| {
        let (s, ep) = (e.get("step")?.as_f64()?, e.get("epoch")?.as_f64()?);
        (s > 0.0 && ep > 0.0).then_some(ep / s)
    }) else {
        return Vec::new();
    };
    let mut ends: Vec<(i64, usize)> = (1..)
        .map(|k| (((k as f64) / per_step).round() as i64, k))
        .take_while(|&(s, _)| s < max_step)
        .filter(|&(s, _)| s > 0)
        .collect();
    // Epochs shorter than a step end on the same step: mark it once.
    ends.dedup_by_key(|e| e.0);
    ends
}

fn draw<DB: DrawingBackend>(
    root: DrawingArea<DB, plotters::coord::Shift>,
    state: &TrainerState,
) -> Result<(), String>
where
    DB::ErrorType: 'static,
{
    root.fill(&WHITE).map_err(|e| e.to_string())?;
    let (top, bottom) = root.split_vertically(240);
    let loss = series(state, "loss");
    let eval = series(state, "eval_loss");
    let lr = series(state, "learning_rate");
    let max_step = state.global_step.max(1) as i64;
    let all: Vec<f64> = loss.iter().chain(&eval).map(|p| p.1).collect();
    let (lo, hi) = all
        .iter()
        .fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), &x| {
            (a.min(x), b.max(x))
        });
    let (lo, hi) = if lo.is_finite() {
        (lo * 0.95, hi * 1.05)
    } else {
        (0.0, 1.0)
    };
    let mut c = ChartBuilder::on(&top)
        .caption("loss", ("sans-serif", 16))
        .margin(8)
        .margin_right(24)
        .x_label_area_size(34)
        .y_label_area_size(48)
        .build_cartesian_2d(0..max_step, lo..hi)
        .map_err(|e| e.to_string())?;
    c.configure_mesh()
        .x_desc("step")
        .draw()
        .map_err(|e| e.to_string())?;
    let ends = epoch_ends(state, max_step);
    let grey = RGBColor(150, 150, 150);
    for &(s, k) in &ends {
        c.draw_series(LineSeries::new([(s, lo), (s, hi)], grey))
            .map_err(|e| e.to_string())?;
        c.draw_series(std::iter::once(Text::new(
            format!("epoch {k}"),
            (s, hi - (hi - lo) * 0.02),
            ("sans-serif", 12).into_font().color(&grey),
        )))
        .map_err(|e| e.to_string())?;
    }
    c.draw_series(LineSeries::new(loss, &BLUE))
        .map_err(|e| e.to_string())?
        .label("train")
        .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 16, y)], BLUE));
    c.draw_series(eval.iter().map(|&p| Circle::new(p, 4, RED.filled())))
        .map_err(|e| e.to_string())?
        .label("eval")
        .legend(|(x, y)| Circle::new((x + 8, y), 4, RED.filled()));
    c.configure_series_labels()
        .border_style(BLACK)
        .draw()
        .map_err(|e| e.to_string())?;
    let lr_hi = lr.iter().map(|p| p.1).fold(0.0, f64::max).max(1e-12) * 1.05;
    let mut c = ChartBuilder::on(&bottom)
        .caption("learning rate", ("sans-serif", 16))
        .margin(8)
        .margin_right(24)
        .x_label_area_size(34)
        .y_label_area_size(48)
        .build_cartesian_2d(0..max_step, 0f64..lr_hi)
        .map_err(|e| e.to_string())?;
    c.configure_mesh()
        .x_desc("step")
        .draw()
        .map_err(|e| e.to_string())?;
    for &(s, _) in &ends {
        c.draw_series(LineSeries::new([(s, 0.0), (s, lr_hi)], grey))
            .map_err(|e| e.to_string())?;
    }
    c.draw_series(LineSeries::new(lr, &GREEN))
        .map_err(|e| e.to_string())?;
    root.present().map_err(|e| e.to_string())
}

/// The curves as an SVG document.
pub fn loss_plot_svg(state: &TrainerState) -> Result<String, String> {
    register_font();
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, SIZE).into_drawing_area();
        draw(root, state)?;
    }
    Ok(svg)
}

/// Size of the plots in pixels.
const SIZE: (u32, u32) = (640, 420);

/// Write the curves as a PNG file at `path`.
pub fn loss_plot_png(state: &TrainerState, path: &Path) -> Result<(), String> {
    register_font();
    let root = BitMapBackend::new(path, SIZE).into_drawing_area();
    draw(root, state)
}

/// Write `loss.svg` and `loss.png` into `dir`, each atomically (a finished
/// file is renamed over the old one).
pub fn save_loss_plot(state: &TrainerState, dir: &Path) -> Result<(), String> {
    let svg = loss_plot_svg(state)?;
    crate::atomic_write::write_file_atomically(&dir.join("loss.svg"), svg.as_bytes())
        .map_err(|e| e.to_string())?;
    // The encoder picks the format from the extension, so the partial file
    // ends in .png too.
    let partial = dir.join(".loss.partial.png");
    loss_plot_png(state, &partial)?;
    std::fs::rename(&partial, dir.join("loss.png")).map_err(|e| format!("{}: {e}", dir.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn epochs_end_where_the_logged_epoch_crosses_a_whole_number() {
        // 945 steps an epoch (15118 blocks, 16 a step), as in 4.3.4.
        let mut s = crate::notebook::reference::tests::state(serde_json::json!([
            {"step": 10, "epoch": 10.0 / 945.0, "loss": 5.0}
        ]));
        s.global_step = 2000;
        assert_eq!(epoch_ends(&s, 2000), vec![(945, 1), (1890, 2)]);
        assert!(loss_plot_svg(&s).unwrap().contains("epoch 2"));
    }
}
