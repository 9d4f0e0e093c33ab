//! Hostile and broken input against a real `ferry target` process over TCP.
//!
//! Each test starts a target with two replicas already in sync, changes the sources,
//! then throws one kind of bad input at the target — from `ferry sync` with the wrong
//! key or from a hand-made client built on `dataplane::protocol`. Every case must get
//! a clear error naming the problem and write nothing to any replica (size, content
//! hash and the target's replica records are compared before and after); afterwards
//! the same target process must still serve a correct sync.

use std::io::Write;
use std::net::{Shutdown, TcpStream};
use std::path::PathBuf;
use std::time::Duration;

use crate::common::*;
use dataplane::protocol::zstream::StreamEncoder;
use dataplane::protocol::{
    auth, block_hash, BlockRecord, Challenge, Codec, Commit, DataHeader, DiskManifest, DiskRun,
    ErrorCode, FrameHeader, FrameKind, FrameReader, FrameWriter, Hello, ManifestBuilder, OpenDisk,
    OpenDiskReply, OpenHeader, ProtocolError, SyncMode, FRAME_MAGIC, MAX_FRAME_PAYLOAD,
    MAX_NAME_LEN, PAYLOAD_ALIGN, PROTOCOL_VERSION_MAX, PROTOCOL_VERSION_MIN, STREAM_START,
    TABLE_HASH_VERSION,
};
use xxhash_rust::xxh3::xxh3_64;
use zerocopy::{FromBytes, IntoBytes};

/// The raw client's replication block: small, so a whole data frame fits in the
/// target's 64 KiB receive buffer and the target never closes on unread bytes (which
/// would turn its Error frame into a connection reset).
const RAW_BLOCK: u64 = 4096;

/// Two disks in sync with their replicas, sources changed since.
struct Fixture {
    pair: Pair,
    /// Size and hash of each replica before the bad input.
    replicas: Vec<(PathBuf, Option<(u64, u128)>)>,
    /// The target's records before the bad input (its working directories, such as
    /// in-progress logs, are its own business).
    records: Vec<(PathBuf, Option<(u64, u128)>)>,
}

impl Fixture {
    fn new(test: &str) -> Fixture {
        let mut rng = Rng::new(test_seed(test));
        let dir = scratch_dir();
        let d0 = PairDisk::new(dir.path(), "d0");
        let d1 = PairDisk::new(dir.path(), "d1");
        make_mixed_image(&d0.source, 4 << 20, &mut rng);
        make_mixed_image(&d1.source, (2 << 20) + 512, &mut rng);
        let pair = Pair::start(dir, vec![d0.clone(), d1.clone()], "", "");
        pair.sync_ok(&[]);
        pair.assert_replicas_identical();
        for d in [&d0, &d1] {
            let f = open_rw(&d.source);
            flip_range(&f, 100_000, 50_000, &mut rng);
        }
        let replicas = [&d0, &d1]
            .map(|d| (d.replica.clone(), fingerprint(&d.replica)))
            .into();
        let records = target_state_fingerprints(&pair.target_state);
        Fixture {
            pair,
            replicas,
            records,
        }
    }

    fn disk_size(&self, i: usize) -> u64 {
        size_of(&self.pair.disks[i].source)
    }

    /// Nothing the target writes changed: replicas and its records.
    fn assert_nothing_written(&self, case: &str) {
        for (path, before) in &self.replicas {
            assert_eq!(
                &fingerprint(path),
                before,
                "{case}: {} was modified",
                path.display()
            );
        }
        assert_eq!(
            target_state_fingerprints(&self.pair.target_state),
            self.records,
            "{case}: the target's records changed"
        );
    }

    /// The target survived and still brings both replicas up to date.
    fn assert_target_still_serves(mut self) {
        self.pair.target.assert_alive();
        let report = self.pair.sync_ok(&[]);
        assert!(u64_field(&report, "blocks_sent") >= 2, "{report}");
        self.pair.assert_replicas_identical();
        self.pair.target.assert_alive();
    }
}

// ---------------------------------------------------------------------------------
// A hand-made client.

struct Raw {
    reader: FrameReader<TcpStream>,
    writer: FrameWriter<TcpStream>,
    stream: TcpStream,
    /// Sequence number of the next frame we send (FrameWriter counts its own; frames
    /// built by hand are numbered from this).
    next_seq: u32,
    /// The protocol version agreed at the handshake (before it: the lowest).
    version: u16,
    /// Per opened disk, the manifest of the Data and Zero frames sent through `send`,
    /// as a real source would put it in its Commit.
    manifests: Vec<ManifestBuilder>,
}

impl Raw {
    fn connect(fx: &Fixture) -> Raw {
        let stream = TcpStream::connect(fx.pair.target.addr()).unwrap();
        stream
            .set_read_timeout(Some(Duration::from_secs(30)))
            .unwrap();
        stream.set_nodelay(true).unwrap();
        Raw {
            reader: FrameReader::new(stream.try_clone().unwrap()),
            writer: FrameWriter::new(stream.try_clone().unwrap()),
            stream,
            next_seq: 0,
            version: PROTOCOL_VERSION_MIN,
            manifests: Vec::new(),
        }
    }

    fn authenticated(fx: &Fixture) -> Raw {
        Raw::authenticated_up_to(fx, PROTOCOL_VERSION_MAX)
    }

    /// A client that speaks protocol versions up to `version_max`, as an older source.
    fn authenticated_up_to(fx: &Fixture, version_max: u16) -> Raw {
        let mut raw = Raw::connect(fx);
        raw.version = auth::client_handshake_up_to(
            &mut raw.reader,
            &mut raw.writer,
            &fx.pair.psk,
            version_max,
        )
        .expect("handshake with the right key");
        assert_eq!(raw.version, version_max);
        raw.next_seq = 2; // Hello, Auth
        raw
    }

    /// The next frame, built by hand for the version agreed.
    fn frame_bytes(&self, kind: FrameKind, payload: &[u8]) -> Vec<u8> {
        frame_bytes(self.version, kind as u8, self.next_seq, payload)
    }

