//! The storage model behind the mount: what the file system shows now (`live`) and what
//! would survive a power cut (`durable`), per file and for the namespace.
//!
//! Data: every write, truncate and fallocate changes a file's live content at once and
//! is queued as pending; `fsync`/`fdatasync` of the file applies the queue to its durable
//! content. Namespace: every create, unlink, mkdir, rmdir and rename changes the live
//! tree at once and is appended to a journal; an fsync of a directory commits the
//! journal up to the last change that touched that directory, in order, the way ext4's
//! journal commits a transaction (so a rename or a create is durable only after its
//! directory was synced, and never ahead of an earlier change). A file's own fsync
//! does not make its directory entry durable: that is POSIX, and stricter than ext4.
//!
//! A power cut throws the pending state away ([`CutMode::DropUnsynced`], LazyFS's
//! behaviour), or keeps a random part of it ([`CutMode::WritebackSome`]): each 4 KiB
//! page of each pending write, each pending truncate, and a random prefix of the
//! journal, as if the kernel had written some dirty pages back and committed some
//! transactions on its own before the power went. The second mode is what catches a
//! missing sync *before* a write (a write-intent record must be durable before the
//! data it protects may reach the disk): under the first mode the unprotected data
//! write is always lost too, which hides the bug.

use std::collections::{BTreeMap, HashMap};
use std::ffi::{OsStr, OsString};
use std::time::SystemTime;

use ferry_io::rng::Rng;

/// The inode number of the root directory (FUSE's fixed root id).
pub const ROOT: u64 = 1;

/// The unit in which [`CutMode::WritebackSome`] keeps or drops parts of a write: a page
/// of the page cache, written back (or not) as a whole.
pub const PAGE_BYTES: u64 = 4096;

/// What kind of node an inode is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    File,
    Dir,
    /// A Unix socket's node (`bind(2)` creates one with `mknod`). It carries no data;
    /// the socket itself lives in the kernel.
    Socket,
}

/// What the power cut keeps of the state that was not synced.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CutMode {
    /// Nothing: every file is exactly as at its last fsync, every directory as at its
    /// last directory fsync.
    DropUnsynced,
    /// A random part, chosen by `seed`: each 4 KiB page of each pending write and each
    /// pending size change independently with probability 1/2 (in their original
    /// order), and a random prefix of the namespace journal.
    WritebackSome { seed: u64 },
}

/// What one cut threw away and kept.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CutReport {
    /// Pending data operations (writes, truncates, fallocates) at the cut.
    pub pending_data_ops: u64,
    /// Of their pages (size changes count as one), how many the cut kept.
    pub pages_kept: u64,
    /// And how many it dropped.
    pub pages_dropped: u64,
    /// Namespace changes in the journal at the cut.
    pub pending_namespace_ops: u64,
    /// Of those, how many the cut committed.
    pub namespace_ops_kept: u64,
}

/// Counters since the model was created.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Stats {
    pub writes: u64,
    pub data_syncs: u64,
    pub dir_syncs: u64,
    pub cuts: u64,
}

/// One change of a file's content, kept until the file is synced.
#[derive(Clone, Debug)]
enum DataOp {
    Write {
        offset: u64,
        data: Vec<u8>,
    },
    SetLen(u64),
    /// Zeroes inside the current size (punch hole or zero range with KEEP_SIZE).
    Zero {
        offset: u64,
        len: u64,
    },
}

fn apply(content: &mut Vec<u8>, op: &DataOp) {
    match op {
        DataOp::Write { offset, data } => {
            let start = *offset as usize;
            let end = start + data.len();
            if content.len() < end {
                content.resize(end, 0);
            }
            content[start..end].copy_from_slice(data);
        }
        DataOp::SetLen(len) => content.resize(*len as usize, 0),
        DataOp::Zero { offset, len } => {
            let start = (*offset as usize).min(content.len());
            let end = (offset + len).min(content.len() as u64) as usize;
            content[start..end].fill(0);
        }
    }
}

