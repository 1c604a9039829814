//! Log lines leave the process through one thread that writes them to
//! stdout in batches.
//!
//! Written by the thread that logs, every request line cost a `write`
//! system call on a request thread (stdout is line-buffered). Here a line is
//! appended to a shared buffer; the writer thread, woken by the first line
//! of a batch, waits [`LINGER`] for more and writes them all in one call.
//! Under load that is hundreds of lines per call; a quiet service's lines
//! appear [`LINGER`] later than before, which no one reading logs notices.
//!
//! Nothing is lost on a normal exit: [`Flusher`], held by `main`, writes
//! what is left and joins the thread when dropped. A process killed outright
//! loses the lines of its last [`LINGER`]. A reader that stops reading (a
//! full pipe) slows the logging threads down once [`MAX_BACKLOG_BYTES`] are
//! waiting, as a blocking `write` did, rather than letting the buffer grow.

use std::io;
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::thread::JoinHandle;
use std::time::Duration;

use tracing_subscriber::fmt::MakeWriter;

/// How long the writer waits after the first line of a batch before writing
/// it: long enough that a loaded service's lines go out hundreds per system
/// call (without it, the writer was woken for every line and the service
/// got slower, not faster), short enough to be unnoticeable in a log.
pub const LINGER: Duration = Duration::from_millis(2);

/// Most bytes of log lines waiting for the writer thread before a logging
/// thread waits too: about 4,000 request lines, enough for a burst, small
/// beside the service's memory.
pub const MAX_BACKLOG_BYTES: usize = 1 << 20;

/// A [`MakeWriter`] whose lines reach `W` in batches.
pub struct Batched<W> {
    shared: Arc<Shared<W>>,
}

/// What the JSON and pretty formats write through.
pub type BatchedStdout = Batched<io::Stdout>;

impl<W> Clone for Batched<W> {
    fn clone(&self) -> Self {
        Self {
            shared: Arc::clone(&self.shared),
        }
    }
}

/// Stops the writer thread once everything logged so far is written.
/// Dropping it flushes; hold it until the process has nothing left to log.
#[must_use = "dropping it stops batching: lines are then written as they come"]
pub struct Flusher {
    stop: Box<dyn Fn() + Send + Sync>,
    thread: Option<JoinHandle<()>>,
}

struct Shared<W> {
    backlog: Mutex<Backlog>,
    /// Where lines go; locked by whoever writes.
    out: Mutex<W>,
    /// Signalled when a batch starts, or to stop.
    work: Condvar,
    /// Signalled when the writer took the backlog, or is gone.
    room: Condvar,
}

#[derive(Default)]
struct Backlog {
    bytes: Vec<u8>,
    /// Whether the writer sleeps on `work` (only then is it woken: a wake-up
    /// is a system call too).
    writer_asleep: bool,
    /// Set when the writer is told to stop: it writes what is there and
    /// exits.
    stopping: bool,
    /// Set when the writer has written its last batch (or never started, or
    /// died): from then on lines are written by the threads that log them.
    writer_gone: bool,
}

impl BatchedStdout {
    /// Starts the writer thread for stdout.
    pub fn start() -> (Self, Flusher) {
        Self::start_to(io::stdout())
    }
}

impl<W: io::Write + Send + 'static> Batched<W> {
    /// Starts the writer thread for `out`. If the thread cannot be started,
    /// lines are written by the threads that log them.
    pub fn start_to(out: W) -> (Self, Flusher) {
        let shared = Arc::new(Shared {
            backlog: Mutex::new(Backlog::default()),
            out: Mutex::new(out),
            work: Condvar::new(),
            room: Condvar::new(),
        });
        let writer = Arc::clone(&shared);
        let thread = std::thread::Builder::new()
            .name("log-writer".to_owned())
            .spawn(move || write_until_stopped(&writer))
            .ok();
        if thread.is_none() {
            shared.lock().writer_gone = true;
        }
        let stopped = Arc::clone(&shared);
        let flusher = Flusher {
            stop: Box::new(move || stopped.stop()),
            thread,
        };
        (Self { shared }, flusher)
    }
}

impl<W: io::Write> Shared<W> {
    // Appending is one call, so a panic while the lock is held cannot leave
    // the backlog half-written: a poisoned lock is still usable.
    fn lock(&self) -> MutexGuard<'_, Backlog> {
        self.backlog.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Errors are dropped, as `tracing` drops them: a log line has no one
    /// to report a failed write to.
    fn write(&self, bytes: &[u8]) {
        let mut out = self.out.lock().unwrap_or_else(PoisonError::into_inner);
        let _ = out.write_all(bytes).and_then(|()| out.flush());
    }

    fn stop(&self) {
        self.lock().stopping = true;
        self.work.notify_one();
        self.room.notify_all();
    }

    fn append(&self, line: &[u8]) {
        let mut backlog = self.lock();
        while backlog.bytes.len() >= MAX_BACKLOG_BYTES && !backlog.writer_gone {
            backlog = self
                .room
                .wait(backlog)
                .unwrap_or_else(PoisonError::into_inner);
        }
        if backlog.writer_gone {
            // Under the lock, as the writer wrote its last batch: this line
            // cannot overtake it.
            self.write(line);
            return;
        }
        backlog.bytes.extend_from_slice(line);
        if backlog.writer_asleep {
            backlog.writer_asleep = false;
            self.work.notify_one();
        }
    }
}

