//! Sample disk images for `ferry demo`, `ferry bench` and `benches/peers.sh`.
//!
//! A replication benchmark is only as honest as its data. An image of random bytes
//! hides what compression buys; an image of zeros hides what reading costs. So the
//! generator builds what a VM disk looks like: an ext4 file system filled with real
//! operating-system files (binaries, libraries, headers, documentation), the rest of
//! the disk never written. Same machine and same arguments give nearly the same image
//! (fixed UUID, hash seed and creation time; only inode timestamps of the staged files
//! vary), so runs can be compared side by side.
//!
//! Without `mke2fs` the generator falls back to a deterministic synthetic image of
//! text-like, incompressible and zero blocks, and says so in [`ImageInfo::kind`].

use std::collections::{BTreeSet, HashSet};
use std::fs::{self, File};
use std::io::{self, Write};
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus};

use crate::io_failure::{IoFailure, Where};

use ferry_io::rng::Rng;

/// One mebibyte, the unit image sizes are given in.
pub const MIB: u64 = 1 << 20;

/// Where the OS files come from, in the order they are taken while they fit the budget.
/// Whole folders only, so the image holds coherent trees, not a random sample of files.
/// Later entries overlap earlier ones (`/usr/share` holds `/usr/share/doc`); they are
/// only taken by budgets large enough for all of it, and files staged twice share one
/// inode in the image.
const OS_FILE_SOURCES: &[&str] = &[
    "/usr/share/doc",
    "/usr/include",
    "/usr/share/man",
    "/usr/lib/python3",
    "/usr/lib/gcc",
    "/usr/share/locale",
    "/usr/bin",
    "/usr/lib/x86_64-linux-gnu",
    "/usr/share",
    "/usr/lib",
];

/// Fixed file-system UUID, directory hash seed and creation time: with them, two runs
/// on one machine lay the file system out the same way.
const FS_UUID: &str = "6f9e3c1a-0b2d-4e5f-8a7b-1c2d3e4f5a6b";
const FS_HASH_SEED: &str = "2b9a4c1e-7d3f-4a6b-9c8d-0e1f2a3b4c5d";
const FS_FAKE_TIME: &str = "1700000000";

/// ext4 block size. Forced (mke2fs picks 1 KiB below 512 MiB) because VM disks use
/// 4 KiB blocks and the block pattern decides how changes spread over 64 KiB blocks.
const FS_BLOCK_BYTES: u64 = 4096;
/// mke2fs's default bytes per inode; more inodes are asked for only when the staged
/// tree has more entries than that gives.
const FS_BYTES_PER_INODE: u64 = 16384;

/// Granularity of the synthetic generator: the default replication block size, so
/// each block is wholly text-like, incompressible or zero.
pub const SYNTHETIC_BLOCK_BYTES: usize = 64 << 10;
/// Share of the synthetic image's data blocks that are text-like (compressible); the
/// rest are incompressible, roughly the mix of an OS disk of documentation and binaries.
const SYNTHETIC_TEXT_PERCENT: u64 = 65;

/// How the image was made.
#[derive(Debug, Clone)]
pub enum ImageKind {
    /// An ext4 file system holding the OS folders in `sources`.
    Ext4 { sources: Vec<PathBuf> },
    /// The synthetic fallback, and why the real one could not be built.
    Synthetic { reason: String },
}

/// What [`make_os_image`] built.
#[derive(Debug, Clone)]
pub struct ImageInfo {
    pub path: PathBuf,
    pub size_bytes: u64,
    /// Bytes of file data (ext4) or of non-zero blocks (synthetic) in the image.
    pub data_bytes: u64,
    pub kind: ImageKind,
}

impl ImageInfo {
    /// One line for humans.
    pub fn describe(&self) -> String {
        let size_mib = self.size_bytes / MIB;
        let data_mib = self.data_bytes as f64 / MIB as f64;
        match &self.kind {
            ImageKind::Ext4 { sources } => {
                let names: Vec<String> = sources.iter().map(|p| p.display().to_string()).collect();
                format!(
                    "{size_mib} MiB ext4 image, {data_mib:.0} MiB of OS files from {}",
                    if names.is_empty() { "nowhere (empty file system)".to_string() } else { names.join(", ") }
                )
            }
            ImageKind::Synthetic { reason } => format!(
                "{size_mib} MiB SYNTHETIC image ({data_mib:.0} MiB of text-like and incompressible blocks) \
                 because {reason}"
            ),
        }
    }
}

