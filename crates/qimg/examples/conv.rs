//! Times a qcow2 -> raw conversion through the library: `conv SRC DST [threads]`.
use qimg::open::{open_image, OpenOptions};
use qimg::ops::convert::{convert, ConvertOptions, Target};
use qimg::raw::Raw;
use qimg::storage::FileStorage;
use std::sync::Arc;

fn main() {
    let a: Vec<String> = std::env::args().collect();
    let src = open_image(a[1].as_ref(), &OpenOptions::default()).unwrap();
    let st = FileStorage::create(a[2].as_ref()).unwrap();
    st.file().set_len(src.len()).unwrap();
    let dst = Arc::new(Raw::open(Arc::new(st), true).unwrap());
    let threads = a.get(3).map(|t| t.parse().unwrap()).unwrap_or(4);
    let t = std::time::Instant::now();
    convert(
        &[src],
        Target::Image(dst),
        &ConvertOptions {
            threads,
            ..Default::default()
        },
    )
    .unwrap();
    eprintln!("{:.3}s", t.elapsed().as_secs_f64());
}
