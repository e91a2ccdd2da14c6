//! Draws a [`Figure`] as SVG with plotters: axes with ticks, axis labels, a caption and a
//! legend. Text is written as SVG `<text>`, so no font files are read; the viewer picks a
//! sans-serif font.

use plotters::prelude::*;

use crate::curves::{Corner, Figure};
use crate::error::{ModelError, Result};

/// Okabe–Ito colours, told apart also by colour-blind readers.
const COLOURS: [RGBColor; 8] = [
    RGBColor(0, 114, 178),
    RGBColor(213, 94, 0),
    RGBColor(0, 158, 115),
    RGBColor(204, 121, 167),
    RGBColor(230, 159, 0),
    RGBColor(86, 180, 233),
    RGBColor(0, 0, 0),
    RGBColor(240, 228, 66),
];

/// The smallest and largest picture accepted, in pixels per side.
pub const SIZE_RANGE: std::ops::RangeInclusive<u32> = 200..=4000;

/// Renders `figure` to an SVG document of `width` × `height` pixels.
pub fn render_svg(figure: &Figure, width: u32, height: u32) -> Result<String> {
    for side in [width, height] {
        if !SIZE_RANGE.contains(&side) {
            return Err(plot_error(format!(
                "picture sides must be {}..={} pixels, got {side}",
                SIZE_RANGE.start(),
                SIZE_RANGE.end()
            )));
        }
    }
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, (width, height)).into_drawing_area();
        draw(&root, figure).map_err(|e| plot_error(e.to_string()))?;
        root.present().map_err(|e| plot_error(e.to_string()))?;
    }
    Ok(svg)
}

type DrawResult = std::result::Result<(), DrawingAreaErrorKind<<SVGBackend<'static> as DrawingBackend>::ErrorType>>;

fn draw(root: &DrawingArea<SVGBackend<'_>, plotters::coord::Shift>, figure: &Figure) -> DrawResult {
    root.fill(&WHITE)?;
    let (x0, x1) = figure.x_range;
    let (y0, y1) = figure.y_range;
    let mut chart = ChartBuilder::on(root)
        .caption(&figure.title, ("sans-serif", 24))
        .margin(20)
        .x_label_area_size(50)
        .y_label_area_size(70)
        .build_cartesian_2d(x0..x1, y0..y1)?;
    chart
        .configure_mesh()
        .x_desc(&figure.x_label)
        .y_desc(&figure.y_label)
        .axis_desc_style(("sans-serif", 19))
        .label_style(("sans-serif", 16))
        .x_label_formatter(&|x| trim_number(*x))
        .y_label_formatter(&|y| trim_number(*y))
        .light_line_style(RGBColor(235, 235, 235))
        .draw()?;
    for (i, curve) in figure.curves.iter().enumerate() {
        let style = ShapeStyle::from(COLOURS[i % COLOURS.len()]).stroke_width(2);
        let label =
            if curve.segments.is_empty() { format!("{} (unreachable)", curve.label) } else { curve.label.clone() };
        // Every curve gets a legend entry, even one with no points.
        chart
            .draw_series(LineSeries::new(std::iter::empty::<(f64, f64)>(), style))?
            .label(label)
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 24, y)], style));
        for segment in &curve.segments {
            chart.draw_series(LineSeries::new(segment.iter().copied(), style))?;
        }
    }
    chart
        .configure_series_labels()
        .label_font(("sans-serif", 17))
        .background_style(WHITE.mix(0.9))
        .border_style(BLACK)
        .position(match figure.legend {
            Corner::UpperRight => SeriesLabelPosition::UpperRight,
            Corner::LowerRight => SeriesLabelPosition::LowerRight,
        })
        .draw()?;
    Ok(())
}

/// Tick labels without trailing zeros: 0.5, 0.75, 1, 12.
fn trim_number(x: f64) -> String {
    let text = format!("{x:.4}");
    let text = text.trim_end_matches('0').trim_end_matches('.');
    if text == "-0" {
        "0".to_string()
    } else {
        text.to_string()
    }
}

fn plot_error(message: String) -> ModelError {
    ModelError::Plot { message }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::curves::{min_rv_figure, Grid};

    #[test]
    fn svg_has_axes_labels_and_legend() {
        let fig = min_rv_figure(&[1, 2, 3], Grid::new(0.05, 0.95, 50).unwrap()).unwrap();
        let svg = render_svg(&fig, 800, 500).unwrap();
        assert!(svg.starts_with("<svg"));
        for text in ["least R_V", "R_M (reliability of one VM", "n = 1 (never helps)", "n = 2", "n = 3", "\n0.5\n"] {
            assert!(svg.contains(text), "missing {text:?}");
        }
        assert!(svg.contains("<polyline"));
    }

    #[test]
    fn picture_size_is_bounded() {
        let fig = min_rv_figure(&[2], Grid::new(0.1, 0.9, 10).unwrap()).unwrap();
        assert!(render_svg(&fig, 10, 500).is_err());
        assert!(render_svg(&fig, 800, 100_000).is_err());
    }

    #[test]
    fn tick_labels_are_trimmed() {
        assert_eq!(trim_number(0.5), "0.5");
        assert_eq!(trim_number(1.0), "1");
        assert_eq!(trim_number(0.125), "0.125");
    }
}
