//! Deadlines for frame exchanges on a TCP connection.
//!
//! A socket timeout (`SO_RCVTIMEO`/`SO_SNDTIMEO`) bounds one system call, and every
//! partial send or receive starts it again: a link that trickles a few bytes now and
//! then holds a 4 MiB frame — and with it a frozen shim epoch — for as long as it
//! trickles. Here the bound is per frame instead: the frame layer starts a
//! [`FrameDeadline`] when it begins to send or receive a frame, and [`TimedStream`]
//! (the socket in non-blocking mode, waiting in `poll` for at most the time left)
//! fails the frame with [`DeadlineExceeded`] once the deadline passes, however many
//! bytes moved before it. A deadline can also be capped by a fixed instant, which is
//! how the target bounds a whole handshake.

use std::io::{self, IoSlice, Read, Write};
use std::net::TcpStream;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, RawFd};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// The error a [`TimedStream`] returns (inside an `io::Error` of kind `TimedOut`) when
/// a frame's deadline passed; [`super::ProtocolError::io`] turns it into
/// [`super::ProtocolError::TimedOut`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("timed out after {after_ms} ms")]
pub struct DeadlineExceeded {
    /// The budget that ran out: the per-frame timeout, or the cap if it was tighter.
    pub after_ms: u64,
}

impl DeadlineExceeded {
    fn into_io(self) -> io::Error {
        io::Error::new(io::ErrorKind::TimedOut, self)
    }
}

/// When the frame in progress must be complete. Shared between a frame reader or
/// writer (which starts it) and the [`TimedStream`] under it (which enforces it);
/// cloning shares it.
#[derive(Debug, Clone)]
pub struct FrameDeadline(Arc<DeadlineState>);

#[derive(Debug)]
struct DeadlineState {
    per_frame: Duration,
    /// Instants below are nanoseconds since `base`; 0 means "not set".
    base: Instant,
    /// When the frame in progress must be complete. Written by the thread that owns
    /// the reader or writer (the only one that uses the stream), so Relaxed suffices:
    /// the atomics only make the handle `Sync`.
    until_ns: AtomicU64,
    /// The budget `until_ns` was computed from, for the error message.
    budget_ms: AtomicU64,
    /// A fixed instant no frame deadline may pass (the handshake's), 0 if none.
    cap_ns: AtomicU64,
    /// The whole budget the cap stands for, for the error message.
    cap_budget_ms: AtomicU64,
}

impl FrameDeadline {
    /// Every frame must be sent (or received) within `per_frame` of its start.
    pub fn new(per_frame: Duration) -> Self {
        Self(Arc::new(DeadlineState {
            per_frame,
            base: Instant::now(),
            until_ns: AtomicU64::new(0),
            budget_ms: AtomicU64::new(per_frame.as_millis() as u64),
            cap_ns: AtomicU64::new(0),
            cap_budget_ms: AtomicU64::new(0),
        }))
    }

    pub fn per_frame(&self) -> Duration {
        self.0.per_frame
    }

    fn ns(&self, at: Instant) -> u64 {
        // +1 keeps 0 free for "not set".
        at.saturating_duration_since(self.0.base).as_nanos() as u64 + 1
    }

    /// Starts a frame exchange: it must finish within the per-frame timeout, and
    /// before the cap if one is set.
    pub fn start_frame(&self) {
        let now = Instant::now();
        let mut until = self.ns(now + self.0.per_frame);
        let mut budget = self.0.per_frame;
        let cap = self.0.cap_ns.load(Ordering::Relaxed);
        if cap != 0 && cap < until {
            until = cap;
            budget = self.0.cap_budget();
        }
        self.0
            .budget_ms
            .store(budget.as_millis() as u64, Ordering::Relaxed);
        self.0.until_ns.store(until, Ordering::Relaxed);
    }

    /// Sets (or with `None` lifts) an instant no frame may end after; the error then
    /// reports `budget` as the time allowed.
    pub fn cap(&self, cap: Option<(Instant, Duration)>) {
        match cap {
            Some((at, budget)) => {
                self.0
                    .cap_budget_ms
                    .store(budget.as_millis() as u64, Ordering::Relaxed);
                self.0.cap_ns.store(self.ns(at), Ordering::Relaxed);
            }
            None => self.0.cap_ns.store(0, Ordering::Relaxed),
        }
    }

