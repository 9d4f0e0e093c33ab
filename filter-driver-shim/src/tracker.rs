//! Persistent change tracking with write-intent discipline.
//!
//! Every WRITE, TRIM and WRITE_ZEROES calls [`Tracker::mark`] *before* it touches the
//! backing store; `mark` returns only once the bitmap pages holding the range's bits
//! are durable in the bitmap file. So after a crash at any moment, every block whose
//! content may have changed has its bit on disk — the md write-intent / dm-era rule.
//!
//! Cost: a bit already set and durable costs a lock and a test. New bits are batched
//! by group commit: while one thread writes and `fdatasync`s the dirty pages, writers
//! arriving meanwhile set their bits in the next batch, and the first of them to find
//! the syncer gone syncs for all of them. The file is saved whole once at start as
//! [`FileState::Live`]; afterwards single 4 KiB pages are rewritten in place with
//! [`ChangedBlockBitmap::encode_page`]. A page torn by a crash fails its checksum and
//! [`ChangedBlockBitmap::load_recovering`] turns it into "all its blocks dirty".
//!
//! At start the bitmap is validated against the backing image's identity recorded in
//! a sidecar state file ([`state`]). If tracking cannot be trusted — the image was
//! resized, replaced or modified while no shim ran, or the bitmap is lost — a new
//! [`GenerationId`] is drawn, the bitmap starts empty and `resync_required` is set
//! until a consumer has done a checksum-compare (seeded) resync and says so with
//! [`Tracker::resync_done`].
//!
//! Epochs ([`Tracker::freeze`], [`Tracker::commit`], [`Tracker::abort`]) split the bits
//! in two: the *frozen* set an epoch in flight carries and the *active* set new writes
//! join. The file always holds their union (`persisted`), so a crash at any moment
//! leaves every block not yet acknowledged by the target dirty; commit rewrites only
//! the pages whose frozen bits it clears, abort writes nothing at all.

pub mod state;

use std::fmt;
use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::{Condvar, Mutex, MutexGuard};

use crate::backing::Identity;
use crate::bitmap::{
    page_file_offset, page_of_block, BitmapError, ChangedBlockBitmap, FileState, GenerationId,
    BLOCKS_PER_PAGE, PAGE_SIZE,
};
use crate::granules::GranuleMasks;
use state::{Shutdown, StateRecord};

/// Default tracking granularity: 64 KiB, the unit the engine ships. A 1 TiB disk
/// needs 2 MiB of bits.
pub const DEFAULT_BLOCK_SIZE: u32 = 64 << 10;

/// Why tracking was restarted with a new generation and a checksum-compare resync is
/// owed to the consumer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ResyncReason {
    /// No bitmap and no state: tracking starts now; nothing was tracked before.
    FirstStart,
    /// A bitmap exists but its state file does not: the image cannot be validated.
    StateMissing,
    /// The state file is corrupt.
    StateUnreadable,
    /// A state file exists but the bitmap is gone.
    BitmapMissing,
    /// The bitmap file is corrupt beyond torn-page recovery.
    BitmapUnreadable,
    /// Bitmap and state file name different generations.
    GenerationMismatch,
    /// The image's size differs from the bitmap's.
    Resized,
    /// The configured block size differs from the bitmap's.
    BlockSizeChanged,
    /// The path now names another file or device (device/inode changed).
    ImageReplaced,
    /// The image was modified (mtime changed) after a clean shutdown.
    ImageModified,
}

impl ResyncReason {
    const ALL: [ResyncReason; 10] = [
        ResyncReason::FirstStart,
        ResyncReason::StateMissing,
        ResyncReason::StateUnreadable,
        ResyncReason::BitmapMissing,
        ResyncReason::BitmapUnreadable,
        ResyncReason::GenerationMismatch,
        ResyncReason::Resized,
        ResyncReason::BlockSizeChanged,
        ResyncReason::ImageReplaced,
        ResyncReason::ImageModified,
    ];

    /// Stable token used in the state file and the control API.
    pub fn as_str(self) -> &'static str {
        match self {
            ResyncReason::FirstStart => "first-start",
            ResyncReason::StateMissing => "state-missing",
            ResyncReason::StateUnreadable => "state-unreadable",
            ResyncReason::BitmapMissing => "bitmap-missing",
            ResyncReason::BitmapUnreadable => "bitmap-unreadable",
            ResyncReason::GenerationMismatch => "generation-mismatch",
            ResyncReason::Resized => "resized",
            ResyncReason::BlockSizeChanged => "block-size-changed",
            ResyncReason::ImageReplaced => "image-replaced",
            ResyncReason::ImageModified => "image-modified",
        }
    }

    /// Inverse of [`as_str`](Self::as_str).
    pub fn from_token(token: &str) -> Option<ResyncReason> {
        Self::ALL.into_iter().find(|r| r.as_str() == token)
    }
}

