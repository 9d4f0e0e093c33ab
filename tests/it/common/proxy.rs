//! A fault-injecting TCP proxy: a real listener and real sockets between a source and
//! a target, forwarding bytes both ways until a test arms a fault — cut every
//! connection after N more bytes in one direction, half-close one direction, stall
//! both, or let one direction trickle — and holding new connections while a test
//! inspects a quiet target.
//!
//! Faults count bytes per direction from the moment they are armed, across
//! connections: an offset past the end of the current connection strikes the next.

use std::io::{ErrorKind, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

/// A direction through the proxy.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dir {
    /// From the connecting side (the source) to the upstream side (the target).
    Up,
    /// From the target back to the source.
    Down,
}

impl Dir {
    fn index(self) -> usize {
        self as usize
    }
}

/// What the proxy does to the link.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// Once `after` more bytes went `dir`, every connection is cut (both sockets shut
    /// down both ways: each peer sees the stream end mid-frame). One-shot.
    Cut { dir: Dir, after: u64 },
    /// Once `after` more bytes went `dir`, that direction of the connection carrying
    /// them is closed (its receiver sees end of stream, what its sender still sends
    /// is swallowed) while the other direction keeps flowing. One-shot.
    HalfClose { dir: Dir, after: u64 },
    /// Once `after` more bytes went `dir`, nothing moves either way, on any
    /// connection, until [`FaultProxy::clear`]. Connections stay open.
    Stall { dir: Dir, after: u64 },
    /// Once `after` more bytes went `dir`, that direction moves one byte per `every`
    /// until cleared.
    Trickle {
        dir: Dir,
        after: u64,
        every: Duration,
    },
}

impl Fault {
    fn trigger(&self) -> (Dir, u64) {
        match *self {
            Fault::Cut { dir, after }
            | Fault::HalfClose { dir, after }
            | Fault::Stall { dir, after }
            | Fault::Trickle { dir, after, .. } => (dir, after),
        }
    }
}

/// One proxied connection: the socket to the source and the one to the target.
struct Conn {
    down: TcpStream,
    up: TcpStream,
    dead: Arc<AtomicBool>,
}

impl Conn {
    fn kill(&self) {
        self.dead.store(true, Ordering::Release);
        let _ = self.down.shutdown(Shutdown::Both);
        let _ = self.up.shutdown(Shutdown::Both);
    }
}

#[derive(Default)]
struct Inner {
    fault: Option<Fault>,
    /// Bytes moved per direction since the fault was armed.
    moved: [u64; 2],
    /// Whether the armed fault has struck (Stall and Trickle stay struck until
    /// cleared; Cut and HalfClose are consumed).
    struck: bool,
    /// Faults that struck since the proxy started.
    strikes: u64,
    conns: Vec<Conn>,
    /// While set, new connections are parked: accepted, never forwarded.
    hold: bool,
    parked: Vec<TcpStream>,
    /// The target's view of each connection's peer address, in connection order.
    upstream_peers: Vec<SocketAddr>,
}

struct State {
    upstream: SocketAddr,
    inner: Mutex<Inner>,
    stop: AtomicBool,
}

/// What a pump may do next.
enum Step {
    /// Forward up to this many bytes.
    Forward(usize),
    /// Wait: the link is stalled.
    Wait,
    /// Forward one byte, then wait this long.
    Trickle(Duration),
    /// This direction of this connection is closed: swallow what arrives.
    Swallow,
}

/// The proxy; stops (and cuts every connection) when dropped.
pub struct FaultProxy {
    pub addr: SocketAddr,
    state: Arc<State>,
    accept: Option<JoinHandle<()>>,
}

impl FaultProxy {
    /// Listens on a free loopback port and forwards every connection to `upstream`.
    pub fn start(upstream: SocketAddr) -> FaultProxy {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind the proxy");
        let addr = listener.local_addr().unwrap();
        listener.set_nonblocking(true).unwrap();
        let state = Arc::new(State {
            upstream,
            inner: Mutex::new(Inner::default()),
            stop: AtomicBool::new(false),
        });
        let s = Arc::clone(&state);
        let accept = std::thread::spawn(move || accept_loop(listener, s));
        FaultProxy {
            addr,
            state,
            accept: Some(accept),
        }
    }