    /// Time left for the frame in progress; `None` if no frame was started.
    fn remaining(&self) -> Result<Option<Duration>, DeadlineExceeded> {
        let until = self.0.until_ns.load(Ordering::Relaxed);
        if until == 0 {
            return Ok(None);
        }
        let now = self.ns(Instant::now());
        if now >= until {
            return Err(DeadlineExceeded {
                after_ms: self.0.budget_ms.load(Ordering::Relaxed),
            });
        }
        Ok(Some(Duration::from_nanos(until - now)))
    }
}

impl DeadlineState {
    fn cap_budget(&self) -> Duration {
        Duration::from_millis(self.cap_budget_ms.load(Ordering::Relaxed))
    }
}

/// A TCP stream, non-blocking underneath, whose reads and writes wait at most until
/// its [`FrameDeadline`]. Before any frame was started they wait without bound.
#[derive(Debug)]
pub struct TimedStream {
    stream: TcpStream,
    deadline: FrameDeadline,
}

impl TimedStream {
    /// Puts `stream` in non-blocking mode (shared with its clones: set once for the
    /// connection) under `deadline`.
    pub fn new(stream: TcpStream, deadline: FrameDeadline) -> io::Result<Self> {
        stream.set_nonblocking(true)?;
        Ok(Self { stream, deadline })
    }

    pub fn get_ref(&self) -> &TcpStream {
        &self.stream
    }

    pub fn deadline(&self) -> &FrameDeadline {
        &self.deadline
    }

    /// Waits until the socket is ready for `events` or the frame's deadline passes.
    fn wait(&self, events: libc::c_short) -> io::Result<()> {
        loop {
            let timeout_ms: libc::c_int = match self.deadline.remaining() {
                Err(e) => return Err(e.into_io()),
                Ok(None) => -1,
                // Round up: a poll that returns a hair early only loops once more.
                Ok(Some(left)) => left
                    .as_micros()
                    .div_ceil(1000)
                    .min(libc::c_int::MAX as u128) as libc::c_int,
            };
            let mut pfd = libc::pollfd {
                fd: self.stream.as_raw_fd(),
                events,
                revents: 0,
            };
            // SAFETY: `pfd` is a valid pollfd on our stack for the duration of the call,
            // and the descriptor is owned by `self.stream`, which outlives it.
            let rc = unsafe { libc::poll(&mut pfd, 1, timeout_ms) };
            if rc > 0 {
                // Readable, writable, or an error/hang-up the next call will report.
                return Ok(());
            }
            if rc < 0 {
                let err = io::Error::last_os_error();
                if err.kind() != io::ErrorKind::Interrupted {
                    return Err(err);
                }
            }
            // rc == 0: time is up (checked at the top), or EINTR: wait again.
        }
    }

    /// Reports the kernel's own timeout (`TCP_USER_TIMEOUT`, keepalive) like ours.
    fn map_err(&self, e: io::Error) -> io::Error {
        if e.raw_os_error() == Some(libc::ETIMEDOUT) {
            return DeadlineExceeded {
                after_ms: user_timeout(self.deadline.per_frame()).as_millis() as u64,
            }
            .into_io();
        }
        e
    }
}

impl Read for TimedStream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        loop {
            match (&self.stream).read(buf) {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => self.wait(libc::POLLIN)?,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                other => return other.map_err(|e| self.map_err(e)),
            }
        }
    }
}