struct Node {
    kind: Kind,
    /// Permission bits.
    perm: u16,
    live: Vec<u8>,
    durable: Vec<u8>,
    pending: Vec<DataOp>,
    mtime: SystemTime,
}

/// One namespace change, kept in the journal until a directory fsync commits it.
#[derive(Clone, Debug)]
enum NsOp {
    Link {
        dir: u64,
        name: OsString,
        ino: u64,
    },
    Unlink {
        dir: u64,
        name: OsString,
    },
    Rename {
        from: u64,
        from_name: OsString,
        to: u64,
        to_name: OsString,
    },
}

impl NsOp {
    fn touches(&self, dir: u64) -> bool {
        match self {
            NsOp::Link { dir: d, .. } | NsOp::Unlink { dir: d, .. } => *d == dir,
            NsOp::Rename { from, to, .. } => *from == dir || *to == dir,
        }
    }
}

/// Directory contents by directory inode.
#[derive(Clone, Default)]
struct Tree(HashMap<u64, BTreeMap<OsString, u64>>);

impl Tree {
    fn get(&self, dir: u64, name: &OsStr) -> Option<u64> {
        self.0.get(&dir)?.get(name).copied()
    }

    fn apply(&mut self, op: &NsOp, kinds: &HashMap<u64, Node>) {
        match op {
            NsOp::Link { dir, name, ino } => {
                self.0.entry(*dir).or_default().insert(name.clone(), *ino);
                if kinds.get(ino).is_some_and(|n| n.kind == Kind::Dir) {
                    self.0.entry(*ino).or_default();
                }
            }
            NsOp::Unlink { dir, name } => {
                if let Some(entries) = self.0.get_mut(dir) {
                    entries.remove(name);
                }
            }
            NsOp::Rename {
                from,
                from_name,
                to,
                to_name,
            } => {
                let moved = self.0.get_mut(from).and_then(|e| e.remove(from_name));
                if let Some(ino) = moved {
                    self.0.entry(*to).or_default().insert(to_name.clone(), ino);
                }
            }
        }
    }
}

/// Attributes of a node, as the FUSE layer needs them.
#[derive(Clone, Copy, Debug)]
pub struct NodeAttr {
    pub ino: u64,
    pub kind: Kind,
    pub perm: u16,
    pub size: u64,
    pub mtime: SystemTime,
}

/// An errno for the FUSE reply.
pub type Errno = i32;

/// The whole file system: nodes, the live and the durable tree, the journal.
pub struct Model {
    nodes: HashMap<u64, Node>,
    live: Tree,
    durable: Tree,
    journal: Vec<NsOp>,
    next_ino: u64,
    /// False from a cut until [`Model::power_on`]: every operation fails with EIO, as
    /// the disk under a machine that lost power answers nothing.
    powered: bool,
    stats: Stats,
}

impl Default for Model {
    fn default() -> Self {
        Self::new()
    }
}

impl Model {
    /// An empty file system: a root directory, durable.
    pub fn new() -> Model {
        let mut nodes = HashMap::new();
        nodes.insert(
            ROOT,
            Node {
                kind: Kind::Dir,
                perm: 0o755,
                live: Vec::new(),
                durable: Vec::new(),
                pending: Vec::new(),
                mtime: SystemTime::now(),
            },
        );
        let mut tree = Tree::default();
        tree.0.insert(ROOT, BTreeMap::new());
        Model {
            nodes,
            live: tree.clone(),
            durable: tree,
            journal: Vec::new(),
            next_ino: ROOT + 1,
            powered: true,
            stats: Stats::default(),
        }
    }

    pub fn stats(&self) -> Stats {
        self.stats
    }

    pub fn powered(&self) -> bool {
        self.powered
    }

    fn check_power(&self) -> Result<(), Errno> {
        if self.powered {
            Ok(())
        } else {
            Err(libc::EIO)
        }
    }

    fn node(&self, ino: u64) -> Result<&Node, Errno> {
        self.nodes.get(&ino).ok_or(libc::ENOENT)
    }

    fn node_mut(&mut self, ino: u64) -> Result<&mut Node, Errno> {
        self.nodes.get_mut(&ino).ok_or(libc::ENOENT)
    }

