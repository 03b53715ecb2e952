//! Segment files: where the bytes of chain blocks live.
//!
//! The `chain` tree in sled maps a block's first seq to an [`Extent`] (17
//! bytes: segment, offset, length) instead of holding the block itself.
//! sled 0.34 copies the whole leaf an insert lands in and seals a zeroed
//! log buffer per flush, so storing ~6 KiB blocks there cost the audit
//! writer more CPU than everything else it does per statement; appending
//! the same bytes to a plain file costs one `pwrite` per block.
//!
//! Files are `segments/NNNNNNNN.seg`, append-only, and a new one starts
//! once the active one passes [`SEGMENT_BYTES`]. They grow ahead of their
//! blocks, [`GROWTH_BYTES`] of zeros at a time, so that a commit's
//! `fdatasync` has no file size to make durable. A commit appends its
//! blocks and `fdatasync`s the segment before sled records their extents,
//! so an extent never names bytes that are not durable. sled is synced
//! about once a second, not per commit: what a crash takes from its index
//! is found again in the segments' tail when the store opens (see
//! `Store::reindex_tail`).
//!
//! A retention purge appends the rewritten blocks like any others and then
//! punches a hole where the old ones were, so emptied payloads leave the
//! file (what the file system does with freed blocks aside). Segments
//! that purges have mostly emptied are then compacted by the store: their
//! remaining blocks are appended again, the same bytes, and the files
//! deleted, so as retention catches up old segments go instead of staying
//! as files of holes.

use std::{
    collections::{hash_map::Entry, BTreeSet, HashMap},
    fs::{DirBuilder, File, OpenOptions},
    io::{Read, Seek, SeekFrom},
    os::unix::fs::{DirBuilderExt, FileExt, OpenOptionsExt},
    os::unix::io::AsRawFd,
    path::{Path, PathBuf},
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc, Mutex, MutexGuard, RwLock, RwLockReadGuard, RwLockWriteGuard,
    },
};

use super::AuditError;
use crate::{lock, unpoisoned};

/// Where segment files live, under the audit directory.
pub const SEGMENT_DIR: &str = "segments";

/// The size past which the next commit starts a new segment. Large enough
/// that a busy gateway opens a new file every few hours, small enough to
/// copy or inspect one by hand.
pub const SEGMENT_BYTES: u64 = 256 << 20;

/// Segment files grow by this many bytes at a time: zeros written ahead of
/// the blocks, which later commits write over. A commit within the file's
/// length leaves `fdatasync` no file size to make durable, which on a
/// journaled ext4 saves a journal commit per audit commit: `pwrite` and
/// `fdatasync` of 450 bytes took 320 to 470 µs appended and 150 µs over
/// zeros (ext4 with its default journal on this VM's disk; 120 to 140
/// against 86 to 102 µs on its root file system, which has none). A
/// clean shutdown cuts them ([`Segments::close`]); a restart after a crash
/// continues after them, so a segment may hold runs of them between
/// blocks. The store's scan of its tail skips them, and a full segment is
/// cut to its last block.
pub const GROWTH_BYTES: u64 = 1 << 20;

/// The largest append buffer kept for the next append: a commit's blocks
/// fit; a compaction's, a quarter of a segment, are let go.
const SCRATCH_KEPT: usize = 4 << 20;

/// The zeros written ahead. Never written to, so its pages stay the
/// kernel's shared zero page.
static ZEROS: [u8; GROWTH_BYTES as usize] = [0; GROWTH_BYTES as usize];

/// Where a block's bytes are.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Extent {
    pub segment: u32,
    pub offset: u64,
    pub len: u32,
}

impl Extent {
    /// Marks a chain value as an extent. A block is compact JSON and
    /// starts with `{`, so the values of stores written before segments
    /// (the blocks themselves) stay distinguishable and readable.
    const TAG: u8 = b'@';
    const ENCODED: usize = 17;

    pub fn encode(self) -> [u8; Self::ENCODED] {
        let mut out = [0; Self::ENCODED];
        out[0] = Self::TAG;
        out[1..5].copy_from_slice(&self.segment.to_be_bytes());
        out[5..13].copy_from_slice(&self.offset.to_be_bytes());
        out[13..].copy_from_slice(&self.len.to_be_bytes());
        out
    }

    /// The extent a chain value names, or `None` for a block stored inline.
    pub fn decode(value: &[u8]) -> Option<Self> {
        let bytes: &[u8; Self::ENCODED] = value.try_into().ok()?;
        (bytes[0] == Self::TAG).then(|| Self {
            segment: u32::from_be_bytes(bytes[1..5].try_into().expect("4 bytes")),
            offset: u64::from_be_bytes(bytes[5..13].try_into().expect("8 bytes")),
            len: u32::from_be_bytes(bytes[13..].try_into().expect("4 bytes")),
        })
    }

