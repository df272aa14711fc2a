//! The audit log: who did what to which asset, from where, with what result (IEC 62443-3-3
//! SR 2.8). One record per setpoint write, acknowledgement, shelve, failed sign-in,
//! permission denial and config change, in the store's `audit` tree under its seq.
//!
//! Records are hash-chained: each stored value is `sha256(prev_hash ‖ json) ‖ json`, and the
//! JSON names the previous record's hash, so a changed, removed or reordered record breaks
//! the chain at that record (`verify`). Retention removes the oldest records and keeps the
//! hash of the last one removed as the chain's anchor (in `meta`).

use std::fs::File;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::sync::mpsc::{Receiver, SyncSender, sync_channel};
use std::sync::{Arc, Condvar, Mutex};

use sha2::{Digest, Sha256};

use ferrotwin_models::Timestamp;

/// `meta` key: the hash the first kept record continues (zeros until retention trims).
const ANCHOR_KEY: &[u8] = b"audit-anchor";
/// Records removed per retention sweep at most.
const MAX_TRIM_PER_SWEEP: usize = 100_000;
/// Longest text kept in a field; longer values are cut and marked.
const MAX_FIELD: usize = 512;

/// One audit record as stored (JSON) and listed.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct AuditRecord {
    pub seq: u64,
    pub ts_us: i64,
    /// The authenticated subject (`user:alice`), or what a failed sign-in showed.
    pub subject: String,
    /// The client's IP address (`-` when unknown).
    pub source: String,
    /// `write`, `acknowledge`, `shelve`, `sign-in`, `denied`, `config`, ...
    pub action: String,
    /// The asset path (and property or alarm) acted on, or the method called.
    pub target: String,
    /// The value written, the comment, the duration: what was asked.
    pub value: String,
    /// `ok`, or `refused: ...`, `failed: ...`.
    pub result: String,
    /// Hex of the previous record's hash.
    pub prev: String,
}

/// What a caller supplies; the log fills seq, time and the chain.
#[derive(Debug, Clone, Default)]
pub struct AuditEntry {
    pub subject: String,
    pub source: String,
    pub action: &'static str,
    pub target: String,
    pub value: String,
    pub result: String,
}

/// The first record whose chain does not hold, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Broken {
    pub seq: u64,
    pub what: String,
}

/// A filter for `list`.
#[derive(Debug, Clone, Default)]
pub struct AuditFilter {
    pub after_seq: u64,
    pub limit: usize,
    /// Substrings each must contain (empty: any).
    pub subject: String,
    pub action: String,
    pub target: String,
    pub from_us: i64,
    pub to_us: i64,
}

struct Head {
    next_seq: u64,
    last_hash: [u8; 32],
    /// The journal segment appends go to, its number and size.
    wal: File,
    wal_no: u64,
    wal_bytes: u64,
    /// The journal failed in a way that may have lost a frame (an fsync failed, a torn
    /// frame could not be cut off): every append is refused from then on.
    broken: Option<String>,
}

/// What the inserter has put in the tree: the last seq, and the sealed journal segments
/// (number, last seq in it) it may delete once the tree holding them is flushed.
#[derive(Default)]
struct Applied {
    seq: u64,
    sealed: Vec<(u64, u64)>,
    /// The inserter stopped on an error: appends still journal, reads say so.
    failed: Option<String>,
}

/// A record on its way from the journal to the tree: seq and stored value.
type Journaled = (u64, Vec<u8>);

pub struct AuditLog {
    tree: sled::Tree,
    meta: sled::Tree,
    dir: PathBuf,
    head: Mutex<Head>,
    applied: Arc<(Mutex<Applied>, Condvar)>,
    to_tree: Mutex<Option<SyncSender<Journaled>>>,
    inserter: Mutex<Option<std::thread::JoinHandle<()>>>,
}

