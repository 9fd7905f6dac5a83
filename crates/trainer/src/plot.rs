//! PNG plots of a run's metrics against examples seen (loss, learning rate, each evaluator),
//! redrawn at every evaluation. Text needs a TrueType font: the first of a few usual system
//! fonts is used; without one the plots are drawn without labels rather than not at all.
use plotters::prelude::*;
use serde_json::{Map, Value};
use std::path::Path;
use std::sync::OnceLock;

const FONT_PATHS: [&str; 5] = [
    "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/TTF/DejaVuSans.ttf",
    "/usr/share/fonts/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/truetype/liberation/LiberationSans-Regular.ttf",
    "/Library/Fonts/Arial Unicode.ttf",
];

/// Whether a font could be registered (once per process).
fn font_ready() -> bool {
    static READY: OnceLock<bool> = OnceLock::new();
    *READY.get_or_init(|| {
        let path = std::env::var("SFT_PLOT_FONT")
            .ok()
            .into_iter()
            .chain(FONT_PATHS.iter().map(|s| s.to_string()))
            .find(|p| Path::new(p).is_file());
        let Some(path) = path else { return false };
        let Ok(bytes) = std::fs::read(&path) else {
            return false;
        };
        // plotters keeps a 'static reference to the font data.
        let bytes: &'static [u8] = Box::leak(bytes.into_boxed_slice());
        plotters::style::register_font("sans-serif", FontStyle::Normal, bytes).is_ok()
    })
}

pub type Series = (String, Vec<(f64, f64)>);

/// Draw one chart of several series (x: examples seen) into `path`.
pub fn draw(path: &Path, title: &str, y_label: &str, series: &[Series]) -> Result<(), String> {
    let points = series.iter().flat_map(|(_, p)| p.iter());
    let (mut x0, mut x1, mut y0, mut y1) = (f64::MAX, f64::MIN, f64::MAX, f64::MIN);
    for &(x, y) in points {
        if y.is_finite() {
            x0 = x0.min(x);
            x1 = x1.max(x);
            y0 = y0.min(y);
            y1 = y1.max(y);
        }
    }
    if x0 > x1 {
        return Ok(()); // nothing to draw yet
    }
    if x1 - x0 < 1e-9 {
        x1 = x0 + 1.0;
    }
    let pad = ((y1 - y0) * 0.05).max(1e-6);
    let (y0, y1) = (y0 - pad, y1 + pad);
    let text = font_ready();
    let root = BitMapBackend::new(path, (900, 540)).into_drawing_area();
    let err = |e: &dyn std::fmt::Display| format!("{}: {e}", path.display());
    root.fill(&WHITE).map_err(|e| err(&e))?;
    let mut builder = ChartBuilder::on(&root);
    builder.margin(16);
    if text {
        builder
            .caption(title, ("sans-serif", 26))
            .x_label_area_size(44)
            .y_label_area_size(64);
    }
    let mut chart = builder
        .build_cartesian_2d(x0..x1, y0..y1)
        .map_err(|e| err(&e))?;
    let mut mesh = chart.configure_mesh();
    if text {
        mesh.x_desc("examples seen").y_desc(y_label);
    } else {
        mesh.disable_x_axis().disable_y_axis();
    }
    mesh.draw().map_err(|e| err(&e))?;
    for (i, (name, pts)) in series.iter().enumerate() {
        let color = Palette99::pick(i).to_rgba();
        let s = chart
            .draw_series(LineSeries::new(pts.iter().copied(), color.stroke_width(2)))
            .map_err(|e| err(&e))?;
        if text {
            s.label(name.clone())
                .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 18, y)], color));
        }
        if pts.len() < 60 {
            chart
                .draw_series(pts.iter().map(|&p| Circle::new(p, 3, color.filled())))
                .map_err(|e| err(&e))?;
        }
    }
    if text && series.len() > 1 {
        chart
            .configure_series_labels()
            .background_style(WHITE.mix(0.8))
            .border_style(BLACK)
            .draw()
            .map_err(|e| err(&e))?;
    }
    root.present().map_err(|e| err(&e))?;
    Ok(())
}

