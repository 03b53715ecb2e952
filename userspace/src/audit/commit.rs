//! Group commit: the queue between producers and the audit writer, and the
//! progress that acknowledgements wait on.
//!
//! Producers (every session, on the hot path) only push onto the [`Inbox`]
//! under a short lock; each queued event gets a ticket, in queue order. The
//! writer wakes when the queue has waited [`Inbox::interval`], when it is
//! long, or at once when someone needs an event durable now (a login about
//! to be admitted, a shutdown), takes everything, commits it with one flush,
//! then advances the [`Progress`] watermark past the batch.
//!
//! Nothing per event wakes a thread: a session records thousands of
//! statements a second while the writer wakes a few hundred times, and an
//! [`Ack`](super::Ack) is two words, not a channel.

use std::{
    sync::{Arc, Condvar, Mutex, MutexGuard},
    time::{Duration, Instant},
};

use tokio::sync::watch;

use super::AuditError;
use crate::{lock, unpoisoned};

/// Queue length that wakes the writer before its interval is up.
const WAKE_AT: usize = 1024;

/// The writer's queue.
pub(super) struct Inbox<M> {
    state: Mutex<InboxState<M>>,
    wake: Condvar,
    /// Longest an event waits for its commit unless someone hurries it.
    interval: Duration,
}

struct InboxState<M> {
    queued: Vec<M>,
    /// The emptied queue the writer handed back, taken as the next
    /// queue: at thousands of events a second, a queue that started
    /// empty at every commit spent its producers' time growing.
    spare: Vec<M>,
    /// Ticket of the next event; tickets start at 1.
    next_ticket: u64,
    /// When the oldest queued message arrived.
    oldest: Option<Instant>,
    /// Someone waits for a queued event (or a control message is queued).
    hurry: bool,
    /// Set by the writer when it stops: nothing more is accepted.
    closed: bool,
}

/// What the writer takes from the inbox in one go.
pub(super) struct Taken<M> {
    pub messages: Vec<M>,
    /// Whether the wait ended by timeout with nothing queued.
    pub idle: bool,
}

impl<M> Inbox<M> {
    pub fn new(interval: Duration) -> Self {
        Self {
            state: Mutex::new(InboxState {
                queued: Vec::new(),
                spare: Vec::new(),
                next_ticket: 1,
                oldest: None,
                hurry: false,
                closed: false,
            }),
            wake: Condvar::new(),
            interval,
        }
    }

    fn lock(&self) -> MutexGuard<'_, InboxState<M>> {
        lock(&self.state)
    }

    /// Queues an event built from its ticket; `None` once the writer has
    /// stopped.
    pub fn push_event(&self, message: impl FnOnce(u64) -> M) -> Option<u64> {
        let mut state = self.lock();
        if state.closed {
            return None;
        }
        let ticket = state.next_ticket;
        state.next_ticket += 1;
        state.queued.push(message(ticket));
        // The first event starts the writer's clock; a long queue is
        // committed early.
        let wake = state.oldest.is_none() || state.queued.len() == WAKE_AT;
        state.oldest.get_or_insert_with(Instant::now);
        drop(state);
        if wake {
            self.wake.notify_one();
        }
        Some(ticket)
    }

    /// Queues a control message (purge, checkpoint, close), handled at once
    /// after everything queued before it is committed.
    pub fn push_control(&self, message: M) -> Result<(), M> {
        let mut state = self.lock();
        if state.closed {
            return Err(message);
        }
        state.queued.push(message);
        state.oldest.get_or_insert_with(Instant::now);
        state.hurry = true;
        drop(state);
        self.wake.notify_one();
        Ok(())
    }

    /// Asks for whatever is queued to be committed now.
    pub fn hurry(&self) {
        let mut state = self.lock();
        if !state.hurry && !state.queued.is_empty() {
            state.hurry = true;
            drop(state);
            self.wake.notify_one();
        }
    }

    /// Waits until there is something to commit (the interval is up, the
    /// queue is long or someone hurries), or `idle` passes with nothing.
    pub fn take(&self, idle: Duration) -> Taken<M> {
        let mut state = self.lock();
        loop {
            let due = match state.oldest {
                None => {
                    let (next, timeout) = unpoisoned(self.wake.wait_timeout(state, idle));
                    state = next;
                    if timeout.timed_out() && state.queued.is_empty() {
                        return Taken {
                            messages: Vec::new(),
                            idle: true,
                        };
                    }
                    continue;
                }
                Some(oldest) => oldest + self.interval,
            };
            let now = Instant::now();
            if state.hurry || state.queued.len() >= WAKE_AT || now >= due {
                break;
            }
            state = unpoisoned(self.wake.wait_timeout(state, due - now)).0;
        }
        state.oldest = None;
        state.hurry = false;
        let spare = std::mem::take(&mut state.spare);
        Taken {
            messages: std::mem::replace(&mut state.queued, spare),
            idle: false,
        }
    }

    /// Hands back a queue [`Inbox::take`] returned, emptied, so that its
    /// capacity serves a later queue.
    pub fn recycle(&self, mut messages: Vec<M>) {
        messages.clear();
        let mut state = self.lock();
        if messages.capacity() > state.spare.capacity() {
            state.spare = messages;
        }
    }

    /// Refuses further messages and returns any still queued, so their
    /// waiters can be answered.
    pub fn close(&self) -> Vec<M> {
        let mut state = self.lock();
        state.closed = true;
        std::mem::take(&mut state.queued)
    }
}