fn cut(s: String) -> String {
    if s.len() <= MAX_FIELD {
        return s;
    }
    let end = crate::core::char_floor(&s, MAX_FIELD);
    format!("{}…({} bytes)", &s[..end], s.len())
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn chain_hash(prev: &[u8; 32], json: &[u8]) -> [u8; 32] {
    let mut h = Sha256::new();
    h.update(prev);
    h.update(json);
    h.finalize().into()
}

impl AuditLog {
    /// Opens the log in the store's database and its journal in `dir` (the data dir): the
    /// records a crash left only in the journal go into the tree first.
    pub fn open(db: &sled::Db, meta: sled::Tree, dir: &Path) -> sled::Result<AuditLog> {
        let tree = db.open_tree("audit")?;
        let head = head_of(&tree, &meta)?;
        let (mut next_seq, mut last_hash) = (head.0, head.1);
        // Replay: every journaled record the tree lacks, in order, while its chain holds (a
        // torn last frame of a crash ends the replay).
        let segments = wal_segments(dir)?;
        let mut replayed = 0u64;
        // Frames past where the replay stopped (other than a torn last frame): kept aside.
        let mut left = 0u64;
        for (_, path) in &segments {
            let bytes = std::fs::read(path)?;
            let mut at = 0usize;
            while let Some((seq, value, next)) = frame_at(&bytes, at) {
                at = next;
                if seq < next_seq {
                    continue;
                }
                let json = &value[32..];
                if seq != next_seq || chain_hash(&last_hash, json) != value[..32] {
                    left += 1;
                    continue;
                }
                tree.insert(seq.to_be_bytes(), value)?;
                last_hash.copy_from_slice(&value[..32]);
                next_seq += 1;
                replayed += 1;
            }
        }
        if replayed > 0 {
            tracing::warn!(
                records = replayed,
                "audit records recovered from the journal"
            );
        }
        tree.flush()?;
        for (_, path) in &segments {
            if left > 0 {
                let aside = path.with_extension(format!("unreplayed-{}", Timestamp::now().0));
                tracing::error!(frames = left, kept = %aside.display(), "audit journal frames that do not continue the chain were left out; kept aside");
                std::fs::rename(path, aside)?;
            } else {
                std::fs::remove_file(path)?;
            }
        }
        let wal_no = segments.last().map_or(0, |(n, _)| n + 1);
        let wal = open_segment(dir, wal_no)?;
        let applied = Arc::new((
            Mutex::new(Applied {
                seq: next_seq - 1,
                ..Applied::default()
            }),
            Condvar::new(),
        ));
        let (tx, rx) = sync_channel(INSERT_QUEUE);
        let inserter = {
            let (tree, applied, dir) = (tree.clone(), applied.clone(), dir.to_path_buf());
            std::thread::Builder::new()
                .name("audit-inserter".into())
                .spawn(move || insert_loop(&tree, &rx, &applied, &dir))?
        };
        Ok(AuditLog {
            tree,
            meta,
            dir: dir.to_path_buf(),
            head: Mutex::new(Head {
                next_seq,
                last_hash,
                wal,
                wal_no,
                wal_bytes: 0,
                broken: None,
            }),
            applied,
            to_tree: Mutex::new(Some(tx)),
            inserter: Mutex::new(Some(inserter)),
        })
    }

    /// Appends a record; with `durable` it is on disk before this returns (a setpoint write
    /// waits for that, and is refused when it fails). Blocking: call it off the async
    /// threads when `durable`.
    ///
    /// The record goes to the journal (an append, and an fsync when durable) and from there
    /// to the tree on the inserter thread: the store's database stalls now and then under a
    /// plant's load (its flushes, up to 0.7 s with 100,000 sensors) and a write to a PLC
    /// must not wait for that.
    pub fn append(&self, e: AuditEntry, durable: bool) -> sled::Result<u64> {
        let mut head = self.head.lock().expect("audit head is never poisoned");
        let refused = |why: String| {
            sled::Error::Io(std::io::Error::other(format!(
                "the audit journal takes no more records: {why}"
            )))
        };
        if let Some(why) = &head.broken {
            return Err(refused(why.clone()));
        }
        if let Some(why) = &self.applied.0.lock().expect("never poisoned").failed {
            return Err(refused(why.clone()));
        }
        let rec = AuditRecord {
            seq: head.next_seq,
            ts_us: Timestamp::now().0,
            subject: cut(e.subject),
            source: cut(e.source),
            action: e.action.to_owned(),
            target: cut(e.target),
            value: cut(e.value),
            result: cut(e.result),
            prev: hex(&head.last_hash),
        };
        let json = serde_json::to_vec(&rec).expect("an audit record serializes");
        let hash = chain_hash(&head.last_hash, &json);
        let mut value = Vec::with_capacity(32 + json.len());
        value.extend_from_slice(&hash);
        value.extend_from_slice(&json);
        if head.wal_bytes >= WAL_SEGMENT_BYTES {
            // Sealed on disk (its last frames may not have been fsynced; a gap before the
            // next segment would end a replay there): the inserter deletes it once the tree
            // holding its records is flushed.
            let sealed = (head.wal_no, head.next_seq - 1);
            head.wal.sync_data()?;
            head.wal = open_segment(&self.dir, head.wal_no + 1)?;
            head.wal_no += 1;
            head.wal_bytes = 0;
            self.applied
                .0
                .lock()
                .expect("never poisoned")
                .sealed
                .push(sealed);
        }
        let mut frame = Vec::with_capacity(12 + value.len());
        frame.extend_from_slice(&rec.seq.to_be_bytes());
        frame.extend_from_slice(&(value.len() as u32).to_be_bytes());
        frame.extend_from_slice(&value);
        let written = head.wal.write_all(&frame);
        if let Err(e) = written {
            // Cut back to the last whole frame, so the next one follows it; the caller is
            // refused (a write does not go to its PLC).
            if let Err(cut) = head.wal.set_len(head.wal_bytes) {
                head.broken = Some(format!(
                    "a torn frame could not be cut off ({cut}) after: {e}"
                ));
            }
            return Err(e.into());
        }
        if durable && let Err(e) = head.wal.sync_data() {
            // After a failed fsync the kernel may have dropped what it held: nothing written
            // since can be trusted to be on disk.
            let _ = head.wal.set_len(head.wal_bytes);
            head.broken = Some(format!("an fsync failed: {e}"));
            return Err(e.into());
        }
        head.wal_bytes += frame.len() as u64;
        head.next_seq += 1;
        head.last_hash = hash;
        // Bounded: when the tree is that far behind, appends wait for it.
        if let Some(tx) = self.to_tree.lock().expect("never poisoned").as_ref() {
            let _ = tx.send((rec.seq, value));
        }
        Ok(rec.seq)
    }

    /// Waits until every record appended so far is in the tree (reads see what was written
    /// before them).
    fn settled(&self) -> sled::Result<()> {
        let upto = self.head.lock().expect("never poisoned").next_seq - 1;
        let (lock, cv) = &*self.applied;
        let mut a = lock.lock().expect("never poisoned");
        let deadline = std::time::Instant::now() + SETTLE_WAIT;
        while a.seq < upto {
            if let Some(why) = &a.failed {
                return Err(sled::Error::Io(std::io::Error::other(format!(
                    "audit records past {} are in the journal only: {why}",
                    a.seq
                ))));
            }
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            if left.is_zero() {
                return Err(sled::Error::Io(std::io::Error::other(format!(
                    "audit records past {} did not reach the tree within {} s",
                    a.seq,
                    SETTLE_WAIT.as_secs()
                ))));
            }
            a = cv.wait_timeout(a, left).expect("never poisoned").0;
        }
        Ok(())
    }

    /// Records in seq order after `f.after_seq` that match `f`, at most `f.limit`; the
    /// records are decoded as they are (a broken one is listed; `verify` says it is broken).
    pub fn list(&self, f: &AuditFilter) -> sled::Result<Vec<AuditRecord>> {
        self.settled()?;
        let mut out = Vec::new();
        let start = f.after_seq.saturating_add(1).to_be_bytes();
        for kv in self.tree.range(start..) {
            let (_, v) = kv?;
            let Some(r) = v
                .get(32..)
                .and_then(|j| serde_json::from_slice::<AuditRecord>(j).ok())
            else {
                continue;
            };
            let keep = r.subject.contains(&f.subject)
                && r.action.contains(&f.action)
                && r.target.contains(&f.target)
                && (f.from_us == 0 || r.ts_us >= f.from_us)
                && (f.to_us == 0 || r.ts_us <= f.to_us);
            if keep {
                out.push(r);
                if out.len() >= f.limit {
                    break;
                }
            }
        }
        Ok(out)
    }

    /// Walks the whole chain; returns the records checked and the first broken one.
    pub fn verify(&self) -> sled::Result<(u64, Option<Broken>)> {
        self.settled()?;
        let mut prev = anchor(&self.meta)?;
        let mut expect_seq: Option<u64> = None;
        let mut n = 0;
        for kv in self.tree.iter() {
            let (k, v) = kv?;
            n += 1;
            let seq = seq_of(&k).unwrap_or(0);
            let broken = |what: String| Ok((n, Some(Broken { seq, what })));
            if let Some(s) = expect_seq
                && seq != s
            {
                return broken(format!("records {s}..{seq} are missing"));
            }
            expect_seq = Some(seq + 1);
            if v.len() < 32 {
                return broken("record is shorter than its hash".into());
            }
            let (hash, json) = v.split_at(32);
            if chain_hash(&prev, json) != hash {
                return broken("hash does not match the record (changed or reordered)".into());
            }
            let r: AuditRecord = match serde_json::from_slice(json) {
                Ok(r) => r,
                Err(e) => return broken(format!("record does not decode: {e}")),
            };
            if r.seq != seq || r.prev != hex(&prev) {
                return broken("record does not name its place in the chain".into());
            }
            prev.copy_from_slice(hash);
        }
        Ok((n, None))
    }

    /// Removes records older than the retention or beyond `max_records` (oldest first, at
    /// most `MAX_TRIM_PER_SWEEP`), moving the anchor to the last removed record's hash.
    pub fn apply_retention(
        &self,
        now: Timestamp,
        retention_days: u64,
        max_records: u64,
    ) -> sled::Result<usize> {
        self.settled()?;
        let cutoff = if retention_days == 0 {
            i64::MIN
        } else {
            now.0 - (retention_days as i64) * 86_400_000_000
        };
        // Keys are consecutive seqs: the count is the span (no scan of the tree).
        let count = match (self.tree.first()?, self.tree.last()?) {
            (Some((a, _)), Some((b, _))) => {
                seq_of(&b)
                    .unwrap_or(0)
                    .saturating_sub(seq_of(&a).unwrap_or(0))
                    + 1
            }
            _ => 0,
        };
        let over = count.saturating_sub(max_records);
        let mut removed = 0usize;
        let mut anchor_hash = None;
        for kv in self.tree.iter().take(MAX_TRIM_PER_SWEEP) {
            let (k, v) = kv?;
            let ts = v
                .get(32..)
                .and_then(|j| serde_json::from_slice::<AuditRecord>(j).ok())
                .map_or(i64::MIN, |r| r.ts_us);
            if ts >= cutoff && (removed as u64) >= over {
                break;
            }
            // The anchor moves first: a crash between the two leaves a chain that starts
            // one record late (verify reports it), never a silently shortened one.
            let hash: [u8; 32] = v
                .get(..32)
                .and_then(|h| h.try_into().ok())
                .unwrap_or([0; 32]);
            anchor_hash = Some(hash);
            // The anchor keeps the removed record's seq too: a log trimmed empty goes on
            // after it, never from 1 again.
            let mut anchor_value = hash.to_vec();
            anchor_value.extend_from_slice(&k);
            self.meta.insert(ANCHOR_KEY, anchor_value)?;
            self.tree.remove(k)?;
            removed += 1;
        }
        if anchor_hash.is_some() {
            self.tree.flush()?;
        }
        Ok(removed)
    }

    /// Test-only: the raw tree, to tamper with.
    #[cfg(test)]
    pub fn raw(&self) -> &sled::Tree {
        &self.tree
    }
}

impl Drop for AuditLog {
    /// The inserter puts what is queued into the tree and ends; what it could not is still in
    /// the journal, replayed on the next open.
    fn drop(&mut self) {
        self.to_tree.lock().map(|mut t| t.take()).ok();
        if let Some(h) = self.inserter.lock().ok().and_then(|mut i| i.take()) {
            let _ = h.join();
        }
    }
}

/// Records between the journal and the tree at most (appends wait beyond).
const INSERT_QUEUE: usize = 65_536;
/// A journal segment is sealed past this size; sealed ones go once the tree has them.
const WAL_SEGMENT_BYTES: u64 = 4 << 20;
/// Longest a read waits for the tree to catch up with the journal.
const SETTLE_WAIT: std::time::Duration = std::time::Duration::from_secs(30);
const WAL_PREFIX: &str = "audit-journal-";

/// The journal segments in `dir`, oldest first.
fn wal_segments(dir: &Path) -> std::io::Result<Vec<(u64, PathBuf)>> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir)? {
        let e = e?;
        let name = e.file_name();
        if let Some(n) = name
            .to_str()
            .and_then(|n| n.strip_prefix(WAL_PREFIX))
            .and_then(|n| n.strip_suffix(".log"))
            .and_then(|n| n.parse::<u64>().ok())
        {
            out.push((n, e.path()));
        }
    }
    out.sort();
    Ok(out)
}

