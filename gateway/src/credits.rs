//! Credit charges that must not be lost: per-unit charges at the end of a
//! request and refunds of admission charges. Each runs in the background
//! and is retried with backoff while the catalog is unavailable; the
//! idempotency key makes a retry that races a slow success harmless, so a
//! charge is written exactly once.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use crate::catalog::{Catalog, CatalogError, Deduction};

/// Background writer of charges and refunds.
#[derive(Clone)]
pub struct ChargeQueue {
    catalog: Arc<dyn Catalog>,
    pending: Arc<AtomicU64>,
}

impl std::fmt::Debug for ChargeQueue {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChargeQueue")
            .field("pending", &self.pending())
            .finish()
    }
}

const FIRST_BACKOFF: Duration = Duration::from_millis(100);
const MAX_BACKOFF: Duration = Duration::from_secs(5);

impl ChargeQueue {
    pub fn new(catalog: Arc<dyn Catalog>) -> Self {
        Self {
            catalog,
            pending: Arc::new(AtomicU64::new(0)),
        }
    }

    /// Charges and refunds not yet written.
    pub fn pending(&self) -> u64 {
        self.pending.load(Ordering::SeqCst)
    }

    /// Deduct in the background, retrying until the catalog takes it.
    pub fn charge(&self, deduction: Deduction) {
        let catalog = self.catalog.clone();
        self.spawn_retrying(move || {
            let catalog = catalog.clone();
            let d = deduction.clone();
            async move {
                let r = catalog.deduct(&d).await?;
                if r.shortfall > 0 {
                    tracing::info!(
                        account = %d.account_id,
                        requested = r.requested,
                        deducted = r.deducted,
                        shortfall = r.shortfall,
                        "per-unit charge exceeded the balance; shortfall recorded"
                    );
                }
                Ok(())
            }
        });
    }

    /// Refund the deduction made under `idempotency_key`, retrying.
    pub fn refund(&self, idempotency_key: String) {
        let catalog = self.catalog.clone();
        self.spawn_retrying(move || {
            let catalog = catalog.clone();
            let key = idempotency_key.clone();
            async move { catalog.refund(&key).await.map(|_| ()) }
        });
    }

    fn spawn_retrying<F, Fut>(&self, op: F)
    where
        F: Fn() -> Fut + Send + 'static,
        Fut: std::future::Future<Output = Result<(), CatalogError>> + Send,
    {
        let pending = self.pending.clone();
        pending.fetch_add(1, Ordering::SeqCst);
        tokio::spawn(async move {
            let mut backoff = FIRST_BACKOFF;
            loop {
                match op().await {
                    Ok(()) => break,
                    Err(CatalogError::Unavailable(e)) => {
                        tracing::warn!(error = %e, retry_in = ?backoff, "credit write failed; will retry");
                        tokio::time::sleep(backoff).await;
                        backoff = (backoff * 2).min(MAX_BACKOFF);
                    }
                    Err(e) => {
                        // Not retryable (e.g. the account was deleted): a
                        // retry would fail the same way forever.
                        tracing::error!(error = %e, "credit write refused; dropping it");
                        break;
                    }
                }
            }
            pending.fetch_sub(1, Ordering::SeqCst);
        });
    }

    /// Wait (up to `timeout`) until every pending write is done; for
    /// graceful shutdown. Returns how many are still pending.
    pub async fn drain(&self, timeout: Duration) -> u64 {
        let deadline = tokio::time::Instant::now() + timeout;
        while self.pending() > 0 && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        self.pending()
    }
}
