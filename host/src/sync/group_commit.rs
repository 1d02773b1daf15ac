//! Group commit: writes queued by concurrent tasks are committed together,
//! one transaction (one fsync on SQLite, a handful of round trips on
//! PostgreSQL) for everything that queued while the previous batch
//! committed. Nobody is answered before their write is durable.

use std::sync::Arc;

use futures::future::BoxFuture;
use tokio::sync::{mpsc, oneshot, Mutex};

use crate::store::StoreError;

/// Most writes committed in one transaction.
const BATCH: usize = 256;

/// How a kind of write is committed.
pub trait Committer: Send + Sync + 'static {
    /// One queued write.
    type Write: Send + Sync + 'static;
    /// What its writer is told once it is durable.
    type Done: Send + 'static;
    /// What it writes, as the metrics name it.
    const NAME: &'static str;

    /// Commits `writes` in one transaction; one answer per write, in order.
    fn commit<'a>(
        &'a self,
        writes: &'a [Self::Write],
    ) -> BoxFuture<'a, Result<Vec<Self::Done>, StoreError>>;
}

type Queued<C> = (
    <C as Committer>::Write,
    oneshot::Sender<Result<<C as Committer>::Done, StoreError>>,
);

/// The queue in front of one or more committer tasks.
pub struct GroupCommit<C: Committer> {
    queue: mpsc::UnboundedSender<Queued<C>>,
}

impl<C: Committer> std::fmt::Debug for GroupCommit<C> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("GroupCommit")
    }
}

impl<C: Committer> GroupCommit<C> {
    /// Starts `tasks` committers sharing one queue (on the current runtime).
    /// They end when this is dropped.
    pub fn start(committer: C, tasks: usize) -> Self {
        let (queue, queued) = mpsc::unbounded_channel();
        let committer = Arc::new(committer);
        let queued = Arc::new(Mutex::new(queued));
        for _ in 0..tasks.max(1) {
            tokio::spawn(run(committer.clone(), queued.clone()));
        }
        Self { queue }
    }

    /// Queues `write` and waits until it is committed.
    pub async fn submit(&self, write: C::Write) -> Result<C::Done, StoreError> {
        let (done, result) = oneshot::channel();
        if self.queue.send((write, done)).is_err() {
            return Err(StoreError::Database(sqlx::Error::PoolClosed));
        }
        result
            .await
            .unwrap_or(Err(StoreError::Database(sqlx::Error::PoolClosed)))
    }
}

async fn run<C: Committer>(
    committer: Arc<C>,
    queued: Arc<Mutex<mpsc::UnboundedReceiver<Queued<C>>>>,
) {
    let mut batch: Vec<Queued<C>> = Vec::with_capacity(BATCH);
    loop {
        // Take what is queued, then let another committer wait for more
        // while this batch commits.
        if queued.lock().await.recv_many(&mut batch, BATCH).await == 0 {
            return;
        }
        metrics::histogram!("ferry_group_commit_size", "writes" => C::NAME)
            .record(batch.len() as f64);
        let (writes, waiting): (Vec<C::Write>, Vec<_>) = batch.drain(..).unzip();
        match committer.commit(&writes).await {
            Ok(done) => {
                for (waiter, done) in waiting.into_iter().zip(done) {
                    let _ = waiter.send(Ok(done));
                }
            }
            // One bad write fails the whole transaction: commit them one by
            // one so each gets its own answer.
            Err(error) => {
                // A write the data refuses (a taken email or remote id) is
                // its writer's answer; anything else is the database's.
                if matches!(error, StoreError::Database(_) | StoreError::Json(_)) {
                    tracing::warn!(
                        writes = C::NAME,
                        group = writes.len(),
                        error = ?error,
                        "a group commit failed; committing its writes one by one"
                    );
                } else {
                    tracing::debug!(
                        writes = C::NAME,
                        group = writes.len(),
                        %error,
                        "a group commit refused a write; committing its writes one by one"
                    );
                }
                metrics::counter!("ferry_group_commit_failures_total", "writes" => C::NAME)
                    .increment(1);
                for (write, waiter) in writes.iter().zip(waiting) {
                    let result = committer
                        .commit(std::slice::from_ref(write))
                        .await
                        .and_then(|mut done| {
                            done.pop()
                                .ok_or(StoreError::Database(sqlx::Error::RowNotFound))
                        });
                    let _ = waiter.send(result);
                }
            }
        }
    }
}
