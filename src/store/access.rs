//! The access index: for every stored blob (layers, configs and manifests alike) its size, when
//! it was last served and which upstreams reference it. It lives in memory and is persisted
//! under `index/` as a snapshot plus an append-only journal of changes since the snapshot.
//!
//! Why a journal rather than an embedded database (redb, sled): the data is small (about 100
//! bytes a blob), every change is a blind upsert, and the only durability need is "never lose
//! content, at worst an older access time". A journal of self-checking lines gives that with no
//! dependency and no second copy of the truth: start-up reads two sequential files and never
//! the blob files (`benches/startup.rs` measures it with 100,000 objects), a torn last line is
//! detected by its checksum and cut off, and a lost record only means a blob the background
//! reconciliation scan (`Store::reconcile`) finds on disk and re-adds with its file time. The blob files stay the
//! truth: the index never makes content servable, it only orders eviction.
//!
//! Access times are batched: a hit updates memory, and `flush` (every eviction check and at
//! shutdown) appends one record per touched blob, so a busy mirror does not write per request.
//! When the journal outgrows the index, `flush` compacts: snapshot to a temporary file, fsync,
//! rename, then truncate the journal. Replaying an old journal over a new snapshot (a crash
//! between the rename and the truncate) is harmless: records are idempotent upserts in order.
//!
//! Line format: `<kind> <digest> <fields...> <fnv64 hex>\n`, kinds `+` (size, access ms), `a`
//! (access ms), `o` (upstream), `-` (removed).

use std::collections::{HashMap, HashSet};
use std::fs::File;
use std::io::{self, BufRead, BufReader, Seek, Write};
use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard};
use std::time::{SystemTime, UNIX_EPOCH};

use crate::oci::{Digest, RegistryHost};

const SNAPSHOT: &str = "access.snapshot";
const JOURNAL: &str = "access.journal";
/// Journal records beyond which a flush compacts (when they also outnumber the entries).
const COMPACT_AFTER: usize = 20_000;

/// Milliseconds since the Unix epoch, the index's clock.
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// What the index knows of one stored blob.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Entry {
    pub size: u64,
    /// Last time it was stored or served, in ms since the Unix epoch.
    pub last_access: u64,
    /// Upstreams it was fetched through or linked for; empty when only a scan found it.
    pub upstreams: Vec<RegistryHost>,
}

pub(super) struct AccessIndex {
    dir: PathBuf,
    /// The process holding `index/lock`: it alone cuts torn tails and compacts.
    owner: bool,
    inner: Mutex<Inner>,
}

pub(super) struct Inner {
    entries: HashMap<Digest, Entry>,
    bytes: u64,
    /// `None` when opened read-only (`cache stats` beside a running mirror).
    journal: Option<File>,
    journal_records: usize,
    touched: HashSet<Digest>,
    /// Records appended since the last fsync.
    unsynced: bool,
}

