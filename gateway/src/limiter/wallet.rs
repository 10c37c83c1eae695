//! Credit balances held in the counter store ("wallets"), so that an
//! admission checks and charges credits in the same atomic store operation
//! as its windows, and the per-unit charge at the end in the same one as
//! the settlement — no catalog round trip on the request path.
//!
//! The catalog stays the ledger of record. A wallet is a copy of an
//! account's unexpired quota blocks, loaded from the catalog
//! ([`WalletSnapshot`]) the first time an account needs it; every charge
//! and refund the store decides is appended, in the same atomic operation,
//! to the account's **outbox**, which `credits::Outbox` writes to the
//! catalog in batches (idempotent by ledger key) and then acknowledges.
//! The outbox lives in the store: on Redis it survives the gateway's death
//! and Postgres outages.
//!
//! Consistency with the catalog:
//!
//! - a wallet is loaded only while its outbox is empty (everything it
//!   decided is in the catalog), so a reload never forgets a charge;
//! - a catalog change made outside the wallet (a grant, a deleted or
//!   expired block, a direct deduction) bumps the account's credit version
//!   and invalidates the wallet ([`CounterStore::wallet_invalidate`]): it is
//!   dropped and reloaded, and a load that read the catalog before the
//!   change (an older version) is refused;
//! - the wallet draws blocks in the catalog's order (earliest expiry first,
//!   never-expiring last, then creation order) and skips expired blocks by
//!   the caller's clock, and the outbox records the exact draws, so the
//!   catalog applies what the wallet decided rather than deciding again.
//!
//! [`Wallet`] is the decision logic; the in-process store runs it directly
//! and the Redis store's scripts mirror it line by line.

use std::collections::HashMap;
use std::fmt::Write as _;

pub use crate::catalog::CreditOp as WalletOp;
use crate::catalog::{Draw, UsageEvent};

/// A quota block as a wallet holds it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WalletBlock {
    pub id: String,
    pub remaining: u64,
    /// Milliseconds since the epoch; `None`: never expires.
    pub expires_ms: Option<u64>,
}

/// What a wallet is loaded from: the account's unexpired blocks in drain
/// order and the catalog's credit version they were read at.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct WalletSnapshot {
    pub version: u64,
    pub blocks: Vec<WalletBlock>,
    /// When it was read (the gateway's clock, ms): the in-process store
    /// keeps the wallet [`WALLET_TTL_MS`] from then.
    pub loaded_ms: u64,
    /// The outbox's acknowledgement count read before the catalog
    /// ([`crate::limiter::CounterStore::outbox_acks`]).
    pub acks: u64,
}

/// Credits an admission charges, atomically with its windows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CreditAsk {
    /// Deducted at admission (all or nothing).
    pub amount: u64,
    /// The balance needed to be admitted (`max(min_balance, amount)`).
    pub threshold: u64,
    /// The admitting gateway instance ([`crate::limiter::Limiter::instance`]),
    /// remembered with the admission until its end: should that gateway
    /// die first, the admission is refunded ([`CounterStore::reap`]).
    pub instance: &'static str,
}

/// What an admission's charge did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Charged {
    /// The balance after the charge.
    pub balance: u64,
    /// Which blocks it drew from, for a refund.
    pub draws: Vec<Draw>,
}

/// Credits settled at the end of a request, with its windows.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct EndCredits {
    /// The per-unit charge: deducted as far as the balance goes, the rest
    /// recorded as a shortfall.
    pub charge: u64,
    /// Give back the admission charge (nothing was served). The store
    /// remembers each admission's draws until its end.
    pub refund: bool,
    /// The admission was asked for credits: its charge (remembered by the
    /// store until now) is recorded with this end, or given back.
    pub admitted: bool,
}

impl EndCredits {
    pub fn is_empty(&self) -> bool {
        self.charge == 0 && !self.refund && !self.admitted
    }
}

/// How long a wallet is kept before it is read from the catalog again: the
/// backstop for a missed invalidation, and what bounds the admissions it
/// remembers for refunds (one whose request never ended is forgotten with
/// its wallet).
pub const WALLET_TTL_MS: u64 = 3_600_000;