fn segment_path(dir: &Path, no: u64) -> PathBuf {
    dir.join(format!("{WAL_PREFIX}{no:010}.log"))
}

/// Creates (or opens) segment `no`; the directory is fsynced so the file itself survives.
fn open_segment(dir: &Path, no: u64) -> std::io::Result<File> {
    let f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(segment_path(dir, no))?;
    File::open(dir)?.sync_all()?;
    Ok(f)
}

/// The frame at `at`: seq (8 bytes), length (4), the stored value (hash ‖ json); `None` at
/// the end or at a torn frame.
fn frame_at(b: &[u8], at: usize) -> Option<(u64, &[u8], usize)> {
    let seq = u64::from_be_bytes(b.get(at..at + 8)?.try_into().ok()?);
    let len = u32::from_be_bytes(b.get(at + 8..at + 12)?.try_into().ok()?) as usize;
    let value = b.get(at + 12..at + 12 + len)?;
    (len >= 32).then_some((seq, value, at + 12 + len))
}

/// The inserter: journaled records into the tree, in order; sealed segments deleted once the
/// tree holding them is on disk.
fn insert_loop(
    tree: &sled::Tree,
    rx: &Receiver<Journaled>,
    applied: &(Mutex<Applied>, Condvar),
    dir: &Path,
) {
    /// A panic ends the inserter: reads and appends are told, not left waiting.
    struct Guard<'a>(&'a (Mutex<Applied>, Condvar));
    impl Drop for Guard<'_> {
        fn drop(&mut self) {
            if std::thread::panicking() {
                let mut a = self.0.0.lock().unwrap_or_else(|p| p.into_inner());
                a.failed = Some("the audit inserter thread panicked".into());
                self.0.1.notify_all();
            }
        }
    }
    let _guard = Guard(applied);
    let (lock, cv) = applied;
    while let Ok(first) = rx.recv() {
        let mut last = 0;
        let mut failed = None;
        for (seq, value) in std::iter::once(first).chain(rx.try_iter().take(4096)) {
            if let Err(e) = tree.insert(seq.to_be_bytes(), value) {
                failed = Some(e.to_string());
                break;
            }
            last = seq;
        }
        let sealed = {
            let mut a = lock.lock().expect("never poisoned");
            if let Some(why) = failed {
                tracing::error!(error = %why, "audit records stay in the journal: the tree refused them");
                a.failed = Some(why);
                cv.notify_all();
                return;
            }
            a.seq = last;
            cv.notify_all();
            a.sealed
                .iter()
                .filter(|(_, upto)| *upto <= last)
                .map(|(no, _)| *no)
                .collect::<Vec<_>>()
        };
        if !sealed.is_empty() && tree.flush().is_ok() {
            for no in &sealed {
                let _ = std::fs::remove_file(segment_path(dir, *no));
            }
            lock.lock()
                .expect("never poisoned")
                .sealed
                .retain(|(no, _)| !sealed.contains(no));
        }
    }
}

