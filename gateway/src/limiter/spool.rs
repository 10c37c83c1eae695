//! The in-process store's durable outbox (`[storage] spool`).
//!
//! With Redis the outbox lives in Redis and survives the gateway. With the
//! in-process store it lives in the gateway's memory; a spool file makes
//! it survive the gateway's death too. Every outbox entry the store
//! decides is appended to the file (one JSON line, one `write` call, under
//! the account's lock, so per account the file has the store's order),
//! and so is every acknowledgement (the catalog has the entries) and the
//! end of every admission that charged credits. No `fsync`: what was
//! written survives a `kill -9` or an OOM kill (the page cache belongs to
//! the kernel), not a power cut of the machine.
//!
//! At start the file is replayed ([`Spool::open`]): the entries not
//! acknowledged go back into the outbox (the writer records them; the
//! catalog's ledger keys make a repeat harmless), the admission charges of
//! requests that never ended are refunded (their gateway died before
//! them: a request the upstream may not have served is not charged), and
//! the file is rewritten with what is still pending.

use std::collections::{HashMap, HashSet};
use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};

use parking_lot::Mutex;
use serde::{Deserialize, Serialize};

use super::wallet::{admission_key, OutboxItem, OutboxOp, WalletOp};

/// One line of the spool.
#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "t", rename_all = "lowercase")]
enum Line {
    /// An outbox entry of account `a`.
    Op { a: String, id: u64, op: OutboxOp },
    /// The catalog has account `a`'s entries `ids`.
    Ack { a: String, ids: Vec<u64> },
    /// Request `r` of account `a`, admitted with a credit charge, ended.
    End { a: String, r: String },
}

/// What a replay found: per account, the outbox entries still to write
/// (in order), and the largest entry id used.
#[derive(Debug, Default)]
pub struct Replayed {
    pub outboxes: Vec<(String, Vec<OutboxItem>)>,
    pub max_id: u64,
    /// Admission charges refunded because their request never ended.
    pub refunded: usize,
}

/// An open spool file (see the module documentation).
#[derive(Debug)]
pub struct Spool {
    path: PathBuf,
    file: Mutex<File>,
    /// Requests admitted with a credit charge and not ended yet, by
    /// (account, request id): their end is written to the file.
    open: Mutex<HashSet<(Box<str>, Box<str>)>>,
}

impl Spool {
    /// Open (creating it if missing) and replay the spool at `path`;
    /// unended admissions are refunded at `now_ms`. The file is rewritten
    /// with what is still pending.
    pub fn open(path: &Path, now_ms: u64) -> std::io::Result<(Spool, Replayed)> {
        let mut order: Vec<String> = Vec::new();
        let mut pending: HashMap<String, Vec<(u64, OutboxOp)>> = HashMap::new();
        let mut open: HashSet<(String, String)> = HashSet::new();
        let mut max_id = 0;
        if let Ok(file) = File::open(path) {
            for (n, line) in BufReader::new(file).lines().enumerate() {
                let line = line?;
                if line.trim().is_empty() {
                    continue;
                }
                let parsed: Line = match serde_json::from_str(&line) {
                    Ok(l) => l,
                    Err(e) => {
                        // A line cut by the crash (the last one): nothing
                        // after it was written.
                        tracing::warn!(path = %path.display(), line = n + 1, error = %e, "spool line unreadable; ignored");
                        continue;
                    }
                };
                match parsed {
                    Line::Op { a, id, op } => {
                        max_id = max_id.max(id);
                        if let OutboxOp::Credit(WalletOp::Charge {
                            key, request_id, ..
                        }) = &op
                        {
                            if *key == admission_key(request_id) {
                                open.insert((a.clone(), request_id.clone()));
                            }
                        }
                        if let OutboxOp::Credit(WalletOp::Refund { key, .. }) = &op {
                            if let Some(r) = key.strip_prefix("adm:") {
                                open.remove(&(a.clone(), r.to_owned()));
                            }
                        }
                        if !pending.contains_key(&a) {
                            order.push(a.clone());
                        }
                        pending.entry(a).or_default().push((id, op));
                    }
                    Line::Ack { a, ids } => {
                        if let Some(items) = pending.get_mut(&a) {
                            let ids: HashSet<u64> = ids.into_iter().collect();
                            items.retain(|(id, _)| !ids.contains(id));
                        }
                    }
                    Line::End { a, r } => {
                        open.remove(&(a, r));
                    }
                }
            }
        }
        // Requests that never ended: their gateway died first.
        let mut refunded = 0;
        let mut unended: Vec<(String, String)> = open.into_iter().collect();
        unended.sort();
        for (a, r) in unended {
            max_id += 1;
            refunded += 1;
            if !pending.contains_key(&a) {
                order.push(a.clone());
            }
            pending.entry(a).or_default().push((
                max_id,
                OutboxOp::Credit(WalletOp::Refund {
                    key: admission_key(&r),
                    at_ms: now_ms,
                }),
            ));
        }
        // Rewrite the file with what is pending, then append to it.
        let tmp = path.with_extension("compacting");
        {
            let mut out = std::io::BufWriter::new(File::create(&tmp)?);
            for a in &order {
                for (id, op) in pending.get(a).into_iter().flatten() {
                    let line = serde_json::to_string(&LineRef::Op { a, id: *id, op })
                        .map_err(std::io::Error::other)?;
                    out.write_all(line.as_bytes())?;
                    out.write_all(b"\n")?;
                }
            }
            out.flush()?;
        }
        std::fs::rename(&tmp, path)?;
        let file = OpenOptions::new().append(true).open(path)?;
        let outboxes = order
            .into_iter()
            .filter_map(|a| {
                let items: Vec<OutboxItem> = pending
                    .remove(&a)?
                    .into_iter()
                    .map(|(id, op)| OutboxItem {
                        id: id.to_string(),
                        op,
                    })
                    .collect();
                (!items.is_empty()).then_some((a, items))
            })
            .collect();
        let spool = Spool {
            path: path.to_owned(),
            file: Mutex::new(file),
            open: Mutex::new(HashSet::new()),
        };
        Ok((
            spool,
            Replayed {
                outboxes,
                max_id,
                refunded,
            },
        ))
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    fn append(&self, line: &LineRef<'_>) {
        let Ok(mut text) = serde_json::to_string(line) else {
            return;
        };
        text.push('\n');
        if let Err(e) = self.file.lock().write_all(text.as_bytes()) {
            tracing::error!(path = %self.path.display(), error = %e, "writing the spool failed: this entry is not durable");
        }
    }

    /// An outbox entry was decided.
    pub fn op(&self, account: &str, id: u64, op: &OutboxOp) {
        if let OutboxOp::Credit(WalletOp::Charge {
            key, request_id, ..
        }) = op
        {
            if *key == admission_key(request_id) {
                self.open
                    .lock()
                    .insert((Box::from(account), Box::from(request_id.as_str())));
            }
        }
        self.append(&LineRef::Op { a: account, id, op });
    }

    /// The catalog has these entries.
    pub fn ack(&self, account: &str, ids: &[u64]) {
        self.append(&LineRef::Ack { a: account, ids });
    }

    /// A request ended; written only for one admitted with a charge.
    pub fn ended(&self, account: &str, request_id: &str) {
        let key = (Box::from(account), Box::from(request_id));
        if self.open.lock().remove(&key) {
            self.append(&LineRef::End {
                a: account,
                r: request_id,
            });
        }
    }
}

/// [`Line`] borrowing what it writes.
#[derive(Serialize)]
#[serde(tag = "t", rename_all = "lowercase")]
enum LineRef<'a> {
    Op {
        a: &'a str,
        id: u64,
        op: &'a OutboxOp,
    },
    Ack {
        a: &'a str,
        ids: &'a [u64],
    },
    End {
        a: &'a str,
        r: &'a str,
    },
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::catalog::Draw;

