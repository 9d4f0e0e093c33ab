//! Limits of one session that must never refuse a legitimate source: a seeded compare
//! whose difference list is as long as a disk can make it, and session slots that
//! unauthenticated peers cannot hold.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use crate::common::*;
use dataplane::protocol::{FrameKind, Hello, FRAME_MAGIC, PROTOCOL_VERSION_MAX};
use dataplane::writer::HANDSHAKE_DEADLINE;
use zerocopy::IntoBytes;

/// A seeded sync where every other 4 KiB block of a 32 MiB disk differs: 4,096
/// separate runs, the most a disk of 8,192 blocks can have, which the target sends as
/// one full DiffRuns frame. The source must take it, ship exactly those blocks, and
/// leave the replica equal to the source.
#[test]
fn seeded_sync_takes_a_difference_in_every_other_block() {
    const SIZE: u64 = 32 << 20;
    const BS: u64 = 4096;
    let seed = test_seed("seeded_every_other_block");
    let mut rng = Rng::new(seed);
    let dir = scratch_dir();
    let disk = PairDisk::new(dir.path(), "d1");
    let mut content = vec![0u8; SIZE as usize];
    rng.fill(&mut content);
    std::fs::write(&disk.replica, &content).unwrap();
    std::fs::write(&disk.source, &content).unwrap();
    let source = open_rw(&disk.source);
    for block in (0..SIZE / BS).step_by(2) {
        flip_range(&source, block * BS, BS as usize, &mut rng);
    }
    drop(source);
    let pair = Pair::start(dir, vec![disk], "block_size_kib = 4\n", "");
    let report = pair.sync_ok(&["--mode", "seeded"]);
    assert_eq!(mode_of(&report, "d1"), "seeded", "{report}");
    assert_eq!(
        u64_field(&report, "blocks_sent"),
        SIZE / BS / 2,
        "exactly the differing blocks travel: {report}"
    );
    pair.assert_replicas_identical();
}

/// A connection that sends a valid Hello one byte at a time.
struct Trickler {
    stream: TcpStream,
    hello: Vec<u8>,
    sent: usize,
}

impl Trickler {
    fn connect(addr: &str) -> Trickler {
        let stream = TcpStream::connect(addr).unwrap();
        stream.set_nodelay(true).unwrap();
        let hello = Hello {
            version_min: 1.into(),
            version_max: PROTOCOL_VERSION_MAX.into(),
            flags: 0.into(),
            nonce: [7; 32],
        };
        // A well-formed frame: the target cannot tell it from a slow source until
        // the handshake deadline.
        let mut wire = Vec::new();
        dataplane::protocol::FrameWriter::new(&mut wire)
            .send(FrameKind::Hello, &[hello.as_bytes()])
            .unwrap();
        assert_eq!(&wire[..4], &FRAME_MAGIC.to_le_bytes());
        Trickler {
            stream,
            hello: wire,
            sent: 0,
        }
    }

    /// Sends the next byte of the Hello; false once the target has closed.
    fn trickle(&mut self) -> bool {
        if self.sent + 1 >= self.hello.len() {
            return !self.closed(); // never completes the frame
        }
        let ok = (&self.stream)
            .write_all(&self.hello[self.sent..self.sent + 1])
            .is_ok();
        self.sent += 1;
        ok && !self.closed()
    }

    /// Whether the target has closed (or reset) the connection.
    fn closed(&self) -> bool {
        self.stream.set_nonblocking(true).unwrap();
        let mut byte = [0u8; 64];
        let closed = match (&self.stream).read(&mut byte) {
            Ok(0) => true,
            Ok(_) => false, // an Error frame: the end of stream follows
            Err(e) => e.kind() != std::io::ErrorKind::WouldBlock,
        };
        self.stream.set_nonblocking(false).unwrap();
        closed
    }
}

