//! The server: exports, configuration, the accept loop, connection accounting and
//! shutdown.
//!
//! Threading model: one thread per connection for the handshake; in transmission each
//! connection runs a small pool of worker threads that take turns reading the next request
//! (leader/follower) and then execute it and write its reply on their own, so replies go
//! out in completion order and a slow request does not hold up the ones behind it. A
//! connection never shares a thread with another one, so a vanishing or hostile client
//! only ever blocks its own threads.

use crate::conn;
use crate::meta::{AllocationDepth, BaseAllocation, MetaContext, DIRTY_BITMAP_PREFIX};
use crate::offset::{OffsetAllocation, OffsetDepth};
use crate::proto::{self, tx_flags, Mode, MAX_STRING};
use crate::stream::{Listener, Stream};
use crate::tls::TlsConfig;
use qimg::Image;
use std::collections::HashMap;
use std::io;
use std::net::Shutdown;
use std::os::fd::RawFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// One image offered to clients under a name.
#[derive(Debug, Clone)]
pub struct Export {
    /// Export name clients ask for (`""` is the default export).
    pub name: String,
    /// Optional human-readable description (`NBD_INFO_DESCRIPTION`).
    pub description: Option<String>,
    /// The open image (its backing chain comes with it).
    pub image: Arc<dyn Image>,
    /// Refuse writes and advertise `NBD_FLAG_READ_ONLY`.
    pub read_only: bool,
    /// Offer the `qemu:allocation-depth` context.
    pub allocation_depth: bool,
    /// Extra contexts named `qemu:dirty-bitmap:NAME`, in the order their ids are assigned.
    pub bitmaps: Vec<Arc<dyn MetaContext>>,
}

impl Export {
    /// A writable export of `image` named `name`, with only `base:allocation`.
    pub fn new(name: impl Into<String>, image: Arc<dyn Image>) -> Export {
        Export {
            name: name.into(),
            description: None,
            image,
            read_only: false,
            allocation_depth: false,
            bitmaps: Vec::new(),
        }
    }
}

/// What `NBD_CMD_TRIM` does (qemu-nbd `--discard`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Discard {
    /// Accept TRIM and do nothing (qemu-nbd's default).
    #[default]
    Ignore,
    /// Pass TRIM down, and let WRITE_ZEROES release space.
    Unmap,
}

/// Whether writes of all-zero buffers become zero writes (qemu-nbd `--detect-zeroes`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum DetectZeroes {
    /// Write the zeros as data.
    #[default]
    Off,
    /// Turn them into zero writes that keep the space allocated.
    On,
    /// Turn them into zero writes that may release space (needs [`Discard::Unmap`]).
    Unmap,
}

/// Flush behaviour (qemu-nbd `--cache`). Direct I/O is not available through the image
/// layer, so `none` and `directsync` differ from their writeback counterparts only in
/// flushing.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum CacheMode {
    /// Host cache, flush on request (default).
    #[default]
    Writeback,
    /// Every write is flushed before its reply.
    Writethrough,
    /// Like writeback (QEMU would bypass the host cache).
    None,
    /// Like writethrough (QEMU would bypass the host cache).
    DirectSync,
    /// Flush requests and FUA are acknowledged without flushing.
    Unsafe,
}

impl CacheMode {
    /// Whether every write must be flushed before it is acknowledged.
    pub fn write_through(self) -> bool {
        matches!(self, CacheMode::Writethrough | CacheMode::DirectSync)
    }
}

/// Server-wide settings.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// Most clients connected at once (handshaking or transmitting); 0 = unlimited. Any
    /// value other than 1 advertises `NBD_FLAG_CAN_MULTI_CONN`, as qemu-nbd does.
    pub max_connections: u32,
    /// Keep serving after the last client disconnects (otherwise `serve` returns once a
    /// client has come and all have gone, like qemu-nbd without `-t`).
    pub persistent: bool,
    /// Time a client has to finish the handshake (`None` = unlimited).
    pub handshake_limit: Option<Duration>,
    /// TRIM policy.
    pub discard: Discard,
    /// Zero detection on writes.
    pub detect_zeroes: DetectZeroes,
    /// Flush policy.
    pub cache: CacheMode,
    /// Requests executed in parallel per connection (QEMU allows 16 in flight).
    pub workers_per_connection: usize,
    /// When set, errors that end a connection are printed to stderr with this prefix
    /// (`"qemu-nbd"` style); a library user embedding the server usually leaves it unset.
    pub log_prefix: Option<String>,
    /// TLS credentials. When set, clients must upgrade with `NBD_OPT_STARTTLS` before any
    /// other option (`qemu-nbd --tls-creds`); when unset, STARTTLS is refused.
    pub tls: Option<TlsConfig>,
}