/// The writer thread: waits for a batch to start, lets it gather for
/// [`LINGER`], writes it; until told to stop, when it writes what is left.
fn write_until_stopped<W: io::Write>(shared: &Shared<W>) {
    /// Marks the writer gone however it leaves, a panic included, so no one
    /// waits for it any more.
    struct Gone<'a, W: io::Write>(&'a Shared<W>);

    impl<W: io::Write> Drop for Gone<'_, W> {
        fn drop(&mut self) {
            self.0.lock().writer_gone = true;
            self.0.room.notify_all();
        }
    }

    let _gone = Gone(shared);
    let mut batch = Vec::new();
    loop {
        let mut backlog = shared.lock();
        while backlog.bytes.is_empty() && !backlog.stopping {
            backlog.writer_asleep = true;
            backlog = shared
                .work
                .wait(backlog)
                .unwrap_or_else(PoisonError::into_inner);
        }
        if !backlog.stopping {
            drop(backlog);
            std::thread::sleep(LINGER);
            backlog = shared.lock();
        }
        std::mem::swap(&mut backlog.bytes, &mut batch);
        shared.room.notify_all();
        if backlog.stopping {
            // The last batch is written under the lock, and the writer is
            // marked gone in it, so lines logged after it (written
            // directly) stay behind it.
            shared.write(&batch);
            backlog.writer_gone = true;
            return;
        }
        drop(backlog);
        shared.write(&batch);
        batch.clear();
    }
}

impl Drop for Flusher {
    fn drop(&mut self) {
        (self.stop)();
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// One event's writer: appends what it is given.
pub struct LineWriter<'a, W>(&'a Shared<W>);

impl<W: io::Write> io::Write for LineWriter<'_, W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0.append(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl<'a, W: io::Write + 'a> MakeWriter<'a> for Batched<W> {
    type Writer = LineWriter<'a, W>;

    fn make_writer(&'a self) -> Self::Writer {
        LineWriter(&self.shared)
    }
}

#[cfg(test)]
mod tests {
    use std::io::Write as _;

    use super::*;

    /// A `Write` that keeps what it gets and counts the calls.
    #[derive(Clone, Default)]
    struct Kept(Arc<Mutex<(Vec<u8>, usize)>>);

    impl io::Write for Kept {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            let mut kept = self.0.lock().unwrap();
            kept.0.extend_from_slice(buf);
            kept.1 += 1;
            Ok(buf.len())
        }

        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    impl Kept {
        fn text(&self) -> String {
            String::from_utf8(self.0.lock().unwrap().0.clone()).unwrap()
        }

        fn writes(&self) -> usize {
            self.0.lock().unwrap().1
        }
    }

    #[test]
    fn every_line_from_every_thread_is_written_once_in_batches_and_none_is_lost_at_the_end() {
        // Arrange
        let out = Kept::default();
        let (batched, flusher) = Batched::start_to(out.clone());

        // Act: 4 threads x 2,000 lines, then stop at once.
        std::thread::scope(|threads| {
            for thread in 0..4 {
                let batched = batched.clone();
                threads.spawn(move || {
                    for line in 0..2_000 {
                        let text = format!("{thread}:{line}\n");
                        batched.make_writer().write_all(text.as_bytes()).unwrap();
                    }
                });
            }
        });
        drop(flusher);
        batched.make_writer().write_all(b"after\n").unwrap();

        // Assert
        let text = out.text();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 8_001);
        assert_eq!(lines.last(), Some(&"after"), "written directly, last");
        for thread in 0..4 {
            let own: Vec<&str> = lines
                .iter()
                .copied()
                .filter(|line| line.starts_with(&format!("{thread}:")))
                .collect();
            let expected: Vec<String> = (0..2_000).map(|line| format!("{thread}:{line}")).collect();
            assert_eq!(own, expected, "each thread's lines, in order");
        }
        assert!(out.writes() < 8_001, "batched: {} writes", out.writes());
    }

    #[test]
    fn a_line_logged_while_the_writer_stops_stays_behind_the_earlier_ones() {
        // Arrange: "a" waits out the writer's linger.
        let out = Kept::default();
        let (batched, flusher) = Batched::start_to(out.clone());
        batched.make_writer().write_all(b"a\n").unwrap();

        // Act: told to stop within the linger, then a line, then joined.
        (flusher.stop)();
        batched.make_writer().write_all(b"b\n").unwrap();
        drop(flusher);
        batched.make_writer().write_all(b"c\n").unwrap();

        // Assert
        assert_eq!(out.text(), "a\nb\nc\n");
    }

    #[test]
    fn a_line_is_written_within_a_few_lingers_while_the_writer_runs() {
        // Arrange
        let out = Kept::default();
        let (batched, _flusher) = Batched::start_to(out.clone());

        // Act
        batched.make_writer().write_all(b"one\n").unwrap();
        let deadline = std::time::Instant::now() + LINGER * 50;
        while out.text().is_empty() && std::time::Instant::now() < deadline {
            std::thread::sleep(LINGER);
        }

        // Assert
        assert_eq!(out.text(), "one\n");
    }
}