/// Why an image could not be made or changed.
#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    #[error("image size {size_mib} MiB is outside 8 MiB ..= 16 TiB")]
    Size { size_mib: u64 },
    #[error("fill {fill_percent}% leaves no room for file-system metadata; use at most 95%")]
    Fill { fill_percent: u32 },
    #[error("mutate: block size must not be zero")]
    ZeroBlockSize,
    #[error("mutate: fraction {fraction} is not between 0 and 1")]
    Fraction { fraction: f64 },
    #[error("cannot run {}", tool.display())]
    Spawn {
        tool: PathBuf,
        #[source]
        source: io::Error,
    },
    /// mke2fs ran and failed; `stderr` is what it said.
    #[error("{} failed ({status}) building {} from {entries} staged files: {stderr}", tool.display(), out.display())]
    Mke2fs {
        tool: PathBuf,
        status: ExitStatus,
        out: PathBuf,
        entries: u64,
        stderr: String,
    },
    #[error("no randomness for a temp dir name: {0}")]
    TempName(getrandom::Error),
    #[error(transparent)]
    Io(#[from] IoFailure),
}

/// Builds a realistic VM disk image of `size_mib` MiB at `out`, filled to about
/// `fill_percent` with real OS files (see the module docs). Replaces `out`.
pub fn make_os_image(
    out: &Path,
    size_mib: u64,
    fill_percent: u32,
) -> Result<ImageInfo, ImageError> {
    check_geometry(size_mib, fill_percent)?;
    let Some(mke2fs) = find_mke2fs() else {
        let reason = "mke2fs (e2fsprogs) was not found in PATH, /usr/sbin or /sbin".to_string();
        return make_synthetic_image(out, size_mib, fill_percent, 0, reason);
    };
    let size_bytes = size_mib * MIB;
    let budget_bytes = size_bytes * u64::from(fill_percent) / 100;

    // Staging next to the image would be tidy, but hard links need the staging area on
    // the same file system as /usr, which the temp dir usually is and /dev/shm is not.
    let stage = TempDir::new("ferry-image-stage")?;
    let (staged, sources) = stage_os_files(stage.path(), budget_bytes)?;

    let tmp_out = with_suffix(out, ".partial");
    drop(create_sized(&tmp_out, size_bytes)?);
    run_mke2fs(&mke2fs, stage.path(), &staged, size_bytes, &tmp_out, out)?;
    rename(&tmp_out, out)?;
    Ok(ImageInfo {
        path: out.to_path_buf(),
        size_bytes,
        data_bytes: staged.file_bytes,
        kind: ImageKind::Ext4 { sources },
    })
}

/// Stages the trees of [`OS_FILE_SOURCES`] that fit in `budget_bytes` under `stage`;
/// returns what was staged and which trees.
fn stage_os_files(stage: &Path, budget_bytes: u64) -> Result<(Staged, Vec<PathBuf>), ImageError> {
    let mut staged = Staged::default();
    let mut sources = Vec::new();
    let mut used_bytes = 0u64;
    for src in OS_FILE_SOURCES.iter().map(Path::new) {
        if !src.is_dir() {
            continue;
        }
        let need_bytes = disk_usage(src);
        if used_bytes + need_bytes > budget_bytes {
            continue;
        }
        let dest = stage.join(src.to_string_lossy().replace('/', "_"));
        stage_tree(src, &dest, &mut staged)?;
        used_bytes += need_bytes;
        sources.push(src.to_path_buf());
    }
    Ok((staged, sources))
}