    fn send(&mut self, kind: FrameKind, parts: &[&[u8]]) {
        self.note(kind, &parts.concat());
        self.writer.send(kind, parts).expect("send");
        self.next_seq += 1;
    }

    /// Adds a Data or Zero frame about to be sent to its disk's manifest.
    fn note(&mut self, kind: FrameKind, payload: &[u8]) {
        match kind {
            FrameKind::Data => {
                let Ok((header, rest)) = DataHeader::ref_from_prefix(payload) else {
                    return;
                };
                let count = header.record_count.get() as usize;
                let len = count * std::mem::size_of::<BlockRecord>();
                let (Some(m), Some(table)) = (
                    self.manifests.get_mut(header.disk.get() as usize),
                    rest.get(..len),
                ) else {
                    return;
                };
                for r in <[BlockRecord]>::ref_from_bytes(table).unwrap() {
                    m.record(r);
                }
            }
            FrameKind::Zero => {
                if let Ok(run) = DiskRun::read_from_bytes(payload) {
                    if let Some(m) = self.manifests.get_mut(run.disk.get() as usize) {
                        m.zero_run(run.start.get(), run.count.get());
                    }
                }
            }
            _ => {}
        }
    }

    /// Sends a Commit for epoch 1000 carrying `manifests`.
    fn send_commit_with(&mut self, manifests: &[DiskManifest]) -> Result<(), ProtocolError> {
        let header = Commit {
            epoch: 1000.into(),
            disk_count: (manifests.len() as u32).into(),
            reserved: 0.into(),
        };
        self.next_seq += 1;
        self.writer.send(
            FrameKind::Commit,
            &[header.as_bytes(), manifests.as_bytes()],
        )
    }

    /// Asks for a commit after a frame the target should have refused, so that a
    /// target that wrongly accepted it answers (Committed) instead of waiting; the
    /// manifests are those of what was sent, as a real source would send them. The
    /// target may already have closed, so a failed send is fine.
    fn send_commit(&mut self) {
        let manifests: Vec<DiskManifest> =
            self.manifests.iter().map(ManifestBuilder::finish).collect();
        let _ = self.send_commit_with(&manifests);
    }

    /// Opens `disks` (name, mode, disk size) with RAW_BLOCK blocks.
    fn open(
        &mut self,
        disks: &[(&str, SyncMode, u64)],
    ) -> Result<Vec<OpenDiskReply>, ProtocolError> {
        let header = OpenHeader {
            epoch: 1000.into(),
            disk_count: (disks.len() as u32).into(),
            max_batch_bytes: 0.into(),
        };
        let entries: Vec<OpenDisk> = disks
            .iter()
            .map(|&(name, mode, size)| open_disk(name, mode, size))
            .collect();
        self.send(FrameKind::Open, &[header.as_bytes(), entries.as_bytes()]);
        self.manifests = vec![ManifestBuilder::new(); disks.len()];
        let mut buf = vec![0u8; 64 << 10];
        let payload = self.reader.expect(FrameKind::OpenOk, &mut buf)?;
        Ok(<[OpenDiskReply]>::ref_from_bytes(payload)
            .expect("OpenOk layout")
            .to_vec())
    }

    /// Writes bytes built by hand straight to the socket.
    fn send_raw(&mut self, bytes: &[u8]) {
        (&self.stream)
            .write_all(bytes)
            .expect("write to the target");
    }

    /// Reads until the target's Error frame and returns it.
    fn expect_error(&mut self, case: &str) -> (ErrorCode, String) {
        let mut buf = vec![0u8; 64 << 10];
        loop {
            match self.reader.read_frame(&mut buf) {
                Err(ProtocolError::Remote { code, message }) => return (code, message),
                Ok(Some((FrameKind::DiffRuns | FrameKind::DiffDone, _))) => continue,
                Ok(Some((kind, _))) => {
                    panic!("{case}: the target answered {kind:?} instead of an Error frame")
                }
                Ok(None) => {
                    panic!("{case}: the target closed the connection without an Error frame")
                }
                Err(e) => panic!("{case}: no Error frame from the target: {e}"),
            }
        }
    }
}

fn open_disk(name: &str, mode: SyncMode, size: u64) -> OpenDisk {
    let mut n = [0u8; MAX_NAME_LEN];
    n[..name.len()].copy_from_slice(name.as_bytes());
    OpenDisk {
        name: n,
        name_len: name.len() as u8,
        mode: mode as u8,
        flags: 0,
        reserved: 0,
        block_size: (RAW_BLOCK as u32).into(),
        disk_size: size.into(),
        generation: [0x42; 16],
        base_epoch: 0.into(),
    }
}

/// A frame built by hand for protocol `version`: header with both checksums, then the
/// payload.
fn frame_bytes(version: u16, kind: u8, seq: u32, payload: &[u8]) -> Vec<u8> {
    let hashed = &payload[..hashed_len(version, kind, payload)];
    let mut header = FrameHeader {
        magic: FRAME_MAGIC.into(),
        kind,
        flags: 0,
        reserved: 0.into(),
        payload_len: (payload.len() as u32).into(),
        seq: seq.into(),
        payload_hash: xxh3_64(hashed).into(),
        header_hash: 0.into(),
    };
    header.header_hash = xxh3_64(&header.as_bytes()[..24]).into();
    let mut out = header.as_bytes().to_vec();
    out.extend_from_slice(payload);
    out
}

/// How many leading bytes of `payload` the payload hash of a frame of `kind` covers
/// under `version` (docs/protocol.md, "Frames"): all of them, but from version 4 only
/// a Data payload's header, records and the padding after them to the next 4096-byte
/// boundary (at most the whole payload).
fn hashed_len(version: u16, kind: u8, payload: &[u8]) -> usize {
    if kind != FrameKind::Data as u8 || version < TABLE_HASH_VERSION || payload.len() < 8 {
        return payload.len();
    }
    let records = u32::from_le_bytes(payload[4..8].try_into().unwrap()) as usize;
    (8 + 48 * records).next_multiple_of(4096).min(payload.len())
}