/// An outbox entry: its id in the store (to acknowledge it) and the op.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutboxItem {
    pub id: String,
    pub op: OutboxOp,
}

/// What an outbox entry asks the catalog to record (serialized as the
/// in-process store's spool writes it).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OutboxOp {
    /// A charge or refund.
    Credit(WalletOp),
    /// The usage record of an ended request.
    Usage(Box<UsageEvent>),
}

impl OutboxItem {
    /// About how many bytes of memory the entry holds (its allocations and
    /// their headers): what `[storage] outbox_memory` counts for the
    /// in-process store.
    pub fn approx_bytes(&self) -> u64 {
        // Each `String`/`Vec`/`Box` is one allocation; count ~16 bytes of
        // allocator overhead for each beside its contents.
        const ALLOC: usize = 16;
        let s = |s: &str| s.len() + ALLOC;
        let draws = |d: &[Draw]| {
            ALLOC
                + d.iter()
                    .map(|d| std::mem::size_of::<Draw>() + s(&d.block_id))
                    .sum::<usize>()
        };
        let op = match &self.op {
            OutboxOp::Credit(WalletOp::Charge {
                key,
                request_id,
                endpoint,
                draws: d,
                ..
            }) => s(key) + s(request_id) + s(endpoint) + draws(d),
            OutboxOp::Credit(WalletOp::Refund { key, .. }) => s(key),
            OutboxOp::Usage(u) => {
                std::mem::size_of::<UsageEvent>()
                    + ALLOC
                    + s(&u.request_id)
                    + s(&u.account_id)
                    + u.key_id.as_deref().map_or(0, s)
                    + s(&u.endpoint)
                    + s(&u.route)
                    + ALLOC
                    + u.units
                        .iter()
                        .map(|x| std::mem::size_of_val(x) + s(&x.unit))
                        .sum::<usize>()
                    + u.charge.as_ref().map_or(0, |c| draws(&c.draws))
            }
        };
        (std::mem::size_of::<Self>() + s(&self.id) + op) as u64
    }
}

/// An admission whose end has not come (yet), as a wallet remembers it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Unended {
    pub request_id: String,
    /// The gateway instance that admitted it.
    pub instance: String,
    pub endpoint: String,
}

/// The answer to [`CounterStore::wallet_init`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WalletInit {
    /// The wallet is loaded (by this call or an earlier one).
    Loaded,
    /// The outbox still holds operations the catalog has not recorded:
    /// flush it, read the catalog again, retry.
    Pending,
    /// The snapshot is older than an invalidation the store has seen: read
    /// the catalog again.
    Stale,
}

/// The ledger key of an admission charge recorded apart (the wallet was
/// dropped before the request's end).
pub fn admission_key(request_id: &str) -> String {
    format!("adm:{request_id}")
}

/// The ledger key of a per-unit charge the catalog decides (the wallet
/// was dropped between the request's admission and its end).
pub fn usage_key(request_id: &str) -> String {
    format!("use:{request_id}")
}

/// The ledger key of a request's charge: its admission and per-unit
/// charges together, recorded at its end (one ledger row per request).
pub fn request_key(request_id: &str) -> String {
    format!("req:{request_id}")
}

/// An account's wallet: its blocks in drain order. The in-process store's
/// implementation; the Redis scripts do the same.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Wallet {
    pub version: u64,
    /// In drain order (the snapshot's), expired ones dropped lazily.
    blocks: Vec<WalletBlock>,
}

