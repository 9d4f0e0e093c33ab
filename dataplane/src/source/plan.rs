//! What to read: turns data extents or a changed-block bitmap into read requests.
//!
//! A plan is a lazy iterator so that memory does not grow with the disk: a 100 GiB
//! sparse image is walked extent by extent, a bitmap run by run.

/// One unit of work for the reader thread.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PlanItem {
    /// Read `len` bytes at `offset` (block aligned, at most one I/O size).
    Read { disk: u32, offset: u64, len: u32 },
    /// `len` bytes at `offset` are a hole on the source: they read as zeros and are not
    /// read at all.
    ZeroRun { disk: u32, offset: u64, len: u64 },
}

/// A run of whole blocks and what the source knows about it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Region {
    /// Blocks `[first, first + count)` may hold data and must be read.
    Data { first: u64, count: u64 },
    /// Blocks `[first, first + count)` are unallocated (read as zeros).
    Hole { first: u64, count: u64 },
}

/// Geometry shared by every plan of one disk.
#[derive(Debug, Clone, Copy)]
pub struct Geometry {
    pub disk: u32,
    pub disk_size: u64,
    pub block_size: u64,
    /// Largest read, a multiple of `block_size`.
    pub io_size: u64,
}

impl Geometry {
    pub fn block_count(&self) -> u64 {
        self.disk_size.div_ceil(self.block_size)
    }
}

/// Turns byte extents of data (sorted, non-overlapping, as SEEK_DATA/SEEK_HOLE yield
/// them) into block regions that cover the whole disk: blocks touched by data are
/// Data, the gaps between are Hole.
pub struct ExtentRegions<I> {
    extents: I,
    geometry: Geometry,
    /// First block not yet covered by a yielded region.
    next_block: u64,
    /// A data region waiting to be merged with the next extent if they touch.
    pending: Option<(u64, u64)>,
    /// A data region to yield after the hole in front of it.
    queued: Option<Region>,
    done: bool,
}

impl<I> ExtentRegions<I> {
    pub fn new(extents: I, geometry: Geometry) -> Self {
        Self {
            extents,
            geometry,
            next_block: 0,
            pending: None,
            queued: None,
            done: false,
        }
    }

    /// Once the extents are exhausted: the pending data region, then the hole up to
    /// the disk's `total` blocks, then nothing.
    fn tail(&mut self, total: u64) -> Option<Region> {
        if let Some((first, end)) = self.pending.take() {
            self.next_block = end;
            return Some(Region::Data {
                first,
                count: end - first,
            });
        }
        if self.next_block < total {
            let first = self.next_block;
            self.next_block = total;
            return Some(Region::Hole {
                first,
                count: total - first,
            });
        }
        None
    }
}

impl<E, I: Iterator<Item = Result<(u64, u64), E>>> Iterator for ExtentRegions<I> {
    type Item = Result<Region, E>;

    fn next(&mut self) -> Option<Self::Item> {
        if let Some(r) = self.queued.take() {
            return Some(Ok(r));
        }
        let bs = self.geometry.block_size;
        let total = self.geometry.block_count();
        loop {
            if self.done {
                return self.tail(total).map(Ok);
            }
            let (offset, len) = match self.extents.next() {
                None => {
                    self.done = true;
                    continue;
                }
                Some(Err(e)) => return Some(Err(e)),
                Some(Ok(x)) => x,
            };
            let end_byte = offset.saturating_add(len).min(self.geometry.disk_size);
            if len == 0 || offset >= end_byte {
                continue;
            }
            let first = offset / bs;
            let end = end_byte.div_ceil(bs);
            match self.pending {
                Some((pf, pe)) if first <= pe => {
                    self.pending = Some((pf, pe.max(end)));
                }
                Some((pf, pe)) => {
                    self.pending = Some((first, end));
                    let data = Region::Data {
                        first: pf,
                        count: pe - pf,
                    };
                    // The blocks between the pending data and this extent are a hole.
                    self.next_block = first;
                    self.queued = Some(Region::Hole {
                        first: pe,
                        count: first - pe,
                    });
                    return Some(Ok(data));
                }
                None => {
                    self.pending = Some((first, end));
                    if first > self.next_block {
                        let hole = Region::Hole {
                            first: self.next_block,
                            count: first - self.next_block,
                        };
                        self.next_block = first;
                        return Some(Ok(hole));
                    }
                }
            }
        }
    }
}

/// Splits regions into reads of at most `io_size` and zero runs.
pub struct Chunker<R> {
    regions: R,
    geometry: Geometry,
    /// Whether holes are reported (they are skipped when the replica is known zero).
    emit_holes: bool,
    /// The data region being split: next block and end block.
    current: Option<(u64, u64)>,
}

impl<R> Chunker<R> {
    pub fn new(regions: R, geometry: Geometry, emit_holes: bool) -> Self {
        assert!(geometry.io_size >= geometry.block_size);
        assert_eq!(geometry.io_size % geometry.block_size, 0);
        Self {
            regions,
            geometry,
            emit_holes,
            current: None,
        }
    }
}

impl<E, R: Iterator<Item = Result<Region, E>>> Iterator for Chunker<R> {
    type Item = Result<PlanItem, E>;

