//! TCP and unix-domain sockets, plain or under TLS, behind one type, so the server code is
//! written once. The plain variants call the socket directly (no lock, no copy); only a
//! TLS stream goes through the session's encryption (see [`crate::tls`]).

use std::io::{self, IoSlice, Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::time::Duration;

use crate::tls::TlsStream;

/// A connected socket.
#[derive(Debug)]
pub enum Stream {
    /// TCP connection.
    Tcp(TcpStream),
    /// Unix-domain connection.
    Unix(UnixStream),
    /// A TCP or unix-domain connection after `NBD_OPT_STARTTLS`.
    Tls(TlsStream),
}

impl Stream {
    /// A second handle to the same socket (used for the writer side).
    pub fn try_clone(&self) -> io::Result<Stream> {
        Ok(match self {
            Stream::Tcp(s) => Stream::Tcp(s.try_clone()?),
            Stream::Unix(s) => Stream::Unix(s.try_clone()?),
            Stream::Tls(s) => Stream::Tls(s.try_clone()?),
        })
    }

    /// Sets the read timeout (`None` = block forever).
    pub fn set_read_timeout(&self, t: Option<Duration>) -> io::Result<()> {
        match self {
            Stream::Tcp(s) => s.set_read_timeout(t),
            Stream::Unix(s) => s.set_read_timeout(t),
            Stream::Tls(s) => s.socket().set_read_timeout(t),
        }
    }

    /// Sets the write timeout (`None` = block forever).
    pub fn set_write_timeout(&self, t: Option<Duration>) -> io::Result<()> {
        match self {
            Stream::Tcp(s) => s.set_write_timeout(t),
            Stream::Unix(s) => s.set_write_timeout(t),
            Stream::Tls(s) => s.socket().set_write_timeout(t),
        }
    }

    /// Shuts down one or both directions.
    pub fn shutdown(&self, how: Shutdown) -> io::Result<()> {
        match self {
            Stream::Tcp(s) => s.shutdown(how),
            Stream::Unix(s) => s.shutdown(how),
            Stream::Tls(s) => s.socket().shutdown(how),
        }
    }

    /// Disables Nagle's algorithm on TCP: replies are written whole, and delaying small
    /// ones only adds latency.
    pub fn set_nodelay(&self) {
        match self {
            Stream::Tcp(s) => {
                let _ = s.set_nodelay(true);
            }
            Stream::Tls(s) => s.socket().set_nodelay(),
            Stream::Unix(_) => {}
        }
    }

    /// Bounds every socket read of a TLS stream by `deadline` (one read of decrypted data
    /// may take several socket reads). A plain stream's reads are single socket reads,
    /// bounded by the read timeout its user sets, so there is nothing to do for it.
    pub(crate) fn set_read_deadline(&mut self, deadline: Option<std::time::Instant>) {
        if let Stream::Tls(s) = self {
            s.set_read_deadline(deadline);
        }
    }

    /// Whether the connection is encrypted.
    pub fn is_tls(&self) -> bool {
        matches!(self, Stream::Tls(_))
    }

    /// Ends a TLS session cleanly (`close_notify`); nothing to do on a plain socket.
    pub fn close_notify(&mut self) -> io::Result<()> {
        match self {
            Stream::Tls(s) => s.close_notify(),
            _ => Ok(()),
        }
    }

    /// Writes every byte of every slice, looping over short vectored writes.
    pub fn write_all_vectored(&mut self, bufs: &mut [&[u8]]) -> io::Result<()> {
        let mut first = 0;
        while first < bufs.len() {
            if bufs[first].is_empty() {
                first += 1;
                continue;
            }
            // Bounded by IOV_MAX-ish batches; the kernel takes what it can.
            let end = (first + 64).min(bufs.len());
            let slices: Vec<IoSlice<'_>> =
                bufs[first..end].iter().map(|b| IoSlice::new(b)).collect();
            let n = match self.write_vectored(&slices) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            };
            let mut left = n;
            while left > 0 {
                let l = bufs[first].len();
                if left >= l {
                    left -= l;
                    first += 1;
                } else {
                    bufs[first] = &bufs[first][left..];
                    left = 0;
                }
            }
        }
        Ok(())
    }
}

impl Read for Stream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Stream::Tcp(s) => s.read(buf),
            Stream::Unix(s) => s.read(buf),
            Stream::Tls(s) => s.read(buf),
        }
    }
}

impl Write for Stream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Stream::Tcp(s) => s.write(buf),
            Stream::Unix(s) => s.write(buf),
            Stream::Tls(s) => s.write(buf),
        }
    }

    fn write_vectored(&mut self, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
        match self {
            Stream::Tcp(s) => s.write_vectored(bufs),
            Stream::Unix(s) => s.write_vectored(bufs),
            Stream::Tls(s) => s.write_vectored(bufs),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// A listening socket the library user owns and hands to the server.
#[derive(Debug)]
pub enum Listener {
    /// TCP listener.
    Tcp(TcpListener),
    /// Unix-domain listener.
    Unix(UnixListener),
}

impl From<TcpListener> for Listener {
    fn from(l: TcpListener) -> Listener {
        Listener::Tcp(l)
    }
}

impl From<UnixListener> for Listener {
    fn from(l: UnixListener) -> Listener {
        Listener::Unix(l)
    }
}

impl Listener {
    /// Accepts one connection.
    pub fn accept(&self) -> io::Result<Stream> {
        match self {
            Listener::Tcp(l) => l.accept().map(|(s, _)| Stream::Tcp(s)),
            Listener::Unix(l) => l.accept().map(|(s, _)| Stream::Unix(s)),
        }
    }

    /// Switches blocking mode (the accept loop polls, then accepts without blocking).
    pub fn set_nonblocking(&self, nb: bool) -> io::Result<()> {
        match self {
            Listener::Tcp(l) => l.set_nonblocking(nb),
            Listener::Unix(l) => l.set_nonblocking(nb),
        }
    }

    /// The raw descriptor, for `poll`.
    pub fn raw_fd(&self) -> RawFd {
        match self {
            Listener::Tcp(l) => l.as_raw_fd(),
            Listener::Unix(l) => l.as_raw_fd(),
        }
    }
}