impl fmt::Display for ResyncReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Errors of change tracking.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TrackerError {
    /// A range past the end of the disk. Callers range-check first; reaching this is
    /// a bug, and the write it belongs to must fail rather than go untracked.
    #[error("range at {offset_bytes} of {len_bytes} bytes ends past the disk's {disk_size} bytes")]
    OutOfRange {
        offset_bytes: u64,
        len_bytes: u64,
        disk_size: u64,
    },
    /// A bitmap operation failed.
    #[error("bitmap of disk `{disk}`")]
    Bitmap {
        disk: String,
        #[source]
        source: BitmapError,
    },
    /// A system call on the bitmap, state file or image failed.
    #[error("cannot {op} {} (disk `{disk}`)", path.display())]
    Io {
        disk: String,
        op: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// An earlier bitmap write failed, so no write can be acknowledged any more: its
    /// bit might not reach the disk. Restart the shim once the storage is healthy.
    #[error("change tracking of disk `{disk}` failed earlier; refusing writes")]
    Failed { disk: String },
}

/// Where a disk's tracking lives.
#[derive(Clone, Debug)]
pub struct TrackerConfig {
    pub disk: String,
    pub bitmap_path: PathBuf,
    pub state_path: PathBuf,
    pub block_size: u32,
}

/// A snapshot of a tracker for the control API.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TrackerStatus {
    pub generation_id: GenerationId,
    /// Blocks of the epoch now frozen, if one is.
    pub frozen_blocks: Option<u64>,
    pub block_size: u32,
    pub block_count: u64,
    pub dirty_blocks: u64,
    /// Some: a checksum-compare resync is owed; the reason says why.
    pub resync_required: Option<ResyncReason>,
    /// Bitmap page syncs so far (each one `fdatasync`); with `marks_waited` this shows
    /// how well group commit batches.
    pub bitmap_syncs: u64,
    /// Marks that had to wait for a bitmap sync.
    pub marks_waited: u64,
    /// Whether a bitmap write failed and writes are being refused.
    pub failed: bool,
    /// The image's identity when this generation was drawn (`None`: drawn by an older
    /// shim).
    pub born: Option<Identity>,
}

struct TrackState {
    /// Active bits: writes since the last freeze (plus aborted epochs' bits).
    bitmap: ChangedBlockBitmap,
    /// Which granules of the active blocks were written; zero where `bitmap` is clear,
    /// whole where the bits came back from the file (crate::granules).
    masks: GranuleMasks,
    /// What the file holds (or will, once pending pages are synced): the active bits
    /// and, while an epoch is frozen, its bits too.
    persisted: ChangedBlockBitmap,
    /// Blocks in the frozen epoch, if one is frozen.
    frozen_blocks: Option<u64>,
    /// For each bit page, the batch that last set a bit in it. A page is durable when
    /// its batch is at most `durable_batch`. Sized once at start (one entry per 2 GiB
    /// of disk at 64 KiB blocks).
    page_batch: Vec<u64>,
    /// Pages with bits set in `open_batch`, each once.
    pending_pages: Vec<u64>,
    /// The batch new bits join; it closes when a syncer takes it.
    open_batch: u64,
    /// Every batch up to this one is durable.
    durable_batch: u64,
    /// A thread is writing and syncing a closed batch.
    syncing: bool,
    failed: bool,
    /// Encoded pages for the syncer; taken while it writes, so no allocation per sync.
    scratch: Vec<u8>,
    /// Spare list swapped with `pending_pages` by the syncer.
    spare_pages: Vec<u64>,
    resync: Option<ResyncReason>,
    bitmap_syncs: u64,
    marks_waited: u64,
}

/// The tracking found at start (or inspected): its bits, whether a resync is owed and
/// why, and the image's identity when its generation was drawn.
#[derive(Debug)]
pub struct Recovered {
    pub bitmap: ChangedBlockBitmap,
    pub resync: Option<ResyncReason>,
    pub born: Option<Identity>,
}

/// Bits set by [`Tracker::mark_begin`] that are not durable yet: the group-commit
/// batch holding them.
#[must_use = "the write may start only after `Tracker::mark_wait` returned"]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MarkTicket(u64);

/// The live tracker of one disk; shared by every connection to it.
pub struct Tracker {
    config: TrackerConfig,
    file: File,
    disk_size: u64,
    identity: Identity,
    /// See [`TrackerStatus::born`].
    born: Option<Identity>,
    state: Mutex<TrackState>,
    batch_durable: Condvar,
}

impl fmt::Debug for Tracker {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Tracker")
            .field("disk", &self.config.disk)
            .field("disk_size", &self.disk_size)
            .finish_non_exhaustive()
    }
}

/// The granule masks of bits found in the file: unknown, so each is the whole block.
fn recovered_masks(bitmap: &ChangedBlockBitmap) -> GranuleMasks {
    let mut masks = GranuleMasks::like(bitmap);
    masks.fill_from(bitmap);
    masks
}

/// Says that tracking of `disk` is live, from what state.
fn log_live(disk: &str, bitmap: &ChangedBlockBitmap, resync: Option<ResyncReason>) {
    tracing::info!(
        disk = %disk,
        generation = %bitmap.generation_id(),
        dirty_blocks = bitmap.count(),
        block_count = bitmap.block_count(),
        resync_owed = resync.map_or("no", ResyncReason::as_str),
        "change tracking live"
    );
}