    fn next(&mut self) -> Option<Self::Item> {
        let g = self.geometry;
        loop {
            if let Some((next, end)) = self.current {
                if next < end {
                    let blocks_per_io = g.io_size / g.block_size;
                    let take = (end - next).min(blocks_per_io);
                    self.current = Some((next + take, end));
                    let offset = next * g.block_size;
                    let len = ((next + take) * g.block_size).min(g.disk_size) - offset;
                    return Some(Ok(PlanItem::Read {
                        disk: g.disk,
                        offset,
                        len: len as u32,
                    }));
                }
                self.current = None;
            }
            match self.regions.next()? {
                Err(e) => return Some(Err(e)),
                Ok(Region::Data { first, count }) => {
                    assert!(first + count <= g.block_count(), "region past the disk end");
                    self.current = Some((first, first + count));
                }
                Ok(Region::Hole { first, count }) => {
                    if self.emit_holes && count > 0 {
                        let offset = first * g.block_size;
                        let len = ((first + count) * g.block_size).min(g.disk_size) - offset;
                        return Some(Ok(PlanItem::ZeroRun {
                            disk: g.disk,
                            offset,
                            len,
                        }));
                    }
                }
            }
        }
    }
}

/// Splits byte ranges (sorted, disjoint, 4 KiB aligned but for the disk's end: the
/// granules a changed-block epoch carries) into reads of at most `io_size`. A read never
/// crosses a multiple of `io_size`, so it spans at most `io_size / block_size` blocks
/// and its records fit the frame's record table.
pub struct RangeReads<I> {
    ranges: I,
    geometry: Geometry,
    /// The range being split: next byte and end.
    current: Option<(u64, u64)>,
}

impl<I> RangeReads<I> {
    pub fn new(ranges: I, geometry: Geometry) -> Self {
        assert_eq!(geometry.io_size % geometry.block_size, 0);
        Self {
            ranges,
            geometry,
            current: None,
        }
    }
}

impl<I: Iterator<Item = (u64, u64)>> Iterator for RangeReads<I> {
    type Item = PlanItem;

    fn next(&mut self) -> Option<PlanItem> {
        let g = self.geometry;
        loop {
            if let Some((next, end)) = self.current.filter(|(next, end)| next < end) {
                let window_end = (next / g.io_size + 1) * g.io_size;
                let stop = end.min(window_end).min(g.disk_size);
                self.current = Some((stop, end));
                if stop > next {
                    return Some(PlanItem::Read {
                        disk: g.disk,
                        offset: next,
                        len: (stop - next) as u32,
                    });
                }
            }
            let (offset, len) = self.ranges.next()?;
            assert!(offset + len <= g.disk_size, "range past the disk end");
            self.current = Some((offset, offset + len));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::convert::Infallible;

    fn geometry(disk_size: u64) -> Geometry {
        Geometry {
            disk: 0,
            disk_size,
            block_size: 64 << 10,
            io_size: 256 << 10,
        }
    }

    fn regions(extents: &[(u64, u64)], g: Geometry) -> Vec<Region> {
        ExtentRegions::new(extents.iter().map(|&e| Ok::<_, Infallible>(e)), g)
            .map(|r| r.unwrap())
            .collect()
    }

    #[test]
    fn regions_cover_the_disk_exactly_once() {
        let g = geometry(10 << 20); // 160 blocks
        let r = regions(&[(100, 10), (70_000, 5), (5 << 20, 1 << 20)], g);
        assert_eq!(
            r,
            vec![
                Region::Data { first: 0, count: 2 },
                Region::Hole {
                    first: 2,
                    count: 78
                },
                Region::Data {
                    first: 80,
                    count: 16
                },
                Region::Hole {
                    first: 96,
                    count: 64
                },
            ]
        );
    }

    #[test]
    fn empty_and_full_disks() {
        let g = geometry(1 << 20);
        assert_eq!(
            regions(&[], g),
            vec![Region::Hole {
                first: 0,
                count: 16
            }]
        );
        assert_eq!(
            regions(&[(0, 1 << 20)], g),
            vec![Region::Data {
                first: 0,
                count: 16
            }]
        );
    }

    #[test]
    fn range_reads_stay_inside_one_io_window() {
        let g = geometry((1 << 20) + 6144);
        let ranges = [
            (4096, 8192),
            (200 << 10, 100 << 10), // crosses the 256 KiB window
            (1 << 20, 6144),        // the disk's tail
        ];
        let reads: Vec<_> = RangeReads::new(ranges.into_iter(), g).collect();
        let read = |offset: u64, len: u32| PlanItem::Read {
            disk: 0,
            offset,
            len,
        };
        assert_eq!(
            reads,
            vec![
                read(4096, 8192),
                read(200 << 10, 56 << 10),
                read(256 << 10, 44 << 10),
                read(1 << 20, 6144),
            ]
        );
    }

    #[test]
    fn chunks_are_bounded_and_cover_the_tail() {
        let g = geometry((1 << 20) + 4096); // 17 blocks, the last one 4 KiB
        let items: Vec<_> = Chunker::new(
            ExtentRegions::new([Ok::<_, Infallible>((0, (1 << 20) + 4096))].into_iter(), g),
            g,
            true,
        )
        .map(|i| i.unwrap())
        .collect();
        assert_eq!(items.len(), 5);
        assert_eq!(
            items[4],
            PlanItem::Read {
                disk: 0,
                offset: 1 << 20,
                len: 4096
            }
        );
        let total: u64 = items
            .iter()
            .map(|i| match i {
                PlanItem::Read { len, .. } => *len as u64,
                PlanItem::ZeroRun { len, .. } => *len,
            })
            .sum();
        assert_eq!(total, g.disk_size);
    }
}