    fn charge(key: &str, request_id: &str) -> OutboxOp {
        OutboxOp::Credit(WalletOp::Charge {
            key: key.into(),
            request_id: request_id.into(),
            endpoint: "e".into(),
            requested: 1,
            deducted: Some(1),
            draws: vec![Draw {
                block_id: "qb".into(),
                credits: 1,
            }],
            at_ms: 5,
        })
    }

    #[test]
    fn replay_keeps_what_was_not_acknowledged_and_refunds_unended_admissions() {
        let dir = std::env::temp_dir().join(format!("plangate-spool-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("outbox.spool");
        let _ = std::fs::remove_file(&path);
        let (spool, replayed) = Spool::open(&path, 0).unwrap();
        assert!(replayed.outboxes.is_empty());
        // r1: admitted, ended, both charges written (acknowledged).
        spool.op("a", 1, &charge("adm:r1", "r1"));
        spool.op("a", 2, &charge("use:r1", "r1"));
        spool.ended("a", "r1");
        spool.ack("a", &[1, 2]);
        // r2: admitted and ended, its per-unit charge not yet written.
        spool.op("a", 3, &charge("adm:r2", "r2"));
        spool.ended("a", "r2");
        spool.op("a", 4, &charge("use:r2", "r2"));
        spool.ack("a", &[3]);
        // r3: admitted, never ended (the gateway died).
        spool.op("b", 5, &charge("adm:r3", "r3"));
        // A line cut by the crash.
        drop(spool);
        let mut f = OpenOptions::new().append(true).open(&path).unwrap();
        f.write_all(br#"{"t":"op","a":"b","id":6,"op":{"k":"ref"#)
            .unwrap();
        drop(f);

        let (spool, replayed) = Spool::open(&path, 99).unwrap();
        assert_eq!(replayed.max_id, 6);
        assert_eq!(replayed.refunded, 1);
        let by: HashMap<_, _> = replayed.outboxes.into_iter().collect();
        assert_eq!(by["a"].len(), 1);
        assert_eq!(by["a"][0].op, charge("use:r2", "r2"));
        assert_eq!(by["b"].len(), 2, "the unended charge and its refund");
        assert_eq!(
            by["b"][1].op,
            OutboxOp::Credit(WalletOp::Refund {
                key: "adm:r3".into(),
                at_ms: 99
            })
        );
        // Rewritten with only what is pending: replaying again refunds
        // nothing more.
        drop(spool);
        let (_, again) = Spool::open(&path, 100).unwrap();
        assert_eq!(again.refunded, 0);
        let by: HashMap<_, _> = again.outboxes.into_iter().collect();
        assert_eq!((by["a"].len(), by["b"].len()), (1, 2));
        std::fs::remove_dir_all(&dir).ok();
    }
}