    fn file_mut(&mut self, ino: u64) -> Result<&mut Node, Errno> {
        let node = self.node_mut(ino)?;
        match node.kind {
            Kind::File => Ok(node),
            Kind::Dir => Err(libc::EISDIR),
            Kind::Socket => Err(libc::EINVAL),
        }
    }

    pub fn attr(&self, ino: u64) -> Result<NodeAttr, Errno> {
        self.check_power()?;
        let n = self.node(ino)?;
        Ok(NodeAttr {
            ino,
            kind: n.kind,
            perm: n.perm,
            size: n.live.len() as u64,
            mtime: n.mtime,
        })
    }

    pub fn lookup(&self, dir: u64, name: &OsStr) -> Result<NodeAttr, Errno> {
        self.check_power()?;
        let ino = self.live.get(dir, name).ok_or(libc::ENOENT)?;
        self.attr(ino)
    }

    fn journal(&mut self, op: NsOp) {
        self.live.apply(&op, &self.nodes);
        self.journal.push(op);
    }

    /// Creates a node `name` in `dir`.
    pub fn create(
        &mut self,
        dir: u64,
        name: &OsStr,
        kind: Kind,
        perm: u16,
    ) -> Result<NodeAttr, Errno> {
        self.check_power()?;
        if self.node(dir)?.kind != Kind::Dir {
            return Err(libc::ENOTDIR);
        }
        if self.live.get(dir, name).is_some() {
            return Err(libc::EEXIST);
        }
        let ino = self.next_ino;
        self.next_ino += 1;
        self.nodes.insert(
            ino,
            Node {
                kind,
                perm,
                live: Vec::new(),
                durable: Vec::new(),
                pending: Vec::new(),
                mtime: SystemTime::now(),
            },
        );
        self.journal(NsOp::Link {
            dir,
            name: name.to_owned(),
            ino,
        });
        self.attr(ino)
    }

    /// Removes the entry `name` from `dir`: a non-directory for `unlink`, an empty
    /// directory for `rmdir`.
    pub fn remove(&mut self, dir: u64, name: &OsStr, want_dir: bool) -> Result<(), Errno> {
        self.check_power()?;
        let ino = self.live.get(dir, name).ok_or(libc::ENOENT)?;
        let is_dir = self.node(ino)?.kind == Kind::Dir;
        match (want_dir, is_dir) {
            (false, true) => return Err(libc::EISDIR),
            (true, false) => return Err(libc::ENOTDIR),
            (true, true) if self.live.0.get(&ino).is_some_and(|e| !e.is_empty()) => {
                return Err(libc::ENOTEMPTY)
            }
            _ => {}
        }
        self.journal(NsOp::Unlink {
            dir,
            name: name.to_owned(),
        });
        Ok(())
    }

    pub fn rename(
        &mut self,
        from: u64,
        from_name: &OsStr,
        to: u64,
        to_name: &OsStr,
    ) -> Result<(), Errno> {
        self.check_power()?;
        let ino = self.live.get(from, from_name).ok_or(libc::ENOENT)?;
        if self.node(to)?.kind != Kind::Dir {
            return Err(libc::ENOTDIR);
        }
        if let Some(existing) = self.live.get(to, to_name) {
            if existing == ino {
                return Ok(());
            }
            let source_dir = self.node(ino)?.kind == Kind::Dir;
            let target_dir = self.node(existing)?.kind == Kind::Dir;
            match (source_dir, target_dir) {
                (false, true) => return Err(libc::EISDIR),
                (true, false) => return Err(libc::ENOTDIR),
                (true, true) if self.live.0.get(&existing).is_some_and(|e| !e.is_empty()) => {
                    return Err(libc::ENOTEMPTY)
                }
                _ => {}
            }
        }
        self.journal(NsOp::Rename {
            from,
            from_name: from_name.to_owned(),
            to,
            to_name: to_name.to_owned(),
        });
        Ok(())
    }

