//! Group commit: writes queued by concurrent tasks are committed together,
//! one transaction (one fsync on SQLite, a handful of round trips on
//! PostgreSQL) for everything that queued while the previous batch
//! committed. Nobody is answered before their write is durable.
//!
//! A committer whose writers come straight back with their next write (API
//! clients, webhook senders) may also wait a little for them; see
//! [`Committer::GATHER`].

use std::sync::Arc;
use std::time::Duration;

use futures::future::BoxFuture;
use tokio::sync::{mpsc, oneshot, Mutex};
use tokio::time::Instant;

use crate::store::StoreError;

/// Most writes committed in one transaction.
const BATCH: usize = 256;

/// Longest a gathering committer waits for its writers (see
/// [`Committer::GATHER`]); the timer rounds it up to its millisecond.
const MOST_PATIENCE: Duration = Duration::from_millis(1);

/// How a kind of write is committed.
pub trait Committer: Send + Sync + 'static {
    /// One queued write.
    type Write: Send + Sync + 'static;
    /// What its writer is told once it is durable.
    type Done: Send + 'static;
    /// What it writes, as the metrics name it.
    const NAME: &'static str;
    /// Whether a group waits for the writers the previous group answered.
    ///
    /// With one committer always busy, writers answered by one group come
    /// back while the next commits, so `n` writers who return at once
    /// split into two alternating groups of `n / 2`. Gathering, a group
    /// that holds fewer writes than were in flight when the previous
    /// commit ended (its group and what queued meanwhile) waits for the
    /// rest, for at most as long as that commit took (and
    /// [`MOST_PATIENCE`]). A lone writer never waits, nor does a group
    /// whose writers all queued. API creates at 8 clients: groups 4.0 →
    /// 8.0, +5–16 % requests/s on PostgreSQL, +33–56 % on SQLite
    /// (docs/performance.md, round 17).
    const GATHER: bool = false;

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
    // Gathering: writers in flight when the last commit ended, and how long
    // a group may wait for them.
    let (mut writers, mut patience) = (0, Duration::ZERO);
    loop {
        // Take what is queued, then let another committer wait for more
        // while this batch commits.
        {
            let mut queue = queued.lock().await;
            if queue.recv_many(&mut batch, BATCH).await == 0 {
                return;
            }
            if C::GATHER {
                gather(&mut queue, &mut batch, writers, patience).await;
            }
        }
        // A writer that stopped waiting while its write queued (its
        // request timed out and was answered that nothing was written, or
        // its client left) is not committed behind its back: a create the
        // client retried met its own customer as `email_taken`.
        batch.retain(|(_, waiter)| !waiter.is_closed());
        if batch.is_empty() {
            continue;
        }
        metrics::histogram!("ferry_group_commit_size", "writes" => C::NAME)
            .record(batch.len() as f64);
        let (writes, waiting): (Vec<C::Write>, Vec<_>) = batch.drain(..).unzip();
        let started = Instant::now();
        let committed = caught(committer.commit(&writes)).await;
        if C::GATHER {
            // Counted before anyone is answered: an answered writer may
            // queue again at once, and would be counted twice.
            patience = started.elapsed().min(MOST_PATIENCE);
            writers = writes.len() + queued.try_lock().map_or(0, |queue| queue.len());
        }
        match committed {
            Ok(done) => {
                for (waiter, done) in waiting.into_iter().zip(done) {
                    let _ = waiter.send(Ok(done));
                }
            }
            // A busy store (no connection from the pool, SQLite's writer
            // locked) says nothing about any one write: committed one by
            // one, each would wait out the same timeout again, and a stall
            // of the single SQLite writer would hold every webhook for
            // minutes. Everyone is told at once (503 `store_busy`: nothing
            // was written). A row's lock timeout is still found write by
            // write: the others commit.
            Err(error) if error.is_store_busy() => {
                tracing::warn!(
                    writes = C::NAME,
                    group = writes.len(),
                    error = ?error,
                    "a group commit found the store busy; its writers are told so"
                );
                metrics::counter!("ferry_group_commit_failures_total", "writes" => C::NAME)
                    .increment(1);
                for waiter in waiting {
                    let _ = waiter.send(Err(StoreError::Database(sqlx::Error::PoolTimedOut)));
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
                    if waiter.is_closed() {
                        // Its writer stopped waiting (a request timed out):
                        // it was told nothing was written.
                        continue;
                    }
                    let result = caught(committer.commit(std::slice::from_ref(write)))
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

/// `commit`, with a panic in it made the group's error (the writes are
/// then committed one by one, each its own answer, the panicking one an
/// error): a committer task that panicked was gone, its queue closed
/// behind it, and every later write of its kind failed (webhooks
/// unanswered, pushes never recorded) while the process went on as if well.
async fn caught<T>(commit: BoxFuture<'_, Result<T, StoreError>>) -> Result<T, StoreError> {
    match futures::FutureExt::catch_unwind(std::panic::AssertUnwindSafe(commit)).await {
        Ok(result) => result,
        Err(panic) => {
            let message = crate::app::panic_text(&*panic);
            tracing::error!(
                panic = message,
                "a group commit panicked; its writers are told it failed"
            );
            Err(StoreError::Database(sqlx::Error::Protocol(format!(
                "the commit panicked: {message}"
            ))))
        }
    }
}

/// Adds to `batch` until it holds `writers` writes or `patience` has passed.
async fn gather<W>(
    queue: &mut mpsc::UnboundedReceiver<W>,
    batch: &mut Vec<W>,
    writers: usize,
    patience: Duration,
) {
    let deadline = Instant::now() + patience;
    let writers = writers.min(BATCH);
    while batch.len() < writers {
        let missing = writers - batch.len();
        match tokio::time::timeout_at(deadline, queue.recv_many(batch, missing)).await {
            Ok(0) | Err(_) => return,
            Ok(_) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex as StdMutex;

    use super::*;

    type Groups = Arc<StdMutex<Vec<Vec<usize>>>>;

    /// Records each group (its writers' numbers), taking 5 ms of (paused)
    /// time to commit it.
    struct Recorder<const GATHER: bool>(Groups);

    impl<const G: bool> Committer for Recorder<G> {
        type Write = usize;
        type Done = ();
        const NAME: &'static str = "test";
        const GATHER: bool = G;

        fn commit<'a>(&'a self, writes: &'a [usize]) -> BoxFuture<'a, Result<Vec<()>, StoreError>> {
            Box::pin(async move {
                tokio::time::sleep(Duration::from_millis(5)).await;
                self.0.lock().unwrap().push(writes.to_vec());
                Ok(vec![(); writes.len()])
            })
        }
    }

    /// How a [`Failing`] committer fails.
    #[derive(Clone, Copy)]
    enum Fails {
        /// Every group, as a busy store.
        Busy,
        /// Any group holding the write numbered 0, refused.
        Refusing,
        /// Any group holding the write numbered 0, by panicking.
        Panicking,
    }

    /// Fails as `fails` says; records each group.
    struct Failing {
        groups: Groups,
        fails: Fails,
    }

    impl Committer for Failing {
        type Write = usize;
        type Done = ();
        const NAME: &'static str = "test";

        fn commit<'a>(&'a self, writes: &'a [usize]) -> BoxFuture<'a, Result<Vec<()>, StoreError>> {
            Box::pin(async move {
                tokio::time::sleep(Duration::from_millis(5)).await;
                self.groups.lock().unwrap().push(writes.to_vec());
                match self.fails {
                    Fails::Busy => Err(StoreError::Database(sqlx::Error::PoolTimedOut)),
                    Fails::Refusing if writes.contains(&0) => Err(StoreError::EmailTaken),
                    Fails::Panicking => {
                        assert!(!writes.contains(&0), "write 0 breaks the committer");
                        Ok(vec![(); writes.len()])
                    }
                    Fails::Refusing => Ok(vec![(); writes.len()]),
                }
            })
        }
    }

    /// Submits writes 0..10 at once; returns each answer, the groups and
    /// the queue.
    async fn ten_at_once(
        fails: Fails,
    ) -> (
        Vec<Result<(), StoreError>>,
        Vec<Vec<usize>>,
        GroupCommit<Failing>,
    ) {
        let groups = Groups::default();
        let committer = Failing {
            groups: groups.clone(),
            fails,
        };
        let queue = GroupCommit::start(committer, 1);
        let answers = futures::future::join_all((0..10).map(|n| queue.submit(n))).await;
        let groups = groups.lock().unwrap().clone();
        (answers, groups, queue)
    }

    /// A busy store was retried write by write, each waiting out the
    /// pool's timeout again: 256 writes behind a stalled SQLite writer
    /// took 256 timeouts to answer.
    #[tokio::test(start_paused = true)]
    async fn a_busy_store_is_everyones_answer_at_once() {
        let (answers, groups, _) = ten_at_once(Fails::Busy).await;
        assert!(answers
            .iter()
            .all(|a| a.as_ref().is_err_and(StoreError::is_store_busy)));
        assert_eq!(groups.len(), 1, "no write retried alone: {groups:?}");
        // A refused write still gets its own answer, the others theirs.
        let (answers, groups, _) = ten_at_once(Fails::Refusing).await;
        assert!(matches!(answers[0], Err(StoreError::EmailTaken)));
        assert!(answers[1..].iter().all(Result::is_ok));
        assert_eq!(groups.len(), 11, "the group, then each alone: {groups:?}");
    }

    /// A commit that panics answers its writers (the panicking write an
    /// error, the others committed alone), and the committer goes on: its
    /// task was gone, and every later write of its kind failed.
    #[tokio::test(start_paused = true)]
    async fn a_panicking_commit_answers_its_writers_and_goes_on() {
        let (answers, _, queue) = ten_at_once(Fails::Panicking).await;
        assert!(answers[0].is_err(), "{answers:?}");
        assert!(answers[1..].iter().all(Result::is_ok), "{answers:?}");
        assert!(
            queue.submit(11).await.is_ok(),
            "the committer is still there"
        );
    }

    /// Four writers that submit six writes each, the next as soon as the
    /// last is answered; the first starts alone, the others while its
    /// group commits. Returns the committed groups' sizes.
    async fn four_writers<const G: bool>() -> Vec<usize> {
        let groups = Groups::default();
        let queue = Arc::new(GroupCommit::start(Recorder::<G>(groups.clone()), 1));
        let writers: Vec<_> = (0..4)
            .map(|writer| {
                let queue = queue.clone();
                tokio::spawn(async move {
                    if writer > 0 {
                        tokio::time::sleep(Duration::from_millis(writer as u64)).await;
                    }
                    for _ in 0..6 {
                        queue.submit(writer).await.expect("committed");
                    }
                })
            })
            .collect();
        for writer in writers {
            writer.await.expect("writer");
        }
        let sizes = groups.lock().unwrap().iter().map(Vec::len).collect();
        sizes
    }

    #[tokio::test(start_paused = true)]
    async fn writers_answered_by_one_group_are_gathered_into_the_next() {
        // Without gathering, the first writer and the other three alternate
        // for good: each comes back while the other group commits.
        assert_eq!(four_writers::<false>().await, [1, 3].repeat(6));
        // Gathering, the three wait for the first; the last group is the
        // three whose sixth write is left, after waiting for the first.
        assert_eq!(four_writers::<true>().await, [1, 4, 4, 4, 4, 4, 3]);
    }

    /// A write whose writer stopped waiting while it queued behind
    /// another group is not committed: its request was answered 408,
    /// nothing written.
    #[tokio::test(start_paused = true)]
    async fn a_write_whose_writer_left_while_queued_is_not_committed() {
        let groups = Groups::default();
        let queue = Arc::new(GroupCommit::start(Recorder::<false>(groups.clone()), 1));
        let first = tokio::spawn({
            let queue = queue.clone();
            async move { queue.submit(0).await }
        });
        tokio::time::sleep(Duration::from_millis(1)).await;
        let left = tokio::time::timeout(Duration::from_millis(1), queue.submit(1)).await;
        assert!(left.is_err(), "gave up while group 0 committed");
        queue.submit(2).await.expect("committed");
        first.await.expect("writer").expect("committed");
        assert_eq!(*groups.lock().unwrap(), [vec![0], vec![2]]);
    }

    #[tokio::test(start_paused = true)]
    async fn a_lone_writer_never_waits() {
        let queue = GroupCommit::start(Recorder::<true>(Groups::default()), 1);
        let started = Instant::now();
        for _ in 0..10 {
            queue.submit(0).await.expect("committed");
        }
        // Ten commits of 5 ms, nothing added.
        assert_eq!(started.elapsed(), Duration::from_millis(50));
    }

    #[tokio::test(start_paused = true)]
    async fn a_writer_that_stops_costs_one_group_its_patience() {
        let queue = GroupCommit::start(Recorder::<true>(Groups::default()), 1);
        // Two writers commit together, then one of them stops.
        let (first, second) = tokio::join!(queue.submit(0), queue.submit(1));
        first.and(second).expect("committed");

        let started = Instant::now();
        queue.submit(0).await.expect("committed");
        let waited = started.elapsed() - Duration::from_millis(5);
        assert!(
            waited > Duration::ZERO && waited <= MOST_PATIENCE + Duration::from_millis(1),
            "waited {waited:?} for the writer that stopped"
        );
        // Having seen one writer in flight, the next group does not wait.
        let started = Instant::now();
        queue.submit(0).await.expect("committed");
        assert_eq!(started.elapsed(), Duration::from_millis(5));
    }
}
