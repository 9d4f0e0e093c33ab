//! The HTTP endpoint: `GET /metrics` and nothing else.
//!
//! A minimal responder on `std::net` rather than an HTTP crate: Prometheus sends one
//! small GET per scrape interval and reads one reply, so a single thread that serves
//! connections one at a time (each bounded by timeouts and an 8 KiB request) is all it
//! takes. An HTTP server crate would bring its own threads, buffers and dependencies
//! into the data plane's processes for that, and its limits would be its own rather
//! than the few stated here.

use std::io::{Read, Write};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use prometheus_client::registry::Registry;

use super::{MetricsError, CONTENT_TYPE};

/// The longest request head read (request line and headers); a longer one is refused.
const MAX_REQUEST_BYTES: usize = 8 << 10;
/// How long a client has to send its request: a stalled client delays the next
/// scrape by at most this.
const READ_TIMEOUT: Duration = Duration::from_secs(2);
/// How long writing the answer may take.
const WRITE_TIMEOUT: Duration = Duration::from_secs(5);

/// Called before each scrape's encoding, to compute what is read at scrape time.
pub type Refresh = Box<dyn Fn() + Send>;

/// A running metrics endpoint; stops (and joins its thread) when dropped.
pub struct MetricsServer {
    addr: SocketAddr,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl MetricsServer {
    /// Listens on `addr` and serves `registry` from a thread of its own.
    pub fn start(
        addr: SocketAddr,
        registry: Registry,
        refresh: Refresh,
    ) -> Result<MetricsServer, MetricsError> {
        let listener =
            TcpListener::bind(addr).map_err(|source| MetricsError::Listen { addr, source })?;
        let addr = listener
            .local_addr()
            .map_err(|source| MetricsError::Listen { addr, source })?;
        let stop = Arc::new(AtomicBool::new(false));
        let thread = std::thread::Builder::new()
            .name("ferry-metrics".into())
            .spawn({
                let stop = Arc::clone(&stop);
                move || serve(&listener, &registry, &refresh, &stop)
            })
            .map_err(MetricsError::Thread)?;
        Ok(MetricsServer {
            addr,
            stop,
            thread: Some(thread),
        })
    }

    /// The address it listens on.
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }
}

impl Drop for MetricsServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
        // Wake the blocking accept with a connection of our own.
        let ip = match self.addr.ip() {
            IpAddr::V4(ip) if ip.is_unspecified() => IpAddr::V4(Ipv4Addr::LOCALHOST),
            IpAddr::V6(ip) if ip.is_unspecified() => IpAddr::V6(Ipv6Addr::LOCALHOST),
            ip => ip,
        };
        let woken =
            TcpStream::connect_timeout(&SocketAddr::new(ip, self.addr.port()), WRITE_TIMEOUT);
        if let (Ok(_), Some(thread)) = (woken, self.thread.take()) {
            let _ = thread.join();
        }
        // Not woken: the thread is left to end with the process.
    }
}

fn serve(listener: &TcpListener, registry: &Registry, refresh: &Refresh, stop: &AtomicBool) {
    for conn in listener.incoming() {
        if stop.load(Ordering::Acquire) {
            break;
        }
        match conn {
            Ok(stream) => {
                if let Err(e) = respond(stream, registry, refresh) {
                    tracing::debug!("metrics request: {e}");
                }
            }
            Err(e) => {
                tracing::warn!("metrics: accept failed: {e}");
                // Out of file descriptors, say: do not spin.
                std::thread::sleep(Duration::from_millis(100));
            }
        }
    }
}