    pub fn end(self) -> u64 {
        self.offset.saturating_add(u64::from(self.len))
    }
}

/// The segment files of one store: reads from any process holding the
/// store, appends from its writer only.
pub struct Segments {
    dir: PathBuf,
    /// [`SEGMENT_BYTES`], except in tests.
    limit: u64,
    /// Read handles, opened on first use.
    readers: Mutex<HashMap<u32, Arc<File>>>,
    /// The segment appended to, opened on the first append.
    active: Mutex<Option<Active>>,
    /// An append's blocks joined for one write, kept between appends (up
    /// to [`SCRATCH_KEPT`]): a commit's few hundred KiB, allocated anew,
    /// were a fresh zeroed huge page at every commit.
    scratch: Mutex<Vec<u8>>,
    /// Read-held by [`Segments::pin`] from looking an extent up in the
    /// chain until its bytes are read; freeing bytes and deleting files
    /// take it for writing, so they wait for such readers.
    in_use: RwLock<()>,
    /// The last segment ends in bytes that are not records (see
    /// [`Segments::start_next_segment`]).
    next_segment: AtomicBool,
}

struct Active {
    number: u32,
    file: File,
    /// Where the next block goes: the file's length at open, then the end
    /// of the last block written.
    end: u64,
    /// The file's length: `end` and the zeros written ahead of it.
    len: u64,
    /// A segment was created since the directory was last synced.
    new_file: bool,
    /// The directory itself was created since its parent was last synced.
    new_dir: bool,
    /// Blocks were written since the last sync.
    dirty: bool,
}

impl Segments {
    /// The segment directory under `audit_dir`. It is created (mode 0700)
    /// by the first append, so reading a store of an earlier version (all
    /// blocks inline in sled) leaves it as it was.
    pub fn open(audit_dir: &Path) -> Self {
        let dir = audit_dir.join(SEGMENT_DIR);
        Self {
            dir,
            limit: SEGMENT_BYTES,
            readers: Mutex::default(),
            active: Mutex::default(),
            scratch: Mutex::default(),
            in_use: RwLock::default(),
            next_segment: AtomicBool::new(false),
        }
    }

    /// Starts a new segment after `limit` bytes instead of
    /// [`SEGMENT_BYTES`], for tests that need several.
    #[cfg(test)]
    pub fn with_limit(mut self, limit: u64) -> Self {
        self.limit = limit;
        self
    }

    fn path(&self, segment: u32) -> PathBuf {
        self.dir.join(format!("{segment:08}.seg"))
    }

