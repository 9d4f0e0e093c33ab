//! Epochs across a consistency group: the disks one `freeze` covers, cut at one
//! instant ([`freeze`]), checked while the engine reads them ([`check`]), and ended
//! together ([`finish`]: commit or abort). The control socket drives these; the shim
//! aborts what is left at shutdown. One disk's share of an epoch (copy-before-write,
//! the state map) is [`crate::epoch`].

use std::io;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::bitmap::{BitmapError, GenerationId};
use crate::disk::ServedDisk;
use crate::epoch::FrozenDisk;
use crate::tracker::{ResyncReason, TrackerError};
use filter_driver_shim_contract::epoch::EpochFiles;

/// Errors of the epoch protocol; each says what the engine asked and why not.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum EpochError {
    #[error("disk `{disk}`: cannot prepare the epoch's files")]
    Prepare {
        disk: String,
        #[source]
        source: io::Error,
    },
    #[error("disk `{disk}`: cannot write the frozen bitmap")]
    SaveBits {
        disk: String,
        #[source]
        source: crate::bitmap::BitmapError,
    },
    #[error("`whole=` names `{0}`, which this shim does not serve")]
    UnknownDisk(String),
    #[error("an epoch is already frozen")]
    AlreadyFrozen,
    #[error("disk `{disk}`: no epoch is frozen")]
    NotFrozen { disk: String },
    #[error("disk `{disk}`: a copy-before-write failed; the epoch cannot be read consistently")]
    Broken { disk: String },
    #[error("disk `{disk}`: cannot make the epoch's content durable on the source (fdatasync); its bits stay set")]
    SyncBacking {
        disk: String,
        #[source]
        source: io::Error,
    },
    #[error("disk `{disk}`: clearing the committed bits")]
    Tracker {
        disk: String,
        #[source]
        source: TrackerError,
    },
}

/// One disk of a frozen epoch, as the freeze reply describes it.
#[derive(Clone, Debug)]
pub struct FrozenDiskInfo {
    pub name: String,
    pub path: PathBuf,
    pub generation_id: GenerationId,
    pub resync_required: Option<ResyncReason>,
    pub block_size: u32,
    pub disk_size: u64,
    pub frozen_blocks: u64,
    pub whole_disk: bool,
    /// The engine reads only the written granules (`freeze … granules=on`); the
    /// granule file is in `files`.
    pub granular: bool,
    pub files: EpochFiles,
}

/// A frozen epoch across every disk of the shim.
#[derive(Clone, Debug)]
pub struct FrozenEpoch {
    pub id: u64,
    /// How long guest writes were held: from asking for the gates until releasing them.
    pub pause: Duration,
    pub disks: Vec<FrozenDiskInfo>,
}

/// Freezes an epoch across `disks` (a consistency group: the cut is one instant for
/// all of them). Writes in flight drain, every disk's active bits become the epoch's,
/// copy-before-write starts, and writes resume; the pause holds no I/O but the drain.
/// Disks named in `whole` preserve every block, not just the frozen ones (their
/// epoch will be a seeded or full sync that reads the whole disk). With `granular`,
/// the others preserve only the granules written before the freeze, which is all the
/// engine will read of them (their masks go to the epoch's granule file).
///
/// In this order: the request is checked, every disk's files are prepared (before the
/// pause, so the pause does no file I/O), the cut is made, then each frozen bitmap is
/// saved; a save that fails aborts the whole epoch.
pub(crate) fn freeze(
    disks: &[Arc<ServedDisk>],
    id: u64,
    whole: &[String],
    granular: bool,
) -> Result<FrozenEpoch, EpochError> {
    check_freeze(disks, whole)?;
    let prepared = prepare(disks, id, whole, granular)?;
    let (frozen, pause) = cut(disks, prepared);
    let infos = save_frozen_bits(disks, &frozen)?;
    tracing::debug!(epoch = %format_args!("{id:016x}"), pause_us = pause.as_micros() as u64, "epoch frozen");
    Ok(FrozenEpoch {
        id,
        pause,
        disks: infos,
    })
}

/// Refuses a freeze that names a disk not served in `whole`, or that comes while an
/// epoch is frozen, in that order.
fn check_freeze(disks: &[Arc<ServedDisk>], whole: &[String]) -> Result<(), EpochError> {
    if let Some(unknown) = whole
        .iter()
        .find(|w| !disks.iter().any(|d| &d.disk.name == *w))
    {
        return Err(EpochError::UnknownDisk(unknown.clone()));
    }
    if disks.iter().any(|d| d.export.gate.frozen().is_some()) {
        return Err(EpochError::AlreadyFrozen);
    }
    Ok(())
}

/// Each disk's epoch map and scratch files, fresh (any left under their names are
/// removed first), and its empty frozen bits. If one disk fails, the files of every
/// disk prepared so far are removed.
fn prepare(
    disks: &[Arc<ServedDisk>],
    id: u64,
    whole: &[String],
    granular: bool,
) -> Result<Vec<FrozenDisk>, EpochError> {
    let mut prepared = Vec::with_capacity(disks.len());
    for d in disks {
        let files = EpochFiles::new(d.epoch_dir(), &d.disk.name, id);
        files.remove();
        let blank = d.export.tracker.blank();
        let whole_disk = whole.contains(&d.disk.name);
        match FrozenDisk::prepare(files.clone(), &blank, whole_disk, granular && !whole_disk) {
            Ok(f) => prepared.push(f),
            Err(source) => {
                files.remove();
                for p in &prepared {
                    p.files.remove();
                }
                return Err(EpochError::Prepare {
                    disk: d.disk.name.clone(),
                    source,
                });
            }
        }
    }
    Ok(prepared)
}

