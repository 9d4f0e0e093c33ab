//! Runs inputs in a child process, so a crash that is not a panic (an abort, a stack
//! overflow, an allocation failure) or a hang is caught with the input that caused it.
//!
//! The child is this same binary started as `smoke --worker TARGET`. Requests on its
//! stdin are `len u32le` + input; each reply on its stdout is `status u8` (0 returned,
//! 1 panicked) + `len u32le` + the outcome label or the panic message. A panic is
//! caught in the child, which then goes on; anything that kills it is seen by the
//! parent as a closed pipe, with the child's last stderr lines as the message.

use std::io::{self, BufReader, Read, Write};
use std::panic::{self, AssertUnwindSafe};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::Duration;

/// Bytes of the child's stderr kept for a crash report.
const STDERR_TAIL_BYTES: usize = 4096;

/// What one input did.
pub enum Verdict {
    /// The harness returned this label.
    Returned(String),
    /// The harness panicked: the panic message with its location.
    Panicked(String),
    /// The child died: its exit status and last stderr output.
    Died(String),
    /// No answer within the timeout; the child was killed.
    Hung,
}

pub struct Worker {
    target: String,
    child: Child,
    stdin: ChildStdin,
    replies: Receiver<Option<(u8, String)>>,
    stderr_tail: Arc<Mutex<Vec<u8>>>,
}

impl Worker {
    pub fn spawn(target: &str) -> io::Result<Worker> {
        let exe = std::env::current_exe()?;
        let mut child = Command::new(exe)
            .args(["--worker", target])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()?;
        let stdin = child.stdin.take().expect("piped");
        let stdout = child.stdout.take().expect("piped");
        let mut stderr = child.stderr.take().expect("piped");
        let (tx, replies) = mpsc::channel();
        thread::spawn(move || {
            let mut stdout = BufReader::new(stdout);
            loop {
                let reply = read_reply(&mut stdout);
                let closed = reply.is_none();
                if tx.send(reply).is_err() || closed {
                    return;
                }
            }
        });
        let stderr_tail = Arc::new(Mutex::new(Vec::new()));
        let tail = Arc::clone(&stderr_tail);
        thread::spawn(move || {
            let mut buf = [0u8; 1024];
            while let Ok(n) = stderr.read(&mut buf) {
                if n == 0 {
                    return;
                }
                let mut tail = tail.lock().unwrap();
                tail.extend_from_slice(&buf[..n]);
                let excess = tail.len().saturating_sub(STDERR_TAIL_BYTES);
                tail.drain(..excess);
            }
        });
        Ok(Worker {
            target: target.to_string(),
            child,
            stdin,
            replies,
            stderr_tail,
        })
    }

    /// Runs one input. After `Died` or `Hung` the worker has been restarted.
    pub fn run(&mut self, input: &[u8], timeout: Duration) -> io::Result<Verdict> {
        let sent = self
            .stdin
            .write_all(&(input.len() as u32).to_le_bytes())
            .and_then(|()| self.stdin.write_all(input))
            .and_then(|()| self.stdin.flush());
        let verdict = match sent.map(|()| self.replies.recv_timeout(timeout)) {
            Ok(Ok(Some((0, label)))) => return Ok(Verdict::Returned(label)),
            Ok(Ok(Some((_, message)))) => return Ok(Verdict::Panicked(message)),
            Ok(Err(RecvTimeoutError::Timeout)) => {
                // Our own child, by its handle.
                let _ = self.child.kill();
                let _ = self.child.wait();
                Verdict::Hung
            }
            // A closed pipe on either side: the child is gone.
            Ok(Ok(None)) | Ok(Err(RecvTimeoutError::Disconnected)) | Err(_) => {
                let status = self.child.wait()?;
                // Let the stderr thread take the last of the output.
                thread::sleep(Duration::from_millis(50));
                let tail = self.stderr_tail.lock().unwrap();
                Verdict::Died(format!(
                    "{status}: {}",
                    String::from_utf8_lossy(&tail).trim()
                ))
            }
        };
        *self = Worker::spawn(&self.target)?;
        Ok(verdict)
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        // Closing stdin makes the child exit on its own; kill it if it does not.
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn read_reply(r: &mut impl Read) -> Option<(u8, String)> {
    let mut head = [0u8; 5];
    r.read_exact(&mut head).ok()?;
    let len = u32::from_le_bytes(head[1..5].try_into().unwrap()) as usize;
    let mut text = vec![0u8; len];
    r.read_exact(&mut text).ok()?;
    Some((head[0], String::from_utf8_lossy(&text).into_owned()))
}

/// The child's side: serve inputs for `target` until stdin closes.
pub fn serve(target: &str) -> ! {
    let Some(target) = ferry_fuzz::all().into_iter().find(|t| t.name == target) else {
        eprintln!("smoke worker: no target {target:?}");
        std::process::exit(2);
    };
    let last_panic = Arc::new(Mutex::new(String::new()));
    let hook_slot = Arc::clone(&last_panic);
    panic::set_hook(Box::new(move |info| {
        *hook_slot.lock().unwrap_or_else(|e| e.into_inner()) = info.to_string();
    }));
    let mut stdin = io::stdin().lock();
    let mut stdout = io::stdout().lock();
    let mut input = Vec::new();
    loop {
        let mut len = [0u8; 4];
        if stdin.read_exact(&mut len).is_err() {
            std::process::exit(0);
        }
        input.resize(u32::from_le_bytes(len) as usize, 0);
        if stdin.read_exact(&mut input).is_err() {
            std::process::exit(0);
        }
        let (status, text) = match panic::catch_unwind(AssertUnwindSafe(|| (target.run)(&input))) {
            Ok(label) => (0u8, label),
            Err(_) => (
                1u8,
                last_panic.lock().unwrap_or_else(|e| e.into_inner()).clone(),
            ),
        };
        let reply = [
            &[status][..],
            &(text.len() as u32).to_le_bytes(),
            text.as_bytes(),
        ]
        .concat();
        if stdout
            .write_all(&reply)
            .and_then(|()| stdout.flush())
            .is_err()
        {
            std::process::exit(0);
        }
    }
}
