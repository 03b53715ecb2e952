//! The daemon's log lines, written to stderr in batches by a thread of
//! their own.
//!
//! A session's worker formats a line (tracing-subscriber does) and appends
//! it to a shared buffer, and that is all its thread does: no wake-up, no
//! syscall. The `portcullis-log` thread wakes every [`FLUSH_INTERVAL`], or
//! as soon as [`EARLY_FLUSH`] bytes have gathered, and writes them in one
//! `write`. A queue that woke its thread and wrote once per line
//! (tracing-appender's) cost the daemon about a tenth of its CPU under
//! clients that connect once per query, at three lines per session.
//!
//! Nothing is dropped: past the limit ([`LIMIT`] bytes, a journal stalled
//! for a long while) a logging thread waits for room rather than lose
//! lines. Once the [`LogGuard`] is dropped, lines are written at once.

use std::{
    io::{self, Write},
    sync::{Arc, Condvar, Mutex},
    thread::JoinHandle,
    time::Duration,
};

use tracing_subscriber::fmt::MakeWriter;

use crate::{lock, unpoisoned};

/// How long a line may wait for its batch: well under what a person
/// following the journal notices.
pub const FLUSH_INTERVAL: Duration = Duration::from_millis(50);

/// A batch this large is written without waiting for the interval.
pub const EARLY_FLUSH: usize = 64 * 1024;

/// The most that may wait to be written: about 128,000 typical lines, a
/// journal stalled for 20 s while 2,000 clients a second connect.
pub const LIMIT: usize = 24 * 1024 * 1024;

/// Hands out appenders to tracing-subscriber, one per line.
pub struct BatchedLog {
    shared: Arc<Shared>,
}

/// Stops the log thread when dropped, after it wrote everything gathered.
pub struct LogGuard {
    shared: Arc<Shared>,
    thread: Option<JoinHandle<()>>,
}

struct Shared {
    state: Mutex<State>,
    /// The log thread waits on it for its next batch.
    gathered: Condvar,
    /// Loggers wait on it for room.
    drained: Condvar,
    out: Mutex<Box<dyn Write + Send>>,
    limit: usize,
    interval: Duration,
}

struct State {
    pending: Vec<u8>,
    /// The guard was dropped: lines go to `out` at once.
    closed: bool,
}

/// Starts the `portcullis-log` thread, writing to `out`.
pub fn start(out: impl Write + Send + 'static) -> io::Result<(BatchedLog, LogGuard)> {
    start_with(Box::new(out), LIMIT, FLUSH_INTERVAL)
}

fn start_with(
    out: Box<dyn Write + Send>,
    limit: usize,
    interval: Duration,
) -> io::Result<(BatchedLog, LogGuard)> {
    let shared = Arc::new(Shared {
        state: Mutex::new(State {
            pending: Vec::new(),
            closed: false,
        }),
        gathered: Condvar::new(),
        drained: Condvar::new(),
        out: Mutex::new(out),
        limit,
        interval,
    });
    let writer = Arc::clone(&shared);
    let thread = std::thread::Builder::new()
        .name("portcullis-log".into())
        .spawn(move || writer.write_batches())?;
    Ok((
        BatchedLog {
            shared: Arc::clone(&shared),
        },
        LogGuard {
            shared,
            thread: Some(thread),
        },
    ))
}

impl Shared {
    fn append(&self, line: &[u8]) {
        let mut state = lock(&self.state);
        while !state.closed
            && !state.pending.is_empty()
            && state.pending.len() + line.len() > self.limit
        {
            state = unpoisoned(self.drained.wait(state));
        }
        if state.closed {
            // Under the state's lock, after whatever gathered before the
            // close: lines keep their order.
            let pending = std::mem::take(&mut state.pending);
            let mut out = lock(&self.out);
            let _ = out.write_all(&pending);
            let _ = out.write_all(line);
            return;
        }
        let before = state.pending.len();
        state.pending.extend_from_slice(line);
        if before < EARLY_FLUSH && state.pending.len() >= EARLY_FLUSH {
            self.gathered.notify_one();
        }
    }

    /// The log thread: writes what gathered, each interval, until closed.
    fn write_batches(&self) {
        let mut batch = Vec::new();
        loop {
            let mut state = lock(&self.state);
            if !state.closed && state.pending.len() < EARLY_FLUSH {
                state = unpoisoned(self.gathered.wait_timeout(state, self.interval)).0;
            }
            std::mem::swap(&mut state.pending, &mut batch);
            self.drained.notify_all();
            let closed = state.closed;
            // Taken before the state's is let go, so that a line logged
            // after the close (written at once, see `append`) comes after
            // this batch.
            let mut out = lock(&self.out);
            drop(state);
            if !batch.is_empty() {
                // Nowhere is left to report a failing stderr to.
                let _ = out.write_all(&batch);
                let _ = out.flush();
            }
            batch.clear();
            // A stalled journal may have grown it: give the memory back.
            batch.shrink_to(EARLY_FLUSH);
            if closed {
                return;
            }
        }
    }
}

