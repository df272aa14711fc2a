//! The audit log: who did what to which asset, from where, with what result (IEC 62443-3-3
//! SR 2.8). One record per setpoint write, acknowledgement, shelve, failed sign-in,
//! permission denial and config change, in the store's `audit` tree under its seq.
//!
//! Records are hash-chained: each stored value is `sha256(prev_hash ‖ json) ‖ json`, and the
//! JSON names the previous record's hash, so a changed, removed or reordered record breaks
//! the chain at that record (`verify`). Retention removes the oldest records and keeps the
//! hash of the last one removed as the chain's anchor (in `meta`).

use std::sync::Mutex;

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
}

pub struct AuditLog {
    tree: sled::Tree,
    meta: sled::Tree,
    head: Mutex<Head>,
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
    pub fn open(db: &sled::Db, meta: sled::Tree) -> sled::Result<AuditLog> {
        let tree = db.open_tree("audit")?;
        let anchor = anchor(&meta)?;
        let head = match tree.last()? {
            Some((k, v)) => Head {
                next_seq: seq_of(&k).unwrap_or(0) + 1,
                last_hash: v
                    .get(..32)
                    .and_then(|h| h.try_into().ok())
                    .unwrap_or(anchor),
            },
            None => Head {
                next_seq: 1,
                last_hash: anchor,
            },
        };
        Ok(AuditLog {
            tree,
            meta,
            head: Mutex::new(head),
        })
    }

    /// Appends a record; with `durable` it is on disk before this returns (a setpoint write
    /// waits for that, and is refused when it fails). Blocking: call it off the async
    /// threads when `durable`.
    pub fn append(&self, e: AuditEntry, durable: bool) -> sled::Result<u64> {
        let mut head = self.head.lock().expect("audit head is never poisoned");
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
        self.tree.insert(rec.seq.to_be_bytes(), value)?;
        if durable {
            self.tree.flush()?;
        }
        head.next_seq += 1;
        head.last_hash = hash;
        Ok(rec.seq)
    }

    /// Records in seq order after `f.after_seq` that match `f`, at most `f.limit`; the
    /// records are decoded as they are (a broken one is listed; `verify` says it is broken).
    pub fn list(&self, f: &AuditFilter) -> sled::Result<Vec<AuditRecord>> {
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
            self.meta.insert(ANCHOR_KEY, &hash)?;
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

fn anchor(meta: &sled::Tree) -> sled::Result<[u8; 32]> {
    Ok(meta
        .get(ANCHOR_KEY)?
        .and_then(|v| <[u8; 32]>::try_from(&*v).ok())
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
        AuditLog::open(&db, meta).expect("audit")
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

    #[test]
    fn retention_keeps_the_chain_verifiable_and_fields_are_bounded() {
        let dir = tempfile::tempdir().expect("tmp");
        let db = sled::open(dir.path()).expect("sled");
        let meta = db.open_tree("meta").expect("meta");
        let a = AuditLog::open(&db, meta).expect("audit");

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