/// The record of a block of `length` bytes at `offset`, stored as `stored_len` bytes at
/// `payload_offset` with `codec`, claiming `hash`; outside any compression stream.
fn block_record(
    (offset, length): (u64, usize),
    (stored_len, payload_offset): (usize, usize),
    codec: Codec,
    hash: [u8; 16],
) -> BlockRecord {
    BlockRecord {
        offset: offset.into(),
        length: (length as u32).into(),
        stored_len: (stored_len as u32).into(),
        payload_offset: (payload_offset as u32).into(),
        codec: codec as u8,
        stream: 0,
        stream_flags: 0,
        reserved: 0,
        hash,
        reserved2: 0.into(),
    }
}

/// A Data payload of raw blocks: `(offset, bytes, hash)` per record, payloads aligned.
fn data_payload(disk: u32, blocks: &[(u64, Vec<u8>, [u8; 16])]) -> Vec<u8> {
    let table_end =
        std::mem::size_of::<DataHeader>() + blocks.len() * std::mem::size_of::<BlockRecord>();
    let mut at = table_end.next_multiple_of(PAYLOAD_ALIGN);
    let mut records = Vec::new();
    for (offset, data, hash) in blocks {
        records.push(block_record(
            (*offset, data.len()),
            (data.len(), at),
            Codec::Raw,
            *hash,
        ));
        at += data.len().next_multiple_of(PAYLOAD_ALIGN);
    }
    let header = DataHeader {
        disk: disk.into(),
        record_count: (blocks.len() as u32).into(),
    };
    let mut out = header.as_bytes().to_vec();
    out.extend_from_slice(records.as_bytes());
    for (_, data, _) in blocks {
        out.resize(out.len().next_multiple_of(PAYLOAD_ALIGN), 0);
        out.extend_from_slice(data);
    }
    out
}

/// One valid raw block of recognisable content at `offset`.
fn block_at(offset: u64, fill: u8) -> (u64, Vec<u8>, [u8; 16]) {
    let data = vec![fill; RAW_BLOCK as usize];
    let hash = block_hash(&data);
    (offset, data, hash)
}

fn assert_error(case: &str, got: (ErrorCode, String), code: ErrorCode, words: &[&str]) {
    let (c, message) = got;
    assert_eq!(c, code, "{case}: error code for {message:?}");
    let lower = message.to_lowercase();
    for w in words {
        assert!(
            lower.contains(&w.to_lowercase()),
            "{case}: the error {message:?} should mention {w:?}"
        );
    }
}

// ---------------------------------------------------------------------------------
// Authentication.

#[test]
fn wrong_key_via_ferry_sync_is_refused() {
    let fx = Fixture::new("wrong_key_via_ferry_sync_is_refused");
    let other_key = fx.pair.path().join("other.key");
    keygen(&other_key);
    let text = std::fs::read_to_string(&fx.pair.source_config).unwrap();
    let config = fx.pair.path().join("wrong-key.toml");
    std::fs::write(
        &config,
        text.replace(&toml_path(&fx.pair.key), &toml_path(&other_key)),
    )
    .unwrap();
    let run = sync(&config, &[]);
    assert!(
        !run.success(),
        "a sync with the wrong key succeeded: {run:?}"
    );
    let err = run.stderr.to_lowercase();
    assert!(
        err.contains("key"),
        "the error should mention the key: {}",
        run.stderr
    );
    assert!(
        run.stdout.trim().is_empty(),
        "no report for a failed sync: {}",
        run.stdout
    );
    fx.assert_nothing_written("wrong key (ferry sync)");
    fx.assert_target_still_serves();
}

#[test]
fn wrong_key_via_raw_client_is_refused() {
    let fx = Fixture::new("wrong_key_via_raw_client_is_refused");

    // The library client notices first: the target cannot prove our (wrong) key.
    let mut raw = Raw::connect(&fx);
    let mut wrong = fx.pair.psk;
    wrong[7] ^= 1;
    let err = auth::client_handshake(&mut raw.reader, &mut raw.writer, &wrong).unwrap_err();
    assert!(matches!(err, ProtocolError::AuthFailed { .. }), "{err}");
    assert!(err.to_string().contains("key"), "{err}");

    // A client that ignores the target's proof and answers with a made-up one.
    let mut raw = Raw::connect(&fx);
    let hello = Hello {
        version_min: PROTOCOL_VERSION_MIN.into(),
        version_max: PROTOCOL_VERSION_MAX.into(),
        flags: 0.into(),
        nonce: [9; 32],
    };
    raw.send(FrameKind::Hello, &[hello.as_bytes()]);
    let mut buf = vec![0u8; 4096];
    let payload = raw.reader.expect(FrameKind::Challenge, &mut buf).unwrap();
    Challenge::read_from_bytes(payload).expect("challenge layout");
    raw.send(FrameKind::Auth, &[&[0x77; 32]]);
    assert_error(
        "forged proof",
        raw.expect_error("forged proof"),
        ErrorCode::Auth,
        &["key"],
    );

    // A client that sends data without even a Hello.
    let mut raw = Raw::connect(&fx);
    let payload = data_payload(0, &[block_at(0, 0xAB)]);
    raw.send_raw(&frame_bytes(
        raw.version,
        FrameKind::Data as u8,
        0,
        &payload,
    ));
    let (code, message) = raw.expect_error("data before hello");
    assert_eq!(code, ErrorCode::Protocol, "{message}");

    fx.assert_nothing_written("wrong key (raw)");
    fx.assert_target_still_serves();
}