/// Formats `image` (already `size_bytes` long) as ext4 holding the files staged in
/// `stage`, deterministically; removes `image` if mke2fs fails. `out` is the final
/// name, for the message.
fn run_mke2fs(
    mke2fs: &Path,
    stage: &Path,
    staged: &Staged,
    size_bytes: u64,
    image: &Path,
    out: &Path,
) -> Result<(), ImageError> {
    let mut cmd = Command::new(mke2fs);
    cmd.env("E2FSPROGS_FAKE_TIME", FS_FAKE_TIME)
        .args(["-q", "-F", "-t", "ext4", "-b"])
        .arg(FS_BLOCK_BYTES.to_string())
        .args(["-U", FS_UUID, "-E"])
        .arg(format!(
            "hash_seed={FS_HASH_SEED},lazy_itable_init=0,lazy_journal_init=0"
        ));
    let inodes_needed = staged.entries + staged.entries / 4 + 1024;
    if inodes_needed > size_bytes / FS_BYTES_PER_INODE {
        cmd.arg("-N").arg(inodes_needed.to_string());
    }
    cmd.arg("-d").arg(stage).arg(image);
    let output = cmd.output().map_err(|source| ImageError::Spawn {
        tool: mke2fs.to_path_buf(),
        source,
    })?;
    if !output.status.success() {
        let _ = fs::remove_file(image);
        return Err(ImageError::Mke2fs {
            tool: mke2fs.to_path_buf(),
            status: output.status,
            out: out.to_path_buf(),
            entries: staged.entries,
            stderr: String::from_utf8_lossy(&output.stderr).trim().to_string(),
        });
    }
    Ok(())
}

/// Creates the image file `path` and sets its length.
fn create_sized(path: &Path, size_bytes: u64) -> Result<File, IoFailure> {
    let file = File::create(path).map_err(IoFailure::on("cannot create image", path))?;
    file.set_len(size_bytes).map_err(IoFailure::at(
        "cannot size image",
        path,
        Where::Size(size_bytes),
    ))?;
    Ok(file)
}

/// Renames a finished image into place.
fn rename(from: &Path, to: &Path) -> Result<(), IoFailure> {
    fs::rename(from, to).map_err(IoFailure::at(
        "cannot move",
        from,
        Where::To(to.to_path_buf()),
    ))
}

/// Builds a deterministic synthetic image: about `fill_percent` of its 64 KiB blocks
/// hold data (text-like or incompressible, chosen by `seed`), the rest are holes.
/// `reason` says why this and not [`make_os_image`] (shown by [`ImageInfo::describe`]).
pub fn make_synthetic_image(
    out: &Path,
    size_mib: u64,
    fill_percent: u32,
    seed: u64,
    reason: String,
) -> Result<ImageInfo, ImageError> {
    check_geometry(size_mib, fill_percent)?;
    let size_bytes = size_mib * MIB;
    let tmp_out = with_suffix(out, ".partial");
    let file = create_sized(&tmp_out, size_bytes)?;
    let mut block = vec![0u8; SYNTHETIC_BLOCK_BYTES];
    let mut data_bytes = 0u64;
    let block_count = size_bytes / SYNTHETIC_BLOCK_BYTES as u64;
    for index in 0..block_count {
        let mut rng = Rng::new(seed ^ index.wrapping_mul(0x9e37_79b9_7f4a_7c15));
        if rng.below(100) >= u64::from(fill_percent) {
            continue;
        }
        if rng.below(100) < SYNTHETIC_TEXT_PERCENT {
            fill_text(&mut rng, &mut block);
        } else {
            rng.fill(&mut block);
        }
        let offset = index * SYNTHETIC_BLOCK_BYTES as u64;
        file.write_all_at(&block, offset).map_err(IoFailure::at(
            "cannot write image",
            &tmp_out,
            Where::Offset(offset),
        ))?;
        data_bytes += SYNTHETIC_BLOCK_BYTES as u64;
    }
    file.sync_data()
        .map_err(IoFailure::on("cannot flush image", &tmp_out))?;
    drop(file);
    rename(&tmp_out, out)?;
    Ok(ImageInfo {
        path: out.to_path_buf(),
        size_bytes,
        data_bytes,
        kind: ImageKind::Synthetic { reason },
    })
}

