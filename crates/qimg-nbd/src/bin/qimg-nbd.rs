//! `qimg-nbd`: a drop-in for `qemu-nbd` (see `qimg_nbd::cli`).

fn main() {
    let mut args = std::env::args();
    let prog = args
        .next()
        .and_then(|p| {
            std::path::Path::new(&p)
                .file_name()
                .map(|f| f.to_string_lossy().into_owned())
        })
        .unwrap_or_else(|| "qimg-nbd".to_string());
    let rest: Vec<String> = args.collect();
    std::process::exit(qimg_nbd::cli::main_serve(&prog, &rest));
}