/// After the Challenge the target must get an Auth frame; anything else (a skipped
/// authentication, an Auth of the wrong length) ends the session with an Error frame
/// that says why (docs/protocol.md: "Any failure ends the session with an Error frame
/// (when the peer can still be told)").
#[test]
fn skipped_or_malformed_auth_gets_an_error_frame() {
    let fx = Fixture::new("skipped_or_malformed_auth_gets_an_error_frame");
    let hello = Hello {
        version_min: PROTOCOL_VERSION_MIN.into(),
        version_max: PROTOCOL_VERSION_MAX.into(),
        flags: 0.into(),
        nonce: [9; 32],
    };
    let header = OpenHeader {
        epoch: 1.into(),
        disk_count: 1.into(),
        max_batch_bytes: 0.into(),
    };
    let entry = open_disk("d0", SyncMode::Full, fx.disk_size(0));
    let mut buf = vec![0u8; 4096];
    let cases: [(&str, FrameKind, Vec<u8>); 2] = [
        (
            "open instead of auth",
            FrameKind::Open,
            [header.as_bytes(), entry.as_bytes()].concat(),
        ),
        ("auth of the wrong length", FrameKind::Auth, vec![0x77; 31]),
    ];
    for (case, kind, payload) in cases {
        let mut raw = Raw::connect(&fx);
        raw.send(FrameKind::Hello, &[hello.as_bytes()]);
        raw.reader.expect(FrameKind::Challenge, &mut buf).unwrap();
        raw.send(kind, &[&payload]);
        let (code, message) = raw.expect_error(case);
        assert!(
            matches!(code, ErrorCode::Auth | ErrorCode::Protocol),
            "{case}: {code:?}: {message}"
        );
        assert!(
            message.to_lowercase().contains("auth"),
            "{case}: the error should mention auth: {message}"
        );
    }
    fx.assert_nothing_written("skipped auth");
    fx.assert_target_still_serves();
}

// ---------------------------------------------------------------------------------
// Broken frames.

#[test]
fn truncated_frame_is_refused() {
    let fx = Fixture::new("truncated_frame_is_refused");
    let size = fx.disk_size(0);
    let payload = data_payload(0, &[block_at(0, 0xAB), block_at(RAW_BLOCK, 0xCD)]);

    // Half a frame, then the source stops sending (but still listens).
    let mut raw = Raw::authenticated(&fx);
    raw.open(&[("d0", SyncMode::Full, size)]).unwrap();
    let bytes = raw.frame_bytes(FrameKind::Data, &payload);
    raw.send_raw(&bytes[..bytes.len() / 2]);
    raw.stream.shutdown(Shutdown::Write).unwrap();
    assert_error(
        "truncated payload",
        raw.expect_error("truncated payload"),
        ErrorCode::Protocol,
        &["truncated"],
    );

    // Half a header.
    let mut raw = Raw::authenticated(&fx);
    raw.open(&[("d0", SyncMode::Full, size)]).unwrap();
    raw.send_raw(&bytes[..20]);
    raw.stream.shutdown(Shutdown::Write).unwrap();
    assert_error(
        "truncated header",
        raw.expect_error("truncated header"),
        ErrorCode::Protocol,
        &["truncated"],
    );

    // Half a frame, then the connection is gone altogether.
    let mut raw = Raw::authenticated(&fx);
    raw.open(&[("d0", SyncMode::Full, size)]).unwrap();
    raw.send_raw(&bytes[..bytes.len() - 1]);
    drop(raw);
    std::thread::sleep(Duration::from_millis(200));

    fx.assert_nothing_written("truncated frame");
    fx.assert_target_still_serves();
}

/// Every byte of a Data frame is covered by a checksum: before version 4 the frame's
/// payload checksum covers all of them; from version 4 it covers the record table, and
/// each block's bytes (raw or compressed) are covered by its record's hash. Whichever
/// catches a damaged byte, the frame is refused and nothing is written.
#[test]
fn corrupted_frame_is_refused() {
    let fx = Fixture::new("corrupted_frame_is_refused");
    let raw_frame = data_payload(0, &[block_at(0, 0xAB)]);
    let zstd_frame = compressed_payload(0);
    // Where the flipped byte is, and what the version-4 target says about it.
    let offset_byte = 8 + 1; // the second byte of the first record's offset
    let cases: [(&str, &[u8], usize, &[&str]); 4] = [
        (
            "raw block",
            &raw_frame,
            raw_frame.len() - 100,
            &["offset 0", "hash check"],
        ),
        (
            "compressed block",
            &zstd_frame,
            zstd_frame.len() / 2 + PAYLOAD_ALIGN / 2,
            &["offset 0", "hash check"],
        ),
        (
            "record offset, raw frame",
            &raw_frame,
            offset_byte,
            &["record table checksum"],
        ),
        (
            "record offset, compressed frame",
            &zstd_frame,
            offset_byte,
            &["record table checksum"],
        ),
    ];
    for version in [TABLE_HASH_VERSION - 1, TABLE_HASH_VERSION] {
        for (what, payload, at, v4_words) in cases {
            let case = format!("version {version}: {what} corrupted");
            assert!(at < payload.len(), "{case}");
            let mut raw = Raw::authenticated_up_to(&fx, version);
            raw.open(&[("d0", SyncMode::Full, fx.disk_size(0))])
                .unwrap();
            let mut bytes = raw.frame_bytes(FrameKind::Data, payload);
            bytes[32 + at] ^= 0x10;
            raw.send_raw(&bytes);
            let words = if version < TABLE_HASH_VERSION {
                &["payload checksum"][..]
            } else {
                v4_words
            };
            assert_error(&case, raw.expect_error(&case), ErrorCode::Integrity, words);
            fx.assert_nothing_written(&case);
        }
    }
    // Undamaged, the same frames pass at either version: the bad block hash of the
    // frame after them is what is refused.
    for version in [TABLE_HASH_VERSION - 1, TABLE_HASH_VERSION] {
        for (what, payload) in [("raw", &raw_frame), ("compressed", &zstd_frame)] {
            let case = format!("version {version}: a good {what} frame, then a bad block");
            let mut raw = Raw::authenticated_up_to(&fx, version);
            raw.open(&[("d0", SyncMode::Full, fx.disk_size(0))])
                .unwrap();
            raw.send(FrameKind::Data, &[payload]);
            let (offset, data, mut hash) = block_at(RAW_BLOCK, 0xCD);
            hash[0] ^= 1;
            raw.send(
                FrameKind::Data,
                &[&data_payload(0, &[(offset, data, hash)])],
            );
            let words = [format!("offset {RAW_BLOCK} "), "hash check".to_string()];
            let words: Vec<&str> = words.iter().map(String::as_str).collect();
            assert_error(&case, raw.expect_error(&case), ErrorCode::Integrity, &words);
            fx.assert_nothing_written(&case);
        }
    }

    // A header byte flipped (payload length).
    let mut raw = Raw::authenticated(&fx);
    raw.open(&[("d0", SyncMode::Full, fx.disk_size(0))])
        .unwrap();
    let mut bytes = raw.frame_bytes(FrameKind::Data, &raw_frame);
    bytes[9] ^= 0x01;
    raw.send_raw(&bytes[..32]);
    assert_error(
        "header corrupted",
        raw.expect_error("header corrupted"),
        ErrorCode::Integrity,
        &["checksum"],
    );

    fx.assert_nothing_written("corrupted frame");
    fx.assert_target_still_serves();
}