/// Overwrites a deterministic pseudo-random `fraction` (0.0..=1.0) of the
/// `block_size`-byte blocks of the image at `path` with new bytes, as a guest's writes
/// would, and returns the indices of the changed blocks in ascending order. Every
/// returned block really differs from what it held. A `fraction` above zero changes at
/// least one block.
pub fn mutate_blocks(
    path: &Path,
    block_size: usize,
    fraction: f64,
    seed: u64,
) -> Result<Vec<u64>, ImageError> {
    if block_size == 0 {
        return Err(ImageError::ZeroBlockSize);
    }
    if !(0.0..=1.0).contains(&fraction) {
        return Err(ImageError::Fraction { fraction });
    }
    let file = fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .map_err(IoFailure::on("mutate: cannot open", path))?;
    let size_bytes = file
        .metadata()
        .map_err(IoFailure::on("mutate: cannot stat", path))?
        .len();
    let mut rng = Rng::new(seed ^ 0x6d75_7461_7465_2121);
    let chosen = choose_blocks(&mut rng, size_bytes.div_ceil(block_size as u64), fraction);

    let mut old = vec![0u8; block_size];
    let mut new = vec![0u8; block_size];
    for &block in &chosen {
        let offset = block * block_size as u64;
        let len = (size_bytes - offset).min(block_size as u64) as usize;
        let (old, new) = (&mut old[..len], &mut new[..len]);
        file.read_exact_at(old, offset).map_err(IoFailure::at(
            "mutate: cannot read",
            path,
            Where::Offset(offset),
        ))?;
        fill_different(&mut rng, old, new);
        file.write_all_at(new, offset).map_err(IoFailure::at(
            "mutate: cannot write",
            path,
            Where::Offset(offset),
        ))?;
    }
    file.sync_data()
        .map_err(IoFailure::on("mutate: cannot flush", path))?;
    Ok(chosen.into_iter().collect())
}

/// Picks `fraction` of `block_count` block indices at random, at least one when
/// `fraction` is above zero.
fn choose_blocks(rng: &mut Rng, block_count: u64, fraction: f64) -> BTreeSet<u64> {
    let mut wanted = (block_count as f64 * fraction).round() as u64;
    if fraction > 0.0 && block_count > 0 {
        wanted = wanted.max(1);
    }
    let wanted = wanted.min(block_count);

    // Floyd's algorithm: `wanted` distinct indices in `wanted` draws, whatever the ratio.
    let mut chosen = BTreeSet::new();
    for j in (block_count - wanted)..block_count {
        let t = rng.below(j + 1);
        if !chosen.insert(t) {
            chosen.insert(j);
        }
    }
    chosen
}

/// Fills `new` with fresh bytes that differ from `old`.
fn fill_different(rng: &mut Rng, old: &[u8], new: &mut [u8]) {
    // Half the writes look like file content, half like compressed or encrypted data.
    if rng.below(2) == 0 {
        fill_text(rng, new);
    } else {
        rng.fill(new);
    }
    if new == old {
        new[0] = !new[0];
    }
}

fn check_geometry(size_mib: u64, fill_percent: u32) -> Result<(), ImageError> {
    // ext4 with a journal needs a few MiB; 8 MiB keeps the generator out of edge cases.
    if !(8..=(1 << 24)).contains(&size_mib) {
        return Err(ImageError::Size { size_mib });
    }
    if fill_percent > 95 {
        return Err(ImageError::Fill { fill_percent });
    }
    Ok(())
}

fn find_mke2fs() -> Option<PathBuf> {
    let path_dirs = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
        .unwrap_or_default();
    path_dirs
        .into_iter()
        .chain(["/usr/sbin", "/sbin"].iter().map(PathBuf::from))
        .map(|d| d.join("mke2fs"))
        .find(|p| p.is_file())
}

fn with_suffix(path: &Path, suffix: &str) -> PathBuf {
    let mut s = path.as_os_str().to_os_string();
    s.push(suffix);
    PathBuf::from(s)
}

/// Space `root` takes on its file system, counting each inode once (as `du -s` does).
/// Unreadable parts count as empty: they will not be staged either.
fn disk_usage(root: &Path) -> u64 {
    let mut seen = HashSet::new();
    let mut total = 0u64;
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        let Ok(entries) = fs::read_dir(&dir) else {
            continue;
        };
        for entry in entries.flatten() {
            let Ok(meta) = entry.metadata() else { continue };
            if seen.insert((meta.dev(), meta.ino())) {
                total += meta.blocks() * 512;
            }
            if meta.is_dir() {
                stack.push(entry.path());
            }
        }
    }
    total
}

#[derive(Default)]
struct Staged {
    /// Directory entries staged (inodes the file system will need, roughly).
    entries: u64,
    /// Bytes of regular files staged.
    file_bytes: u64,
    /// Set at the first hard link refused (another file system, or not allowed):
    /// every later file is copied without trying.
    links_refused: bool,
}