    /// Arms `fault` (replacing any other), counting bytes from now.
    pub fn arm(&self, fault: Fault) {
        let mut i = self.state.inner.lock().unwrap();
        i.fault = Some(fault);
        i.moved = [0, 0];
        i.struck = false;
    }

    /// Disarms any fault; a stalled or trickling link flows again.
    pub fn clear(&self) {
        let mut i = self.state.inner.lock().unwrap();
        i.fault = None;
        i.struck = false;
    }

    /// Faults that struck so far.
    pub fn strikes(&self) -> u64 {
        self.state.inner.lock().unwrap().strikes
    }

    /// Cuts every live connection now.
    pub fn cut_all(&self) {
        let i = self.state.inner.lock().unwrap();
        for c in &i.conns {
            c.kill();
        }
    }

    /// Cuts every connection and parks new ones until [`release`](Self::release):
    /// nothing reaches the target meanwhile.
    pub fn hold(&self) {
        let mut i = self.state.inner.lock().unwrap();
        i.hold = true;
        for c in &i.conns {
            c.kill();
        }
    }

    /// Ends a [`hold`](Self::hold): parked connections are closed (their sources
    /// have given up or will), new ones are forwarded again.
    pub fn release(&self) {
        let mut i = self.state.inner.lock().unwrap();
        i.hold = false;
        for p in i.parked.drain(..) {
            let _ = p.shutdown(Shutdown::Both);
        }
    }

    /// Connections forwarded to the target so far, as the target saw their peers.
    pub fn upstream_peers(&self) -> Vec<SocketAddr> {
        self.state.inner.lock().unwrap().upstream_peers.clone()
    }
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        self.state.stop.store(true, Ordering::Release);
        {
            let mut i = self.state.inner.lock().unwrap();
            for c in &i.conns {
                c.kill();
            }
            for p in i.parked.drain(..) {
                let _ = p.shutdown(Shutdown::Both);
            }
        }
        if let Some(t) = self.accept.take() {
            let _ = t.join();
        }
    }
}

fn accept_loop(listener: TcpListener, state: Arc<State>) {
    while !state.stop.load(Ordering::Acquire) {
        let down = match listener.accept() {
            Ok((s, _)) => s,
            Err(e) if e.kind() == ErrorKind::WouldBlock => {
                std::thread::sleep(Duration::from_millis(5));
                continue;
            }
            Err(_) => continue,
        };
        let _ = down.set_nonblocking(false);
        {
            let mut i = state.inner.lock().unwrap();
            if i.hold {
                i.parked.push(down);
                continue;
            }
        }
        let up = match TcpStream::connect_timeout(&state.upstream, Duration::from_secs(5)) {
            Ok(s) => s,
            Err(_) => continue, // the target is down: the source sees its connection end
        };
        let _ = up.set_nodelay(true);
        let _ = down.set_nodelay(true);
        let dead = Arc::new(AtomicBool::new(false));
        let conn = Conn {
            down: down.try_clone().unwrap(),
            up: up.try_clone().unwrap(),
            dead: Arc::clone(&dead),
        };
        {
            let mut i = state.inner.lock().unwrap();
            i.conns.retain(|c| !c.dead.load(Ordering::Acquire));
            if let Ok(a) = up.local_addr() {
                i.upstream_peers.push(a);
            }
            i.conns.push(conn);
        }
        for (dir, from, to) in [
            (Dir::Up, down.try_clone().unwrap(), up.try_clone().unwrap()),
            (
                Dir::Down,
                up.try_clone().unwrap(),
                down.try_clone().unwrap(),
            ),
        ] {
            let (s, dead) = (Arc::clone(&state), Arc::clone(&dead));
            std::thread::spawn(move || pump(&s, dir, from, to, &dead));
        }
    }
}

