//! `qemu-img bench`: a simple I/O benchmark through the image layer: COUNT requests of
//! BUFFER_SIZE bytes, DEPTH of them in flight, at offsets that advance by STEP_SIZE and
//! wrap around at the end of the image, as qemu-img places them.
use crate::args::{HasArg, Item, Key, LongOpt};
use crate::cmd::common::{image_spec, open, ro_options};
use crate::ctx::{print_ignore, run_getopt, Ctx, Parsed};
use crate::opts::{cvtnum, cvtnum_full, CacheMode};
use qimg::open::OpenOptions;
use qimg::Image;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Mutex;

const CMD: &str = "bench";

/// `qemu-img bench --help` text (`qemu-img` is replaced by the program name).
pub const HELP: &str = r#"Usage:
Run simple image benchmark.  Usage:

  qemu-img bench [-f FMT | --image-opts] [-t CACHE] [-c COUNT] [-d DEPTH]
        [-o OFFSET] [-s BUFFER_SIZE] [-S STEP_SIZE] [-i AIO] [-n]
        [-w [--pattern PATTERN] [--flush-interval INTERVAL [--no-drain]]]

Arguments:
  -h, --help
     print this help and exit
  -q, --quiet
     quiet operations
  -f, --format FMT
     specify FILENAME format explicitly
  --image-opts
     indicates that FILENAME is a complete image specification
     instead of a file name (incompatible with --format)
  -t, --cache CACHE
     cache mode for FILENAME (writeback)
  -c, --count COUNT
     number of I/O requests to perform
  -s, --buffer-size BUFFER_SIZE
     size of each I/O request
  -d, --depth DEPTH
     number of requests to perform in parallel
  -o, --offset OFFSET
     start first request at this OFFSET
  -S, --step-size STEP_SIZE
     each next request offset increment
  -i, --aio AIO
     async-io backend (threads, native, io_uring)
  -n, --native
     use native AIO backend if possible
  -w, --write
     perform write test (default is read)
  --pattern PATTERN
     write this pattern byte instead of zero
  --flush-interval FLUSH_INTERVAL
     issue flush after this number of requests
  --no-drain
     do not wait when flushing pending requests
  -U, --force-share
     open images in shared mode for concurrent access

"#;

/// Short options, in getopt syntax.
const SHORT: &str = "hc:d:f:ni:o:qs:S:t:wU";
const IMAGE_OPTS: u16 = 1;
const OBJECT: u16 = 2;
const PATTERN: u16 = 3;
const FLUSH_INTERVAL: u16 = 4;
const NO_DRAIN: u16 = 5;

/// Long options, in the table order that decides how ambiguities are listed.
const LONG: &[LongOpt] = &[
    LongOpt::new("help", HasArg::No, Key::Short('h')),
    LongOpt::new("format", HasArg::Required, Key::Short('f')),
    LongOpt::new("image-opts", HasArg::No, Key::Long(IMAGE_OPTS)),
    LongOpt::new("cache", HasArg::Required, Key::Short('t')),
    LongOpt::new("count", HasArg::Required, Key::Short('c')),
    LongOpt::new("depth", HasArg::Required, Key::Short('d')),
    LongOpt::new("offset", HasArg::Required, Key::Short('o')),
    LongOpt::new("buffer-size", HasArg::Required, Key::Short('s')),
    LongOpt::new("step-size", HasArg::Required, Key::Short('S')),
    LongOpt::new("aio", HasArg::Required, Key::Short('i')),
    LongOpt::new("native", HasArg::No, Key::Short('n')),
    LongOpt::new("write", HasArg::No, Key::Short('w')),
    LongOpt::new("pattern", HasArg::Required, Key::Long(PATTERN)),
    LongOpt::new(
        "flush-interval",
        HasArg::Required,
        Key::Long(FLUSH_INTERVAL),
    ),
    LongOpt::new("no-drain", HasArg::No, Key::Long(NO_DRAIN)),
    LongOpt::new("force-share", HasArg::No, Key::Short('U')),
    LongOpt::new("object", HasArg::Required, Key::Long(OBJECT)),
    LongOpt::new("quiet", HasArg::No, Key::Short('q')),
];

/// Everything `qemu-img bench` accepts on its command line.
#[derive(Clone, Debug)]
pub struct BenchOpts {
    /// `-f`.
    pub format: Option<String>,
    /// `--image-opts`.
    pub image_opts: bool,
    /// `-t`.
    pub cache: Option<String>,
    /// `-c`: requests in all (default 75000).
    pub count: u64,
    /// `-d`: requests in flight (default 64).
    pub depth: u64,
    /// `-o`: offset of the first request.
    pub offset: u64,
    /// `-s`: bytes per request (default 4096).
    pub bufsize: u64,
    /// `-S`: offset increment (0: the buffer size).
    pub step: u64,
    /// `-i native` or `-n`.
    pub native_aio: bool,
    /// `-w`.
    pub write: bool,
    /// `--pattern`: the byte written.
    pub pattern: u8,
    /// `--flush-interval`: flush after this many requests (0: never).
    pub flush_interval: u64,
    /// `--no-drain`.
    pub no_drain: bool,
    /// `-U`.
    pub force_share: bool,
    /// `--object` definitions.
    pub objects: Vec<String>,
    /// The image.
    pub filename: String,
}