/// A Data payload of one compressed block at `offset`, laid out as the source lays out
/// a compressed frame: header, record, padding to PAYLOAD_ALIGN, the zstd frame.
fn compressed_payload(offset: u64) -> Vec<u8> {
    // Text-like content: compressible, so the block travels as a zstd frame, whose
    // literals are entropy coded (a flipped byte changes what it decompresses to).
    let mut rng = Rng::new(7);
    let content: Vec<u8> = (0..RAW_BLOCK)
        .map(|_| b"ferry replicates blocks "[rng.below(24) as usize])
        .collect();
    let compressed = zstd::bulk::compress(&content, 1).unwrap();
    assert!(compressed.len() < content.len() / 2);
    let record = block_record(
        (offset, RAW_BLOCK as usize),
        (compressed.len(), PAYLOAD_ALIGN),
        Codec::Zstd,
        block_hash(&content),
    );
    let header = DataHeader {
        disk: 0.into(),
        record_count: 1.into(),
    };
    let mut out = [header.as_bytes(), record.as_bytes()].concat();
    out.resize(PAYLOAD_ALIGN, 0);
    out.extend_from_slice(&compressed);
    out
}

#[test]
fn oversized_length_is_refused_before_the_payload() {
    let fx = Fixture::new("oversized_length_is_refused_before_the_payload");
    let size = fx.disk_size(0);
    for len in [MAX_FRAME_PAYLOAD as u32 + 1, u32::MAX] {
        let case = format!("payload_len {len}");
        let mut raw = Raw::authenticated(&fx);
        raw.open(&[("d0", SyncMode::Full, size)]).unwrap();
        let mut header = FrameHeader {
            magic: FRAME_MAGIC.into(),
            kind: FrameKind::Data as u8,
            flags: 0,
            reserved: 0.into(),
            payload_len: len.into(),
            seq: raw.next_seq.into(),
            payload_hash: 0.into(),
            header_hash: 0.into(),
        };
        header.header_hash = xxh3_64(&header.as_bytes()[..24]).into();
        // Only the header: the target must refuse without waiting for the payload.
        raw.send_raw(header.as_bytes());
        assert_error(
            &case,
            raw.expect_error(&case),
            ErrorCode::Protocol,
            &[&len.to_string(), &MAX_FRAME_PAYLOAD.to_string()],
        );
    }
    fx.assert_nothing_written("oversized length");
    fx.assert_target_still_serves();
}

#[test]
fn wrong_sequence_number_is_refused() {
    let fx = Fixture::new("wrong_sequence_number_is_refused");
    let size = fx.disk_size(0);
    let payload = data_payload(0, &[block_at(0, 0xAB)]);
    for (case, delta) in [("skipped", 1i64), ("replayed", -1), ("far", 1000)] {
        let mut raw = Raw::authenticated(&fx);
        raw.open(&[("d0", SyncMode::Full, size)]).unwrap();
        let seq = (raw.next_seq as i64 + delta) as u32;
        raw.send_raw(&frame_bytes(
            raw.version,
            FrameKind::Data as u8,
            seq,
            &payload,
        ));
        assert_error(
            case,
            raw.expect_error(case),
            ErrorCode::Protocol,
            &["sequence"],
        );
    }
    // An unknown frame kind with valid checksums.
    let mut raw = Raw::authenticated(&fx);
    raw.open(&[("d0", SyncMode::Full, size)]).unwrap();
    raw.send_raw(&frame_bytes(raw.version, 99, raw.next_seq, b"hello"));
    assert_error(
        "unknown kind",
        raw.expect_error("unknown kind"),
        ErrorCode::Protocol,
        &["kind", "99"],
    );
    fx.assert_nothing_written("wrong sequence");
    fx.assert_target_still_serves();
}

// ---------------------------------------------------------------------------------
// Well-formed frames with bad content.