/// Decides what the pump for `dir` may do now.
fn step(state: &State, dir: Dir, closed: bool, cap: usize) -> Step {
    if closed {
        return Step::Swallow;
    }
    let i = state.inner.lock().unwrap();
    let Some(fault) = i.fault else {
        return Step::Forward(cap);
    };
    let (on, after) = fault.trigger();
    if i.struck {
        return match fault {
            Fault::Stall { .. } => Step::Wait,
            Fault::Trickle { every, .. } if on == dir => Step::Trickle(every),
            _ => Step::Forward(cap),
        };
    }
    if on != dir {
        return Step::Forward(cap);
    }
    // Forward at most up to the trigger point, so the fault strikes at that byte.
    let left = after.saturating_sub(i.moved[dir.index()]);
    Step::Forward((left as usize).clamp(1, cap))
}

/// Counts `n` bytes moved in `dir`; returns the fault if they reached its trigger.
fn account(state: &State, dir: Dir, n: u64) -> Option<Fault> {
    let mut i = state.inner.lock().unwrap();
    i.moved[dir.index()] += n;
    let fault = i.fault?;
    let (on, after) = fault.trigger();
    if i.struck || on != dir || i.moved[dir.index()] < after {
        return None;
    }
    i.strikes += 1;
    match fault {
        Fault::Cut { .. } | Fault::HalfClose { .. } => i.fault = None,
        Fault::Stall { .. } | Fault::Trickle { .. } => i.struck = true,
    }
    if matches!(fault, Fault::Cut { .. }) {
        for c in &i.conns {
            c.kill();
        }
    }
    Some(fault)
}

fn pump(state: &State, dir: Dir, mut from: TcpStream, mut to: TcpStream, dead: &AtomicBool) {
    const CHUNK: usize = 64 << 10;
    let mut buf = vec![0u8; CHUNK];
    let _ = from.set_read_timeout(Some(Duration::from_millis(50)));
    let _ = to.set_write_timeout(Some(Duration::from_millis(50)));
    let mut closed = false;
    // A zero-byte trigger strikes before anything moves.
    if let Some(f) = account(state, dir, 0) {
        closed = strike(f, dir, &to);
    }
    loop {
        if state.stop.load(Ordering::Acquire) || dead.load(Ordering::Acquire) {
            break;
        }
        let (max, pause) = match step(state, dir, closed, CHUNK) {
            Step::Wait => {
                std::thread::sleep(Duration::from_millis(20));
                continue;
            }
            Step::Forward(n) => (n, None),
            Step::Trickle(every) => (1, Some(every)),
            Step::Swallow => (CHUNK, None),
        };
        let n = match from.read(&mut buf[..max]) {
            Ok(0) => {
                // The sender closed its side: pass the end of stream on.
                let _ = to.shutdown(Shutdown::Write);
                break;
            }
            Ok(n) => n,
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => continue,
            Err(e) if e.kind() == ErrorKind::Interrupted => continue,
            Err(_) => break,
        };
        if closed {
            continue; // swallowed
        }
        let mut sent = 0;
        while sent < n {
            if state.stop.load(Ordering::Acquire) || dead.load(Ordering::Acquire) {
                return;
            }
            match to.write(&buf[sent..n]) {
                Ok(0) => return,
                Ok(k) => sent += k,
                Err(e)
                    if matches!(
                        e.kind(),
                        ErrorKind::WouldBlock | ErrorKind::TimedOut | ErrorKind::Interrupted
                    ) => {}
                Err(_) => {
                    let _ = from.shutdown(Shutdown::Read);
                    return;
                }
            }
        }
        if let Some(f) = account(state, dir, n as u64) {
            closed = strike(f, dir, &to);
        }
        if let Some(p) = pause {
            std::thread::sleep(p);
        }
    }
}

/// Applies a fault that struck on this pump's connection; true if this direction
/// is now closed.
fn strike(fault: Fault, dir: Dir, to: &TcpStream) -> bool {
    match fault {
        Fault::HalfClose { dir: on, .. } if on == dir => {
            let _ = to.shutdown(Shutdown::Write);
            true
        }
        _ => false,
    }
}
