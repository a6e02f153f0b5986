//! Times a raw -> qcow2 conversion into an existing empty qcow2: `conv2 SRC DST [threads] [compress]`.
use qimg::open::{open_image, OpenOptions};
use qimg::ops::convert::{convert, ConvertOptions, Target};
use qimg::qcow2::writer::Qcow2Writer;
use qimg::storage::FileStorage;
use std::sync::Arc;

fn main() {
    let a: Vec<String> = std::env::args().collect();
    let src = open_image(
        a[1].as_ref(),
        &OpenOptions {
            format: Some("raw".into()),
            ..Default::default()
        },
    )
    .unwrap();
    let w = Qcow2Writer::open(
        Arc::new(FileStorage::open(a[2].as_ref(), true).unwrap()),
        None,
    )
    .unwrap();
    let threads = a.get(3).map(|t| t.parse().unwrap()).unwrap_or(4);
    let compress = a.get(4).is_some();
    let t = std::time::Instant::now();
    convert(
        &[src],
        Target::Qcow2(Box::new(w)),
        &ConvertOptions {
            threads,
            compress,
            ..Default::default()
        },
    )
    .unwrap();
    eprintln!("{:.3}s", t.elapsed().as_secs_f64());
}
