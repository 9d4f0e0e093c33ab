use serde_json::{json, Value};

use super::*;

fn gen() -> GenerationId {
    GenerationId::from_bytes(*b"0123456789abcdef")
}

fn status_reply() -> StatusReply {
    StatusReply {
        ok: Flag,
        epoch: Some(EpochStatus {
            id: EpochId::new(0xabc0_0000_0000_0001),
            owned: true,
            disks: vec!["vda".into()],
        }),
        pauses: Pauses {
            count: 1,
            last_us: 20,
            max_us: 30,
            total_us: 40,
        },
        disks: vec![StatusDisk {
            name: "vda".into(),
            path: "/images/vda.img".into(),
            generation_id: gen(),
            block_size: 65536,
            block_count: 16,
            dirty_blocks: 3,
            frozen_blocks: None,
            resync_required: true,
            resync_reason: Some("image-modified".into()),
            bitmap_syncs: 5,
            marks_waited: 1,
            tracking_failed: false,
            connections: 2,
            writes_refused: false,
            generation_born: Some(ImageAtBirth {
                size_bytes: 1 << 20,
                ino: 12,
                mtime_ns: 1_796_535_923_000_000_001,
            }),
        }],
        engine: None,
        granules: true,
    }
}

fn freeze_reply() -> FreezeReply {
    FreezeReply {
        ok: Flag,
        epoch: EpochId::new(7),
        pause_us: 120,
        idle_timeout_ms: Some(120_000),
        disks: vec![FreezeDisk {
            name: "vda".into(),
            path: "/images/vda.img".into(),
            generation_id: gen(),
            resync_required: false,
            resync_reason: None,
            block_size: 65536,
            disk_size: 1 << 20,
            frozen_blocks: 4,
            whole_disk: true,
            bitmap: "/s/vda.epoch-0000000000000007.cbt".into(),
            map: "/s/vda.epoch-0000000000000007.map".into(),
            scratch: "/s/vda.epoch-0000000000000007.scratch".into(),
            granules: Some("/s/vda.epoch-0000000000000007.gran".into()),
        }],
    }
}

fn round_trip<T>(reply: &T)
where
    T: Serialize + for<'de> Deserialize<'de> + PartialEq + std::fmt::Debug,
{
    let line = serde_json::to_string(reply).unwrap();
    assert!(!line.contains('\n'), "one line: {line}");
    assert_eq!(&serde_json::from_str::<T>(&line).unwrap(), reply, "{line}");
}

#[test]
fn every_request_round_trips_through_its_line() {
    let requests = [
        Request::Status,
        Request::Freeze {
            disks: None,
            whole: vec![],
            granules: false,
        },
        Request::Freeze {
            disks: Some(vec!["a".into(), "b".into()]),
            whole: vec!["b".into()],
            granules: true,
        },
        Request::Freeze {
            disks: Some(vec![]),
            whole: vec![],
            granules: false,
        },
        Request::Check(EpochId::new(0x0123_4567_89ab_cdef)),
        Request::Commit(EpochId::new(1)),
        Request::Abort(EpochId::new(u64::MAX)),
        Request::Demote,
        Request::ResyncDone {
            disk: "vda".into(),
            generation: gen(),
        },
    ];
    for r in requests {
        let line = r.to_string();
        assert_eq!(line.parse::<Request>(), Ok(r.clone()), "{line}");
        assert_eq!(format!("{line}\n").parse::<Request>(), Ok(r), "{line}");
    }
}

#[test]
fn request_lines_are_the_documented_ascii() {
    let r = Request::Freeze {
        disks: Some(vec!["a".into(), "b".into()]),
        whole: vec!["a".into()],
        granules: true,
    };
    assert_eq!(r.to_string(), "freeze disks=a,b whole=a granules=on");
    assert_eq!(
        Request::Check(EpochId::new(10)).to_string(),
        "check 000000000000000a"
    );
    assert_eq!(
        Request::ResyncDone {
            disk: "vda".into(),
            generation: gen()
        }
        .to_string(),
        "resync-done vda 30313233343536373839616263646566"
    );
}

#[test]
fn bad_requests_get_the_shims_messages() {
    let cases = [
        ("", "empty request"),
        ("  \n", "empty request"),
        ("thaw", "unknown command `thaw`"),
        ("freeze all", "unknown freeze argument `all`"),
        ("check", "missing epoch id"),
        ("commit xyz", "`xyz` is not an epoch id (16 hex digits)"),
        ("resync-done vda", "usage: resync-done <disk> <generation>"),
        (
            "resync-done vda 12",
            "`12` is not a generation id (32 hex digits)",
        ),
    ];
    for (line, message) in cases {
        let e = line.parse::<Request>().unwrap_err();
        assert_eq!(e.to_string(), message, "{line:?}");
    }
}