    /// The live entries of `dir`, in name order.
    pub fn entries(&self, dir: u64) -> Result<Vec<(OsString, u64, Kind)>, Errno> {
        self.check_power()?;
        let entries = self.live.0.get(&dir).ok_or(libc::ENOTDIR)?;
        Ok(entries
            .iter()
            .map(|(name, ino)| {
                let kind = self.nodes.get(ino).map_or(Kind::File, |n| n.kind);
                (name.clone(), *ino, kind)
            })
            .collect())
    }

    pub fn read(&self, ino: u64, offset: u64, len: u32) -> Result<Vec<u8>, Errno> {
        self.check_power()?;
        let n = self.node(ino)?;
        let size = n.live.len() as u64;
        let start = offset.min(size) as usize;
        let end = (offset + u64::from(len)).min(size) as usize;
        Ok(n.live[start..end].to_vec())
    }

    fn change(&mut self, ino: u64, op: DataOp) -> Result<(), Errno> {
        self.check_power()?;
        let n = self.file_mut(ino)?;
        apply(&mut n.live, &op);
        n.pending.push(op);
        n.mtime = SystemTime::now();
        Ok(())
    }

    pub fn write(&mut self, ino: u64, offset: u64, data: &[u8]) -> Result<(), Errno> {
        self.stats.writes += 1;
        self.change(
            ino,
            DataOp::Write {
                offset,
                data: data.to_vec(),
            },
        )
    }

    pub fn set_len(&mut self, ino: u64, len: u64) -> Result<(), Errno> {
        self.change(ino, DataOp::SetLen(len))
    }

    pub fn set_perm(&mut self, ino: u64, perm: u16) -> Result<(), Errno> {
        self.check_power()?;
        self.node_mut(ino)?.perm = perm;
        Ok(())
    }

    /// `fallocate(2)`: plain allocation (mode 0, may extend), punch hole (with
    /// KEEP_SIZE, as the kernel demands) and zero range. Anything else is EOPNOTSUPP,
    /// which callers must handle anyway.
    pub fn fallocate(&mut self, ino: u64, offset: u64, len: u64, mode: i32) -> Result<(), Errno> {
        self.check_power()?;
        let size = self.file_mut(ino)?.live.len() as u64;
        let end = offset.checked_add(len).ok_or(libc::EFBIG)?;
        let keep_size = mode & libc::FALLOC_FL_KEEP_SIZE != 0;
        let extend = |m: &mut Model| {
            if !keep_size && end > size {
                m.change(ino, DataOp::SetLen(end))
            } else {
                Ok(())
            }
        };
        match mode & !libc::FALLOC_FL_KEEP_SIZE {
            0 => extend(self),
            libc::FALLOC_FL_PUNCH_HOLE if keep_size => {
                self.change(ino, DataOp::Zero { offset, len })
            }
            libc::FALLOC_FL_ZERO_RANGE => {
                self.change(ino, DataOp::Zero { offset, len })?;
                extend(self)
            }
            _ => Err(libc::EOPNOTSUPP),
        }
    }

    /// `fsync`/`fdatasync` of a file: its content is durable.
    pub fn sync_data(&mut self, ino: u64) -> Result<(), Errno> {
        self.check_power()?;
        self.stats.data_syncs += 1;
        let n = self.node_mut(ino)?;
        for op in std::mem::take(&mut n.pending) {
            apply(&mut n.durable, &op);
        }
        Ok(())
    }

    /// `fsync` of a directory: the journal is committed up to the last change that
    /// touched `dir`.
    pub fn sync_dir(&mut self, dir: u64) -> Result<(), Errno> {
        self.check_power()?;
        self.stats.dir_syncs += 1;
        if let Some(last) = self.journal.iter().rposition(|op| op.touches(dir)) {
            for op in self.journal.drain(..=last) {
                self.durable.apply(&op, &self.nodes);
            }
        }
        Ok(())
    }