impl Wallet {
    /// The wallet of `snapshot`, holding back what `unended` admissions
    /// drew (the catalog records their charges only at their ends).
    pub fn load<'a>(snapshot: &WalletSnapshot, unended: impl Iterator<Item = &'a [Draw]>) -> Self {
        let mut blocks = snapshot.blocks.clone();
        // The snapshot is in drain order already; sorting again (stable)
        // makes the wallet independent of how the catalog ordered it.
        blocks.sort_by_key(|b| b.expires_ms.unwrap_or(u64::MAX));
        let mut wallet = Wallet {
            version: snapshot.version,
            blocks,
        };
        for draws in unended {
            for d in draws {
                if let Some(b) = wallet.blocks.iter_mut().find(|b| b.id == d.block_id) {
                    b.remaining = b.remaining.saturating_sub(d.credits);
                }
            }
        }
        wallet
    }

    /// Drop blocks expired at `now_ms`; the balance of the rest.
    pub fn balance(&mut self, now_ms: u64) -> u64 {
        self.blocks
            .retain(|b| b.expires_ms.map_or(true, |e| e > now_ms));
        self.blocks
            .iter()
            .map(|b| b.remaining)
            .fold(0, u64::saturating_add)
    }

    /// Take up to `amount` in drain order; returns what was taken and from
    /// where. Call [`Wallet::balance`] first (it drops expired blocks).
    pub fn draw(&mut self, amount: u64) -> (u64, Vec<Draw>) {
        let mut left = amount;
        let mut draws = Vec::new();
        for b in &mut self.blocks {
            if left == 0 {
                break;
            }
            let take = b.remaining.min(left);
            if take > 0 {
                b.remaining -= take;
                left -= take;
                draws.push(Draw {
                    block_id: b.id.clone(),
                    credits: take,
                });
            }
        }
        (amount - left, draws)
    }

    /// Give back draws to the blocks still held (an expired or deleted
    /// block gets nothing, as in the catalog).
    pub fn give_back(&mut self, draws: &[Draw]) {
        for d in draws {
            if let Some(b) = self.blocks.iter_mut().find(|b| b.id == d.block_id) {
                b.remaining = b.remaining.saturating_add(d.credits);
            }
        }
    }
}

/// One request's admission and per-unit draws as one list: each block
/// once, in the order first drawn.
pub fn merge_draws(admission: &[Draw], unit: &[Draw]) -> Vec<Draw> {
    let mut out: Vec<Draw> = admission.to_vec();
    for d in unit {
        match out.iter_mut().find(|o| o.block_id == d.block_id) {
            Some(o) => o.credits = o.credits.saturating_add(d.credits),
            None => out.push(d.clone()),
        }
    }
    out
}

/// Draws as the Redis scripts write them: `id=n;id=n`.
pub fn encode_draws(draws: &[Draw]) -> String {
    let mut s = String::new();
    for (i, d) in draws.iter().enumerate() {
        if i > 0 {
            s.push(';');
        }
        let _ = write!(s, "{}={}", d.block_id, d.credits);
    }
    s
}

