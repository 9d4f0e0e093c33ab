//! The harnesses themselves: seeds run clean and reach the code they were written to
//! reach, and the repairs really get a damaged input past the integrity checks.

use ferry_fuzz::{all, targets};

#[test]
fn every_seed_runs_without_a_finding() {
    for target in all() {
        let seeds = (target.seeds)();
        assert!(!seeds.is_empty(), "{} has no seeds", target.name);
        for (i, seed) in seeds.iter().enumerate() {
            let outcome = (target.run)(seed);
            assert!(!outcome.is_empty(), "{} seed {i}", target.name);
        }
    }
}

#[test]
fn seeds_are_accepted_where_they_should_be() {
    for target in all() {
        let accepted = (target.seeds)()
            .iter()
            .map(|s| (target.run)(s))
            .filter(|o| o.starts_with("ok") || o.starts_with("eof") || o.starts_with("recovered"))
            .count();
        let expected = match target.name {
            // The server refuses every seed (nobody knows the key) but answers the
            // well-formed Hellos with a Challenge.
            "handshake_server" => 0,
            _ => 1,
        };
        assert!(
            accepted >= expected,
            "{}: only {accepted} seeds accepted",
            target.name
        );
    }
    let challenged = (targets::handshake_server::target().seeds)()
        .iter()
        .map(|s| targets::handshake_server::run(s))
        .filter(|o| o.starts_with("challenged"))
        .count();
    assert!(challenged > 0, "no handshake seed gets a Challenge");
}

/// Bytes that only a checksum covers (or that are a checksum), per target.
fn checksum_damage(target: &str, seed: &[u8]) -> Vec<usize> {
    match target {
        // Header hash, and the last payload byte (payload hash).
        "frame_decoder" | "handshake_server" => vec![24, seed.len() - 1],
        // Header checksum and the first page's checksum.
        "bitmap_file" => vec![120, 4096],
        // The first record's block hash: control, disks, data header, 24 bytes in.
        // Not for seeds the harness repairs itself (control bit 0), nor when that
        // record is a Zero block, whose hash the verifier does not check.
        "data_frame_verify" => {
            let record = 1 + 9 * (1 + usize::from(seed[0] >> 1 & 3)) + 8;
            if seed[0] & 1 != 0 || seed[record + 20] == 2 {
                Vec::new()
            } else {
                vec![record + 24]
            }
        }
        // The first request's magic (after the 9-byte session prefix).
        "nbd_request" => vec![ferry_fuzz::targets::nbd_request::PREFIX],
        // The first option's magic (after the client flags).
        "nbd_option" => vec![4],
        _ => Vec::new(),
    }
}

#[test]
fn repairs_undo_checksum_damage() {
    let mut repaired = 0;
    for target in all() {
        let Some(repair) = target.repair else {
            continue;
        };
        for seed in (target.seeds)() {
            let before = (target.run)(&seed);
            let good = |o: &str| {
                o.starts_with("ok") || o.starts_with("eof") || o.starts_with("challenged")
            };
            if seed.len() < 64 || !good(&before) {
                continue;
            }
            let damage = checksum_damage(target.name, &seed);
            if damage.is_empty() {
                continue;
            }
            let mut damaged = seed.clone();
            for at in damage {
                damaged[at] ^= 0x40;
            }
            assert!(
                !good(&(target.run)(&damaged)),
                "{}: damage not detected",
                target.name
            );
            repair(&mut damaged, 0);
            let after = (target.run)(&damaged);
            assert!(
                good(&after),
                "{}: a repaired seed is refused: {after} (was {before})",
                target.name
            );
            repaired += 1;
        }
    }
    assert!(repaired >= 10, "only {repaired} seeds exercised");
}

#[test]
fn labels_hide_numbers_and_echoed_input() {
    let e = "record 17: offset 4096 is past the end of disk \"x\"";
    assert_eq!(
        ferry_fuzz::label("err", &e),
        "err:record # offset # is past the end of disk"
    );
}