/// How far the writer has got, shared by every acknowledgement.
pub(super) struct Progress {
    /// Tickets up to this one are settled: committed, or listed in
    /// `failed`. The writer holds the sender; when it stops, waiters for
    /// later tickets learn that it is gone.
    settled: watch::Receiver<u64>,
    /// Ticket ranges (inclusive) whose batch failed, with the reason. A
    /// failure is rare and loud, so a list is enough.
    failed: Mutex<Vec<(u64, u64, String)>>,
    hurry: Box<dyn Fn() + Send + Sync>,
    /// Never sent on: closes when the writer's [`Settle`] goes, without a
    /// wake-up per commit as `settled` would give.
    gone: watch::Receiver<()>,
}

/// The writer's side of [`Progress`].
pub(super) struct Settle {
    sender: watch::Sender<u64>,
    progress: Arc<Progress>,
    _gone: watch::Sender<()>,
}

impl Progress {
    /// `hurry` asks the writer to commit now (see [`Inbox::hurry`]).
    pub fn new(hurry: impl Fn() + Send + Sync + 'static) -> (Arc<Self>, Settle) {
        let (sender, settled) = watch::channel(0);
        let (gone_sender, gone) = watch::channel(());
        let progress = Arc::new(Self {
            settled,
            failed: Mutex::new(Vec::new()),
            hurry: Box::new(hurry),
            gone,
        });
        (
            Arc::clone(&progress),
            Settle {
                sender,
                progress,
                _gone: gone_sender,
            },
        )
    }

    /// Resolves once the writer is gone (its [`Settle`] dropped).
    pub async fn writer_stopped(&self) {
        // Nothing is ever sent: `changed` returns only when it closes.
        let _ = self.gone.clone().changed().await;
    }

    /// Waits until every ticket in `first..=last` is settled; the first
    /// failure among them, if any, is the error. With `hurry`, asks the
    /// writer to commit now; without, they go with the next commit, at the
    /// end of the interval or when someone else hurries.
    pub async fn durable(&self, first: u64, last: u64, hurry: bool) -> Result<(), AuditError> {
        let mut settled = self.settled.clone();
        if *settled.borrow() < last {
            if hurry {
                (self.hurry)();
            }
            if settled.wait_for(|&done| done >= last).await.is_err() {
                // The writer stopped; it settles what it took before that.
                if *settled.borrow() < last {
                    return Err(AuditError::WriterGone);
                }
            }
        }
        let failed = lock(&self.failed);
        match failed
            .iter()
            .find(|(from, to, _)| *from <= last && first <= *to)
        {
            Some((_, _, message)) => Err(AuditError::Commit(message.clone())),
            None => Ok(()),
        }
    }
}

impl Settle {
    /// Tickets up to `last` are committed.
    pub fn committed(&self, last: u64) {
        self.sender.send_if_modified(|done| {
            let moved = last > *done;
            *done = (*done).max(last);
            moved
        });
    }