/// The inverse of [`encode_draws`]; `None` for anything it does not write.
/// A block named more than once is merged into its first place: the end
/// script writes a request's admission and per-unit draws one after the
/// other (`adm;unit`) and leaves merging them to this side, where it is
/// cheap (in Lua it cost 2 µs of Redis time per credit request).
pub fn decode_draws(s: &str) -> Option<Vec<Draw>> {
    let mut out: Vec<Draw> = Vec::new();
    if s.is_empty() {
        return Some(out);
    }
    // Where each block is in `out`: found by a scan for the usual handful
    // of draws, by an index for a request that drew from many blocks.
    let indexed = s.bytes().filter(|&b| b == b';').count() >= 16;
    let mut index: HashMap<&str, usize> = HashMap::new();
    for part in s.split(';') {
        let (id, n) = part.rsplit_once('=')?;
        let credits: u64 = n.parse().ok()?;
        let at = if indexed {
            index.get(id).copied()
        } else {
            out.iter().position(|d| d.block_id == id)
        };
        match at {
            Some(i) => out[i].credits = out[i].credits.checked_add(credits)?,
            None => {
                if indexed {
                    index.insert(id, out.len());
                }
                out.push(Draw {
                    block_id: id.to_owned(),
                    credits,
                });
            }
        }
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn block(id: &str, remaining: u64, expires_ms: Option<u64>) -> WalletBlock {
        WalletBlock {
            id: id.into(),
            remaining,
            expires_ms,
        }
    }

    #[test]
    fn draws_earliest_expiry_first_never_expiring_last_and_skips_expired() {
        let mut w = Wallet::load(
            &WalletSnapshot {
                version: 1,
                loaded_ms: 0,
                acks: 0,
                blocks: vec![
                    block("never", 10, None),
                    block("late", 5, Some(2_000)),
                    block("gone", 7, Some(1_000)),
                    block("early", 3, Some(1_500)),
                ],
            },
            std::iter::empty(),
        );
        assert_eq!(w.balance(1_000), 18);
        let (taken, draws) = w.draw(10);
        assert_eq!(taken, 10);
        assert_eq!(encode_draws(&draws), "early=3;late=5;never=2");
        assert_eq!(w.balance(1_000), 8);
        let (taken, _) = w.draw(20);
        assert_eq!(taken, 8);
        w.give_back(&draws);
        assert_eq!(w.balance(1_000), 10);
        // The expired block is gone for good: a refund to it is lost.
        w.give_back(&[Draw {
            block_id: "gone".into(),
            credits: 7,
        }]);
        assert_eq!(w.balance(1_000), 10);
    }

    /// A wallet loaded while admissions are unended holds their draws
    /// back; merged draws list each block once.
    #[test]
    fn loads_hold_back_unended_admissions_and_draws_merge() {
        let held = [
            vec![Draw {
                block_id: "a".into(),
                credits: 2,
            }],
            vec![
                Draw {
                    block_id: "b".into(),
                    credits: 9,
                },
                Draw {
                    block_id: "x".into(),
                    credits: 1,
                },
            ],
        ];
        let snapshot = WalletSnapshot {
            version: 1,
            loaded_ms: 0,
            acks: 0,
            blocks: vec![block("a", 5, None), block("b", 4, None)],
        };
        let mut w = Wallet::load(&snapshot, held.iter().map(Vec::as_slice));
        assert_eq!(w.balance(0), 3, "a: 5 - 2, b: 4 - 9 floored at 0");
        let merged = merge_draws(
            &held[1],
            &[
                Draw {
                    block_id: "b".into(),
                    credits: 1,
                },
                Draw {
                    block_id: "c".into(),
                    credits: 4,
                },
            ],
        );
        assert_eq!(encode_draws(&merged), "b=10;x=1;c=4");
    }

    #[test]
    fn draws_round_trip() {
        let draws = vec![
            Draw {
                block_id: "qb_1".into(),
                credits: 3,
            },
            Draw {
                block_id: "qb_2".into(),
                credits: 1_000_000_000_000_000,
            },
        ];
        assert_eq!(decode_draws(&encode_draws(&draws)), Some(draws));
        assert_eq!(decode_draws(""), Some(vec![]));
        // An admission's and a per-unit charge's draws, as the end script
        // writes them: one entry per block, in first-drawn order.
        assert_eq!(
            decode_draws("qb_1=3;qb_2=1;qb_2=4;qb_1=1;qb_3=2"),
            Some(merge_draws(
                &decode_draws("qb_1=3;qb_2=1").unwrap(),
                &decode_draws("qb_2=4;qb_1=1;qb_3=2").unwrap()
            ))
        );
        assert_eq!(
            encode_draws(&decode_draws("qb_2=1;qb_1=3;qb_2=4").unwrap()),
            "qb_2=5;qb_1=3"
        );
        assert_eq!(decode_draws("x=1;"), None);
        // Many blocks (the index): each once, in order, summed.
        let ids: Vec<String> = (0..1000).map(|i| format!("qb_{i}=1")).collect();
        let twice = format!("{};{}", ids.join(";"), ids.join(";"));
        let merged = decode_draws(&twice).unwrap();
        assert_eq!(merged.len(), 1000);
        assert!(merged
            .iter()
            .enumerate()
            .all(|(i, d)| d.block_id == format!("qb_{i}") && d.credits == 2));
        assert_eq!(decode_draws("x"), None);
        assert_eq!(decode_draws("x=-1"), None);
    }
}