#[test]
fn record_past_the_end_of_the_disk_is_refused() {
    let fx = Fixture::new("record_past_the_end_of_the_disk_is_refused");
    let size = fx.disk_size(0);
    let d1_size = fx.disk_size(1);
    let cases: Vec<(&str, u32, u64)> = vec![
        ("at the end", 0, size),
        ("one block past", 0, size + RAW_BLOCK),
        ("far past", 0, 1 << 50),
        ("u64 wrap", 0, !(RAW_BLOCK - 1)),
        (
            "past the second disk's end",
            1,
            d1_size.next_multiple_of(RAW_BLOCK),
        ),
    ];
    for (case, disk, offset) in cases {
        let mut raw = Raw::authenticated(&fx);
        raw.open(&[
            ("d0", SyncMode::Full, size),
            ("d1", SyncMode::Full, d1_size),
        ])
        .unwrap();
        // A valid block first in the same frame: the whole frame must be refused.
        let payload = data_payload(disk, &[block_at(0, 0x11), block_at(offset, 0xAB)]);
        raw.send(FrameKind::Data, &[&payload]);
        raw.send_commit();
        assert_error(
            case,
            raw.expect_error(case),
            ErrorCode::OutOfRange,
            &[&offset.to_string()],
        );
    }
    // A record shorter or longer than its block, and an unaligned offset.
    for (case, offset, len) in [
        ("short block", 0u64, 512usize),
        ("unaligned", 512, RAW_BLOCK as usize),
    ] {
        let mut raw = Raw::authenticated(&fx);
        raw.open(&[("d0", SyncMode::Full, size)]).unwrap();
        let data = vec![0xAB; len];
        let hash = block_hash(&data);
        let payload = data_payload(0, &[(offset, data, hash)]);
        raw.send(FrameKind::Data, &[&payload]);
        assert_error(case, raw.expect_error(case), ErrorCode::OutOfRange, &[]);
    }
    // A Zero range past the end.
    let mut raw = Raw::authenticated(&fx);
    raw.open(&[("d0", SyncMode::Full, size)]).unwrap();
    let run = DiskRun {
        disk: 0.into(),
        reserved: 0.into(),
        start: 0.into(),
        count: (size + 1).into(),
    };
    raw.send(FrameKind::Zero, &[run.as_bytes()]);
    raw.send_commit();
    assert_error(
        "zero past the end",
        raw.expect_error("zero past the end"),
        ErrorCode::OutOfRange,
        &[],
    );
    fx.assert_nothing_written("record past the end");
    fx.assert_target_still_serves();
}

#[test]
fn block_hash_mismatch_is_refused() {
    let fx = Fixture::new("block_hash_mismatch_is_refused");
    let size = fx.disk_size(0);

    let mut raw = Raw::authenticated(&fx);
    raw.open(&[("d0", SyncMode::Full, size)]).unwrap();
    let (offset, data, mut hash) = block_at(RAW_BLOCK, 0xAB);
    hash[0] ^= 1;
    let payload = data_payload(0, &[block_at(0, 0x11), (offset, data, hash)]);
    raw.send(FrameKind::Data, &[&payload]);
    raw.send_commit();
    assert_error(
        "raw block",
        raw.expect_error("raw block"),
        ErrorCode::Integrity,
        &["hash"],
    );

    // A compressed block whose content does not match its hash, and one that inflates
    // past its block (a decompression bomb).
    for (case, content_len) in [("zstd block", RAW_BLOCK as usize), ("zstd bomb", 16 << 20)] {
        let mut raw = Raw::authenticated(&fx);
        raw.open(&[("d0", SyncMode::Full, size)]).unwrap();
        let content = vec![0x5Au8; content_len];
        let compressed = zstd::bulk::compress(&content, 1).unwrap();
        let claimed = vec![0x5Bu8; RAW_BLOCK as usize];
        let record = block_record(
            (0, RAW_BLOCK as usize),
            (compressed.len(), 56),
            Codec::Zstd,
            block_hash(&claimed),
        );
        let header = DataHeader {
            disk: 0.into(),
            record_count: 1.into(),
        };
        raw.send(
            FrameKind::Data,
            &[header.as_bytes(), record.as_bytes(), &compressed],
        );
        raw.send_commit();
        assert_error(
            case,
            raw.expect_error(case),
            ErrorCode::Integrity,
            &["hash"],
        );
    }
    fx.assert_nothing_written("hash mismatch");
    fx.assert_target_still_serves();
}