    /// Tickets `first..=last` were not stored.
    pub fn failed(&self, first: u64, last: u64, message: String) {
        lock(&self.progress.failed).push((first, last, message));
        self.committed(last);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn writer_stopped_waits_for_the_writer_to_go_not_for_commits() {
        let (progress, settle) = Progress::new(|| {});
        let stopped = progress.writer_stopped();
        tokio::pin!(stopped);
        settle.committed(5);
        assert!(
            tokio::time::timeout(Duration::from_millis(50), &mut stopped)
                .await
                .is_err(),
            "a commit is not a stop"
        );
        drop(settle);
        tokio::time::timeout(Duration::from_secs(1), stopped)
            .await
            .expect("resolves once the writer is gone");
    }

    #[tokio::test]
    async fn only_hurried_acks_hurry_the_writer() {
        use std::sync::atomic::{AtomicUsize, Ordering};
        let hurries = Arc::new(AtomicUsize::new(0));
        let counted = Arc::clone(&hurries);
        let (progress, settle) = Progress::new(move || {
            counted.fetch_add(1, Ordering::Relaxed);
        });
        let unhurried = progress.durable(1, 2, false);
        tokio::pin!(unhurried);
        assert!(
            tokio::time::timeout(Duration::from_millis(20), &mut unhurried)
                .await
                .is_err(),
            "waits for a commit"
        );
        assert_eq!(hurries.load(Ordering::Relaxed), 0);
        settle.committed(2);
        assert!(unhurried.await.is_ok());
        let hurried = progress.durable(3, 3, true);
        tokio::pin!(hurried);
        assert!(
            tokio::time::timeout(Duration::from_millis(20), &mut hurried)
                .await
                .is_err()
        );
        assert_eq!(hurries.load(Ordering::Relaxed), 1);
        settle.committed(3);
        assert!(hurried.await.is_ok());
    }

    #[test]
    fn events_wait_for_the_interval_unless_hurried() {
        let inbox = Inbox::new(Duration::from_millis(50));
        assert_eq!(inbox.push_event(|t| t), Some(1));
        assert_eq!(inbox.push_event(|t| t), Some(2));
        let started = Instant::now();
        let taken = inbox.take(Duration::from_secs(5));
        assert_eq!(taken.messages, vec![1, 2]);
        assert!(started.elapsed() >= Duration::from_millis(40));

        inbox.push_event(|t| t);
        inbox.hurry();
        let started = Instant::now();
        assert_eq!(inbox.take(Duration::from_secs(5)).messages, vec![3]);
        assert!(started.elapsed() < Duration::from_millis(40));

        assert!(inbox.take(Duration::from_millis(1)).idle);
        assert!(inbox.close().is_empty());
        assert_eq!(inbox.push_event(|t| t), None);
    }

    #[test]
    fn a_recycled_queue_takes_the_next_events_without_growing() {
        let inbox = Inbox::new(Duration::from_millis(1));
        for _ in 0..1000 {
            inbox.push_event(|t| t);
        }
        let taken = inbox.take(Duration::from_secs(5)).messages;
        assert_eq!(taken.len(), 1000);
        let capacity = taken.capacity();
        let address = taken.as_ptr();
        inbox.recycle(taken);
        // The recycled vector is the queue after the next take.
        inbox.push_event(|t| t);
        let next = inbox.take(Duration::from_secs(5)).messages;
        assert_eq!(next, vec![1001], "emptied before reuse");
        inbox.recycle(next);
        inbox.push_event(|t| t);
        let reused = inbox.take(Duration::from_secs(5)).messages;
        assert_eq!(reused, vec![1002]);
        assert_eq!(reused.as_ptr(), address, "the same allocation");
        assert!(reused.capacity() >= capacity);
        // A smaller queue handed back does not replace a larger spare.
        inbox.recycle(reused);
        inbox.recycle(Vec::with_capacity(4));
        inbox.push_event(|t| t);
        inbox.take(Duration::from_secs(5));
        inbox.push_event(|t| t);
        assert_eq!(
            inbox.take(Duration::from_secs(5)).messages.as_ptr(),
            address
        );
    }

    #[tokio::test]
    async fn acks_see_commits_failures_and_a_stopped_writer() {
        let (progress, settle) = Progress::new(|| {});
        settle.committed(3);
        assert!(progress.durable(1, 3, true).await.is_ok());
        settle.failed(4, 6, "disk full".into());
        assert!(progress.durable(5, 5, true).await.is_err());
        settle.committed(9);
        assert!(progress.durable(7, 9, true).await.is_ok());
        assert!(progress.durable(3, 9, true).await.is_err());
        drop(settle);
        assert!(matches!(
            progress.durable(10, 10, true).await,
            Err(AuditError::WriterGone)
        ));
    }
}
