//! The report's PNG plots: a value against N on a log axis whose ticks are the N values, one
//! solid line per model (with error bars where the value has an interval), dashed reference
//! lines (chance accuracy, the ideal speedup), and the legend in a panel beside the chart, where
//! it covers no point.

use std::path::Path;

use anyhow::Result;
use plotters::element::DashedPathElement;
use plotters::prelude::*;
use plotters::style::FontStyle;

/// One point: N, the value, and its interval `(low, high)` where it has one.
pub type Point = (f64, f64, Option<(f64, f64)>);

/// One line of a plot.
#[derive(Debug, Clone, Default)]
pub struct Curve {
    pub name: String,
    pub points: Vec<Point>,
    /// A reference (chance, ideal): dashed, drawn in grey tones, without markers.
    pub reference: bool,
}

pub(crate) fn register_font() {
    // Registering twice is harmless; the font is compiled in, so plots never depend on the
    // host's fonts.
    let _ =
        plotters::style::register_font("sans-serif", FontStyle::Normal, dejavu::sans::regular());
}

/// Draw `curves` into `path` (an 880 x 560 chart and a 540-pixel legend panel), whole or not at
/// all (through a temporary file, `datamux_data::atomic`).
pub fn draw(path: &Path, title: &str, ylabel: &str, curves: &[Curve]) -> Result<()> {
    register_font();
    let draw = |tmp: &Path| -> std::result::Result<(), Box<dyn std::error::Error>> {
        let root = BitMapBackend::new(tmp, (1420, 560)).into_drawing_area();
        root.fill(&WHITE)?;
        let (left, legend) = root.split_horizontally(880);
        let mut ns: Vec<f64> = curves
            .iter()
            .filter(|c| !c.reference)
            .flat_map(|c| c.points.iter().map(|p| p.0.max(1.0)))
            .collect();
        if ns.is_empty() {
            ns = curves
                .iter()
                .flat_map(|c| c.points.iter().map(|p| p.0.max(1.0)))
                .collect();
        }
        ns.sort_by(f64::total_cmp);
        ns.dedup();
        let (x0, x1) = (
            ns.first().copied().unwrap_or(1.0),
            ns.last().copied().unwrap_or(1.0),
        );
        let ys: Vec<f64> = curves
            .iter()
            .flat_map(|c| {
                c.points.iter().flat_map(|(_, y, e)| {
                    let (lo, hi) = e.unwrap_or((*y, *y));
                    [*y, lo, hi]
                })
            })
            .filter(|y| y.is_finite())
            .collect();
        let y0 = ys.iter().copied().fold(f64::INFINITY, f64::min);
        let y1 = ys.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        let pad = ((y1 - y0) * 0.08).max(0.5);
        // log2 N on the axis; the ticks (below) sit at the N values themselves.
        let (lx0, lx1) = ((x0 * 0.8).log2(), (x1 * 1.25).log2());
        let (ly0, ly1) = (y0 - pad, y1 + pad);
        let mut chart = ChartBuilder::on(&left)
            .caption(title, ("sans-serif", 24))
            .margin(12)
            .x_label_area_size(40)
            .y_label_area_size(60)
            .build_cartesian_2d(lx0..lx1, ly0..ly1)?;
        chart
            .configure_mesh()
            .x_labels(0)
            .disable_x_mesh()
            .x_desc("N (log scale)")
            .y_desc(ylabel)
            .draw()?;
        let grid = RGBColor(220, 220, 220);
        for n in &ns {
            let x = n.log2();
            chart.draw_series(LineSeries::new([(x, ly0), (x, ly1)], grid.stroke_width(1)))?;
            let (px, py) = chart.backend_coord(&(x, ly0));
            let text = format!("{n:.0}");
            left.draw(&Text::new(
                text.clone(),
                (px - 4 * text.len() as i32, py + 6),
                ("sans-serif", 15).into_font(),
            ))?;
        }
        let mut legend_rows = Vec::new();
        let mut model = 0;
        for c in curves {
            let color = if c.reference {
                RGBColor(110, 110, 110).to_rgba()
            } else {
                model += 1;
                Palette99::pick(model - 1).to_rgba()
            };
            let pts: Vec<(f64, f64)> = c
                .points
                .iter()
                .map(|(x, y, _)| (x.max(1.0).log2(), *y))
                .collect();
            if c.reference {
                // A constant reference spans the axis; a curve follows its points.
                let line = if pts.len() == 1 {
                    vec![(lx0, pts[0].1), (lx1, pts[0].1)]
                } else {
                    pts.clone()
                };
                chart.draw_series(DashedLineSeries::new(line, 6, 6, color.stroke_width(2)))?;
            } else {
                chart.draw_series(LineSeries::new(pts.clone(), color.stroke_width(2)))?;
                chart.draw_series(pts.iter().map(|p| Circle::new(*p, 4, color.filled())))?;
                chart.draw_series(c.points.iter().filter_map(|(x, y, e)| {
                    let (lo, hi) = (*e)?;
                    Some(ErrorBar::new_vertical(
                        x.max(1.0).log2(),
                        lo,
                        *y,
                        hi,
                        color.stroke_width(1),
                        8,
                    ))
                }))?;
            }
            legend_rows.push((c.name.clone(), color, c.reference));
        }
        // The legend panel: a line sample and the name per curve.
        for (i, (name, color, dashed)) in legend_rows.iter().enumerate() {
            let y = 40 + 22 * i as i32;
            let sample = vec![(8, y), (36, y)];
            if *dashed {
                legend.draw(&DashedPathElement::new(sample, 5, 4, color.stroke_width(2)))?;
            } else {
                legend.draw(&PathElement::new(sample, color.stroke_width(2)))?;
            }
            legend.draw(&Text::new(
                name.clone(),
                (42, y - 8),
                ("sans-serif", 14).into_font(),
            ))?;
        }
        root.present()?;
        Ok(())
    };
    datamux_data::atomic::write_path(path, draw)
        .map_err(|e| anyhow::anyhow!("cannot draw {}: {e}", path.display()))
}