#[test]
fn every_reply_round_trips_through_its_json() {
    round_trip(&status_reply());
    round_trip(&StatusReply {
        epoch: None,
        ..status_reply()
    });
    round_trip(&StatusReply {
        engine: Some(crate::engine_status::EngineStatus {
            pid: 42,
            ..Default::default()
        }),
        ..status_reply()
    });
    round_trip(&freeze_reply());
    round_trip(&Done::default());
    round_trip(&Refusal::new("no disk `x`"));
    round_trip(&Outcome {
        ok: false,
        error: Some("why".into()),
    });
}

#[test]
fn ok_is_pinned_to_the_reply_kind() {
    assert_eq!(
        serde_json::to_string(&Done::default()).unwrap(),
        r#"{"ok":true}"#
    );
    assert_eq!(
        serde_json::to_string(&Refusal::new("no")).unwrap(),
        r#"{"ok":false,"error":"no"}"#
    );
    assert!(serde_json::from_str::<Done>(r#"{"ok":false}"#).is_err());
    assert!(serde_json::from_str::<Refusal>(r#"{"ok":true,"error":"x"}"#).is_err());
}

/// The field names `socat` users, the engine and docs/shim.md rely on: renaming one
/// fails here.
#[test]
fn reply_field_names() {
    let status = serde_json::to_value(status_reply()).unwrap();
    assert_eq!(
        status,
        json!({
            "ok": true,
            "granules": true,
            "epoch": {"id": "abc0000000000001", "owned": true, "disks": ["vda"]},
            "pauses": {"count": 1, "last_us": 20, "max_us": 30, "total_us": 40},
            "disks": [{
                "name": "vda",
                "path": "/images/vda.img",
                "generation_id": "30313233343536373839616263646566",
                "block_size": 65536,
                "block_count": 16,
                "dirty_blocks": 3,
                "frozen_blocks": null,
                "resync_required": true,
                "resync_reason": "image-modified",
                "bitmap_syncs": 5,
                "marks_waited": 1,
                "tracking_failed": false,
                "connections": 2,
                "writes_refused": false,
                "generation_born": {"size_bytes": 1048576, "ino": 12, "mtime_ns": 1_796_535_923_000_000_001_i128},
            }],
        })
    );
    let freeze = serde_json::to_value(freeze_reply()).unwrap();
    assert_eq!(
        freeze,
        json!({
            "ok": true,
            "epoch": "0000000000000007",
            "pause_us": 120,
            "idle_timeout_ms": 120000,
            "disks": [{
                "name": "vda",
                "path": "/images/vda.img",
                "generation_id": "30313233343536373839616263646566",
                "resync_required": false,
                "resync_reason": null,
                "block_size": 65536,
                "disk_size": 1048576,
                "frozen_blocks": 4,
                "whole_disk": true,
                "bitmap": "/s/vda.epoch-0000000000000007.cbt",
                "map": "/s/vda.epoch-0000000000000007.map",
                "scratch": "/s/vda.epoch-0000000000000007.scratch",
                "granules": "/s/vda.epoch-0000000000000007.gran",
            }],
        })
    );
}

#[test]
fn a_newer_shims_extra_fields_are_read_and_a_missing_field_is_named() {
    let mut v: Value = serde_json::to_value(freeze_reply()).unwrap();
    v["from_the_future"] = json!(1);
    v["disks"][0]["also_new"] = json!("x");
    assert_eq!(
        serde_json::from_value::<FreezeReply>(v.clone()).unwrap(),
        freeze_reply()
    );
    // An older shim without the idle bound.
    v.as_object_mut().unwrap().remove("idle_timeout_ms");
    assert_eq!(
        serde_json::from_value::<FreezeReply>(v.clone())
            .unwrap()
            .idle_timeout_ms,
        None
    );
    // An older shim that tracks whole blocks only.
    v["disks"][0].as_object_mut().unwrap().remove("granules");
    assert_eq!(
        serde_json::from_value::<FreezeReply>(v.clone())
            .unwrap()
            .disks[0]
            .granules,
        None
    );
    v["disks"][0].as_object_mut().unwrap().remove("scratch");
    let e = serde_json::from_value::<FreezeReply>(v).unwrap_err();
    assert!(e.to_string().contains("`scratch`"), "{e}");
}