/// Where the next record goes: after the tree's last, or after the anchor when none is kept.
fn head_of(tree: &sled::Tree, meta: &sled::Tree) -> sled::Result<(u64, [u8; 32])> {
    let anchor = anchor(meta)?;
    Ok(match tree.last()? {
        Some((k, v)) => (
            seq_of(&k).unwrap_or(0) + 1,
            v.get(..32)
                .and_then(|h| h.try_into().ok())
                .unwrap_or(anchor),
        ),
        // Trimmed empty: after the last record removed (anchors before the seq was kept: 1).
        None => (anchor_seq(meta)? + 1, anchor),
    })
}

/// The seq of the last record retention removed (0: none, or an anchor that predates it).
fn anchor_seq(meta: &sled::Tree) -> sled::Result<u64> {
    Ok(meta
        .get(ANCHOR_KEY)?
        .and_then(|v| v.get(32..40).and_then(seq_of))
        .unwrap_or(0))
}

fn anchor(meta: &sled::Tree) -> sled::Result<[u8; 32]> {
    Ok(meta
        .get(ANCHOR_KEY)?
        .and_then(|v| v.get(..32).and_then(|h| <[u8; 32]>::try_from(h).ok()))
        .unwrap_or([0; 32]))
}

fn seq_of(k: &[u8]) -> Option<u64> {
    <[u8; 8]>::try_from(k).ok().map(u64::from_be_bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn log(dir: &std::path::Path) -> AuditLog {
        // A db dropped a moment ago may still hold its lock on sled's flusher thread.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        let db = loop {
            match sled::open(dir) {
                Ok(db) => break db,
                Err(e) if std::time::Instant::now() < deadline => {
                    let _ = e;
                    std::thread::sleep(std::time::Duration::from_millis(20));
                }
                Err(e) => panic!("sled: {e}"),
            }
        };
        let meta = db.open_tree("meta").expect("meta");
        AuditLog::open(&db, meta, dir).expect("audit")
    }

    fn entry(i: usize) -> AuditEntry {
        AuditEntry {
            subject: "user:alice".into(),
            source: "10.0.0.7".into(),
            action: "write",
            target: format!("acme/berlin/m{i}.speed"),
            value: "42".into(),
            result: "ok".into(),
        }
    }

    #[test]
    fn a_flipped_byte_breaks_the_chain_at_its_record() {
        let dir = tempfile::tempdir().expect("tmp");
        let a = log(dir.path());
        for i in 0..5 {
            a.append(entry(i), false).expect("append");
        }
        assert_eq!(a.verify().expect("verify"), (5, None));
        // Flip one byte of record 3's JSON (inside its target).
        let k = 3u64.to_be_bytes();
        let mut v = a.raw().get(k).expect("get").expect("record 3").to_vec();
        let at = v.len() - 20;
        v[at] ^= 0x01;
        a.raw().insert(k, v).expect("tamper");
        let (_, broken) = a.verify().expect("verify");
        assert_eq!(broken.expect("broken").seq, 3);
    }

    #[test]
    fn a_removed_record_and_a_reopened_log_are_seen() {
        let dir = tempfile::tempdir().expect("tmp");
        {
            let a = log(dir.path());
            for i in 0..4 {
                a.append(entry(i), true).expect("append");
            }
        }
        let a = log(dir.path());
        // Continues the chain after a reopen.
        assert_eq!(a.append(entry(9), false).expect("append"), 5);
        assert_eq!(a.verify().expect("verify"), (5, None));
        a.raw().remove(2u64.to_be_bytes()).expect("remove");
        let (_, broken) = a.verify().expect("verify");
        let b = broken.expect("broken");
        assert_eq!(b.seq, 3, "{b:?}");
        assert!(b.what.contains("missing"), "{b:?}");
    }

    /// Records journaled but not yet in the tree when the process died are put back on the
    /// next open, in chain order; a torn frame at the journal's end is left out.
    #[test]
    fn records_only_in_the_journal_are_recovered_and_a_torn_frame_ends_the_replay() {
        let dir = tempfile::tempdir().expect("tmp");
        {
            let a = log(dir.path());
            for i in 0..5 {
                a.append(entry(i), true).expect("append");
            }
            assert_eq!(a.verify().expect("verify"), (5, None));
        }
        // The crash: records 4 and 5 never reached the tree, the last frame is half written.
        {
            let db = sled::open(dir.path()).expect("sled");
            let t = db.open_tree("audit").expect("tree");
            t.remove(5u64.to_be_bytes()).expect("remove");
            t.remove(4u64.to_be_bytes()).expect("remove");
            db.flush().expect("flush");
        }
        let segs = wal_segments(dir.path()).expect("segments");
        assert_eq!(segs.len(), 1, "{segs:?}");
        let mut f = std::fs::OpenOptions::new()
            .append(true)
            .open(&segs[0].1)
            .expect("segment");
        f.write_all(&6u64.to_be_bytes()).expect("torn");
        f.write_all(&[0, 0, 9]).expect("torn");
        drop(f);
        let a = log(dir.path());
        assert_eq!(a.verify().expect("verify"), (5, None));
        assert_eq!(a.append(entry(6), true).expect("append"), 6);
        assert_eq!(a.verify().expect("verify"), (6, None));
        let segs = wal_segments(dir.path()).expect("segments");
        assert_eq!(segs.len(), 1, "the replayed segment is gone: {segs:?}");
    }

    /// The journal is bounded: sealed segments go once the tree holding them is on disk.
    #[test]
    fn sealed_journal_segments_are_removed_once_the_tree_has_them() {
        let dir = tempfile::tempdir().expect("tmp");
        let a = log(dir.path());
        let mut e = entry(0);
        e.value = "v".repeat(MAX_FIELD);
        e.target = "t".repeat(MAX_FIELD);
        let per = 1200u64;
        let n = (WAL_SEGMENT_BYTES / per) * 3;
        for _ in 0..n {
            a.append(e.clone(), false).expect("append");
        }
        assert_eq!(a.verify().expect("verify").0, n);
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
        loop {
            let segs = wal_segments(dir.path()).expect("segments");
            if segs.len() <= 2 {
                break;
            }
            assert!(std::time::Instant::now() < deadline, "{segs:?}");
            // A later append wakes the inserter, which deletes what the tree holds.
            a.append(entry(1), false).expect("append");
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
    }

    /// Trimmed to nothing, the log goes on after its last seq (never from 1 again: a reader
    /// paging with `after_seq` would miss records, and a replay would stop at the first).
    #[test]
    fn a_log_trimmed_empty_goes_on_after_its_last_seq_across_a_reopen() {
        let dir = tempfile::tempdir().expect("tmp");
        {
            let a = log(dir.path());
            for i in 0..3 {
                a.append(entry(i), true).expect("append");
            }
            assert_eq!(a.apply_retention(Timestamp::now(), 0, 0).expect("trim"), 3);
            assert_eq!(a.verify().expect("verify"), (0, None));
        }
        let a = log(dir.path());
        assert_eq!(a.append(entry(4), true).expect("append"), 4);
        assert_eq!(a.verify().expect("verify"), (1, None));
        drop(a);
        let a = log(dir.path());
        assert_eq!(a.verify().expect("verify"), (1, None));
        assert_eq!(a.append(entry(5), true).expect("append"), 5);
    }

    #[test]
    fn retention_keeps_the_chain_verifiable_and_fields_are_bounded() {
        let dir = tempfile::tempdir().expect("tmp");
        let db = sled::open(dir.path()).expect("sled");
        let meta = db.open_tree("meta").expect("meta");
        let a = AuditLog::open(&db, meta, dir.path()).expect("audit");

        for i in 0..6 {
            let mut e = entry(i);
            e.value = "x".repeat(10_000);
            a.append(e, false).expect("append");
        }
        assert_eq!(a.apply_retention(Timestamp::now(), 0, 3).expect("trim"), 3);
        assert_eq!(a.verify().expect("verify"), (3, None));
        let l = a
            .list(&AuditFilter {
                limit: 10,
                ..Default::default()
            })
            .expect("list");
        assert_eq!(l.first().map(|r| r.seq), Some(4));
        assert!(l[0].value.len() < 600 && l[0].value.contains("10000 bytes"));
    }
}