    /// Keeps the bytes of every extent the chain names now where they are
    /// until the guard drops. Take it before looking an extent up: a purge
    /// may free a block's old bytes, and a compaction delete its old file,
    /// between that look-up and the read.
    pub fn pin(&self) -> RwLockReadGuard<'_, ()> {
        unpoisoned(self.in_use.read())
    }

    /// Waits until no reader holds a [`Segments::pin`].
    fn unpinned(&self) -> RwLockWriteGuard<'_, ()> {
        unpoisoned(self.in_use.write())
    }

    /// The bytes `extent` names.
    ///
    /// # Errors
    /// A missing segment or one shorter than the extent: the store was
    /// truncated or damaged outside the gateway.
    pub fn read(&self, extent: Extent) -> Result<Vec<u8>, AuditError> {
        let path = self.path(extent.segment);
        let file = {
            let mut readers = lock(&self.readers);
            match readers.get(&extent.segment) {
                Some(file) => Arc::clone(file),
                None => {
                    let file = match File::open(&path) {
                        Ok(file) => Arc::new(file),
                        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                            return Err(AuditError::Corrupt(format!(
                                "{} is missing, but the chain names it: the store was \
                                 truncated; run `portcullis audit verify` on a copy",
                                path.display()
                            )))
                        }
                        Err(source) => return Err(AuditError::Io { path, source }),
                    };
                    readers.insert(extent.segment, Arc::clone(&file));
                    file
                }
            }
        };
        let mut bytes = vec![0; extent.len as usize];
        match file.read_exact_at(&mut bytes, extent.offset) {
            Ok(()) => Ok(bytes),
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => {
                Err(AuditError::Corrupt(format!(
                    "{} ends before byte {}, where the chain says a block ends: the store was \
                     truncated",
                    path.display(),
                    extent.end()
                )))
            }
            Err(source) => Err(AuditError::Io { path, source }),
        }
    }

    /// Appends blocks to the active segment, in order, and returns where
    /// each went. Nothing is durable before [`Segments::sync`].
    ///
    /// A failed append leaves the end where it was, so the next append
    /// overwrites whatever part of this one reached the file.
    pub fn append<'a>(
        &self,
        blocks: impl IntoIterator<Item = &'a [u8]>,
    ) -> Result<Vec<Extent>, AuditError> {
        let mut guard = lock(&self.active);
        let active = self.active_segment(&mut guard)?;
        // One write per commit, not per block.
        let mut bytes = lock(&self.scratch);
        bytes.clear();
        let mut extents = Vec::new();
        for block in blocks {
            let len = u32::try_from(block.len()).map_err(|_| {
                AuditError::Commit(format!("a chain block of {} bytes", block.len()))
            })?;
            extents.push(Extent {
                segment: active.number,
                offset: active.end + bytes.len() as u64,
                len,
            });
            bytes.extend_from_slice(block);
        }
        let end = active.end + bytes.len() as u64;
        active
            .file
            .write_all_at(&bytes, active.end)
            .map_err(io(&self.path(active.number)))?;
        // Past the zeros written ahead: write the next step's worth. From
        // a buffer of its own, not by growing `bytes` by up to a MiB,
        // which cost the writer a fresh, zeroed allocation several times
        // a second under load. Zeros that fail to go ahead only mean the
        // next commits' syncs make a size durable again.
        let len = if end > active.len {
            let len = end.div_ceil(GROWTH_BYTES) * GROWTH_BYTES;
            match active
                .file
                .write_all_at(&ZEROS[..(len - end) as usize], end)
            {
                Ok(()) => len,
                Err(_) => end,
            }
        } else {
            active.len
        };
        active.dirty |= end > active.end;
        (active.end, active.len) = (end, len);
        if bytes.capacity() > SCRATCH_KEPT {
            *bytes = Vec::new();
        }
        Ok(extents)
    }

    /// The segment to append to, starting a new one when the active one
    /// is full.
    fn active_segment<'g>(
        &self,
        guard: &'g mut MutexGuard<'_, Option<Active>>,
    ) -> Result<&'g mut Active, AuditError> {
        let mut new_dir = false;
        let next = match guard.as_ref() {
            Some(active) if active.end < self.limit => None,
            Some(active) => Some(active.number + 1),
            None => {
                new_dir = !self.dir.exists();
                if new_dir {
                    DirBuilder::new()
                        .mode(0o700)
                        .create(&self.dir)
                        .map_err(io(&self.dir))?;
                }
                let next = u32::from(self.next_segment.load(Ordering::Relaxed));
                Some(
                    self.last_number()?
                        .map_or(1, |last| last.saturating_add(next)),
                )
            }
        };
        if let Some(number) = next {
            if let Some(full) = guard.as_mut() {
                // A closed segment keeps no zeros past its last block.
                if full.len > full.end {
                    let path = self.path(full.number);
                    full.file.set_len(full.end).map_err(io(&path))?;
                    full.len = full.end;
                    full.dirty = true;
                }
                // The full segment's last blocks must be durable before a
                // later sync only covers the new one.
                if full.dirty {
                    full.file.sync_data().map_err(io(&self.path(full.number)))?;
                }
            }
            let path = self.path(number);
            let existed = path.exists();
            let file = OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(false)
                .mode(0o600)
                .open(&path)
                .map_err(io(&path))?;
            let end = file.metadata().map_err(io(&path))?.len();
            **guard = Some(Active {
                number,
                file,
                end,
                len: end,
                new_file: !existed,
                new_dir,
                dirty: false,
            });
        }
        Ok(guard.as_mut().expect("set above"))
    }

    /// Cuts the zeros written ahead of the active segment's last block and
    /// makes that durable, at a clean shutdown: a restart then appends
    /// right after the last block instead of after a run of zeros.
    pub fn close(&self) -> Result<(), AuditError> {
        let mut guard = lock(&self.active);
        if let Some(active) = guard.as_mut() {
            if active.len > active.end {
                let path = self.path(active.number);
                active.file.set_len(active.end).map_err(io(&path))?;
                active.file.sync_data().map_err(io(&path))?;
                active.len = active.end;
            }
        }
        Ok(())
    }

    /// The numbers of the segment files in the directory; none while the
    /// directory does not exist (no append yet).
    pub fn numbers(&self) -> Result<BTreeSet<u32>, AuditError> {
        let mut numbers = BTreeSet::new();
        let entries = match std::fs::read_dir(&self.dir) {
            Ok(entries) => entries,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(numbers),
            Err(source) => return Err(io(&self.dir)(source)),
        };
        for entry in entries {
            let name = entry.map_err(io(&self.dir))?.file_name();
            let number = name
                .to_str()
                .and_then(|n| n.strip_suffix(".seg"))
                .and_then(|n| n.parse::<u32>().ok());
            numbers.extend(number);
        }
        Ok(numbers)
    }

    /// A segment's bytes from `offset` to its end.
    pub fn read_from(&self, segment: u32, offset: u64) -> Result<Vec<u8>, AuditError> {
        let path = self.path(segment);
        let mut file = File::open(&path).map_err(io(&path))?;
        file.seek(SeekFrom::Start(offset)).map_err(io(&path))?;
        let mut bytes = Vec::new();
        file.read_to_end(&mut bytes).map_err(io(&path))?;
        Ok(bytes)
    }

    /// Makes the first append of this process start a new segment instead
    /// of continuing the last one: its end holds bytes that are not
    /// records (a write a crash cut short), and records appended after
    /// them could not be found again by reading on from the records
    /// before (see `Store::reindex_tail`).
    pub fn start_next_segment(&self) {
        self.next_segment.store(true, Ordering::Relaxed);
    }

    /// The highest segment number in the directory.
    fn last_number(&self) -> Result<Option<u32>, AuditError> {
        Ok(self.numbers()?.last().copied())
    }

    /// Makes every append so far durable: `fdatasync` on the active
    /// segment and, after a new one was created, on the directory.
    pub fn sync(&self) -> Result<(), AuditError> {
        let mut guard = lock(&self.active);
        let Some(active) = guard.as_mut() else {
            return Ok(());
        };
        if active.dirty {
            active
                .file
                .sync_data()
                .map_err(io(&self.path(active.number)))?;
            active.dirty = false;
        }
        if active.new_file {
            File::open(&self.dir)
                .and_then(|d| d.sync_all())
                .map_err(io(&self.dir))?;
            active.new_file = false;
        }
        if active.new_dir {
            if let Some(parent) = self.dir.parent() {
                File::open(parent)
                    .and_then(|d| d.sync_all())
                    .map_err(io(parent))?;
            }
            active.new_dir = false;
        }
        Ok(())
    }

    /// Frees the bytes of blocks no longer referenced (replaced by a
    /// purge): a hole is punched so they read back as zeros, and the
    /// segment is synced.
    pub fn release(&self, extents: &[Extent]) -> Result<(), AuditError> {
        let mut touched: HashMap<u32, File> = HashMap::new();
        {
            // Readers wait for the punching only: bytes once punched read
            // as zeros whether or not the sync below has happened.
            let _unpinned = self.unpinned();
            for extent in extents {
                let path = self.path(extent.segment);
                let file = match touched.entry(extent.segment) {
                    Entry::Occupied(open) => open.into_mut(),
                    Entry::Vacant(slot) => slot.insert(
                        OpenOptions::new()
                            .write(true)
                            .open(&path)
                            .map_err(io(&path))?,
                    ),
                };
                punch_hole(file, *extent).map_err(io(&path))?;
            }
        }
        for (segment, file) in touched {
            file.sync_data().map_err(io(&self.path(segment)))?;
        }
        Ok(())
    }

    /// The segment appended to, once this process has appended.
    pub fn active_number(&self) -> Option<u32> {
        lock(&self.active).as_ref().map(|a| a.number)
    }

    /// A segment file's length, holes included.
    pub fn file_len(&self, segment: u32) -> Result<u64, AuditError> {
        let path = self.path(segment);
        Ok(std::fs::metadata(&path).map_err(io(&path))?.len())
    }

    /// Deletes a segment file no extent names any more, then syncs the
    /// directory.
    pub fn remove(&self, segment: u32) -> Result<(), AuditError> {
        let path = self.path(segment);
        {
            let _unpinned = self.unpinned();
            lock(&self.readers).remove(&segment);
            std::fs::remove_file(&path).map_err(io(&path))?;
        }
        File::open(&self.dir)
            .and_then(|d| d.sync_all())
            .map_err(io(&self.dir))
    }
}