impl Default for ServerConfig {
    /// qemu-nbd's defaults, except that the server keeps running after the last client
    /// (a library user decides when to stop).
    fn default() -> ServerConfig {
        ServerConfig {
            max_connections: 1,
            persistent: true,
            handshake_limit: Some(Duration::from_secs(10)),
            discard: Discard::Ignore,
            detect_zeroes: DetectZeroes::Off,
            cache: CacheMode::Writeback,
            workers_per_connection: 16,
            log_prefix: None,
            tls: None,
        }
    }
}

/// An export with everything derived from it that connections need.
#[derive(Debug)]
pub(crate) struct ExportState {
    pub(crate) export: Export,
    /// Size advertised: the image length rounded up to whole 512-byte sectors, as QEMU's
    /// block layer reports it.
    pub(crate) size: u64,
    /// Every context the export offers, with its id (QEMU's numbering: 0 base, 1 depth,
    /// 2+i bitmaps).
    pub(crate) contexts: Vec<(u32, Arc<dyn MetaContext>)>,
    /// The image's files mapped read-only, so read replies can go from the page cache to
    /// the socket with one copy instead of two (empty for images of other kinds).
    pub(crate) views: qimg::mapped::MappedLayers,
}

impl ExportState {
    fn new(export: Export) -> ExportState {
        let len = export.image.len();
        let size = len.checked_add(511).map(|v| v & !511).unwrap_or(len & !511);
        // An offset export hides the backing chain (see `offset`), which changes what
        // the allocation contexts report.
        let base: Arc<dyn MetaContext> = match OffsetAllocation::new(export.image.clone()) {
            Some(c) => Arc::new(c),
            None => Arc::new(BaseAllocation::new(export.image.clone())),
        };
        let mut contexts: Vec<(u32, Arc<dyn MetaContext>)> = vec![(0, base)];
        if export.allocation_depth {
            let depth: Arc<dyn MetaContext> = match OffsetDepth::new(export.image.clone()) {
                Some(c) => Arc::new(c),
                None => Arc::new(AllocationDepth::new(export.image.clone())),
            };
            contexts.push((1, depth));
        }
        for (i, b) in export.bitmaps.iter().enumerate() {
            contexts.push((2 + i as u32, b.clone()));
        }
        let views = qimg::mapped::MappedLayers::new(export.image.as_ref());
        ExportState {
            export,
            size,
            contexts,
            views,
        }
    }

    /// Transmission flags for a client in `mode` that selected `n_contexts` contexts.
    pub(crate) fn tx_flags(&self, cfg: &ServerConfig, mode: Mode, n_contexts: usize) -> u16 {
        let mut f =
            tx_flags::HAS_FLAGS | tx_flags::SEND_FLUSH | tx_flags::SEND_FUA | tx_flags::SEND_CACHE;
        if self.export.read_only {
            f |= tx_flags::READ_ONLY;
        } else {
            f |= tx_flags::SEND_TRIM | tx_flags::SEND_WRITE_ZEROES | tx_flags::SEND_FAST_ZERO;
        }
        if cfg.max_connections != 1 {
            f |= tx_flags::CAN_MULTI_CONN;
        }
        if mode >= Mode::Structured {
            f |= tx_flags::SEND_DF;
        }
        if mode == Mode::Extended && n_contexts > 0 {
            f |= tx_flags::BLOCK_STATUS_PAYLOAD;
        }
        f
    }

    /// Marks in `sel` the contexts a query names. In a list request the wildcards `base:`,
    /// `qemu:` and `qemu:dirty-bitmap:` select whole namespaces; in a set request they
    /// select nothing (a wildcard must not select contexts, per the specification).
    /// Unknown namespaces and names are ignored.
    pub(crate) fn match_query(&self, q: &[u8], list: bool, sel: &mut [bool]) {
        for (i, (_, ctx)) in self.contexts.iter().enumerate() {
            let name = ctx.name().as_bytes();
            let hit = if name == q {
                true
            } else if !list {
                false
            } else {
                match q {
                    b"base:" => name.starts_with(b"base:"),
                    b"qemu:" => name.starts_with(b"qemu:"),
                    _ if q == DIRTY_BITMAP_PREFIX.as_bytes() => {
                        name.starts_with(DIRTY_BITMAP_PREFIX.as_bytes())
                    }
                    _ => false,
                }
            };
            if hit {
                sel[i] = true;
            }
        }
    }
}