    /// The power goes: from now on every operation fails with EIO, and what was not
    /// synced is gone (or partly kept, per `mode`). Processes that still hold the
    /// mount must be killed and the mount replaced before [`Model::power_on`]; the
    /// kernel's page cache of the old mount still holds the lost data.
    pub fn cut(&mut self, mode: CutMode) -> CutReport {
        self.powered = false;
        self.stats.cuts += 1;
        let mut report = CutReport::default();
        let mut rng = match mode {
            CutMode::DropUnsynced => None,
            CutMode::WritebackSome { seed } => Some(Rng::new(seed)),
        };
        let mut inos: Vec<u64> = self.nodes.keys().copied().collect();
        inos.sort_unstable();
        for ino in inos {
            let n = self.nodes.get_mut(&ino).expect("listed above");
            for op in std::mem::take(&mut n.pending) {
                report.pending_data_ops += 1;
                let Some(rng) = rng.as_mut() else {
                    report.pages_dropped += 1;
                    continue;
                };
                match op {
                    DataOp::Write { offset, data } => {
                        // Page by page, split at the file's page boundaries.
                        let mut at = 0usize;
                        while at < data.len() {
                            let file_offset = offset + at as u64;
                            let page_end = (file_offset / PAGE_BYTES + 1) * PAGE_BYTES;
                            let take = ((page_end - file_offset) as usize).min(data.len() - at);
                            if rng.next_u64() & 1 == 1 {
                                report.pages_kept += 1;
                                apply(
                                    &mut n.durable,
                                    &DataOp::Write {
                                        offset: file_offset,
                                        data: data[at..at + take].to_vec(),
                                    },
                                );
                            } else {
                                report.pages_dropped += 1;
                            }
                            at += take;
                        }
                    }
                    op => {
                        if rng.next_u64() & 1 == 1 {
                            report.pages_kept += 1;
                            apply(&mut n.durable, &op);
                        } else {
                            report.pages_dropped += 1;
                        }
                    }
                }
            }
            n.live = n.durable.clone();
        }
        report.pending_namespace_ops = self.journal.len() as u64;
        let keep = rng
            .as_mut()
            .map_or(0, |r| r.below(self.journal.len() as u64 + 1) as usize);
        for op in self.journal.drain(..keep) {
            self.durable.apply(&op, &self.nodes);
        }
        report.namespace_ops_kept = keep as u64;
        self.journal.clear();
        self.live = self.durable.clone();
        // Nodes no durable entry names are gone with the power.
        let mut reachable = std::collections::HashSet::new();
        reachable.insert(ROOT);
        for entries in self.durable.0.values() {
            reachable.extend(entries.values().copied());
        }
        self.nodes.retain(|ino, _| reachable.contains(ino));
        self.durable.0.retain(|ino, _| reachable.contains(ino));
        self.live = self.durable.clone();
        report
    }

    /// The power is back (after the mount was replaced).
    pub fn power_on(&mut self) {
        self.powered = true;
    }