/// Reads one request and answers it; the connection closes after the answer.
fn respond(mut stream: TcpStream, registry: &Registry, refresh: &Refresh) -> std::io::Result<()> {
    stream.set_read_timeout(Some(READ_TIMEOUT))?;
    stream.set_write_timeout(Some(WRITE_TIMEOUT))?;
    let mut head = [0u8; MAX_REQUEST_BYTES];
    let mut len = 0;
    let complete = loop {
        if head_end(&head[..len]) {
            break true;
        }
        if len == head.len() {
            break false;
        }
        match stream.read(&mut head[len..])? {
            0 => break false,
            n => len += n,
        }
    };
    let line = head[..len]
        .split(|&b| b == b'\n')
        .next()
        .and_then(|l| std::str::from_utf8(l).ok())
        .unwrap_or("");
    let mut words = line.split_whitespace();
    let (method, target) = (words.next().unwrap_or(""), words.next().unwrap_or(""));
    let path = target.split('?').next().unwrap_or("");
    let answer = if !complete {
        Answer::text("400 Bad Request", "a request head of at most 8 KiB\n")
    } else if method != "GET" && method != "HEAD" {
        Answer::text("405 Method Not Allowed", "GET /metrics\n")
    } else if path != "/metrics" {
        Answer::text("404 Not Found", "ferry serves its metrics at /metrics\n")
    } else {
        refresh();
        let mut body = String::new();
        match prometheus_client::encoding::text::encode(&mut body, registry) {
            Ok(()) => Answer {
                status: "200 OK",
                content_type: CONTENT_TYPE,
                body,
            },
            Err(_) => Answer::text("500 Internal Server Error", "encoding failed\n"),
        }
    };
    let header = format!(
        "HTTP/1.1 {}\r\nContent-Type: {}\r\nContent-Length: {}\r\nConnection: close\r\n{}\r\n",
        answer.status,
        answer.content_type,
        answer.body.len(),
        if answer.status.starts_with("405") {
            "Allow: GET, HEAD\r\n"
        } else {
            ""
        }
    );
    stream.write_all(header.as_bytes())?;
    if method != "HEAD" {
        stream.write_all(answer.body.as_bytes())?;
    }
    stream.flush()?;
    let _ = stream.shutdown(Shutdown::Write);
    Ok(())
}

/// Whether `head` holds a whole request head (ended by an empty line).
fn head_end(head: &[u8]) -> bool {
    head.windows(4).any(|w| w == b"\r\n\r\n") || head.windows(2).any(|w| w == b"\n\n")
}

struct Answer {
    status: &'static str,
    content_type: &'static str,
    body: String,
}

impl Answer {
    fn text(status: &'static str, body: &str) -> Answer {
        Answer {
            status,
            content_type: "text/plain; charset=utf-8",
            body: body.to_string(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use prometheus_client::metrics::counter::Counter;

    fn get(addr: SocketAddr, request: &str) -> String {
        let mut s = TcpStream::connect(addr).unwrap();
        s.write_all(request.as_bytes()).unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).unwrap();
        out
    }

    #[test]
    fn serves_metrics_and_refuses_the_rest() {
        let mut registry = Registry::with_prefix("ferry");
        let c = Counter::<u64>::default();
        registry.register("things", "Things", c.clone());
        c.inc_by(3);
        let refreshed = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let r = Arc::clone(&refreshed);
        let server = MetricsServer::start(
            "127.0.0.1:0".parse().unwrap(),
            registry,
            Box::new(move || {
                r.fetch_add(1, Ordering::Relaxed);
            }),
        )
        .unwrap();
        let addr = server.local_addr();
        let ok = get(addr, "GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n");
        assert!(ok.starts_with("HTTP/1.1 200 OK\r\n"), "{ok}");
        assert!(ok.contains(CONTENT_TYPE), "{ok}");
        assert!(ok.contains("\r\n\r\n# HELP ferry_things Things.\n"), "{ok}");
        assert!(ok.contains("\nferry_things_total 3\n"), "{ok}");
        assert!(ok.ends_with("# EOF\n"), "{ok}");
        assert_eq!(refreshed.load(Ordering::Relaxed), 1);
        let head = get(addr, "HEAD /metrics?x=1 HTTP/1.0\r\n\r\n");
        assert!(head.starts_with("HTTP/1.1 200 OK\r\n") && head.ends_with("\r\n\r\n"));
        assert!(get(addr, "GET / HTTP/1.1\r\n\r\n").starts_with("HTTP/1.1 404"));
        let post = get(addr, "POST /metrics HTTP/1.1\r\n\r\n");
        assert!(post.starts_with("HTTP/1.1 405") && post.contains("Allow: GET, HEAD"));
        // Exactly the bound, without its end: all of it is read, then refused.
        let mut huge = format!(
            "GET /metrics HTTP/1.1\r\nX: {}",
            "a".repeat(MAX_REQUEST_BYTES)
        );
        huge.truncate(MAX_REQUEST_BYTES);
        assert!(get(addr, &huge).starts_with("HTTP/1.1 400"));
        drop(server);
        assert!(
            TcpStream::connect(addr).is_err(),
            "still listening after drop"
        );
    }
}