impl Drop for LogGuard {
    fn drop(&mut self) {
        lock(&self.shared.state).closed = true;
        self.shared.gathered.notify_one();
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// One line's writer: tracing-subscriber formats a line, then writes it
/// whole with one `write_all`.
pub struct Appender<'a>(&'a Shared);

impl Write for Appender<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0.append(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl<'a> MakeWriter<'a> for BatchedLog {
    type Writer = Appender<'a>;

    fn make_writer(&'a self) -> Self::Writer {
        Appender(&self.shared)
    }
}

#[cfg(test)]
mod tests {
    use std::{
        sync::mpsc,
        time::{Duration, Instant},
    };

    use super::*;

    /// Collects what is written, and how many writes it took.
    #[derive(Clone, Default)]
    struct Collected(Arc<Mutex<(Vec<u8>, usize)>>);

    impl Write for Collected {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            let mut collected = lock(&self.0);
            collected.0.extend_from_slice(buf);
            collected.1 += 1;
            Ok(buf.len())
        }

        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    impl Collected {
        fn text(&self) -> String {
            String::from_utf8(lock(&self.0).0.clone()).unwrap()
        }

        fn writes(&self) -> usize {
            lock(&self.0).1
        }
    }

    fn log(log: &BatchedLog, line: &str) {
        log.make_writer().write_all(line.as_bytes()).unwrap();
    }

    #[test]
    fn lines_from_many_threads_arrive_whole_in_order_in_few_writes() {
        let out = Collected::default();
        let (batched, guard) = start(out.clone()).unwrap();
        std::thread::scope(|scope| {
            for thread in 0..4 {
                let batched = &batched;
                scope.spawn(move || {
                    for n in 0..2_000 {
                        log(batched, &format!("thread {thread} line {n}\n"));
                    }
                });
            }
        });
        drop(guard);
        let text = out.text();
        for thread in 0..4 {
            let prefix = format!("thread {thread} line ");
            let numbers: Vec<usize> = text
                .lines()
                .filter_map(|l| l.strip_prefix(&prefix))
                .map(|n| n.parse().unwrap())
                .collect();
            assert_eq!(numbers, (0..2_000).collect::<Vec<_>>());
        }
        assert_eq!(text.lines().count(), 8_000);
        assert!(out.writes() < 100, "{} writes", out.writes());
    }

    #[test]
    fn a_line_is_written_within_the_interval_without_a_wake_up() {
        let out = Collected::default();
        let (batched, _guard) = start(out.clone()).unwrap();
        log(&batched, "one line\n");
        let deadline = Instant::now() + FLUSH_INTERVAL * 20;
        while out.text().is_empty() {
            assert!(Instant::now() < deadline, "the line was never written");
            std::thread::sleep(Duration::from_millis(5));
        }
        assert_eq!(out.text(), "one line\n");
    }

    /// A stderr that blocks until its sender is dropped (a stalled
    /// journal).
    struct Stalled {
        go: mpsc::Receiver<()>,
        out: Collected,
    }

    impl Write for Stalled {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            let _ = self.go.recv();
            self.out.write(buf)
        }

        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn a_stalled_stderr_holds_loggers_back_and_loses_nothing() {
        let out = Collected::default();
        let (go, stalled) = mpsc::channel::<()>();
        let stderr = Stalled {
            go: stalled,
            out: out.clone(),
        };
        let (batched, guard) = start_with(Box::new(stderr), 100, Duration::from_millis(1)).unwrap();
        let (done, finished) = mpsc::channel();
        let logger = std::thread::spawn(move || {
            for n in 0..50 {
                log(&batched, &format!("line {n:02} of the stall\n"));
            }
            done.send(()).unwrap();
            batched
        });
        // The first batch is stuck in the write; then the buffer fills.
        assert!(finished.recv_timeout(Duration::from_millis(200)).is_err());
        // Let every write through.
        drop(go);
        finished.recv_timeout(Duration::from_secs(10)).unwrap();
        let batched = logger.join().unwrap();
        drop(guard);
        log(&batched, "after the guard\n");
        let text = out.text();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 51, "{text}");
        for (n, line) in lines[..50].iter().enumerate() {
            assert_eq!(*line, format!("line {n:02} of the stall"));
        }
        assert_eq!(lines[50], "after the guard");
    }
}