    /// The durable content of the file at `path` (components below the root), for
    /// tests of the model itself.
    pub fn durable_content(&self, path: &[&str]) -> Option<Vec<u8>> {
        let mut ino = ROOT;
        for c in path {
            ino = self.durable.get(ino, OsStr::new(c))?;
        }
        Some(self.nodes.get(&ino)?.durable.clone())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn os(s: &str) -> &OsStr {
        OsStr::new(s)
    }

    #[test]
    fn unsynced_data_is_lost_and_synced_data_stays() {
        let mut m = Model::new();
        let f = m.create(ROOT, os("f"), Kind::File, 0o644).unwrap().ino;
        m.sync_dir(ROOT).unwrap();
        m.write(f, 0, b"durable").unwrap();
        m.sync_data(f).unwrap();
        m.write(f, 0, b"VOLATILE!").unwrap();
        assert_eq!(m.read(f, 0, 100).unwrap(), b"VOLATILE!");
        let r = m.cut(CutMode::DropUnsynced);
        assert_eq!(r.pending_data_ops, 1);
        assert_eq!(m.read(f, 0, 100), Err(libc::EIO), "no power, no answer");
        m.power_on();
        assert_eq!(m.read(f, 0, 100).unwrap(), b"durable");
    }

    #[test]
    fn a_create_or_rename_needs_its_directory_synced() {
        let mut m = Model::new();
        let d = m.create(ROOT, os("d"), Kind::Dir, 0o755).unwrap().ino;
        m.sync_dir(ROOT).unwrap();
        let f = m.create(d, os("tmp"), Kind::File, 0o644).unwrap().ino;
        m.write(f, 0, b"x").unwrap();
        m.sync_data(f).unwrap();
        m.rename(d, os("tmp"), d, os("final")).unwrap();
        // The file's own fsync does not make its name durable.
        m.cut(CutMode::DropUnsynced);
        m.power_on();
        assert!(m.lookup(d, os("tmp")).is_err() && m.lookup(d, os("final")).is_err());

        let f = m.create(d, os("tmp"), Kind::File, 0o644).unwrap().ino;
        m.write(f, 0, b"y").unwrap();
        m.sync_data(f).unwrap();
        m.rename(d, os("tmp"), d, os("final")).unwrap();
        m.sync_dir(d).unwrap();
        m.cut(CutMode::DropUnsynced);
        m.power_on();
        assert_eq!(m.durable_content(&["d", "final"]).unwrap(), b"y");
        assert!(m.lookup(d, os("tmp")).is_err());
    }

    #[test]
    fn syncing_one_directory_commits_the_journal_in_order() {
        let mut m = Model::new();
        let a = m.create(ROOT, os("a"), Kind::Dir, 0o755).unwrap().ino;
        let b = m.create(ROOT, os("b"), Kind::Dir, 0o755).unwrap().ino;
        m.sync_dir(ROOT).unwrap();
        m.create(a, os("early"), Kind::File, 0o644).unwrap();
        m.create(b, os("x"), Kind::File, 0o644).unwrap();
        m.create(a, os("late"), Kind::File, 0o644).unwrap();
        m.sync_dir(b).unwrap();
        m.cut(CutMode::DropUnsynced);
        m.power_on();
        assert!(
            m.lookup(a, os("early")).is_ok(),
            "committed ahead of b's change"
        );
        assert!(m.lookup(b, os("x")).is_ok());
        assert!(m.lookup(a, os("late")).is_err(), "after b's last change");
    }

    #[test]
    fn writeback_keeps_some_pages_of_unsynced_writes() {
        let mut kept_any = false;
        let mut dropped_any = false;
        for seed in 0..16 {
            let mut m = Model::new();
            let f = m.create(ROOT, os("f"), Kind::File, 0o644).unwrap().ino;
            m.sync_dir(ROOT).unwrap();
            m.set_len(f, 4 * PAGE_BYTES).unwrap();
            m.sync_data(f).unwrap();
            m.write(f, 0, &vec![7u8; 4 * PAGE_BYTES as usize]).unwrap();
            m.cut(CutMode::WritebackSome { seed });
            m.power_on();
            let content = m.durable_content(&["f"]).unwrap();
            assert_eq!(content.len() as u64, 4 * PAGE_BYTES);
            for page in content.chunks(PAGE_BYTES as usize) {
                assert!(page.iter().all(|&b| b == page[0]), "pages are whole");
                kept_any |= page[0] == 7;
                dropped_any |= page[0] == 0;
            }
        }
        assert!(kept_any && dropped_any);
    }

    #[test]
    fn punch_hole_and_zero_range_keep_or_extend_the_size() {
        let mut m = Model::new();
        let f = m.create(ROOT, os("f"), Kind::File, 0o644).unwrap().ino;
        m.write(f, 0, &[1u8; 100]).unwrap();
        m.fallocate(
            f,
            10,
            200,
            libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
        )
        .unwrap();
        let c = m.read(f, 0, 1000).unwrap();
        assert_eq!(c.len(), 100);
        assert!(c[..10].iter().all(|&b| b == 1) && c[10..].iter().all(|&b| b == 0));
        m.fallocate(f, 50, 100, libc::FALLOC_FL_ZERO_RANGE).unwrap();
        assert_eq!(m.attr(f).unwrap().size, 150);
        assert_eq!(
            m.fallocate(f, 0, 1, libc::FALLOC_FL_COLLAPSE_RANGE),
            Err(libc::EOPNOTSUPP)
        );
    }
}
