//! `compression = "auto"`, the default: whatever it picks frame by frame, the replica is
//! byte-identical, and `ferry sync --json` says what it picked. On a slow link (here
//! `max_rate`, which the sender pays like a link) it compresses; with a fixed level
//! every frame goes at that level.

use std::os::unix::fs::FileExt;
use std::path::Path;

use crate::common::*;

const MIB: u64 = 1 << 20;

/// A 24 MiB image: text-like blocks (compress well), random blocks (do not), zero
/// blocks and holes, interleaved by the MiB so the policy sees its data change.
fn mixed_image(path: &Path, seed: u64) {
    let f = create_sparse(path, 24 * MIB);
    let mut rng = Rng::new(seed);
    let words = [
        "replica ", "epoch ", "block ", "frame ", "the ", "target ", "source ", "commit ", "zstd ",
        "bitmap\n",
    ];
    let mut buf = vec![0u8; MIB as usize];
    for mib in 0..20 {
        match mib % 5 {
            0 | 1 | 3 => {
                let mut text = Vec::with_capacity(buf.len());
                while text.len() < buf.len() {
                    text.extend_from_slice(
                        words[rng.below(words.len() as u64) as usize].as_bytes(),
                    );
                }
                text.truncate(buf.len());
                buf.copy_from_slice(&text);
            }
            2 => rng.fill(&mut buf),
            _ => buf.fill(0),
        }
        f.write_all_at(&buf, mib * MIB).unwrap();
    }
    // The last 4 MiB stay a hole.
    f.sync_all().unwrap();
}

/// Data frames of a sync report: raw and compressed (level → frames).
fn frames(report: &serde_json::Value) -> (u64, Vec<(String, u64)>) {
    let raw = u64_field(report, "frames_raw");
    let zstd = report["frames_zstd"]
        .as_object()
        .unwrap_or_else(|| panic!("no frames_zstd: {report}"))
        .iter()
        .map(|(level, n)| (level.clone(), n.as_u64().unwrap()))
        .collect();
    (raw, zstd)
}

fn pair(extra: &str) -> Pair {
    let dir = scratch_dir();
    let disks = vec![PairDisk::new(dir.path(), "os")];
    let pair = Pair::start(dir, disks, extra, "");
    mixed_image(&pair.disks[0].source, test_seed("auto_compression"));
    pair
}

#[test]
fn auto_syncs_are_byte_identical_and_say_what_they_chose() {
    // The defaults: no compression key at all.
    let fast = pair("");
    let r = fast.sync_ok(&["--mode", "full"]);
    fast.assert_replicas_identical();
    let (raw, zstd) = frames(&r);
    // 16 MiB of data blocks in 256 KiB reads; zero-only reads are not Data frames.
    let total = raw + zstd.iter().map(|(_, n)| n).sum::<u64>();
    assert_eq!(total, 64, "{r}");

    // A slow link: the sender is held on every frame, so auto compresses.
    let slow = pair("max_rate = \"64Mbit\"\n");
    let r = slow.sync_ok(&["--mode", "full"]);
    slow.assert_replicas_identical();
    let (raw, zstd) = frames(&r);
    assert_eq!(raw + zstd.iter().map(|(_, n)| n).sum::<u64>(), 64, "{r}");
    assert!(!zstd.is_empty(), "nothing compressed on a slow link: {r}");
    assert!(
        u64_field(&r, "bytes_sent") < 14 * MIB,
        "compression bought little: {r}"
    );
}

#[test]
fn a_fixed_level_and_none_are_kept() {
    let zstd = pair("compression = \"zstd\"\ncompression_level = 3\n");
    let r = zstd.sync_ok(&["--mode", "full"]);
    zstd.assert_replicas_identical();
    assert_eq!(frames(&r), (0, vec![("3".to_string(), 64)]), "{r}");

    let none = pair("compression = \"none\"\n");
    let r = none.sync_ok(&["--mode", "full"]);
    none.assert_replicas_identical();
    assert_eq!(frames(&r), (64, vec![]), "{r}");
}