impl Write for TimedStream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.write_vectored(&[IoSlice::new(buf)])
    }

    fn write_vectored(&mut self, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
        loop {
            match (&self.stream).write_vectored(bufs) {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => self.wait(libc::POLLOUT)?,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                other => return other.map_err(|e| self.map_err(e)),
            }
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl AsRawFd for TimedStream {
    fn as_raw_fd(&self) -> RawFd {
        self.stream.as_raw_fd()
    }
}

impl AsFd for TimedStream {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.stream.as_fd()
    }
}

/// `TCP_USER_TIMEOUT` for a connection whose frames are bounded by `io_timeout`:
/// twice it, so the frame deadline — which names the timeout in its error — normally
/// fires first, and the kernel still cuts a connection whose sent data stays
/// unacknowledged while no frame is in progress.
pub fn user_timeout(io_timeout: Duration) -> Duration {
    io_timeout.saturating_mul(2)
}

/// Sets the socket options every ferry connection uses: no Nagle delay (frames are
/// written whole), `TCP_USER_TIMEOUT` (see [`user_timeout`]) and keepalive probes that
/// find a dead peer within about `io_timeout` of silence even while no frame is in
/// progress.
pub fn tune_socket(stream: &TcpStream, io_timeout: Duration) -> io::Result<()> {
    use nix::sys::socket::{setsockopt, sockopt};
    stream.set_nodelay(true)?;
    let user_ms = user_timeout(io_timeout).as_millis().min(u32::MAX as u128) as u32;
    // Keepalive times are whole seconds: idle for half the timeout, then three probes
    // a sixth of it apart.
    let secs = |d: Duration| d.as_secs().clamp(1, 32_767) as u32;
    let idle = secs(io_timeout / 2);
    let interval = secs(io_timeout / 6);
    let set = |r: nix::Result<()>| r.map_err(io::Error::from);
    set(setsockopt(stream, sockopt::TcpUserTimeout, &user_ms))?;
    set(setsockopt(stream, sockopt::KeepAlive, &true))?;
    set(setsockopt(stream, sockopt::TcpKeepIdle, &idle))?;
    set(setsockopt(stream, sockopt::TcpKeepInterval, &interval))?;
    set(setsockopt(stream, sockopt::TcpKeepCount, &3))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::TcpListener;

    fn pair() -> (TcpStream, TcpStream) {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let a = TcpStream::connect(l.local_addr().unwrap()).unwrap();
        let (b, _) = l.accept().unwrap();
        (a, b)
    }

    #[test]
    fn a_trickling_peer_cannot_stretch_a_frame_past_its_deadline() {
        let (a, b) = pair();
        let deadline = FrameDeadline::new(Duration::from_millis(400));
        let mut timed = TimedStream::new(a, deadline.clone()).unwrap();
        // The peer sends one byte every 50 ms: each read makes progress, but the
        // frame of 64 bytes cannot complete within 400 ms.
        let trickle = std::thread::spawn(move || {
            for _ in 0..64 {
                if (&b).write_all(&[1]).is_err() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        });
        let started = Instant::now();
        deadline.start_frame();
        let mut buf = [0u8; 64];
        let err = timed.read_exact(&mut buf).unwrap_err();
        let elapsed = started.elapsed();
        assert_eq!(err.kind(), io::ErrorKind::TimedOut, "{err}");
        assert_eq!(err.to_string(), "timed out after 400 ms");
        assert!(elapsed >= Duration::from_millis(400), "{elapsed:?}");
        assert!(elapsed < Duration::from_secs(3), "{elapsed:?}");
        trickle.join().unwrap();
    }

    #[test]
    fn a_cap_bounds_every_frame_and_is_reported() {
        let (a, _b) = pair();
        let deadline = FrameDeadline::new(Duration::from_secs(60));
        let mut timed = TimedStream::new(a, deadline.clone()).unwrap();
        let budget = Duration::from_millis(200);
        deadline.cap(Some((Instant::now() + budget, budget)));
        deadline.start_frame();
        let err = timed.read(&mut [0u8; 8]).unwrap_err();
        assert_eq!(err.to_string(), "timed out after 200 ms");
        // Lifted, frames get the per-frame timeout again.
        deadline.cap(None);
        deadline.start_frame();
        assert!(deadline.remaining().unwrap().unwrap() > Duration::from_secs(50));
    }

    #[test]
    fn a_stalled_writer_times_out_whatever_it_already_sent() {
        let (a, b) = pair();
        let deadline = FrameDeadline::new(Duration::from_millis(300));
        let mut timed = TimedStream::new(a, deadline.clone()).unwrap();
        deadline.start_frame();
        // Far more than both socket buffers hold, and the peer never reads.
        let big = vec![0u8; 64 << 20];
        let err = timed.write_all(&big).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::TimedOut, "{err}");
        drop(b);
    }
}