impl AccessIndex {
    /// Loads the snapshot and replays the journal. Owner: a torn or corrupt journal tail is cut
    /// off so appends continue after the last good record. Writable: changes are appended.
    pub fn load(dir: &Path, writable: bool, owner: bool) -> io::Result<AccessIndex> {
        if writable {
            std::fs::create_dir_all(dir)?;
        }
        let mut inner = Inner {
            entries: HashMap::new(),
            bytes: 0,
            journal: None,
            journal_records: 0,
            touched: HashSet::new(),
            unsynced: false,
        };
        match File::open(dir.join(SNAPSHOT)) {
            Ok(file) => {
                let (_, bad) = inner.replay(file)?;
                if bad {
                    tracing::warn!(
                        "the access index snapshot has a damaged record; the scan re-adds what it missed"
                    );
                }
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
        let journal_path = dir.join(JOURNAL);
        match File::open(&journal_path) {
            Ok(file) => {
                let (good, bad) = inner.replay(file)?;
                inner.journal_records = good.1;
                if bad && owner {
                    tracing::warn!(
                        kept_bytes = good.0,
                        "cut a torn record off the access journal (an interrupted write); at worst some access times are older"
                    );
                    let file = File::options().write(true).open(&journal_path)?;
                    file.set_len(good.0)?;
                    file.sync_all()?;
                }
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
        if writable {
            let mut journal = File::options()
                .create(true)
                .append(true)
                .open(&journal_path)?;
            journal.seek(io::SeekFrom::End(0))?;
            inner.journal = Some(journal);
        }
        Ok(AccessIndex {
            dir: dir.to_owned(),
            owner,
            inner: Mutex::new(inner),
        })
    }

    pub fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner
            .lock()
            .expect("the access index lock is never poisoned")
    }

    /// Appends access times of touched blobs; compacts when the journal has grown large.
    pub fn flush(&self) -> io::Result<()> {
        let mut inner = self.lock();
        let touched: Vec<Digest> = inner.touched.drain().collect();
        let mut buf = String::new();
        for digest in touched {
            if let Some(e) = inner.entries.get(&digest) {
                push_record(&mut buf, &format!("a {digest} {}", e.last_access));
            }
        }
        inner.append(&buf)?;
        if inner.unsynced
            && let Some(journal) = &inner.journal
        {
            journal.sync_data()?;
            inner.unsynced = false;
        }
        if self.owner
            && inner.journal_records > COMPACT_AFTER
            && inner.journal_records > inner.entries.len()
        {
            inner.compact(&self.dir)?;
        }
        Ok(())
    }
}

impl Inner {
    /// Applies every good line of `file`; returns (bytes and records up to the last good line,
    /// whether a bad line stopped the replay).
    fn replay(&mut self, file: File) -> io::Result<((u64, usize), bool)> {
        let mut reader = BufReader::with_capacity(1 << 20, file);
        let mut line = String::new();
        let (mut offset, mut records) = (0u64, 0usize);
        loop {
            line.clear();
            let n = match reader.read_line(&mut line) {
                Ok(n) => n,
                // Garbage that is not UTF-8: a damaged tail.
                Err(e) if e.kind() == io::ErrorKind::InvalidData => {
                    return Ok(((offset, records), true));
                }
                Err(e) => return Err(e),
            };
            if n == 0 {
                return Ok(((offset, records), false));
            }
            if !line.ends_with('\n') || self.apply_line(&line[..n - 1]).is_none() {
                return Ok(((offset, records), true));
            }
            offset += n as u64;
            records += 1;
        }
    }

    fn apply_line(&mut self, line: &str) -> Option<()> {
        let (body, sum) = line.rsplit_once(' ')?;
        if u64::from_str_radix(sum, 16).ok()? != fnv64(body.as_bytes()) {
            return None;
        }
        let mut fields = body.split(' ');
        let kind = fields.next()?;
        let digest: Digest = fields.next()?.parse().ok()?;
        match kind {
            "+" => {
                let size = fields.next()?.parse().ok()?;
                let at = fields.next()?.parse().ok()?;
                self.set(digest, size, at);
            }
            "a" => {
                let at: u64 = fields.next()?.parse().ok()?;
                if let Some(e) = self.entries.get_mut(&digest) {
                    e.last_access = e.last_access.max(at);
                }
            }
            "o" => {
                let upstream: RegistryHost = fields.next()?.parse().ok()?;
                if let Some(e) = self.entries.get_mut(&digest)
                    && !e.upstreams.contains(&upstream)
                {
                    e.upstreams.push(upstream);
                }
            }
            "-" => {
                self.forget(&digest);
            }
            _ => return None,
        }
        Some(())
    }

    fn set(&mut self, digest: Digest, size: u64, at: u64) {
        match self.entries.get_mut(&digest) {
            Some(e) => {
                self.bytes = self.bytes - e.size + size;
                e.size = size;
                e.last_access = e.last_access.max(at);
            }
            None => {
                self.bytes += size;
                self.entries.insert(
                    digest,
                    Entry {
                        size,
                        last_access: at,
                        upstreams: Vec::new(),
                    },
                );
            }
        }
    }

    fn forget(&mut self, digest: &Digest) -> Option<Entry> {
        let e = self.entries.remove(digest)?;
        self.bytes -= e.size;
        self.touched.remove(digest);
        Some(e)
    }

    fn append(&mut self, records: &str) -> io::Result<()> {
        if records.is_empty() {
            return Ok(());
        }
        if let Some(journal) = &mut self.journal {
            self.unsynced = true;
            journal.write_all(records.as_bytes())?;
            self.journal_records += records.matches('\n').count();
        }
        Ok(())
    }

    /// Appends without failing the caller: a lost record costs an older access time or a
    /// rescan, never content, so it is logged, not propagated.
    fn append_logged(&mut self, record: &str) {
        let mut buf = String::new();
        push_record(&mut buf, record);
        if let Err(e) = self.append(&buf) {
            tracing::warn!(error = %e, "could not append to the access journal; the next scan repairs the index");
        }
    }

    /// Records a stored blob (or refreshes one stored again).
    pub fn insert(&mut self, digest: &Digest, size: u64, at: u64) {
        self.set(digest.clone(), size, at);
        self.append_logged(&format!("+ {digest} {size} {at}"));
    }

    /// Notes that `upstream` references `digest`, if `digest` is stored.
    pub fn add_upstream(&mut self, digest: &Digest, upstream: &RegistryHost) {
        let Some(e) = self.entries.get_mut(digest) else {
            return;
        };
        if e.upstreams.contains(upstream) {
            return;
        }
        e.upstreams.push(upstream.clone());
        self.append_logged(&format!("o {digest} {upstream}"));
    }

    /// A hit: kept in memory until the next flush.
    pub fn touch(&mut self, digest: &Digest, at: u64) {
        if let Some(e) = self.entries.get_mut(digest) {
            e.last_access = e.last_access.max(at);
            self.touched.insert(digest.clone());
        }
    }

    pub fn remove(&mut self, digest: &Digest) -> Option<Entry> {
        let e = self.forget(digest)?;
        self.append_logged(&format!("- {digest}"));
        Some(e)
    }

    pub fn get(&self, digest: &Digest) -> Option<&Entry> {
        self.entries.get(digest)
    }

    pub fn contains(&self, digest: &Digest) -> bool {
        self.entries.contains_key(digest)
    }

    pub fn usage(&self) -> (u64, u64) {
        (self.bytes, self.entries.len() as u64)
    }

    pub fn entries(&self) -> impl Iterator<Item = (&Digest, &Entry)> {
        self.entries.iter()
    }

    /// Rewrites the snapshot from memory and empties the journal.
    fn compact(&mut self, dir: &Path) -> io::Result<()> {
        let tmp = dir.join(format!("{SNAPSHOT}.tmp"));
        {
            let mut out = io::BufWriter::with_capacity(1 << 20, File::create(&tmp)?);
            let mut buf = String::new();
            for (digest, e) in &self.entries {
                buf.clear();
                push_record(
                    &mut buf,
                    &format!("+ {digest} {} {}", e.size, e.last_access),
                );
                for up in &e.upstreams {
                    push_record(&mut buf, &format!("o {digest} {up}"));
                }
                out.write_all(buf.as_bytes())?;
            }
            out.into_inner().map_err(|e| e.into_error())?.sync_all()?;
        }
        std::fs::rename(&tmp, dir.join(SNAPSHOT))?;
        File::open(dir)?.sync_all()?;
        if let Some(journal) = &self.journal {
            journal.set_len(0)?;
            journal.sync_all()?;
        }
        self.journal_records = 0;
        tracing::debug!(entries = self.entries.len(), "compacted the access index");
        Ok(())
    }
}

fn push_record(buf: &mut String, body: &str) {
    use std::fmt::Write as _;
    let _ = writeln!(buf, "{body} {:016x}", fnv64(body.as_bytes()));
}

/// FNV-1a, 64 bits: enough to tell a torn or zero-filled line from a written one.
fn fnv64(bytes: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in bytes {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::oci::Algorithm;

    fn d(n: u32) -> Digest {
        Digest::of(Algorithm::Sha256, &n.to_le_bytes())
    }

    #[test]
    fn records_survive_a_reload_and_a_torn_tail_is_cut() {
        let dir = tempfile::tempdir().expect("tempdir");
        let up: RegistryHost = "docker.io".parse().expect("host");
        {
            let index = AccessIndex::load(dir.path(), true, true).expect("load");
            let mut i = index.lock();
            i.insert(&d(1), 10, 100);
            i.insert(&d(2), 20, 200);
            i.add_upstream(&d(2), &up);
            i.touch(&d(1), 300);
            i.insert(&d(3), 30, 400);
            i.remove(&d(3));
            drop(i);
            index.flush().expect("flush");
        }
        // A write cut short by a crash.
        let journal = dir.path().join(JOURNAL);
        let mut f = File::options().append(true).open(&journal).expect("open");
        f.write_all(b"+ sha256:abc 12").expect("write");
        drop(f);

        let index = AccessIndex::load(dir.path(), true, true).expect("reload");
        let mut i = index.lock();
        assert_eq!(i.usage(), (30, 2));
        assert_eq!(i.get(&d(1)).map(|e| e.last_access), Some(300));
        assert_eq!(i.get(&d(2)).map(|e| e.upstreams.clone()), Some(vec![up]));
        // Appends continue on a clean line after the cut.
        i.insert(&d(4), 40, 500);
        drop(i);
        drop(index);
        let index = AccessIndex::load(dir.path(), false, false).expect("reload");
        assert_eq!(index.lock().usage(), (70, 3));
    }

    #[test]
    fn compaction_keeps_everything() {
        let dir = tempfile::tempdir().expect("tempdir");
        let index = AccessIndex::load(dir.path(), true, true).expect("load");
        {
            let mut i = index.lock();
            for n in 0..100 {
                i.insert(&d(n), u64::from(n), u64::from(n));
            }
            i.remove(&d(0));
            i.compact(dir.path()).expect("compact");
            i.touch(&d(5), 1_000);
        }
        index.flush().expect("flush");
        drop(index);
        let index = AccessIndex::load(dir.path(), true, true).expect("reload");
        let i = index.lock();
        assert_eq!(i.usage(), ((1..100).sum(), 99));
        assert_eq!(i.get(&d(5)).map(|e| e.last_access), Some(1_000));
    }
}