/// The (examples, value) points of `key` over the records that carry it.
pub fn series_of(records: &[Map<String, Value>], key: &str) -> Vec<(f64, f64)> {
    records
        .iter()
        .filter_map(|r| {
            let x = r.get("examples")?.as_f64()?;
            let y = r.get(key)?.as_f64()?;
            Some((x, y))
        })
        .collect()
}

/// Redraw every plot of a run folder from its metrics records: `loss.png`, `lr.png`, one
/// `<name>.png` per evaluator (its scores named `<name>...`, the Wilson bounds `*_ci_low` and
/// `*_ci_high` left out) and,
/// with two evaluators or more, `evals.png` (each one's primary score), each when it has data.
pub fn redraw(run_dir: &Path, records: &[Map<String, Value>]) -> Result<(), String> {
    let steps: Vec<Map<String, Value>> = records
        .iter()
        .filter(|r| r.contains_key("loss") && !r.contains_key("eval"))
        .cloned()
        .collect();
    draw(
        &run_dir.join("loss.png"),
        "Training loss",
        "loss",
        &[
            ("train loss".into(), series_of(&steps, "loss")),
            ("held-out loss".into(), series_of(records, "eval_loss")),
        ],
    )?;
    draw(
        &run_dir.join("lr.png"),
        "Learning rate",
        "lr",
        &[("lr".into(), series_of(&steps, "lr"))],
    )?;
    // The evaluators' records: `eval` names them (`loss` is the held-out loss, drawn above).
    let mut evaluators: Vec<(&str, Vec<Map<String, Value>>)> = Vec::new();
    for r in records {
        let Some(name) = r.get("eval").and_then(Value::as_str) else {
            continue;
        };
        if name == "loss" || !r.contains_key(name) {
            continue;
        }
        match evaluators.iter_mut().find(|(n, _)| *n == name) {
            Some((_, recs)) => recs.push(r.clone()),
            None => evaluators.push((name, vec![r.clone()])),
        }
    }
    for (name, recs) in &evaluators {
        let mut keys: Vec<&str> = vec![name];
        for r in recs {
            for (k, v) in r {
                let plotted = k.starts_with(name) && v.is_number() && !keys.contains(&k.as_str());
                if plotted && !k.ends_with("_ci_low") && !k.ends_with("_ci_high") {
                    keys.push(k);
                }
            }
        }
        let series: Vec<Series> = keys
            .iter()
            .map(|k| (k.to_string(), series_of(recs, k)))
            .collect();
        draw(&run_dir.join(format!("{name}.png")), name, "score", &series)?;
    }
    if evaluators.len() > 1 {
        let series: Vec<Series> = evaluators
            .iter()
            .map(|(name, recs)| (name.to_string(), series_of(recs, name)))
            .collect();
        draw(&run_dir.join("evals.png"), "Evaluations", "score", &series)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn draws_pngs_from_records() {
        let t = tempfile::tempdir().unwrap();
        let mut recs = Vec::new();
        for i in 0..20u64 {
            let mut m = Map::new();
            m.insert("step".into(), i.into());
            m.insert("examples".into(), (i * 4).into());
            m.insert("loss".into(), (3.0 / (1.0 + i as f64)).into());
            m.insert("lr".into(), 1e-4.into());
            recs.push(m);
        }
        let mut e = Map::new();
        e.insert("eval".into(), "ifs".into());
        e.insert("examples".into(), 40.into());
        e.insert("ifs".into(), 0.5.into());
        recs.push(e);
        let mut e = Map::new();
        e.insert("eval".into(), "other".into());
        e.insert("examples".into(), 40.into());
        e.insert("other".into(), 0.25.into());
        recs.push(e);
        redraw(t.path(), &recs).unwrap();
        for f in ["loss.png", "lr.png", "ifs.png", "other.png", "evals.png"] {
            let bytes = std::fs::read(t.path().join(f)).unwrap();
            assert_eq!(&bytes[1..4], b"PNG", "{f}");
        }
    }
}