/// Wakes the accept loop: a non-blocking pipe whose read end is polled with the listener.
/// A byte `S` means "shut down" (writable from a signal handler), anything else means
/// "re-check the connection count".
#[derive(Debug)]
struct Waker {
    rd: RawFd,
    wr: RawFd,
}

impl Waker {
    fn new() -> io::Result<Waker> {
        let mut fds = [0 as libc::c_int; 2];
        // SAFETY: pipe2 writes two descriptors into the array we pass.
        let r = unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC | libc::O_NONBLOCK) };
        if r != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(Waker {
            rd: fds[0],
            wr: fds[1],
        })
    }

    fn wake(&self, b: u8) {
        // A full pipe already guarantees a wake-up, so EAGAIN is fine to ignore.
        // SAFETY: writing one byte from a valid buffer to our own pipe.
        let _ = unsafe { libc::write(self.wr, (&b as *const u8).cast(), 1) };
    }

    /// Empties the pipe; returns whether a shutdown byte was in it.
    fn drain(&self) -> bool {
        let mut shutdown = false;
        let mut buf = [0u8; 64];
        loop {
            // SAFETY: reading into a local buffer of the given size from our own pipe.
            let n = unsafe { libc::read(self.rd, buf.as_mut_ptr().cast(), buf.len()) };
            if n <= 0 {
                return shutdown;
            }
            shutdown |= buf[..n as usize].contains(&b'S');
        }
    }
}

impl Drop for Waker {
    fn drop(&mut self) {
        // SAFETY: closing descriptors this struct owns.
        unsafe {
            libc::close(self.rd);
            libc::close(self.wr);
        }
    }
}

#[derive(Debug, Default)]
struct ConnTable {
    active: usize,
    next_id: u64,
    /// Control handles of live connections, for shutting them down.
    streams: HashMap<u64, Stream>,
    /// Some client has connected at least once (for non-persistent exit).
    served_any: bool,
}

#[derive(Debug)]
pub(crate) struct Inner {
    pub(crate) exports: Vec<ExportState>,
    pub(crate) config: ServerConfig,
    shutdown: AtomicBool,
    waker: Waker,
    table: Mutex<ConnTable>,
    changed: Condvar,
}

impl Inner {
    pub(crate) fn find_export(&self, name: &[u8]) -> Option<usize> {
        self.exports
            .iter()
            .position(|e| e.export.name.as_bytes() == name)
    }

    pub(crate) fn log(&self, msg: std::fmt::Arguments<'_>) {
        if let Some(p) = &self.config.log_prefix {
            eprintln!("{p}: {msg}");
        }
    }

    pub(crate) fn shutting_down(&self) -> bool {
        self.shutdown.load(Ordering::SeqCst)
    }

    fn lock_table(&self) -> MutexGuard<'_, ConnTable> {
        // A panic while holding this lock cannot leave the table inconsistent in a way
        // that matters more than refusing to continue, so recover the guard.
        self.table.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// Errors refusing a server configuration.
#[derive(Debug)]
pub enum ConfigError {
    /// Two exports share a name.
    DuplicateName(String),
    /// A name or description exceeds the protocol's 4096-byte string limit.
    TooLong(&'static str, String),
    /// A bitmap context's name does not start with `qemu:dirty-bitmap:`.
    BadContextName(String),
    /// The server's internal wake-up pipe could not be created.
    Io(String),
}

impl std::fmt::Display for ConfigError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ConfigError::DuplicateName(n) => write!(f, "duplicate export name '{n}'"),
            ConfigError::TooLong(what, v) => write!(f, "{what} '{v}' too long"),
            ConfigError::Io(e) => write!(f, "{e}"),
            ConfigError::BadContextName(n) => write!(
                f,
                "metadata context '{n}' is not in the {DIRTY_BITMAP_PREFIX} namespace"
            ),
        }
    }
}

impl std::error::Error for ConfigError {}