/// Three peers that never finish their Hello (one byte a second) must not keep a real
/// source out, though they outnumber the target's session limit of two; and each is
/// dropped once the handshake deadline has passed.
#[test]
fn trickling_handshakes_hold_no_session_slot_and_are_dropped_at_the_deadline() {
    let seed = test_seed("trickling_handshakes");
    let mut rng = Rng::new(seed);
    let dir = scratch_dir();
    let disk = PairDisk::new(dir.path(), "d1");
    make_mixed_image(&disk.source, 4 << 20, &mut rng);
    let pair = Pair::start(dir, vec![disk], "", "max_sessions = 2\n");
    let mut tricklers: Vec<Trickler> = (0..3)
        .map(|_| Trickler::connect(&pair.target.addr()))
        .collect();
    let started = Instant::now();
    for t in &mut tricklers {
        assert!(t.trickle(), "the target accepts a connection");
    }
    // Give the target time to accept them (and, before the fix, to count them).
    std::thread::sleep(Duration::from_millis(300));
    let report = pair.sync_ok(&[]);
    assert_eq!(mode_of(&report, "d1"), "full", "{report}");
    pair.assert_replicas_identical();
    // The sync got in while the tricklers were still being waited for, not because
    // they had already been dropped.
    if started.elapsed() < HANDSHAKE_DEADLINE {
        for t in &mut tricklers {
            assert!(t.trickle(), "still inside the handshake deadline");
        }
    }
    // Then every trickler is dropped, however it keeps trickling.
    let deadline = started + HANDSHAKE_DEADLINE + Duration::from_secs(30);
    for t in &mut tricklers {
        while t.trickle() {
            assert!(
                Instant::now() < deadline,
                "a connection trickling its Hello was still open {:?} after it started (handshake deadline {HANDSHAKE_DEADLINE:?})\n{}",
                started.elapsed(),
                pair.target.stderr()
            );
            std::thread::sleep(Duration::from_secs(1));
        }
    }
    assert!(
        started.elapsed() + Duration::from_millis(500) >= HANDSHAKE_DEADLINE,
        "dropped after {:?}, before the deadline of {HANDSHAKE_DEADLINE:?}",
        started.elapsed()
    );
    let log = pair.target.stderr();
    assert!(log.contains("handshake"), "the target logs why: {log}");
}

/// Pre-authentication connections have their own bound: past it, new ones are closed
/// at once, and a real source still gets in once they are gone.
#[test]
fn pending_handshakes_are_bounded() {
    let seed = test_seed("pending_handshakes_bounded");
    let mut rng = Rng::new(seed);
    let dir = scratch_dir();
    let disk = PairDisk::new(dir.path(), "d1");
    make_mixed_image(&disk.source, 1 << 20, &mut rng);
    let pair = Pair::start(dir, vec![disk], "", "");
    let bound = dataplane::writer::MAX_PENDING_HANDSHAKES;
    let idle: Vec<TcpStream> = (0..bound + 8)
        .map(|_| TcpStream::connect(pair.target.addr()).unwrap())
        .collect();
    let closed = |s: &TcpStream| {
        s.set_nonblocking(true).unwrap();
        let mut b = [0u8; 256];
        match (&*s).read(&mut b) {
            Ok(0) => true,
            Ok(_) => true, // an Error frame: the target is closing
            Err(e) => e.kind() != std::io::ErrorKind::WouldBlock,
        }
    };
    // The ones past the bound are closed without waiting for the deadline.
    let mut refused = 0;
    let until = Instant::now() + Duration::from_secs(20);
    while refused < 8 && Instant::now() < until {
        refused = idle.iter().filter(|s| closed(s)).count();
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(
        refused >= 8,
        "{refused} of {} connections past the bound of {bound} were closed",
        bound + 8
    );
    drop(idle);
    // The target frees a pending slot when its handshake thread reads the hang-up; on a
    // loaded machine the first sync can still find the bound full, and is refused at
    // once (nothing is written). Within a few seconds one must get in.
    let until = Instant::now() + Duration::from_secs(20);
    let run = loop {
        let run = pair.sync(&[]);
        if run.success() || Instant::now() > until {
            break run;
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    assert!(
        run.success(),
        "the target did not recover its handshake slots: {run:?}"
    );
    let report = run.json();
    assert_eq!(mode_of(&report, "d1"), "full", "{report}");
    pair.assert_replicas_identical();
}