/// Mirrors the tree at `src` into `dest`: directories made, regular files hard-linked
/// (copied when linking is refused), symlinks recreated. Entries that cannot be read
/// are left out, as `cp -a` would report and skip them; failing to write the staging
/// area is an error.
fn stage_tree(src: &Path, dest: &Path, staged: &mut Staged) -> Result<(), IoFailure> {
    let mut stack = vec![(src.to_path_buf(), dest.to_path_buf())];
    while let Some((from_dir, to_dir)) = stack.pop() {
        fs::create_dir_all(&to_dir).map_err(IoFailure::on("staging: cannot create", &to_dir))?;
        let Ok(entries) = fs::read_dir(&from_dir) else {
            continue;
        };
        for entry in entries.flatten() {
            let Ok(file_type) = entry.file_type() else {
                continue;
            };
            let from = entry.path();
            let to = to_dir.join(entry.file_name());
            if file_type.is_dir() {
                stack.push((from, to));
            } else if file_type.is_file() {
                let Ok(meta) = entry.metadata() else { continue };
                if !stage_file(&from, &to, &meta, staged)? {
                    continue;
                }
                staged.file_bytes += meta.len();
            } else if file_type.is_symlink() {
                let Ok(link) = fs::read_link(&from) else {
                    continue;
                };
                std::os::unix::fs::symlink(&link, &to)
                    .map_err(IoFailure::on("staging: cannot create symlink", &to))?;
            } else {
                // Sockets, FIFOs and device nodes are not disk content.
                continue;
            }
            staged.entries += 1;
        }
        staged.entries += 1;
    }
    Ok(())
}

/// Stages one regular file; `Ok(false)` if the source cannot be read.
fn stage_file(
    from: &Path,
    to: &Path,
    meta: &fs::Metadata,
    staged: &mut Staged,
) -> Result<bool, IoFailure> {
    if !staged.links_refused {
        match fs::hard_link(from, to) {
            Ok(()) => return Ok(true),
            Err(_) => staged.links_refused = true,
        }
    }
    let Ok(mut reader) = File::open(from) else {
        return Ok(false);
    };
    let mut writer = File::create(to).map_err(IoFailure::on("staging: cannot create", to))?;
    match io::copy(&mut reader, &mut writer) {
        Ok(_) => {}
        // The source vanished or cannot be read mid-way: leave it out.
        Err(_) if reader.metadata().is_err() => {
            drop(writer);
            let _ = fs::remove_file(to);
            return Ok(false);
        }
        Err(e) => {
            return Err(IoFailure::at(
                "staging: cannot copy",
                from,
                Where::To(to.to_path_buf()),
            )(e))
        }
    }
    writer
        .flush()
        .and_then(|()| writer.set_permissions(meta.permissions()))
        .and_then(|()| meta.modified().and_then(|t| writer.set_modified(t)))
        .map_err(IoFailure::on("staging: cannot finish", to))?;
    Ok(true)
}

/// A directory that is removed, with everything in it, when dropped.
pub struct TempDir {
    path: PathBuf,
}

impl TempDir {
    /// Creates `<temp dir>/<prefix>-<pid>-<random>`.
    pub fn new(prefix: &str) -> Result<TempDir, ImageError> {
        Self::new_in(&std::env::temp_dir(), prefix)
    }

    /// Creates `<parent>/<prefix>-<pid>-<random>`.
    pub fn new_in(parent: &Path, prefix: &str) -> Result<TempDir, ImageError> {
        let mut nonce = [0u8; 8];
        getrandom::fill(&mut nonce).map_err(ImageError::TempName)?;
        let path = parent.join(format!(
            "{prefix}-{}-{:016x}",
            std::process::id(),
            u64::from_le_bytes(nonce)
        ));
        fs::create_dir(&path).map_err(IoFailure::on("cannot create temp dir", &path))?;
        Ok(TempDir { path })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        if let Err(e) = fs::remove_dir_all(&self.path) {
            eprintln!(
                "ferry: warning: cannot remove temp dir {}: {e}",
                self.path.display()
            );
        }
    }
}

/// Words for text-like blocks: prose and config-file vocabulary, so zstd finds the
/// redundancy it finds in documentation and source (about 3:1 at level 1).
const WORDS: &[&str] = &[
    "the",
    "of",
    "and",
    "to",
    "in",
    "is",
    "for",
    "that",
    "with",
    "on",
    "as",
    "by",
    "file",
    "system",
    "data",
    "block",
    "disk",
    "write",
    "read",
    "error",
    "return",
    "value",
    "if",
    "else",
    "struct",
    "int",
    "char",
    "const",
    "static",
    "void",
    "include",
    "define",
    "config",
    "option",
    "default",
    "user",
    "kernel",
    "device",
    "memory",
    "buffer",
    "page",
    "size",
    "offset",
    "length",
    "copy",
    "replica",
    "source",
    "target",
    "version",
    "license",
    "copyright",
    "software",
    "free",
    "GNU",
    "usage",
    "see",
    "manual",
];