/// Deallocates an extent's bytes; where the file system cannot, overwrites
/// them with zeros.
fn punch_hole(file: &File, extent: Extent) -> std::io::Result<()> {
    let Ok(offset) = libc::off_t::try_from(extent.offset) else {
        return Err(std::io::Error::other("extent out of range"));
    };
    let len = libc::off_t::from(extent.len);
    // SAFETY: fallocate only reads its integer arguments; the descriptor
    // is owned by `file` for the whole call.
    let punched = unsafe {
        libc::fallocate(
            file.as_raw_fd(),
            libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
            offset,
            len,
        )
    };
    if punched == 0 {
        return Ok(());
    }
    let error = std::io::Error::last_os_error();
    if error.raw_os_error() != Some(libc::EOPNOTSUPP) {
        return Err(error);
    }
    file.write_all_at(&vec![0; extent.len as usize], extent.offset)
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> AuditError + '_ {
    move |source| AuditError::Io {
        path: path.to_owned(),
        source,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn extents_round_trip_and_blocks_are_not_extents() {
        let extent = Extent {
            segment: 3,
            offset: 1 << 33,
            len: 6000,
        };
        assert_eq!(Extent::decode(&extent.encode()), Some(extent));
        assert_eq!(Extent::decode(br#"{"seq":1,"at_us":2,"prev":"00"}"#), None);
        assert_eq!(Extent::decode(b"{0123456789abcdef"), None);
        assert_eq!(Extent::decode(b""), None);
    }

    #[test]
    fn appends_read_back_across_reopen_and_released_bytes_are_gone() {
        let dir = tempfile::tempdir().unwrap();
        let segments = Segments::open(dir.path());
        let extents = segments.append([&b"first block"[..], b"second"]).unwrap();
        segments.sync().unwrap();
        assert_eq!(segments.read(extents[1]).unwrap(), b"second");
        assert_eq!(segments.file_len(1).unwrap(), GROWTH_BYTES, "zeros ahead");
        let more = segments.append([&b"third"[..]]).unwrap();
        assert_eq!(more[0].offset, extents[1].end(), "written over them");

        // A reopened store appends after what is there, zeros included,
        // whether or not it is referenced.
        let segments = Segments::open(dir.path());
        let after = segments.append([&b"fourth"[..]]).unwrap();
        assert_eq!(after[0].offset, GROWTH_BYTES);
        assert_eq!(segments.file_len(1).unwrap(), 2 * GROWTH_BYTES);
        segments.sync().unwrap();
        segments.release(&extents[..1]).unwrap();
        assert_eq!(segments.read(extents[0]).unwrap(), vec![0; 11]);
        assert_eq!(segments.read(more[0]).unwrap(), b"third");

        let past_end = Extent {
            offset: 2 * GROWTH_BYTES,
            ..more[0]
        };
        let err = segments.read(past_end).unwrap_err().to_string();
        assert!(err.contains("was truncated"), "{err}");
        let missing = Extent {
            segment: 9,
            ..more[0]
        };
        let err = segments.read(missing).unwrap_err().to_string();
        assert!(err.contains("00000009.seg is missing"), "{err}");
    }

    #[test]
    fn a_closed_segment_keeps_no_zeros_and_a_restart_appends_after_its_last_block() {
        let dir = tempfile::tempdir().unwrap();
        let segments = Segments::open(dir.path());
        let first = segments.append([&b"first block"[..]]).unwrap();
        segments.sync().unwrap();
        segments.close().unwrap();
        assert_eq!(segments.file_len(1).unwrap(), first[0].end());

        let segments = Segments::open(dir.path());
        let next = segments.append([&b"after restart"[..]]).unwrap();
        assert_eq!(next[0].offset, first[0].end());
        assert_eq!(segments.read(first[0]).unwrap(), b"first block");
        assert_eq!(segments.read(next[0]).unwrap(), b"after restart");
    }

    #[test]
    fn a_full_segment_is_synced_and_followed_by_the_next() {
        let dir = tempfile::tempdir().unwrap();
        let mut segments = Segments::open(dir.path());
        segments.limit = 10;
        let first = segments.append([&b"0123456789"[..], b"ab"]).unwrap();
        let second = segments.append([&b"cd"[..]]).unwrap();
        segments.sync().unwrap();
        assert_eq!((first[1].segment, second[0].segment), (1, 2));
        assert_eq!(second[0].offset, 0);
        assert_eq!(segments.read(first[1]).unwrap(), b"ab");
        assert_eq!(segments.read(second[0]).unwrap(), b"cd");
        assert_eq!(segments.file_len(1).unwrap(), 12, "cut to its last block");
        // Reopened, appends continue in the last segment.
        let segments = Segments::open(dir.path());
        assert_eq!(segments.append([&b"ef"[..]]).unwrap()[0].segment, 2);
    }
}
