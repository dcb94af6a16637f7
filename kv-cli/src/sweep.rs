//! `vramkv bench --sweep`: throughput against batch size and against table size, printed
//! as a table and drawn as an SVG line plot.

use crate::workload::mix;
use std::fmt::Write as _;
use std::time::Instant;
use vramkv::{KvBackend, Result};

/// One measured point.
pub struct Point {
    /// The series this point belongs to (`"put"`, `"get"`).
    pub series: &'static str,
    /// Batch size or table size.
    pub x: usize,
    /// Millions of operations per second (median of the repetitions).
    pub mops: f64,
}

/// Sizes 1K, 10K, ... up to and including `max`.
pub fn decades(max: usize) -> Vec<usize> {
    let mut v = Vec::new();
    let mut x = 1000;
    while x <= max {
        v.push(x);
        x = x.saturating_mul(10);
    }
    if v.last() != Some(&max) && max >= 1000 {
        v.push(max);
    }
    v
}

fn distinct_keys(from: usize, n: usize, salt: u64) -> Vec<u64> {
    (from..from + n).map(|i| mix(salt ^ i as u64)).collect()
}

fn median(mut xs: Vec<f64>) -> f64 {
    xs.sort_by(f64::total_cmp);
    xs[xs.len() / 2]
}

/// Times `put` and `get` of fresh distinct keys at each batch size, into a cleared table.
pub fn by_batch(t: &dyn KvBackend, sizes: &[usize], reps: usize) -> Result<Vec<Point>> {
    let w = t.width();
    let mut out = Vec::new();
    let largest = sizes.iter().copied().max().unwrap_or(0);
    // Output buffers are written once here so that no timed call pays for first-touch page faults.
    let (mut vbuf, mut fbuf) = (vec![1u64; largest * w], vec![true; largest]);
    for &n in sizes {
        let (mut puts, mut gets) = (Vec::new(), Vec::new());
        for r in 0..reps {
            t.clear()?;
            let keys = distinct_keys(0, n, r as u64 + 1);
            let vals = vec![7u64; n * w];
            let (v, f) = (&mut vbuf[..n * w], &mut fbuf[..n]);
            let t0 = Instant::now();
            t.put(&keys, &vals)?;
            puts.push(n as f64 / t0.elapsed().as_secs_f64() / 1e6);
            let t0 = Instant::now();
            t.get(&keys, v, f)?;
            gets.push(n as f64 / t0.elapsed().as_secs_f64() / 1e6);
            check_all_found(f)?;
        }
        out.push(Point {
            series: "put",
            x: n,
            mops: median(puts),
        });
        out.push(Point {
            series: "get",
            x: n,
            mops: median(gets),
        });
    }
    Ok(out)
}

/// Fills the table to each size, then times a put of `batch` new keys and a get of
/// `batch` present keys.
pub fn by_table(
    t: &dyn KvBackend,
    sizes: &[usize],
    batch: usize,
    reps: usize,
) -> Result<Vec<Point>> {
    let w = t.width();
    let mut out = Vec::new();
    let (mut vbuf, mut fbuf) = (vec![1u64; batch * w], vec![true; batch]);
    t.clear()?;
    let mut filled = 0;
    for &size in sizes {
        let grow = size.saturating_sub(filled);
        for start in (filled..filled + grow).step_by(batch.max(1 << 20)) {
            let n = (filled + grow - start).min(batch.max(1 << 20));
            t.put(&distinct_keys(start, n, 0), &vec![1u64; n * w])?;
        }
        filled += grow;
        let (mut puts, mut gets) = (Vec::new(), Vec::new());
        for r in 0..reps {
            let fresh = distinct_keys(usize::MAX / 2 + r * batch, batch, 0);
            let t0 = Instant::now();
            t.put(&fresh, &vec![2u64; batch * w])?;
            puts.push(batch as f64 / t0.elapsed().as_secs_f64() / 1e6);
            t.delete(&fresh)?;
            // A window of keys that are in the table, moved along at each repetition.
            let len = batch.min(filled);
            let present = distinct_keys(r * batch % (filled - len + 1), len, 0);
            let (v, f) = (&mut vbuf[..len * w], &mut fbuf[..len]);
            let t0 = Instant::now();
            t.get(&present, v, f)?;
            gets.push(len as f64 / t0.elapsed().as_secs_f64() / 1e6);
            check_all_found(f)?;
        }
        out.push(Point {
            series: "put",
            x: size,
            mops: median(puts),
        });
        out.push(Point {
            series: "get",
            x: size,
            mops: median(gets),
        });
    }
    Ok(out)
}

fn check_all_found(found: &[bool]) -> Result<()> {
    let missing = found.iter().filter(|f| !**f).count();
    if missing > 0 {
        return Err(vramkv::Error::device(
            "bench",
            format!("sweep validation failed: {missing} keys put were not found"),
        ));
    }
    Ok(())
}

/// Prints the points as a table.
pub fn print(title: &str, xname: &str, points: &[Point]) {
    println!(
        "\n{title}\n{xname:>14} {:>14} {:>14}",
        "PUT M ops/s", "GET M ops/s"
    );
    let mut xs: Vec<usize> = points.iter().map(|p| p.x).collect();
    xs.dedup();
    for x in xs {
        let get = |s| {
            points
                .iter()
                .find(|p| p.x == x && p.series == s)
                .map_or(0.0, |p| p.mops)
        };
        println!("{x:>14} {:>14.1} {:>14.1}", get("put"), get("get"));
    }
}