impl Default for BenchOpts {
    fn default() -> Self {
        BenchOpts {
            format: None,
            image_opts: false,
            cache: None,
            count: 75000,
            depth: 64,
            offset: 0,
            bufsize: 4096,
            step: 0,
            native_aio: false,
            write: false,
            pattern: 0,
            flush_interval: 0,
            no_drain: false,
            force_share: false,
            objects: Vec::new(),
            filename: String::new(),
        }
    }
}

/// Parses the arguments after `bench`; usage errors are reported here, exactly as
/// qemu-img words them.
pub fn parse(ctx: &Ctx, args: &[String]) -> Parsed<BenchOpts> {
    let mut o = BenchOpts::default();
    let int_max = i32::MAX as i64;
    let mut g = ctx.getopt(CMD, args, SHORT, LONG);
    let res = run_getopt(ctx, CMD, &mut g, |item| {
        let Item::Opt(key, arg) = item else {
            return Ok(());
        };
        let arg = arg.unwrap_or_default();
        let num = |name: &str, min: i64, max: i64| -> Result<u64, i32> {
            cvtnum_full(name, &arg, min, max)
                .map(|v| v as u64)
                .map_err(|m| {
                    ctx.error(&m);
                    1
                })
        };
        match key {
            Key::Short('h') => {
                ctx.print_help(HELP);
                return Err(0);
            }
            Key::Short('c') => o.count = num("request count", 1, int_max)?,
            Key::Short('d') => o.depth = num("queue depth", 1, int_max)?,
            Key::Short('f') => o.format = Some(arg),
            Key::Short('n') => o.native_aio = true,
            Key::Short('i') => match arg.as_str() {
                "native" => o.native_aio = true,
                "threads" | "io_uring" => o.native_aio = false,
                _ => {
                    ctx.error(&format!("Invalid aio option: {arg}"));
                    return Err(1);
                }
            },
            Key::Short('o') => {
                o.offset = cvtnum("offset", &arg).map(|v| v as u64).map_err(|m| {
                    ctx.error(&m);
                    1
                })?
            }
            Key::Short('q') => {}
            Key::Short('s') => o.bufsize = num("buffer size", 1, int_max)?,
            Key::Short('S') => o.step = num("step size", 0, int_max)?,
            Key::Short('t') => o.cache = Some(arg),
            Key::Short('w') => o.write = true,
            Key::Short('U') => o.force_share = true,
            Key::Long(PATTERN) => o.pattern = num("pattern byte", 0, 0xff)? as u8,
            Key::Long(FLUSH_INTERVAL) => o.flush_interval = num("flush interval", 0, int_max)?,
            Key::Long(NO_DRAIN) => o.no_drain = true,
            Key::Long(IMAGE_OPTS) => o.image_opts = true,
            Key::Long(OBJECT) => o.objects.push(arg),
            _ => {}
        }
        Ok(())
    });
    if let Err(code) = res {
        return Parsed::Exit(code);
    }
    if o.flush_interval > 0 && !o.write {
        ctx.error("--flush-interval is only available in write tests");
        return Parsed::Exit(1);
    }
    if o.flush_interval > 0 && o.flush_interval < o.depth {
        ctx.error("Flush interval can't be smaller than depth");
        return Parsed::Exit(1);
    }
    let ops = g.operands();
    let [filename] = ops.as_slice() else {
        return Parsed::Exit(ctx.usage_error(CMD, "Expecting one image file name"));
    };
    o.filename = filename.clone();
    if o.step == 0 {
        o.step = o.bufsize;
    }
    Parsed::Run(o)
}

/// Runs `bench`; returns the process exit code.
pub fn run(ctx: &Ctx, args: &[String]) -> i32 {
    match parse(ctx, args) {
        Parsed::Run(opts) => bench_cmd(ctx, &opts),
        Parsed::Exit(code) => code,
    }
}

/// The offset of request `k`: the first at `offset`, each next one `step` further,
/// wrapping around at the end of the image as qemu-img wraps them.
fn request_offset(o: &BenchOpts, size: u64, k: u64) -> u64 {
    if k == 0 || size == 0 {
        return o.offset;
    }
    let s = u128::from(size);
    ((u128::from(o.offset) + u128::from(k) * u128::from(o.step)) % s) as u64
}

