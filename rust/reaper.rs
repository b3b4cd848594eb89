//! Freeing off the caller's thread.
//!
//! The cache is called from the server's event loop. Evicting or closing a long
//! chain frees every item of it: about 1 µs a response, so 16 ms for a
//! 20,000-turn chain, during which no other connection is served. The cache
//! takes what is slow to free out of such nodes ([`crate::node::Remains`]) and
//! hands it here; one background thread frees it.
//!
//! The meter does not wait for that thread: a node leaves the meter when its
//! remains are taken, so eviction still stops as soon as enough is gone.
//! [`settle`] waits for the thread to catch up, for heap measurements.
//!
//! A forked child does not inherit the thread: the first hand-off in a new
//! process starts its own. If no thread can be started, the caller frees.

use std::sync::mpsc::{self, Receiver, Sender, SyncSender};
use std::thread;
use std::time::Duration;

use parking_lot::Mutex;

type Garbage = Box<dyn Send>;

enum Job {
    Free(Garbage),
    /// Answered once everything handed over before it is freed.
    Settle(SyncSender<()>),
}

/// The thread's queue, and the process that started it.
struct Reaper {
    pid: u32,
    jobs: Sender<Job>,
}

static REAPER: Mutex<Option<Reaper>> = Mutex::new(None);

/// Free `garbage` on the background thread (or here, when there is none).
pub fn free_later<T: Send + 'static>(garbage: T) {
    if let Err(mpsc::SendError(Job::Free(garbage))) = send(Job::Free(Box::new(garbage))) {
        drop(garbage);
    }
}

/// Wait until what was handed over before this call is freed, at most `timeout`.
/// Returns whether it was.
pub fn settle(timeout: Duration) -> bool {
    let (done, settled) = mpsc::sync_channel(1);
    match send(Job::Settle(done)) {
        Ok(()) => settled.recv_timeout(timeout).is_ok(),
        // No thread: the caller freed everything itself.
        Err(_) => true,
    }
}

fn send(job: Job) -> Result<(), mpsc::SendError<Job>> {
    let mut reaper = REAPER.lock();
    let pid = std::process::id();
    if reaper.as_ref().is_none_or(|r| r.pid != pid) {
        *reaper = start(pid);
    }
    match reaper.as_ref() {
        Some(r) => r.jobs.send(job),
        None => Err(mpsc::SendError(job)),
    }
}

fn start(pid: u32) -> Option<Reaper> {
    let (jobs, queue) = mpsc::channel();
    thread::Builder::new()
        .name("warmsocket-reaper".into())
        .spawn(move || run(queue))
        .ok()?;
    Some(Reaper { pid, jobs })
}

fn run(queue: Receiver<Job>) {
    for job in queue {
        match job {
            Job::Free(garbage) => drop(garbage),
            Job::Settle(done) => {
                // The asker may have stopped waiting.
                let _ = done.send(());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;

    struct Counted(Arc<AtomicUsize>);

    impl Drop for Counted {
        fn drop(&mut self) {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }

    #[test]
    fn what_is_handed_over_is_freed_on_another_thread_by_the_time_settle_returns() {
        let freed = Arc::new(AtomicUsize::new(0));
        struct OnThread(Arc<Mutex<Option<thread::ThreadId>>>);
        impl Drop for OnThread {
            fn drop(&mut self) {
                *self.0.lock() = Some(thread::current().id());
            }
        }
        let where_freed = Arc::new(Mutex::new(None));
        free_later((
            (0..100).map(|_| Counted(freed.clone())).collect::<Vec<_>>(),
            OnThread(where_freed.clone()),
        ));
        assert!(settle(Duration::from_secs(5)));
        assert_eq!(freed.load(Ordering::SeqCst), 100);
        let freed_on = where_freed.lock().expect("freed");
        assert_ne!(freed_on, thread::current().id());
    }
}
