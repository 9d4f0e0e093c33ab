//! What a session received for each disk: the order check every range passes before it
//! may reach the applier, and the manifest its Commit must match.
//!
//! Order: the source sends each disk's ranges (Data records and Zero frames) in
//! strictly increasing offset order across the whole epoch, so no two ranges of an
//! epoch overlap and the replica's content never depends on which write completes
//! first. One "next allowed offset" per disk checks that in constant memory; inside a
//! frame the verifier already checked it record by record.

use crate::protocol::manifest::ManifestBuilder;
use crate::protocol::{BlockRecord, DiskManifest};

use super::rejection::{RangeKind, Rejection};
use super::TargetError;

pub struct Received {
    /// Per disk: where the last range received this epoch ended. A new range must not
    /// start before it.
    next_offset: Vec<u64>,
    /// Per disk: the manifest of everything admitted so far.
    manifests: Vec<ManifestBuilder>,
}

impl Received {
    pub fn new(disks: usize) -> Self {
        Self {
            next_offset: vec![0; disks],
            manifests: vec![ManifestBuilder::new(); disks],
        }
    }

    /// Admits a verified Data frame of `disk` (its records in increasing order, inside
    /// the disk). Refused, before anything of it is written, if it reaches back into a
    /// range already received this epoch.
    pub fn data(
        &mut self,
        disk: u32,
        name: &str,
        records: &[BlockRecord],
    ) -> Result<(), TargetError> {
        let (Some(first), Some(last)) = (records.first(), records.last()) else {
            return Ok(());
        };
        let end = last.offset.get() + u64::from(last.length.get());
        self.admit(disk, name, RangeKind::DataFrame, first.offset.get(), end)?;
        let m = &mut self.manifests[disk as usize];
        records.iter().for_each(|r| m.record(r));
        Ok(())
    }

    /// Admits a Zero frame of `len` bytes at `offset` of `disk` (already checked to lie
    /// inside the disk).
    pub fn zero(
        &mut self,
        disk: u32,
        name: &str,
        offset: u64,
        len: u64,
    ) -> Result<(), TargetError> {
        self.admit(disk, name, RangeKind::ZeroRange, offset, offset + len)?;
        self.manifests[disk as usize].zero_run(offset, len);
        Ok(())
    }

    fn admit(
        &mut self,
        disk: u32,
        name: &str,
        kind: RangeKind,
        start: u64,
        end: u64,
    ) -> Result<(), TargetError> {
        let next = &mut self.next_offset[disk as usize];
        if start < *next {
            return Err(Rejection::OutOfOrder {
                disk: name.to_string(),
                kind,
                start,
                end,
                next: *next,
            }
            .into());
        }
        *next = end;
        Ok(())
    }

    /// Checks the source's manifests (one per disk, in Open order) against what was
    /// received. A difference means the epoch is not what the source read: it must not
    /// be committed.
    pub fn check_commit(&self, names: &[String], sent: &[DiskManifest]) -> Result<(), TargetError> {
        if sent.len() != self.manifests.len() {
            return Err(Rejection::ManifestCount {
                sent: sent.len(),
                opened: self.manifests.len(),
            }
            .into());
        }
        for ((theirs, ours), name) in sent.iter().zip(&self.manifests).zip(names) {
            let ours = ours.finish();
            if *theirs != ours {
                return Err(Rejection::ManifestMismatch {
                    disk: name.clone(),
                    sent: *theirs,
                    received: ours,
                }
                .into());
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::{block_hash, Codec, ErrorCode};

    fn rec(offset: u64, fill: u8) -> BlockRecord {
        BlockRecord {
            offset: offset.into(),
            length: 4096.into(),
            stored_len: 4096.into(),
            payload_offset: 0.into(),
            codec: Codec::Raw as u8,
            stream: 0,
            stream_flags: 0,
            reserved: 0,
            hash: block_hash(&[fill; 4096]),
            reserved2: 0.into(),
        }
    }

    #[test]
    fn ranges_must_increase_across_frames_per_disk() {
        let mut r = Received::new(2);
        r.data(0, "a", &[rec(0, 1), rec(4096, 2)]).unwrap();
        r.zero(0, "a", 8192, 8192).unwrap();
        // Another disk has its own order.
        r.data(1, "b", &[rec(0, 1)]).unwrap();
        r.data(0, "a", &[rec(16384, 3)]).unwrap();
        for (what, result) in [
            ("repeat", r.data(0, "a", &[rec(16384, 3)])),
            ("back", r.data(0, "a", &[rec(4096, 3)])),
            ("zero over data", r.zero(0, "a", 12288, 8192)),
        ] {
            let e = result.unwrap_err();
            assert_eq!(e.code(), ErrorCode::Protocol, "{what}");
            assert!(
                matches!(&e, TargetError::Rejected(Rejection::OutOfOrder { disk, .. }) if disk == "a"),
                "{what}: {e}"
            );
        }
    }

    #[test]
    fn a_commit_must_match_what_arrived() {
        let names = ["a".to_string()];
        let mut sent = ManifestBuilder::new();
        let mut r = Received::new(1);
        for (i, fill) in [1u8, 2, 3].into_iter().enumerate() {
            let recs = [rec(i as u64 * 4096, fill)];
            sent.record(&recs[0]);
            // The target never sees the second frame.
            if i != 1 {
                r.data(0, "a", &recs).unwrap();
            }
        }
        let e = r.check_commit(&names, &[sent.finish()]).unwrap_err();
        assert_eq!(e.code(), ErrorCode::Integrity);
        let TargetError::Rejected(Rejection::ManifestMismatch {
            sent: theirs,
            received: ours,
            ..
        }) = &e
        else {
            panic!("not a manifest mismatch: {e}");
        };
        assert_eq!(theirs.data_blocks.get(), 3, "{e}");
        assert_eq!(ours.data_blocks.get(), 2, "{e}");

        let mut all = Received::new(1);
        for (i, fill) in [1u8, 2, 3].into_iter().enumerate() {
            all.data(0, "a", &[rec(i as u64 * 4096, fill)]).unwrap();
        }
        all.check_commit(&names, &[sent.finish()]).unwrap();
        let e = all.check_commit(&names, &[]).unwrap_err();
        assert_eq!(e.code(), ErrorCode::Protocol);
        assert!(matches!(
            e,
            TargetError::Rejected(Rejection::ManifestCount { sent: 0, opened: 1 })
        ));
    }
}