/// An SVG line plot: one panel per sweep, x on a log scale, M ops/s on a linear scale.
///
/// Written directly rather than through plotters: plotters lays out text through system
/// fonts (font-kit), which headless build and GPU machines do not have.
pub fn svg(panels: &[(&str, &str, &[Point])], subtitle: &str) -> String {
    let (pw, ph, left, top, bottom) = (520.0, 320.0, 70.0, 50.0, 50.0);
    let width = panels.len() as f64 * (pw + left) + 20.0;
    let height = ph + top + bottom + 30.0;
    let mut s = String::new();
    let _ = writeln!(
        s,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" font-family="sans-serif" font-size="12"><rect width="100%" height="100%" fill="white"/>"#
    );
    let _ = writeln!(
        s,
        r#"<text x="10" y="18" font-size="14">vramkv bench --sweep — {subtitle}</text>"#
    );
    for (pi, (title, xname, pts)) in panels.iter().enumerate() {
        let x0 = left + pi as f64 * (pw + left);
        let (xmin, xmax) = pts.iter().fold((f64::MAX, f64::MIN), |(a, b), p| {
            let l = (p.x as f64).log10();
            (a.min(l), b.max(l))
        });
        let ymax = pts.iter().map(|p| p.mops).fold(1.0, f64::max) * 1.1;
        let sx = |x: usize| x0 + ((x as f64).log10() - xmin) / (xmax - xmin).max(1e-9) * pw;
        let sy = |y: f64| top + ph - y / ymax * ph;
        let _ = writeln!(
            s,
            r#"<text x="{x0}" y="{}" font-size="13">{title}</text>"#,
            top - 10.0
        );
        let _ = writeln!(
            s,
            r#"<rect x="{x0}" y="{top}" width="{pw}" height="{ph}" fill="none" stroke="black"/>"#
        );
        for k in 0..=4 {
            let y = ymax * k as f64 / 4.0;
            let (x1, yy, tx, ty) = (x0 + pw, sy(y), x0 - 5.0, sy(y) + 4.0);
            let _ = writeln!(
                s,
                r##"<line x1="{x0}" x2="{x1}" y1="{yy}" y2="{yy}" stroke="#ddd"/><text x="{tx}" y="{ty}" text-anchor="end">{y:.0}</text>"##
            );
        }
        let mut xs: Vec<usize> = pts.iter().map(|p| p.x).collect();
        xs.dedup();
        for x in &xs {
            let _ = writeln!(
                s,
                r#"<text x="{}" y="{}" text-anchor="middle">{}</text>"#,
                sx(*x),
                top + ph + 16.0,
                human(*x)
            );
        }
        let (lx, ly, rx, ry) = (x0 + pw / 2.0, top + ph + 36.0, x0 - 50.0, top + ph / 2.0);
        let _ = writeln!(
            s,
            r#"<text x="{lx}" y="{ly}" text-anchor="middle">{xname} (log scale)</text><text x="{rx}" y="{ry}" transform="rotate(-90 {rx} {ry})" text-anchor="middle">M ops/s</text>"#
        );
        for (series, color) in [("put", "#d62728"), ("get", "#1f77b4")] {
            let line: Vec<String> = pts
                .iter()
                .filter(|p| p.series == series)
                .map(|p| format!("{:.1},{:.1}", sx(p.x), sy(p.mops)))
                .collect();
            let _ = writeln!(
                s,
                r#"<polyline points="{}" fill="none" stroke="{color}" stroke-width="2"/>"#,
                line.join(" ")
            );
            // The legend sits under the panel, clear of the lines.
            let lx = x0 + pw - 120.0 + if series == "put" { 0.0 } else { 60.0 };
            let ly = top + ph + 36.0;
            let _ = writeln!(
                s,
                r#"<line x1="{}" x2="{}" y1="{ly}" y2="{ly}" stroke="{color}" stroke-width="2"/><text x="{}" y="{}">{series}</text>"#,
                lx,
                lx + 20.0,
                lx + 25.0,
                ly + 4.0
            );
        }
    }
    s.push_str("</svg>\n");
    s
}

fn human(x: usize) -> String {
    match x {
        x if x >= 1_000_000 && x % 1_000_000 == 0 => format!("{}M", x / 1_000_000),
        x if x >= 1000 && x % 1000 == 0 => format!("{}K", x / 1000),
        x => x.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decades_cover_the_range() {
        assert_eq!(decades(100_000), [1000, 10_000, 100_000]);
        assert_eq!(decades(50_000), [1000, 10_000, 50_000]);
    }

    #[test]
    fn table_sweep_reads_only_keys_it_put() {
        let t = vramkv::open_backend(vramkv::BackendKind::Cpu, vramkv::TableConfig::new(5000))
            .expect("open");
        let pts = by_table(&t, &[1000, 3000], 2048, 3).expect("every key read back was put");
        assert_eq!(pts.len(), 4);
    }

    #[test]
    fn svg_has_both_series() {
        let pts = [
            Point {
                series: "put",
                x: 1000,
                mops: 5.0,
            },
            Point {
                series: "get",
                x: 1000,
                mops: 9.0,
            },
            Point {
                series: "put",
                x: 10_000,
                mops: 50.0,
            },
            Point {
                series: "get",
                x: 10_000,
                mops: 90.0,
            },
        ];
        let s = svg(&[("by batch", "batch size", &pts)], "test");
        assert!(s.starts_with("<svg") && s.ends_with("</svg>\n"));
        assert_eq!(s.matches("<polyline").count(), 2);
        assert!(s.contains(">10K<"));
    }
}