impl Tracker {
    fn io_err(&self, op: &'static str, path: &Path) -> impl FnOnce(io::Error) -> TrackerError {
        let disk = self.config.disk.clone();
        let path = path.to_path_buf();
        move |source| TrackerError::Io {
            disk,
            op,
            path,
            source,
        }
    }

    /// Loads (or creates) the tracking of a disk whose backing store currently has
    /// `identity`, validates it, and makes the bitmap file live for in-place updates.
    pub fn open(config: TrackerConfig, identity: Identity) -> Result<Tracker, TrackerError> {
        let disk = config.disk.clone();
        let io_err = |op: &'static str, path: &Path| {
            let disk = disk.clone();
            let path = path.to_path_buf();
            move |source| TrackerError::Io {
                disk,
                op,
                path,
                source,
            }
        };
        let bitmap_err = |source| TrackerError::Bitmap {
            disk: disk.clone(),
            source,
        };

        let Recovered {
            bitmap,
            resync,
            born,
        } = Self::recover(&config, identity)?;
        bitmap
            .save_with_state(&config.bitmap_path, FileState::Live)
            .map_err(bitmap_err)?;
        let record = StateRecord {
            generation_id: bitmap.generation_id(),
            block_size: bitmap.block_size(),
            identity,
            shutdown: Shutdown::Running,
            resync,
            born,
        };
        state::write(&config.state_path, &record)
            .map_err(io_err("write state file", &config.state_path))?;
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .open(&config.bitmap_path)
            .map_err(io_err("open bitmap", &config.bitmap_path))?;
        let page_count = bitmap.page_count() as usize;
        log_live(&config.disk, &bitmap, resync);
        Ok(Tracker {
            disk_size: identity.size_bytes,
            identity,
            born,
            file,
            state: Mutex::new(TrackState {
                masks: recovered_masks(&bitmap),
                persisted: bitmap.clone(),
                frozen_blocks: None,
                bitmap,
                page_batch: vec![0; page_count],
                pending_pages: Vec::with_capacity(page_count),
                spare_pages: Vec::with_capacity(page_count),
                open_batch: 1,
                durable_batch: 0,
                syncing: false,
                failed: false,
                scratch: vec![0; page_count * PAGE_SIZE],
                resync,
                bitmap_syncs: 0,
                marks_waited: 0,
            }),
            batch_durable: Condvar::new(),
            config,
        })
    }

    /// Decides whether the tracking found on disk can be continued: it can when a
    /// bitmap and its state file are both readable ([`Tracker::history`]) and nothing
    /// about the image broke their continuity ([`Tracker::broken_continuity`]).
    /// Otherwise a new generation starts, for the first reason found. Reads only; the
    /// caller saves what this returns.
    fn recover(config: &TrackerConfig, identity: Identity) -> Result<Recovered, TrackerError> {
        let (bitmap, record) = match Self::history(config) {
            Ok(found) => found,
            Err(reason) => return Self::new_generation(config, identity, reason),
        };
        if let Some(reason) = Self::broken_continuity(config, identity, &bitmap, &record) {
            return Self::new_generation(config, identity, reason);
        }
        if let Some(reason) = record.resync {
            tracing::error!(disk = %config.disk, reason = %reason, "a checksum-compare resync is still owed from an earlier start");
        }
        Ok(Recovered {
            bitmap,
            resync: record.resync,
            born: record.born,
        })
    }

    /// What the tracking a stopped shim left in `config`'s files says, as a shim
    /// starting now on an image with `identity` would take it: its bits (active and
    /// frozen together), or a new empty generation owing a resync, and why. Reads
    /// only. For `ferry become-replica`, which hands the bits of a demoted primary to
    /// its target so reverse replication sends them back.
    pub fn inspect(config: &TrackerConfig, identity: Identity) -> Result<Recovered, TrackerError> {
        Self::recover(config, identity)
    }

    /// The bitmap and state file a previous shim left, both readable (torn bitmap
    /// pages already turned into dirty blocks), or why there is no history to continue.
    /// The state file is read first, so an unreadable one is reported as such whether
    /// or not the bitmap exists.
    fn history(config: &TrackerConfig) -> Result<(ChangedBlockBitmap, StateRecord), ResyncReason> {
        let disk = &config.disk;
        let record = match state::read(&config.state_path) {
            Ok(r) => r,
            Err(why) => {
                let why = ferry_io::chain(&why);
                tracing::error!(disk = %disk, path = %config.state_path.display(), %why, "state file unreadable");
                return Err(ResyncReason::StateUnreadable);
            }
        };
        let bitmap_exists = config.bitmap_path.exists();
        let (bitmap, recovery) = match (bitmap_exists, &record) {
            (false, None) => return Err(ResyncReason::FirstStart),
            (false, Some(_)) => return Err(ResyncReason::BitmapMissing),
            (true, _) => match ChangedBlockBitmap::load_recovering(&config.bitmap_path) {
                Ok(loaded) => loaded,
                Err(e) => {
                    let why = ferry_io::chain(&e);
                    tracing::error!(disk = %disk, %why, "bitmap unreadable");
                    return Err(ResyncReason::BitmapUnreadable);
                }
            },
        };
        let Some(record) = record else {
            return Err(ResyncReason::StateMissing);
        };
        if !recovery.torn_pages.is_empty() {
            tracing::warn!(
                disk = %disk,
                torn_pages = %recovery
                    .torn_pages
                    .iter()
                    .map(u64::to_string)
                    .collect::<Vec<_>>()
                    .join(","),
                "bitmap pages torn by a crash: their blocks are marked dirty (a bounded superset)"
            );
        }
        Ok((bitmap, record))
    }

    /// Why the found `bitmap` and `record` no longer describe the image, checked in
    /// this order: generation, size, block size, device and inode, then (after a clean
    /// shutdown only) mtime. `None`: tracking continues.
    fn broken_continuity(
        config: &TrackerConfig,
        identity: Identity,
        bitmap: &ChangedBlockBitmap,
        record: &StateRecord,
    ) -> Option<ResyncReason> {
        let disk = &config.disk;
        if record.generation_id != bitmap.generation_id() {
            return Some(ResyncReason::GenerationMismatch);
        }
        if bitmap.disk_size() != identity.size_bytes
            || record.identity.size_bytes != identity.size_bytes
        {
            tracing::error!(disk = %disk, was = bitmap.disk_size(), now = identity.size_bytes, "image size changed");
            return Some(ResyncReason::Resized);
        }
        if bitmap.block_size() != config.block_size {
            tracing::error!(disk = %disk, was = bitmap.block_size(), now = config.block_size, "block size changed");
            return Some(ResyncReason::BlockSizeChanged);
        }
        let was = record.identity;
        if (was.dev, was.ino, was.rdev) != (identity.dev, identity.ino, identity.rdev) {
            return Some(ResyncReason::ImageReplaced);
        }
        match record.shutdown {
            Shutdown::Clean if was.mtime_ns != identity.mtime_ns => {
                return Some(ResyncReason::ImageModified);
            }
            Shutdown::Clean => {}
            Shutdown::Running => {
                // The recorded mtime predates our own writes, so it proves nothing
                // either way; size, device and inode were still checked above.
                tracing::warn!(
                    disk = %disk,
                    dirty_blocks = bitmap.count(),
                    "previous shim did not shut down cleanly: continuing its tracking (write-intent bits cover every acknowledged write)"
                );
            }
        }
        None
    }

    /// A new generation with an empty bitmap, owing a resync for `reason` (logged: a
    /// warning on a first start, an error otherwise).
    fn new_generation(
        config: &TrackerConfig,
        identity: Identity,
        reason: ResyncReason,
    ) -> Result<Recovered, TrackerError> {
        let disk = &config.disk;
        let generation = GenerationId::random().map_err(|source| TrackerError::Io {
            disk: disk.clone(),
            op: "draw a generation id for",
            path: config.bitmap_path.clone(),
            source,
        })?;
        if reason == ResyncReason::FirstStart {
            tracing::warn!(
                disk = %disk, %generation,
                "no tracking history: starting a new generation; a replica that never held this disk needs a full or seeded sync (a promoted replica's reverse replication does not)"
            );
        } else {
            tracing::error!(
                disk = %disk, %generation, reason = %reason,
                "CHANGE TRACKING CANNOT BE TRUSTED: new generation drawn; a checksum-compare resync of this disk is required"
            );
        }
        let bitmap = ChangedBlockBitmap::new(identity.size_bytes, config.block_size, generation, 0)
            .map_err(|source| TrackerError::Bitmap {
                disk: disk.clone(),
                source,
            })?;
        Ok(Recovered {
            bitmap,
            resync: Some(reason),
            born: Some(identity),
        })
    }

    fn lock(&self) -> MutexGuard<'_, TrackState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn disk_size(&self) -> u64 {
        self.disk_size
    }

    /// Marks every block touched by `offset_bytes..offset_bytes + len_bytes` dirty and
    /// returns once those bits are durable. Call it before the write it covers.
    pub fn mark(&self, offset_bytes: u64, len_bytes: u64) -> Result<(), TrackerError> {
        match self.mark_begin(offset_bytes, len_bytes)? {
            None => Ok(()),
            Some(ticket) => self.mark_wait(ticket),
        }
    }

    /// The first half of [`Tracker::mark`], which never waits for I/O: sets the bits
    /// and returns `None` if they are already durable, or a ticket to pass to
    /// [`Tracker::mark_wait`] before the write they cover may start. Lets a thread
    /// that serves many requests (the io_uring engine) go on with others while the
    /// bits are synced, and have every write that arrives meanwhile join one group
    /// commit.
    pub fn mark_begin(
        &self,
        offset_bytes: u64,
        len_bytes: u64,
    ) -> Result<Option<MarkTicket>, TrackerError> {
        let end = offset_bytes
            .checked_add(len_bytes)
            .filter(|&end| end <= self.disk_size)
            .ok_or(TrackerError::OutOfRange {
                offset_bytes,
                len_bytes,
                disk_size: self.disk_size,
            })?;
        if len_bytes == 0 {
            return Ok(None);
        }
        let mut st = self.lock();
        if st.failed {
            return Err(TrackerError::Failed {
                disk: self.config.disk.clone(),
            });
        }
        let block_size = u64::from(st.bitmap.block_size());
        let first = offset_bytes / block_size;
        let last = (end - 1) / block_size;
        let mut needed_batch = 0;
        st.masks.mark(offset_bytes, len_bytes);
        for page in page_of_block(first)..=page_of_block(last) {
            let lo = first.max(page * BLOCKS_PER_PAGE);
            let hi = last.min((page + 1) * BLOCKS_PER_PAGE - 1);
            let bitmap_err = |source| TrackerError::Bitmap {
                disk: self.config.disk.clone(),
                source,
            };
            st.bitmap.set_blocks(lo, hi - lo + 1).map_err(bitmap_err)?;
            let before = st.persisted.count();
            st.persisted
                .set_blocks(lo, hi - lo + 1)
                .map_err(bitmap_err)?;
            let p = page as usize;
            if st.persisted.count() != before && st.page_batch[p] != st.open_batch {
                st.page_batch[p] = st.open_batch;
                st.pending_pages.push(page);
            }
            needed_batch = needed_batch.max(st.page_batch[p]);
        }
        if needed_batch <= st.durable_batch {
            return Ok(None);
        }
        st.marks_waited += 1;
        Ok(Some(MarkTicket(needed_batch)))
    }

    /// The second half of [`Tracker::mark`]: returns once the bits `ticket` stands
    /// for are durable, syncing them (with everything pending) if no other thread is.
    pub fn mark_wait(&self, ticket: MarkTicket) -> Result<(), TrackerError> {
        let st = self.lock();
        self.wait_durable(st, ticket.0)
    }

    /// Waits until `batch` is durable, syncing it (and everything pending with it)
    /// when no other thread is.
    fn wait_durable<'a>(
        &'a self,
        mut st: MutexGuard<'a, TrackState>,
        batch: u64,
    ) -> Result<(), TrackerError> {
        loop {
            if st.failed {
                return Err(TrackerError::Failed {
                    disk: self.config.disk.clone(),
                });
            }
            if st.durable_batch >= batch {
                return Ok(());
            }
            if st.syncing {
                st = self
                    .batch_durable
                    .wait(st)
                    .unwrap_or_else(|e| e.into_inner());
                continue;
            }
            // Become the syncer for the open batch, which includes `batch`.
            st.syncing = true;
            let closing = st.open_batch;
            st.open_batch += 1;
            let spare = std::mem::take(&mut st.spare_pages);
            let pages = std::mem::replace(&mut st.pending_pages, spare);
            let mut scratch = std::mem::take(&mut st.scratch);
            for (i, &page) in pages.iter().enumerate() {
                let out: &mut [u8; PAGE_SIZE] = (&mut scratch[i * PAGE_SIZE..(i + 1) * PAGE_SIZE])
                    .try_into()
                    .expect("slice of PAGE_SIZE bytes");
                st.persisted
                    .encode_page(page, out)
                    .expect("pending pages are below page_count");
            }
            drop(st);
            let written = self.write_pages(&pages, &scratch);
            st = self.lock();
            st.syncing = false;
            st.scratch = scratch;
            let mut pages = pages;
            pages.clear();
            st.spare_pages = pages;
            st.bitmap_syncs += 1;
            match written {
                Ok(()) => st.durable_batch = closing,
                Err(e) => {
                    tracing::error!(
                        disk = %self.config.disk,
                        error = %e,
                        "bitmap write failed: refusing every write from now on"
                    );
                    st.failed = true;
                }
            }
            self.batch_durable.notify_all();
        }
    }

    fn write_pages(&self, pages: &[u64], scratch: &[u8]) -> io::Result<()> {
        for (i, &page) in pages.iter().enumerate() {
            self.file.write_all_at(
                &scratch[i * PAGE_SIZE..(i + 1) * PAGE_SIZE],
                page_file_offset(page),
            )?;
        }
        loop {
            match self.file.sync_data() {
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                other => return other,
            }
        }
    }

    /// A snapshot for the control API.
    pub fn status(&self) -> TrackerStatus {
        let st = self.lock();
        TrackerStatus {
            generation_id: st.bitmap.generation_id(),
            frozen_blocks: st.frozen_blocks,
            block_size: st.bitmap.block_size(),
            block_count: st.bitmap.block_count(),
            dirty_blocks: st.bitmap.count(),
            resync_required: st.resync,
            bitmap_syncs: st.bitmap_syncs,
            marks_waited: st.marks_waited,
            failed: st.failed,
            born: self.born,
        }
    }

    /// A copy of the active bits (writes since the last freeze).
    pub fn snapshot(&self) -> ChangedBlockBitmap {
        self.lock().bitmap.clone()
    }

    /// A copy of what the bitmap file holds: active and frozen bits together.
    pub fn persisted(&self) -> ChangedBlockBitmap {
        self.lock().persisted.clone()
    }

    /// An empty bitmap of this disk's geometry and generation, made outside the freeze
    /// pause so that the pause allocates nothing.
    pub fn blank(&self) -> ChangedBlockBitmap {
        let mut b = self.lock().bitmap.clone();
        b.clear_all();
        b
    }

    /// Freezes an epoch: swaps the active bits and their granule masks into `blank`
    /// and `blank_masks` (which must come from [`blank`](Self::blank) and
    /// `GranuleMasks::like` of it, made outside the freeze pause) and starts a new, empty active set. The file
    /// keeps every bit. Call with writes to the disk drained.
    pub fn freeze(&self, blank: &mut ChangedBlockBitmap, blank_masks: &mut GranuleMasks) {
        let mut st = self.lock();
        debug_assert!(blank.is_empty() && blank.block_count() == st.bitmap.block_count());
        std::mem::swap(&mut st.bitmap, blank);
        std::mem::swap(&mut st.masks, blank_masks);
        st.frozen_blocks = Some(blank.count());
    }

    /// The target acknowledged the epoch that carried `frozen`: its bits leave the
    /// file unless written again since the freeze. Returns once that is durable.
    pub fn commit(&self, frozen: &ChangedBlockBitmap) -> Result<(), TrackerError> {
        let mut st = self.lock();
        st.frozen_blocks = None;
        let bitmap_err = |source| TrackerError::Bitmap {
            disk: self.config.disk.clone(),
            source,
        };
        st.persisted.and_not(frozen).map_err(bitmap_err)?;
        let TrackState {
            bitmap, persisted, ..
        } = &mut *st;
        persisted.or_with(bitmap).map_err(bitmap_err)?;
        let mut last_page = None;
        for (first, count) in frozen.iter_runs() {
            for page in page_of_block(first)..=page_of_block(first + count - 1) {
                if last_page == Some(page) {
                    continue;
                }
                last_page = Some(page);
                let p = page as usize;
                if st.page_batch[p] != st.open_batch {
                    st.page_batch[p] = st.open_batch;
                    st.pending_pages.push(page);
                }
            }
        }
        if last_page.is_none() {
            return Ok(());
        }
        let batch = st.open_batch;
        self.wait_durable(st, batch)
    }

    /// The epoch that carried `frozen` failed: its bits and granules join the active
    /// set again, so the next epoch carries them. The file already holds them; nothing
    /// is written.
    pub fn abort(
        &self,
        frozen: &ChangedBlockBitmap,
        frozen_masks: &GranuleMasks,
    ) -> Result<(), TrackerError> {
        let mut st = self.lock();
        st.frozen_blocks = None;
        st.masks.or_with(frozen_masks);
        st.bitmap
            .or_with(frozen)
            .map_err(|source| TrackerError::Bitmap {
                disk: self.config.disk.clone(),
                source,
            })
    }

    /// The consumer finished a checksum-compare resync of generation `generation`:
    /// tracking is trusted again. A stale generation is refused (false).
    pub fn resync_done(&self, generation: GenerationId) -> Result<bool, TrackerError> {
        let mut st = self.lock();
        if st.bitmap.generation_id() != generation {
            return Ok(false);
        }
        if st.resync.is_none() {
            return Ok(true);
        }
        let record = StateRecord {
            generation_id: generation,
            block_size: st.bitmap.block_size(),
            identity: self.identity,
            shutdown: Shutdown::Running,
            resync: None,
            born: self.born,
        };
        let path = self.config.state_path.clone();
        state::write(&path, &record).map_err(self.io_err("write state file", &path))?;
        tracing::info!(disk = %self.config.disk, %generation, "checksum-compare resync done: tracking trusted again");
        st.resync = None;
        Ok(true)
    }

    /// Records a clean shutdown: call after the last write has been synced to the
    /// image, with the image's identity as it is now.
    pub fn close_clean(&self, identity: Identity) -> Result<(), TrackerError> {
        let st = self.lock();
        let record = StateRecord {
            generation_id: st.bitmap.generation_id(),
            block_size: st.bitmap.block_size(),
            identity,
            shutdown: Shutdown::Clean,
            resync: st.resync,
            born: self.born,
        };
        let path = self.config.state_path.clone();
        state::write(&path, &record).map_err(self.io_err("write state file", &path))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    fn identity(size: u64) -> Identity {
        Identity {
            size_bytes: size,
            dev: 1,
            ino: 2,
            rdev: 0,
            mtime_ns: 3,
        }
    }

    fn config(dir: &Path) -> TrackerConfig {
        TrackerConfig {
            disk: "d".into(),
            bitmap_path: dir.join("d.cbt"),
            state_path: dir.join("d.state"),
            block_size: 4096,
        }
    }

    #[test]
    fn marks_are_durable_and_shared() {
        let dir = tempfile::tempdir().unwrap();
        let size = 3 * BLOCKS_PER_PAGE * 4096 + 5;
        let t = Arc::new(Tracker::open(config(dir.path()), identity(size)).unwrap());
        assert_eq!(t.status().resync_required, Some(ResyncReason::FirstStart));
        t.mark(0, 1).unwrap();
        t.mark(BLOCKS_PER_PAGE * 4096 - 1, 2).unwrap(); // straddles pages 0 and 1
        t.mark(size - 1, 1).unwrap();
        assert!(matches!(
            t.mark(size, 1),
            Err(TrackerError::OutOfRange { .. })
        ));
        let syncs = t.status().bitmap_syncs;
        t.mark(0, 4096).unwrap();
        assert_eq!(
            t.status().bitmap_syncs,
            syncs,
            "a durable bit costs no sync"
        );

        let threads: Vec<_> = (0..8u64)
            .map(|i| {
                let t = Arc::clone(&t);
                std::thread::spawn(move || {
                    for j in 0..200u64 {
                        t.mark((i * 1000 + j * 7) * 4096, 4096).unwrap();
                    }
                })
            })
            .collect();
        for th in threads {
            th.join().unwrap();
        }
        let (on_disk, rec) = ChangedBlockBitmap::load_recovering(dir.path().join("d.cbt")).unwrap();
        assert_eq!(rec.state, FileState::Live);
        assert_eq!(on_disk, t.snapshot(), "every acknowledged bit is on disk");
        let st = t.status();
        assert!(
            st.bitmap_syncs < 1 + 3 + 1600,
            "group commit batched: {st:?}"
        );
    }

    #[test]
    fn mark_begin_never_waits_and_mark_wait_makes_the_bits_durable() {
        let dir = tempfile::tempdir().unwrap();
        let size = 64 * 4096;
        let t = Tracker::open(config(dir.path()), identity(size)).unwrap();
        let on_disk = || {
            ChangedBlockBitmap::load_recovering(dir.path().join("d.cbt"))
                .unwrap()
                .0
        };
        let a = t
            .mark_begin(0, 4096)
            .unwrap()
            .expect("a new bit waits for a sync");
        let b = t.mark_begin(5 * 4096, 1).unwrap().expect("so does another");
        assert!(!on_disk().test(0).unwrap(), "nothing synced yet");
        assert_eq!(t.status().bitmap_syncs, 0);
        t.mark_wait(b).unwrap();
        assert_eq!(t.status().bitmap_syncs, 1, "one sync for both");
        t.mark_wait(a).unwrap();
        assert_eq!(t.status().bitmap_syncs, 1);
        assert!(on_disk().test(0).unwrap() && on_disk().test(5).unwrap());
        assert_eq!(t.mark_begin(0, 4096).unwrap(), None, "durable: no ticket");
        assert_eq!(t.mark_begin(0, 0).unwrap(), None);
        assert!(matches!(
            t.mark_begin(size, 1),
            Err(TrackerError::OutOfRange { .. })
        ));
    }

    #[test]
    fn restart_continues_or_detects_changes() {
        let dir = tempfile::tempdir().unwrap();
        let size = 1 << 20;
        let t = Tracker::open(config(dir.path()), identity(size)).unwrap();
        let gen = t.status().generation_id;
        t.mark(8192, 100).unwrap();
        drop(t); // a crash: no clean close

        let t = Tracker::open(config(dir.path()), identity(size)).unwrap();
        let st = t.status();
        assert_eq!(st.generation_id, gen, "tracking continues after a crash");
        assert_eq!(st.dirty_blocks, 1);
        assert_eq!(
            st.resync_required,
            Some(ResyncReason::FirstStart),
            "still owed"
        );
        t.close_clean(identity(size)).unwrap();
        drop(t);

        // Modified after a clean shutdown: new generation, empty, resync required.
        let mut changed = identity(size);
        changed.mtime_ns += 1;
        let t = Tracker::open(config(dir.path()), changed).unwrap();
        let st = t.status();
        assert_ne!(st.generation_id, gen);
        assert_eq!(st.dirty_blocks, 0);
        assert_eq!(st.resync_required, Some(ResyncReason::ImageModified));
        drop(t);

        let t = Tracker::open(config(dir.path()), identity(2 * size)).unwrap();
        assert_eq!(t.status().resync_required, Some(ResyncReason::Resized));
        drop(t);
        let mut other = identity(2 * size);
        other.ino = 99;
        let t = Tracker::open(config(dir.path()), other).unwrap();
        assert_eq!(
            t.status().resync_required,
            Some(ResyncReason::ImageReplaced)
        );
        drop(t);
        std::fs::write(dir.path().join("d.cbt"), b"garbage").unwrap();
        let t = Tracker::open(config(dir.path()), other).unwrap();
        assert_eq!(
            t.status().resync_required,
            Some(ResyncReason::BitmapUnreadable)
        );
    }

    #[test]
    fn torn_page_recovers_as_dirty() {
        let dir = tempfile::tempdir().unwrap();
        let size = 2 * BLOCKS_PER_PAGE * 4096;
        let t = Tracker::open(config(dir.path()), identity(size)).unwrap();
        t.mark(0, 1).unwrap();
        drop(t);
        // Tear page 1 (file offset 8192).
        let f = OpenOptions::new()
            .write(true)
            .open(dir.path().join("d.cbt"))
            .unwrap();
        f.write_all_at(&[0xff; 512], page_file_offset(1)).unwrap();
        let t = Tracker::open(config(dir.path()), identity(size)).unwrap();
        let st = t.status();
        assert_eq!(st.dirty_blocks, 1 + BLOCKS_PER_PAGE);
    }

    #[test]
    fn epochs_keep_the_file_a_superset_until_commit() {
        let dir = tempfile::tempdir().unwrap();
        let size = 2 * BLOCKS_PER_PAGE * 4096;
        let t = Tracker::open(config(dir.path()), identity(size)).unwrap();
        let on_disk = || {
            ChangedBlockBitmap::load_recovering(dir.path().join("d.cbt"))
                .unwrap()
                .0
        };
        t.mark(0, 1).unwrap();
        t.mark(BLOCKS_PER_PAGE * 4096, 1).unwrap(); // page 1
        let mut frozen = t.blank();
        let mut masks = GranuleMasks::like(&frozen);
        t.freeze(&mut frozen, &mut masks);
        assert_eq!(frozen.count(), 2);
        assert_eq!(t.status().dirty_blocks, 0);
        assert_eq!(t.status().frozen_blocks, Some(2));
        // A write after the freeze to a frozen block and a new one.
        t.mark(0, 1).unwrap();
        t.mark(4096, 1).unwrap();
        assert_eq!(on_disk().count(), 3, "file holds frozen and active bits");

        // Abort: the frozen bits come back; nothing is lost.
        t.abort(&frozen, &masks).unwrap();
        assert_eq!(t.status().dirty_blocks, 3);
        assert_eq!(on_disk(), t.persisted());

        let mut frozen = t.blank();
        let mut masks = GranuleMasks::like(&frozen);
        t.freeze(&mut frozen, &mut masks);
        t.mark(4096, 1).unwrap(); // written again after the freeze: stays
        t.commit(&frozen).unwrap();
        let after = on_disk();
        assert_eq!(after.count(), 1, "commit cleared the carried bits");
        assert!(after.test(1).unwrap());
        assert_eq!(t.status().frozen_blocks, None);

        // A crash with an epoch frozen: restart sees every bit.
        let mut frozen = t.blank();
        let mut masks = GranuleMasks::like(&frozen);
        t.mark(0, 1).unwrap();
        t.freeze(&mut frozen, &mut masks);
        t.mark(2 * 4096, 1).unwrap();
        drop(t);
        let t = Tracker::open(config(dir.path()), identity(size)).unwrap();
        assert_eq!(t.status().dirty_blocks, 3);
    }

    #[test]
    fn granule_masks_follow_the_bits_and_are_whole_after_a_restart() {
        let dir = tempfile::tempdir().unwrap();
        let mut cfg = config(dir.path());
        cfg.block_size = 64 << 10;
        let size = 64 * (64 << 10);
        let t = Tracker::open(cfg.clone(), identity(size)).unwrap();
        t.mark(4096, 4096).unwrap();
        t.mark((64 << 10) + 512, 100).unwrap();
        let mut frozen = t.blank();
        let mut masks = GranuleMasks::like(&frozen);
        t.freeze(&mut frozen, &mut masks);
        assert_eq!((masks.get(0), masks.get(1)), (0b10, 0b1));
        assert_eq!(t.lock().masks.get(0), 0, "the active masks start empty");
        // Written again after the freeze, then the epoch fails: both granules come back.
        t.mark(8192, 4096).unwrap();
        t.abort(&frozen, &masks).unwrap();
        assert_eq!(t.lock().masks.get(0), 0b110);
        assert_eq!(t.lock().masks.get(1), 0b1);
        let mut frozen = t.blank();
        let mut masks = GranuleMasks::like(&frozen);
        t.freeze(&mut frozen, &mut masks);
        t.commit(&frozen).unwrap();
        t.mark(20 << 10, 4096).unwrap();
        // A crash: the bits come back from the file, their granules unknown (whole).
        drop(t);
        let t = Tracker::open(cfg, identity(size)).unwrap();
        assert_eq!(t.lock().masks.get(0), 0xffff);
        assert_eq!(t.lock().masks.get(1), 0);
    }

    #[test]
    fn resync_done_clears_only_the_current_generation() {
        let dir = tempfile::tempdir().unwrap();
        let t = Tracker::open(config(dir.path()), identity(1 << 20)).unwrap();
        let gen = t.status().generation_id;
        assert!(t.status().resync_required.is_some());
        assert!(!t.resync_done(GenerationId::from_bytes([9; 16])).unwrap());
        assert!(t.status().resync_required.is_some());
        assert!(t.resync_done(gen).unwrap());
        assert_eq!(t.status().resync_required, None);
        drop(t);
        let t = Tracker::open(config(dir.path()), identity(1 << 20)).unwrap();
        assert_eq!(t.status().resync_required, None, "persisted");
        assert_eq!(t.status().generation_id, gen);
    }
}