/// A handle that stops a running server from another thread (or, through
/// [`ShutdownHandle::signal_fd`], from a signal handler).
#[derive(Debug, Clone)]
pub struct ShutdownHandle {
    inner: Arc<Inner>,
}

impl ShutdownHandle {
    /// Asks the server to stop: no new connections, connected clients are disconnected
    /// after their in-flight requests complete, images are flushed, and `serve` returns.
    pub fn shutdown(&self) {
        self.inner.shutdown.store(true, Ordering::SeqCst);
        self.inner.waker.wake(b'S');
    }

    /// A descriptor to which writing the byte `b'S'` requests shutdown. `write(2)` is
    /// async-signal-safe, so a SIGTERM handler can use it; the descriptor stays valid for
    /// as long as the server exists.
    pub fn signal_fd(&self) -> RawFd {
        self.inner.waker.wr
    }
}

/// An NBD server over a set of exports.
#[derive(Debug, Clone)]
pub struct Server {
    inner: Arc<Inner>,
}

impl Server {
    /// Validates the exports and builds a server.
    pub fn new(exports: Vec<Export>, config: ServerConfig) -> Result<Server, ConfigError> {
        let mut seen = std::collections::HashSet::new();
        for e in &exports {
            if e.name.len() > MAX_STRING {
                return Err(ConfigError::TooLong("export name", e.name.clone()));
            }
            if let Some(d) = &e.description {
                if d.len() > MAX_STRING {
                    return Err(ConfigError::TooLong("export description", d.clone()));
                }
            }
            if !seen.insert(e.name.clone()) {
                return Err(ConfigError::DuplicateName(e.name.clone()));
            }
            for b in &e.bitmaps {
                let n = b.name();
                if !n.starts_with(DIRTY_BITMAP_PREFIX) || n.len() > MAX_STRING {
                    return Err(ConfigError::BadContextName(n.to_string()));
                }
            }
        }
        let waker = Waker::new().map_err(|e| ConfigError::Io(e.to_string()))?;
        let mut config = config;
        config.workers_per_connection = config.workers_per_connection.clamp(1, 256);
        Ok(Server {
            inner: Arc::new(Inner {
                exports: exports.into_iter().map(ExportState::new).collect(),
                config,
                shutdown: AtomicBool::new(false),
                waker,
                table: Mutex::new(ConnTable::default()),
                changed: Condvar::new(),
            }),
        })
    }

    /// A handle for stopping the server.
    pub fn shutdown_handle(&self) -> ShutdownHandle {
        ShutdownHandle {
            inner: self.inner.clone(),
        }
    }

    /// The size advertised for export `name`, if it exists.
    pub fn export_size(&self, name: &str) -> Option<u64> {
        self.inner
            .find_export(name.as_bytes())
            .map(|i| self.inner.exports[i].size)
    }

    /// Number of clients currently connected.
    pub fn active_connections(&self) -> usize {
        self.inner.lock_table().active
    }

    /// Serves one already-accepted connection on the calling thread until it ends.
    /// It counts towards `max_connections` only for the non-persistent exit rule and for
    /// shutdown; limiting is the caller's business when it accepts on its own.
    pub fn serve_stream(&self, stream: Stream) {
        let id = match self.register(&stream) {
            Some(id) => id,
            None => return,
        };
        conn::run(&self.inner, stream);
        self.unregister(id);
    }

    fn register(&self, stream: &Stream) -> Option<u64> {
        let ctl = stream.try_clone().ok()?;
        let mut t = self.inner.lock_table();
        let id = t.next_id;
        t.next_id += 1;
        t.active += 1;
        t.served_any = true;
        t.streams.insert(id, ctl);
        if self.inner.shutting_down() {
            // Raced with shutdown: make the connection end at once.
            let _ = stream.shutdown(Shutdown::Both);
        }
        Some(id)
    }

    fn unregister(&self, id: u64) {
        let mut t = self.inner.lock_table();
        t.streams.remove(&id);
        t.active = t.active.saturating_sub(1);
        drop(t);
        self.inner.changed.notify_all();
        self.inner.waker.wake(b'W');
    }