/// The pause: every gate held at once, so the cut is one instant for the group. Each
/// disk's active bits move into its frozen epoch, which is installed in its gate
/// (copy-before-write starts), then every gate opens. Returns the frozen disks and how
/// long writes were held.
fn cut(disks: &[Arc<ServedDisk>], prepared: Vec<FrozenDisk>) -> (Vec<Arc<FrozenDisk>>, Duration) {
    let started = Instant::now();
    let gates: Vec<_> = disks.iter().map(|d| d.export.gate.drain()).collect();
    let mut frozen = Vec::with_capacity(disks.len());
    for ((d, gate), mut f) in disks.iter().zip(&gates).zip(prepared) {
        debug_assert!(
            gate.frozen().is_none(),
            "the control socket allows one epoch at a time"
        );
        d.export.tracker.freeze(&mut f.bits, &mut f.masks);
        let f = Arc::new(f);
        gate.install(Arc::clone(&f));
        frozen.push(f);
    }
    drop(gates);
    (frozen, started.elapsed())
}

/// After the cut: each disk's frozen bits saved to its epoch bitmap file, and the
/// freeze reply's description of the disk. A save that fails aborts the epoch on
/// every disk (its bits join the active ones again) before the error is returned.
fn save_frozen_bits(
    disks: &[Arc<ServedDisk>],
    frozen: &[Arc<FrozenDisk>],
) -> Result<Vec<FrozenDiskInfo>, EpochError> {
    let mut infos = Vec::with_capacity(disks.len());
    for (d, f) in disks.iter().zip(frozen) {
        let saved = f.bits.save(&f.files.bitmap).and_then(|()| {
            if !f.granular {
                return Ok(());
            }
            f.masks
                .save(&f.bits, &f.files.granules)
                .map_err(|source| BitmapError::Io {
                    op: "write the granule masks to",
                    path: f.files.granules.clone(),
                    source,
                })
        });
        if let Err(source) = saved {
            let _ = finish(disks, false);
            return Err(EpochError::SaveBits {
                disk: d.disk.name.clone(),
                source,
            });
        }
        let status = d.export.tracker.status();
        infos.push(FrozenDiskInfo {
            name: d.disk.name.clone(),
            path: d.disk.path.clone(),
            generation_id: status.generation_id,
            resync_required: status.resync_required,
            block_size: status.block_size,
            disk_size: d.export.info.size_bytes,
            frozen_blocks: f.bits.count(),
            whole_disk: f.whole_disk,
            granular: f.granular,
            files: f.files.clone(),
        });
    }
    Ok(infos)
}

/// Whether every disk still holds its frozen epoch intact (no copy failed).
pub(crate) fn check(disks: &[Arc<ServedDisk>]) -> Result<(), EpochError> {
    for d in disks {
        let gate = d.export.gate.frozen();
        match gate.as_deref() {
            None => {
                return Err(EpochError::NotFrozen {
                    disk: d.disk.name.clone(),
                })
            }
            Some(f) if f.is_broken() => {
                return Err(EpochError::Broken {
                    disk: d.disk.name.clone(),
                })
            }
            Some(_) => {}
        }
    }
    Ok(())
}

/// Ends the frozen epoch on every disk: `commit` clears its bits (the target has it),
/// otherwise they join the active bits again. Copy-before-write stops and the epoch's
/// files go.
pub(crate) fn finish(disks: &[Arc<ServedDisk>], commit: bool) -> Result<(), EpochError> {
    let mut first_error = None;
    for d in disks {
        // Drained: no write still copies into the epoch being ended.
        let taken = d.export.gate.drain().take();
        let Some(f) = taken else { continue };
        // The epoch shipped what the guest had written, durable on the source or not
        // (a write is acknowledged before it is flushed). Its bits may go only once the
        // source holds that content durably too: after a power loss that dropped an
        // unflushed write the block must differ from the replica *and* be marked, or
        // the replica keeps a write the source no longer has and nothing resends the
        // block (found by tests/it/power_loss.rs).
        let synced = if commit && !f.is_broken() {
            d.export
                .backing
                .sync_data()
                .map_err(|source| EpochError::SyncBacking {
                    disk: d.disk.name.clone(),
                    source,
                })
        } else {
            Ok(())
        };
        let result = match &synced {
            Ok(()) if commit && !f.is_broken() => d.export.tracker.commit(&f.bits),
            _ => d.export.tracker.abort(&f.bits, &f.masks),
        };
        if let Err(e) = synced {
            first_error.get_or_insert(e);
        }
        if f.copies() > 0 {
            tracing::debug!(disk = %d.disk.name, copies = f.copies(), "copy-before-write blocks this epoch");
        }
        f.files.remove();
        if let Err(source) = result {
            first_error.get_or_insert(EpochError::Tracker {
                disk: d.disk.name.clone(),
                source,
            });
        }
    }
    first_error.map_or(Ok(()), Err)
}