fn bench_cmd(ctx: &Ctx, o: &BenchOpts) -> i32 {
    let mode = match o.cache.as_deref() {
        None => CacheMode::Writeback,
        Some(t) => match CacheMode::parse(t) {
            Some(m) => m,
            None => {
                ctx.error("Invalid cache mode");
                return 1;
            }
        },
    };
    let (file, fmt) = match image_spec(ctx, &o.filename, o.format.clone(), o.image_opts) {
        Ok(x) => x,
        Err(c) => return c,
    };
    if o.native_aio && !matches!(mode, CacheMode::None | CacheMode::Directsync) {
        ctx.error(&format!(
            "Could not open '{file}': aio=native was specified, but it requires cache.direct=on, which was not specified."
        ));
        return 1;
    }
    let opts = OpenOptions {
        writable: o.write,
        ..ro_options(fmt, o.force_share)
    };
    let img = match open(ctx, &file, &opts) {
        Ok(i) => i,
        Err(c) => return c,
    };
    print_ignore(&format!(
        "Sending {} {} requests, {} bytes each, {} in parallel (starting at offset {}, step size {})\n",
        o.count,
        if o.write { "write" } else { "read" },
        o.bufsize,
        o.depth,
        o.offset,
        o.step
    ));
    if o.flush_interval > 0 {
        print_ignore(&format!(
            "Sending flush every {} requests\n",
            o.flush_interval
        ));
    }
    let t0 = std::time::Instant::now();
    if let Err(e) = run_requests(img.as_ref(), o, mode) {
        let errno = std::io::Error::from_raw_os_error(e);
        ctx.error(&format!(
            "Failed request: {}",
            qimg::error::strerror(&errno)
        ));
        return 1;
    }
    print_ignore(&format!(
        "Run completed in {:.3} seconds.\n",
        t0.elapsed().as_secs_f64()
    ));
    0
}

/// Issues every request, `depth` at a time (on at most as many threads as make sense
/// here), with a flush after every `flush_interval` of them. Returns the errno of the
/// first failure.
fn run_requests(img: &dyn Image, o: &BenchOpts, mode: CacheMode) -> Result<(), i32> {
    let size = img.len();
    let threads = o.depth.min(o.count).min(16) as usize;
    let batch = if o.write && o.flush_interval > 0 {
        o.flush_interval
    } else {
        o.count
    };
    let every_write_flushed = matches!(mode, CacheMode::Writethrough | CacheMode::Directsync);
    let failed = AtomicBool::new(false);
    let first_error = Mutex::new(None::<i32>);
    let mut done = 0u64;
    while done < o.count && !failed.load(Ordering::Relaxed) {
        let end = (done + batch).min(o.count);
        let next = AtomicU64::new(done);
        std::thread::scope(|s| {
            for _ in 0..threads {
                s.spawn(|| {
                    let mut buf = vec![o.pattern; o.bufsize as usize];
                    loop {
                        let k = next.fetch_add(1, Ordering::Relaxed);
                        if k >= end || failed.load(Ordering::Relaxed) {
                            return;
                        }
                        let off = request_offset(o, size, k);
                        let r = if off.checked_add(o.bufsize).is_none_or(|e| e > size) {
                            // The block layer refuses requests past the end with EIO.
                            Err(libc::EIO)
                        } else if o.write {
                            img.write_at(&buf, off)
                                .and_then(|()| {
                                    if every_write_flushed {
                                        img.flush()
                                    } else {
                                        Ok(())
                                    }
                                })
                                .map_err(|e| e.errno())
                        } else {
                            img.read_at(&mut buf, off).map_err(|e| e.errno())
                        };
                        if let Err(e) = r {
                            failed.store(true, Ordering::Relaxed);
                            first_error.lock().unwrap().get_or_insert(e);
                            return;
                        }
                    }
                });
            }
        });
        done = end;
        if o.write && o.flush_interval > 0 && !failed.load(Ordering::Relaxed) {
            // --no-drain lets qemu-img flush while requests are still in flight; here the
            // batch has completed either way, which only makes the flush cover more.
            img.flush().map_err(|e| e.errno())?;
        }
    }
    match first_error.into_inner().unwrap() {
        Some(e) => Err(e),
        None if o.write && !matches!(mode, CacheMode::Unsafe) => img.flush().map_err(|e| e.errno()),
        None => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn offsets_wrap_as_qemu_img_places_them() {
        let o = BenchOpts {
            step: 5000,
            bufsize: 512,
            ..Default::default()
        };
        // 64 KiB image: the 15th request wraps to 70000 - 65536.
        assert_eq!(request_offset(&o, 65536, 13), 65000);
        assert_eq!(request_offset(&o, 65536, 14), 4464);
        assert_eq!(request_offset(&o, 65536, 15), 9464);
        let far = BenchOpts {
            offset: 70000,
            ..o.clone()
        };
        assert_eq!(request_offset(&far, 65536, 0), 70000);
        assert_eq!(request_offset(&far, 65536, 1), 9464);
    }
}