/// A bad stream chunk: what it is, the highest version the client offers, the chunk,
/// its stream and flags, and the error it must get.
type StreamCase<'a> = (&'a str, u16, &'a [u8], u8, u8, ErrorCode, &'a [&'a str]);

/// A chunk of a compression stream (protocol 4) that is out of its stream, damaged or
/// longer than its block, or sent in a session that predates streams, is refused and
/// nothing is written.
#[test]
fn stream_chunks_out_of_their_stream_are_refused() {
    let fx = Fixture::new("stream_chunks_out_of_their_stream_are_refused");
    let size = fx.disk_size(0);
    let block = vec![0x5Au8; RAW_BLOCK as usize];
    let mut encoder = StreamEncoder::new(0).unwrap();
    let mut chunk = vec![0u8; StreamEncoder::chunk_bound(block.len())];
    let (n, start) = encoder.chunk(1, &block, &mut chunk).unwrap();
    chunk.truncate(n);
    assert_eq!(start, STREAM_START);
    let bomb = zstd::bulk::compress(&vec![0x5Au8; 16 << 20], 1).unwrap();
    let cases: [StreamCase<'_>; 5] = [
        (
            "a continuation of a stream never started",
            PROTOCOL_VERSION_MAX,
            &chunk,
            0,
            0,
            ErrorCode::Protocol,
            &["stream 0", "not started"],
        ),
        (
            "stream 16",
            PROTOCOL_VERSION_MAX,
            &chunk,
            16,
            STREAM_START,
            ErrorCode::Protocol,
            &["no such stream"],
        ),
        (
            "unknown flags",
            PROTOCOL_VERSION_MAX,
            &chunk,
            0,
            2,
            ErrorCode::Protocol,
            &["unknown flags"],
        ),
        (
            "a chunk inflating past its block",
            PROTOCOL_VERSION_MAX,
            &bomb,
            0,
            STREAM_START,
            ErrorCode::Integrity,
            &["hash"],
        ),
        (
            "a stream chunk in a version-3 session",
            3,
            &chunk,
            0,
            STREAM_START,
            ErrorCode::Protocol,
            &["unknown codec 3"],
        ),
    ];
    for (case, version, payload, stream, flags, code, words) in cases {
        let mut raw = Raw::authenticated_up_to(&fx, version);
        raw.open(&[("d0", SyncMode::Full, size)]).unwrap();
        let record = BlockRecord {
            stream,
            stream_flags: flags,
            ..block_record(
                (0, RAW_BLOCK as usize),
                (payload.len(), 56),
                Codec::ZstdStream,
                block_hash(&block),
            )
        };
        let header = DataHeader {
            disk: 0.into(),
            record_count: 1.into(),
        };
        raw.send(
            FrameKind::Data,
            &[header.as_bytes(), record.as_bytes(), payload],
        );
        raw.send_commit();
        assert_error(case, raw.expect_error(case), code, words);
    }
    fx.assert_nothing_written("stream chunks");
    fx.assert_target_still_serves();
}

#[test]
fn unknown_disk_is_refused() {
    let fx = Fixture::new("unknown_disk_is_refused");
    let size = fx.disk_size(0);

    let mut raw = Raw::authenticated(&fx);
    let err = raw
        .open(&[
            ("d0", SyncMode::Full, size),
            ("not-configured", SyncMode::Full, size),
        ])
        .unwrap_err();
    match err {
        ProtocolError::Remote { code, message } => {
            assert_error(
                "unknown disk",
                (code, message),
                ErrorCode::UnknownDisk,
                &["not-configured"],
            );
        }
        e => panic!("unknown disk: {e}"),
    }
    assert!(!fx.pair.path().join("not-configured.replica").exists());

    // A path-like name must not reach the file system either.
    let mut raw = Raw::authenticated(&fx);
    let err = raw
        .open(&[("../d0.replica", SyncMode::Full, size)])
        .unwrap_err();
    assert!(
        matches!(
            err,
            ProtocolError::Remote {
                code: ErrorCode::UnknownDisk,
                ..
            }
        ),
        "{err}"
    );

    // A data frame for a disk index the session did not open.
    let mut raw = Raw::authenticated(&fx);
    raw.open(&[("d0", SyncMode::Full, size)]).unwrap();
    let payload = data_payload(1, &[block_at(0, 0xAB)]);
    raw.send(FrameKind::Data, &[&payload]);
    let (code, message) = raw.expect_error("disk index");
    assert!(
        matches!(
            code,
            ErrorCode::UnknownDisk | ErrorCode::OutOfRange | ErrorCode::Protocol
        ),
        "{code:?}: {message}"
    );
    assert!(message.contains('1'), "{message}");

    fx.assert_nothing_written("unknown disk");
    fx.assert_target_still_serves();
}

#[test]
fn malformed_open_is_refused() {
    let fx = Fixture::new("malformed_open_is_refused");
    let size = fx.disk_size(0);
    let ok = open_disk("d0", SyncMode::Full, size);
    let mut cases: Vec<(&str, Vec<OpenDisk>, u32)> = Vec::new();
    cases.push(("opened twice", vec![ok, ok], 2));
    let mut bad_block = ok;
    bad_block.block_size = 3000.into();
    cases.push(("block size", vec![bad_block], 1));
    let mut bad_mode = ok;
    bad_mode.mode = 9;
    cases.push(("mode", vec![bad_mode], 1));
    let mut long_name = ok;
    long_name.name_len = 200;
    cases.push(("name length", vec![long_name], 1));
    let mut zero = ok;
    zero.disk_size = 0.into();
    cases.push(("zero size", vec![zero], 1));
    cases.push(("count mismatch", vec![ok], 2));
    cases.push(("no disks", vec![], 0));
    let mut changed = ok;
    changed.mode = SyncMode::Changed as u8;
    changed.base_epoch = 12345.into();
    cases.push((
        "changed on a base the replica does not hold",
        vec![changed],
        1,
    ));
    for (case, entries, count) in cases {
        let mut raw = Raw::authenticated(&fx);
        let header = OpenHeader {
            epoch: 7.into(),
            disk_count: count.into(),
            max_batch_bytes: 0.into(),
        };
        raw.send(FrameKind::Open, &[header.as_bytes(), entries.as_bytes()]);
        let (code, message) = raw.expect_error(case);
        assert_ne!(code, ErrorCode::Internal, "{case}: {message}");
        assert!(!message.is_empty(), "{case}");
    }
    fx.assert_nothing_written("malformed open");
    fx.assert_target_still_serves();
}

/// A session that sent valid data and then broke off (a bad frame, or the connection
/// dropped before Commit) must leave every replica at its last acknowledged epoch:
/// invariant 2 of the brief — the target applies an epoch atomically.
#[test]
fn aborted_session_leaves_replicas_at_the_last_epoch() {
    let fx = Fixture::new("aborted_session_leaves_replicas_at_the_last_epoch");
    let size = fx.disk_size(0);

    let mut raw = Raw::authenticated(&fx);
    raw.open(&[("d0", SyncMode::Full, size)]).unwrap();
    raw.send(FrameKind::Data, &[&data_payload(0, &[block_at(0, 0xAB)])]);
    let (offset, data, mut hash) = block_at(RAW_BLOCK, 0xCD);
    hash[3] ^= 0x40;
    raw.send(
        FrameKind::Data,
        &[&data_payload(0, &[(offset, data, hash)])],
    );
    assert_error(
        "bad second frame",
        raw.expect_error("bad second frame"),
        ErrorCode::Integrity,
        &["hash"],
    );
    fx.assert_nothing_written("valid frame, then a bad one");

    let mut raw = Raw::authenticated(&fx);
    raw.open(&[("d0", SyncMode::Full, size)]).unwrap();
    raw.send(
        FrameKind::Data,
        &[&data_payload(0, &[block_at(2 * RAW_BLOCK, 0xEF)])],
    );
    raw.writer.flush().unwrap();
    std::thread::sleep(Duration::from_millis(300));
    let failed = || fx.pair.target.stderr().matches("session failed").count();
    let failed_before = failed();
    drop(raw);
    // The target notices the close, rolls the epoch back and releases the disk (then
    // logs the session's end); give it a moment.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while (fingerprint(&fx.pair.disks[0].replica) != fx.replicas[0].1 || failed() == failed_before)
        && std::time::Instant::now() < deadline
    {
        std::thread::sleep(Duration::from_millis(20));
    }
    fx.assert_nothing_written("valid frame, then the connection dropped");
    fx.assert_target_still_serves();
}

// ---------------------------------------------------------------------------------
// Order and completeness of an epoch.

/// Ranges of a disk must come in increasing offset order across the whole session: a
/// frame that reaches back into what an earlier frame covered would make the replica's
/// content depend on which write completes first. The target refuses it before writing
/// any of it, and rolls back what the session wrote before.
#[test]
fn overlapping_ranges_across_frames_are_refused() {
    let fx = Fixture::new("overlapping_ranges_across_frames_are_refused");
    let size = fx.disk_size(0);
    let zero = |offset: u64, len: u64| DiskRun {
        disk: 0.into(),
        reserved: 0.into(),
        start: offset.into(),
        count: len.into(),
    };
    let b = RAW_BLOCK;
    type Frames = Vec<(FrameKind, Vec<u8>)>;
    let cases: Vec<(&str, Frames)> = vec![
        (
            "data over data",
            vec![
                (
                    FrameKind::Data,
                    data_payload(0, &[block_at(0, 0x11), block_at(b, 0x12)]),
                ),
                (FrameKind::Data, data_payload(0, &[block_at(b, 0x13)])),
            ],
        ),
        (
            "data going back",
            vec![
                (FrameKind::Data, data_payload(0, &[block_at(4 * b, 0x21)])),
                (FrameKind::Data, data_payload(0, &[block_at(0, 0x22)])),
            ],
        ),
        (
            "zero over data",
            vec![
                (
                    FrameKind::Data,
                    data_payload(0, &[block_at(0, 0x31), block_at(b, 0x32)]),
                ),
                (FrameKind::Zero, zero(b, 2 * b).as_bytes().to_vec()),
            ],
        ),
        (
            "data inside a zero range",
            vec![
                (FrameKind::Zero, zero(0, 8 * b).as_bytes().to_vec()),
                (FrameKind::Data, data_payload(0, &[block_at(3 * b, 0x41)])),
            ],
        ),
    ];
    for (case, frames) in cases {
        let mut raw = Raw::authenticated(&fx);
        raw.open(&[("d0", SyncMode::Full, size)]).unwrap();
        for (kind, payload) in &frames {
            raw.send(*kind, &[payload]);
        }
        raw.send_commit();
        assert_error(
            case,
            raw.expect_error(case),
            ErrorCode::Protocol,
            &["d0", "overlaps or goes back", "increasing offset order"],
        );
        fx.assert_nothing_written(case);
    }
    fx.assert_target_still_serves();
}

/// A Commit whose manifest disagrees with what the target received — here the source
/// counted a frame that never arrived — is refused: the epoch is rolled back and
/// nothing is acknowledged.
#[test]
fn commit_with_a_manifest_that_disagrees_is_refused() {
    let fx = Fixture::new("commit_with_a_manifest_that_disagrees_is_refused");
    let size = fx.disk_size(0);
    let b = RAW_BLOCK;

    let mut raw = Raw::authenticated(&fx);
    raw.open(&[("d0", SyncMode::Full, size)]).unwrap();
    let frames = [
        data_payload(0, &[block_at(0, 0x51), block_at(b, 0x52)]),
        data_payload(0, &[block_at(4 * b, 0x53)]),
        data_payload(0, &[block_at(8 * b, 0x54)]),
    ];
    // The manifest covers all three frames; the second one is "lost" on the way.
    let mut sent = ManifestBuilder::new();
    for f in &frames {
        let (header, rest) = DataHeader::ref_from_prefix(f).unwrap();
        let n = header.record_count.get() as usize * std::mem::size_of::<BlockRecord>();
        for r in <[BlockRecord]>::ref_from_bytes(&rest[..n]).unwrap() {
            sent.record(r);
        }
    }
    raw.send(FrameKind::Data, &[&frames[0]]);
    raw.send(FrameKind::Data, &[&frames[2]]);
    raw.send_commit_with(&[sent.finish()]).unwrap();
    assert_error(
        "a Data frame dropped",
        raw.expect_error("a Data frame dropped"),
        ErrorCode::Integrity,
        &[
            "d0",
            "manifest",
            "source sent 4 data blocks",
            "received 3 data blocks",
        ],
    );
    fx.assert_nothing_written("a Data frame dropped");
    drop(raw);

    // Every Data frame dropped: the Commit comes right after the Open, where an epoch
    // that changed nothing is committed without the receive pipeline. It is checked
    // all the same.
    let mut raw = Raw::authenticated(&fx);
    raw.open(&[("d0", SyncMode::Full, size)]).unwrap();
    raw.send_commit_with(&[sent.finish()]).unwrap();
    assert_error(
        "every Data frame dropped",
        raw.expect_error("every Data frame dropped"),
        ErrorCode::Integrity,
        &[
            "d0",
            "manifest",
            "source sent 4 data blocks",
            "received 0 data blocks",
        ],
    );
    fx.assert_nothing_written("every Data frame dropped");
    drop(raw);

    // So is its epoch: a Commit for another epoch right after the Open is refused.
    let mut raw = Raw::authenticated(&fx);
    raw.open(&[("d0", SyncMode::Full, size)]).unwrap();
    let other = Commit {
        epoch: 999.into(),
        disk_count: 1.into(),
        reserved: 0.into(),
    };
    let nothing = ManifestBuilder::new().finish();
    raw.next_seq += 1;
    raw.writer
        .send(FrameKind::Commit, &[other.as_bytes(), nothing.as_bytes()])
        .unwrap();
    assert_error(
        "a Commit of another epoch",
        raw.expect_error("a Commit of another epoch"),
        ErrorCode::Protocol,
        &["commit of epoch 999", "opened for epoch 1000"],
    );
    fx.assert_nothing_written("a Commit of another epoch");
    drop(raw);

    // A Commit without the session's manifests is malformed.
    let mut raw = Raw::authenticated(&fx);
    raw.open(&[("d0", SyncMode::Full, size)]).unwrap();
    raw.send(FrameKind::Data, &[&frames[0]]);
    raw.send_commit_with(&[]).unwrap();
    assert_error(
        "no manifest",
        raw.expect_error("no manifest"),
        ErrorCode::Protocol,
        &["commit carries 0 disk manifests"],
    );
    fx.assert_nothing_written("no manifest");
    fx.assert_target_still_serves();
}
