//! The allocated parts of a disk, so initial replication reads data and skips holes.
//!
//! Image files are walked with `lseek(SEEK_DATA)` / `lseek(SEEK_HOLE)`: two system calls
//! per extent, no allocation, so a 100 GiB sparse file holding a few MiB costs
//! microseconds. A block device has no holes to report; it is one extent.

use std::iter::FusedIterator;

use nix::errno::Errno;
use nix::unistd::{lseek, Whence};

use super::disk::{Disk, DiskKind, DiskOp};
use super::IoError;

/// Iterates over `(offset, len)` byte ranges of `disk` that may hold data, in order,
/// non-overlapping, within `0..disk.size()`. Everything outside them reads as zeros.
///
/// Extent edges are where the file system puts them (its block size in practice); the
/// last one may end at an unaligned `disk.size()`. A file system without
/// `SEEK_DATA`/`SEEK_HOLE` reports the rest of the file as one extent. The walk moves the
/// file offset of the disk's descriptor, which positional I/O (`pread`, io_uring) ignores.
pub fn data_extents(disk: &Disk) -> DataExtents<'_> {
    let walk = match disk.kind() {
        DiskKind::File => Walk::Seek,
        DiskKind::BlockDevice => Walk::Whole,
    };
    DataExtents {
        disk,
        next_offset: 0,
        walk,
    }
}

/// Iterator returned by [`data_extents`].
#[derive(Debug)]
pub struct DataExtents<'a> {
    disk: &'a Disk,
    /// Where the next search starts; everything before it has been reported.
    next_offset: u64,
    walk: Walk,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Walk {
    /// Ask the file system for the next data and hole.
    Seek,
    /// Report everything left as one extent.
    Whole,
    Finished,
}

impl DataExtents<'_> {
    fn seek(&self, from: u64, whence: Whence) -> Result<u64, Errno> {
        // Offsets stay below disk.size(), a file size, so they fit in off_t.
        lseek(self.disk.fd(), from as libc::off_t, whence).map(|at| at as u64)
    }

    fn fail(&mut self, op: DiskOp, offset: u64, errno: Errno) -> Option<<Self as Iterator>::Item> {
        self.walk = Walk::Finished;
        Some(Err(self.disk.error(op, Some(offset), errno.into())))
    }
}

impl Iterator for DataExtents<'_> {
    type Item = Result<(u64, u64), IoError>;

    fn next(&mut self) -> Option<Self::Item> {
        let end = self.disk.size();
        if self.next_offset >= end {
            self.walk = Walk::Finished;
        }
        match self.walk {
            Walk::Finished => None,
            Walk::Whole => {
                self.walk = Walk::Finished;
                Some(Ok((self.next_offset, end - self.next_offset)))
            }
            Walk::Seek => {
                let data = match self.seek(self.next_offset, Whence::SeekData) {
                    Ok(data) => data,
                    // No data at or after the offset: the rest is a hole.
                    Err(Errno::ENXIO) => {
                        self.walk = Walk::Finished;
                        return None;
                    }
                    // The file system cannot tell holes apart.
                    Err(Errno::EINVAL | Errno::EOPNOTSUPP) => {
                        self.walk = Walk::Whole;
                        return self.next();
                    }
                    Err(errno) => return self.fail(DiskOp::SeekData, self.next_offset, errno),
                };
                if data >= end {
                    self.walk = Walk::Finished;
                    return None;
                }
                let hole = match self.seek(data, Whence::SeekHole) {
                    Ok(hole) => hole.min(end),
                    // The file shrank under us; what is left of it is data.
                    Err(Errno::ENXIO) => end,
                    Err(errno) => return self.fail(DiskOp::SeekHole, data, errno),
                };
                // SEEK_HOLE from a data offset lands past it; anything else would loop.
                if hole <= data {
                    self.walk = Walk::Whole;
                    self.next_offset = data;
                    return self.next();
                }
                self.next_offset = hole;
                Some(Ok((data, hole - data)))
            }
        }
    }
}

impl FusedIterator for DataExtents<'_> {}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::{FileExt, MetadataExt};

    use super::*;

    const GIB: u64 = 1 << 30;
    const MIB: u64 = 1 << 20;

    fn extents(disk: &Disk) -> Vec<(u64, u64)> {
        data_extents(disk).collect::<Result<_, _>>().unwrap()
    }

    #[test]
    fn sparse_file_reports_only_written_blocks() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sparse.img");
        let size = 10 * GIB;
        let file = std::fs::File::create(&path).unwrap();
        file.set_len(size).unwrap();
        let written: [(u64, usize); 5] = [
            (0, 4096),
            (4096 * 1000, 8192),
            (3 * GIB + 65_536, 4096),
            (7 * GIB, MIB as usize),
            (size - 4096, 4096),
        ];
        for &(offset, len) in &written {
            file.write_all_at(&vec![0xa5u8; len], offset).unwrap();
        }
        file.sync_all().unwrap();
        drop(file);

        let disk = Disk::open_source(&path).unwrap();
        let found = extents(&disk);

        for pair in found.windows(2) {
            assert!(pair[0].0 + pair[0].1 <= pair[1].0, "unordered: {found:?}");
        }
        for &(offset, len) in &written {
            let covered = found
                .iter()
                .any(|&(at, n)| at <= offset && offset + len as u64 <= at + n);
            assert!(covered, "{len} bytes at {offset} not inside {found:?}");
        }
        let total: u64 = found.iter().map(|&(_, n)| n).sum();
        // File systems allocate in blocks (and ext4 may preallocate a little around
        // writes), but never gigabytes for five small writes.
        assert!(
            total < 64 * MIB,
            "{total} bytes of extents for ~1 MiB of data: {found:?}"
        );
        assert!(total >= MIB + 5 * 4096);
        assert_eq!(found.last().map(|&(at, n)| at + n), Some(size));
        assert!(std::fs::metadata(&path).unwrap().blocks() * 512 < 64 * MIB);
    }

    #[test]
    fn empty_and_dense_files() {
        let dir = tempfile::tempdir().unwrap();
        let hollow = dir.path().join("hollow.img");
        std::fs::File::create(&hollow)
            .unwrap()
            .set_len(GIB)
            .unwrap();
        assert_eq!(extents(&Disk::open_source(&hollow).unwrap()), vec![]);

        let zero_len = dir.path().join("zero-len.img");
        std::fs::File::create(&zero_len).unwrap();
        assert_eq!(extents(&Disk::open_source(&zero_len).unwrap()), vec![]);

        // Not a multiple of any block size: the extent ends at the file's end.
        let dense = dir.path().join("dense.img");
        std::fs::write(&dense, vec![1u8; 100_000]).unwrap();
        assert_eq!(
            extents(&Disk::open_source(&dense).unwrap()),
            vec![(0, 100_000)]
        );
    }

    #[test]
    fn block_device_is_one_extent() {
        use crate::io::test_support::{LoopDevice, Skip};
        let dir = tempfile::tempdir().unwrap();
        let backing = dir.path().join("backing.img");
        // Sparse backing file: the device still reports one extent.
        std::fs::File::create(&backing)
            .unwrap()
            .set_len(8 * MIB)
            .unwrap();
        let dev = match LoopDevice::attach(&backing) {
            Ok(dev) => dev,
            Err(Skip(why)) => {
                ferry_io::require::skip(ferry_io::require::Feature::Loop, why);
                return;
            }
        };
        let disk = Disk::open_source(dev.path()).unwrap();
        assert_eq!(extents(&disk), vec![(0, 8 * MIB)]);
    }
}