fn fill_text(rng: &mut Rng, buf: &mut [u8]) {
    let mut pos = 0;
    let mut line_words = 0;
    while pos < buf.len() {
        let word = WORDS[rng.below(WORDS.len() as u64) as usize].as_bytes();
        let sep: &[u8] = if line_words >= 8 + rng.below(6) {
            line_words = 0;
            b".\n"
        } else {
            line_words += 1;
            b" "
        };
        for &b in word.iter().chain(sep) {
            if pos == buf.len() {
                break;
            }
            buf[pos] = b;
            pos += 1;
        }
        if rng.below(16) == 0 && pos + 6 <= buf.len() {
            let n = rng.below(100_000);
            let digits = format!("{n:05} ");
            buf[pos..pos + 6].copy_from_slice(digits.as_bytes());
            pos += 6;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn synthetic_image_is_deterministic_and_mixed() {
        let dir = TempDir::new("ferry-imagegen-test").expect("temp dir");
        let a = dir.path().join("a.img");
        let b = dir.path().join("b.img");
        let info = make_synthetic_image(&a, 8, 50, 7, "test".into()).expect("image a");
        make_synthetic_image(&b, 8, 50, 7, "test".into()).expect("image b");
        assert_eq!(fs::read(&a).expect("read a"), fs::read(&b).expect("read b"));
        assert_eq!(info.size_bytes, 8 * MIB);
        assert!(info.data_bytes > 0 && info.data_bytes < info.size_bytes);
        let bytes = fs::read(&a).expect("read a");
        let blocks: Vec<&[u8]> = bytes.chunks(SYNTHETIC_BLOCK_BYTES).collect();
        assert!(
            blocks.iter().any(|b| b.iter().all(|&x| x == 0)),
            "some blocks are zero"
        );
        assert!(
            blocks.iter().any(|b| b.iter().all(|&x| x.is_ascii())),
            "some blocks are text"
        );
    }

    #[test]
    fn mutate_changes_exactly_the_reported_blocks() {
        let dir = TempDir::new("ferry-imagegen-test").expect("temp dir");
        let path = dir.path().join("m.img");
        make_synthetic_image(&path, 8, 30, 1, "test".into()).expect("image");
        let before = fs::read(&path).expect("read before");
        let block_size = 64 << 10;
        let changed = mutate_blocks(&path, block_size, 0.1, 42).expect("mutate");
        let after = fs::read(&path).expect("read after");
        assert_eq!(before.len(), after.len());
        let block_count = before.len().div_ceil(block_size) as u64;
        assert_eq!(
            changed.len() as u64,
            (block_count as f64 * 0.1).round() as u64
        );
        assert!(
            changed.windows(2).all(|w| w[0] < w[1]),
            "sorted and distinct"
        );
        for (i, (old, new)) in before
            .chunks(block_size)
            .zip(after.chunks(block_size))
            .enumerate()
        {
            assert_eq!(
                old != new,
                changed.binary_search(&(i as u64)).is_ok(),
                "block {i}"
            );
        }
        assert_eq!(
            mutate_blocks(&path, block_size, 0.1, 42).expect("again"),
            changed,
            "same seed, same blocks"
        );
    }

    #[test]
    fn mutate_rejects_nonsense() {
        let dir = TempDir::new("ferry-imagegen-test").expect("temp dir");
        let path = dir.path().join("x.img");
        assert!(mutate_blocks(&path, 4096, 0.5, 0).is_err(), "missing file");
        File::create(&path).expect("create");
        assert!(mutate_blocks(&path, 0, 0.5, 0).is_err());
        assert!(mutate_blocks(&path, 4096, 1.5, 0).is_err());
        assert_eq!(
            mutate_blocks(&path, 4096, 0.5, 0).expect("empty file"),
            Vec::<u64>::new()
        );
    }

    #[test]
    fn temp_dir_is_removed() {
        let dir = TempDir::new("ferry-imagegen-test").expect("temp dir");
        let path = dir.path().to_path_buf();
        fs::write(path.join("f"), b"x").expect("write");
        drop(dir);
        assert!(!path.exists());
    }
}