    /// Accepts and serves clients on `listener` until shut down or, when not persistent,
    /// until the last client has gone. Images are flushed before returning.
    pub fn serve(&self, listener: Listener) -> io::Result<()> {
        listener.set_nonblocking(true)?;
        let inner = &self.inner;
        let mut threads: Vec<JoinHandle<()>> = Vec::new();
        let result = loop {
            if inner.waker.drain() {
                inner.shutdown.store(true, Ordering::SeqCst);
            }
            if inner.shutting_down() {
                break Ok(());
            }
            threads.retain(|t| !t.is_finished());
            let (active, served_any) = {
                let t = inner.lock_table();
                (t.active, t.served_any)
            };
            if !inner.config.persistent && served_any && active == 0 {
                break Ok(());
            }
            let max = inner.config.max_connections as usize;
            // At the limit, leave new clients in the listen backlog (as qemu-nbd does)
            // and only wait for a connection to end.
            let can_accept = max == 0 || active < max;
            let mut fds = [
                libc::pollfd {
                    fd: inner.waker.rd,
                    events: libc::POLLIN,
                    revents: 0,
                },
                libc::pollfd {
                    fd: listener.raw_fd(),
                    events: libc::POLLIN,
                    revents: 0,
                },
            ];
            let nfds = if can_accept { 2 } else { 1 };
            // SAFETY: poll on an array of initialised pollfd structs of length nfds.
            let r = unsafe { libc::poll(fds.as_mut_ptr(), nfds, -1) };
            if r < 0 {
                let e = io::Error::last_os_error();
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                break Err(e);
            }
            if !can_accept || fds[1].revents == 0 {
                continue;
            }
            match listener.accept() {
                Ok(stream) => {
                    if let Stream::Tcp(s) = &stream {
                        let _ = s.set_nonblocking(false);
                    }
                    let server = self.clone();
                    let id = match server.register(&stream) {
                        Some(id) => id,
                        None => continue,
                    };
                    let spawned =
                        std::thread::Builder::new()
                            .name("nbd-conn".into())
                            .spawn(move || {
                                conn::run(&server.inner, stream);
                                server.unregister(id);
                            });
                    match spawned {
                        Ok(h) => threads.push(h),
                        Err(e) => {
                            inner.log(format_args!("cannot start a connection thread: {e}"));
                            self.unregister(id);
                        }
                    }
                }
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted
                    ) => {}
                // Errors such as ECONNABORTED or EMFILE concern one client or are
                // transient; keep serving the others (briefly backing off on EMFILE).
                Err(e) => {
                    inner.log(format_args!("accept failed: {e}"));
                    std::thread::sleep(Duration::from_millis(10));
                }
            }
        };
        if inner.shutting_down() {
            // Let any other accept loop on this server see the request too.
            inner.waker.wake(b'S');
        }
        self.close_connections();
        for t in threads {
            let _ = t.join();
        }
        self.flush_all();
        result
    }

    /// Ends every connection: reading stops at once so in-flight requests can finish and
    /// be answered; after a grace period whatever is left is cut.
    fn close_connections(&self) {
        let inner = &self.inner;
        {
            let t = inner.lock_table();
            for s in t.streams.values() {
                let _ = s.shutdown(Shutdown::Read);
                // A client that stopped reading must not keep us from exiting.
                let _ = s.set_write_timeout(Some(Duration::from_secs(2)));
            }
        }
        let deadline = Instant::now() + Duration::from_secs(5);
        let mut t = inner.lock_table();
        while t.active > 0 {
            let now = Instant::now();
            if now >= deadline {
                for s in t.streams.values() {
                    let _ = s.shutdown(Shutdown::Both);
                }
                break;
            }
            t = inner
                .changed
                .wait_timeout(t, deadline - now)
                .map(|(g, _)| g)
                .unwrap_or_else(|e| e.into_inner().0);
        }
    }

    fn flush_all(&self) {
        for e in &self.inner.exports {
            if !e.export.read_only {
                if let Err(err) = e.export.image.flush() {
                    self.inner
                        .log(format_args!("flushing '{}' failed: {err}", e.export.name));
                }
            }
        }
    }
}

/// Serves `exports` on a listener the caller owns, until the server is shut down or (when
/// not persistent) the last client leaves. The convenience form of [`Server::new`] and
/// [`Server::serve`].
pub fn serve_listener(
    listener: impl Into<Listener>,
    exports: Vec<Export>,
    config: ServerConfig,
) -> io::Result<()> {
    let server = Server::new(exports, config)
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e.to_string()))?;
    server.serve(listener.into())
}

/// Checks that `proto::MAX_PAYLOAD` fits the block-size info we send.
const _: () = assert!(proto::MAX_PAYLOAD as u64 <= u32::MAX as u64);
