//! The worker pool shared by all connections, with adaptive concurrency.
//!
//! Requests served from the page cache are CPU-bound and take microseconds: then the best is
//! about two running workers per core, and waking more only adds context switches (measured:
//! 4 workers do 4 KiB random reads at ~6 µs of server CPU each, 32 workers at ~15 µs).
//! Requests that wait for the disk take tens of microseconds or more: then throughput grows
//! with the number of reads in flight (measured on a cold cache: 4 workers 45k IOPS, 32
//! workers 83k). So the pool has `max` threads but only wakes a sleeping one while fewer than
//! `target` are running, and `target` follows the share of slow jobs: two per core while
//! jobs are fast, `max` while many wait for the disk. A share, not a mean duration, because
//! on a busy machine a fast job is sometimes preempted for a whole time slice: such outliers
//! must not switch the pool to disk mode.

use std::collections::VecDeque;
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::thread;
use std::time::Instant;

/// A unit of work.
pub(crate) type Job = Box<dyn FnOnce() + Send + 'static>;

/// A job slower than this probably waited for the disk.
const SLOW_JOB_NANOS: u128 = 100_000;

/// Fixed-point one for `slow_share`.
const ONE: u32 = 1024;

/// Above this share of slow jobs, the pool runs up to `max` workers.
const SLOW_SHARE: u32 = ONE / 4;

struct State {
    queue: VecDeque<Job>,
    /// Workers executing a job.
    running: usize,
    /// Workers blocked waiting for a job.
    sleeping: usize,
    /// Moving average of the share of slow jobs, in 1/`ONE`.
    slow_share: u32,
    closed: bool,
}

struct Inner {
    state: Mutex<State>,
    wake: Condvar,
    /// Concurrency for CPU-bound jobs.
    base: usize,
    /// Most workers.
    max: usize,
}

impl Inner {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// How many workers should run at once given recent job durations.
    fn target(&self, st: &State) -> usize {
        if st.slow_share > SLOW_SHARE {
            self.max
        } else {
            self.base
        }
    }
}

/// Worker threads; dropping the [`Pool`] (after [`Pool::join`]) stops them.
pub(crate) struct Pool {
    inner: Arc<Inner>,
    threads: Vec<thread::JoinHandle<()>>,
}

/// Submits jobs to a [`Pool`]; cheap to clone.
#[derive(Clone)]
pub(crate) struct Submitter {
    inner: Arc<Inner>,
}

impl Pool {
    /// A pool of `max` threads running `base` at a time while jobs are fast.
    pub(crate) fn new(base: usize, max: usize) -> std::io::Result<Pool> {
        let max = max.max(1);
        let inner = Arc::new(Inner {
            state: Mutex::new(State {
                queue: VecDeque::new(),
                running: 0,
                sleeping: 0,
                slow_share: 0,
                closed: false,
            }),
            wake: Condvar::new(),
            base: base.clamp(1, max),
            max,
        });
        let threads = (0..max)
            .map(|i| {
                let inner = Arc::clone(&inner);
                thread::Builder::new()
                    .name(format!("nbd-worker-{i}"))
                    .spawn(move || work(&inner))
            })
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Pool { inner, threads })
    }

    /// A handle to submit jobs.
    pub(crate) fn submitter(&self) -> Submitter {
        Submitter {
            inner: Arc::clone(&self.inner),
        }
    }

    /// Runs every queued job, then stops the workers.
    pub(crate) fn join(mut self) {
        self.inner.lock().closed = true;
        self.inner.wake.notify_all();
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

impl Submitter {
    /// Queues a job; runs it on the calling thread if the pool has stopped.
    pub(crate) fn submit(&self, job: Job) {
        let mut st = self.inner.lock();
        if st.closed {
            drop(st);
            job();
            return;
        }
        st.queue.push_back(job);
        // Waking costs a system call and a context switch: only when a sleeper exists and
        // the running workers are fewer than the current target (busy workers pick the job
        // up when they finish their current one).
        if st.sleeping > 0 && st.running < self.inner.target(&st) {
            drop(st);
            self.inner.wake.notify_one();
        }
    }
}

fn work(inner: &Inner) {
    let mut st = inner.lock();
    loop {
        // Leave the job to another worker if enough are running already.
        if let Some(job) = (st.running < inner.target(&st))
            .then(|| st.queue.pop_front())
            .flatten()
        {
            st.running += 1;
            drop(st);
            let start = Instant::now();
            job();
            let slow = start.elapsed().as_nanos() > SLOW_JOB_NANOS;
            st = inner.lock();
            st.running -= 1;
            // Moving average over ~32 jobs.
            st.slow_share = st.slow_share - st.slow_share / 32 + if slow { ONE / 32 } else { 0 };
            // When jobs turned slow, more workers may run: wake one for the backlog (it
            // wakes the next in turn), since no submission may come to do it.
            if st.sleeping > 0 && st.queue.len() > 1 && st.running + 1 < inner.target(&st) {
                inner.wake.notify_one();
            }
            continue;
        }
        if st.closed && st.queue.is_empty() {
            // Workers that went back to sleep while others ran the last jobs must see the
            // end too.
            inner.wake.notify_all();
            return;
        }
        if st.closed && st.running == 0 {
            // Shutting down with jobs left and nobody running: run them regardless of target.
            if let Some(job) = st.queue.pop_front() {
                st.running += 1;
                drop(st);
                job();
                st = inner.lock();
                st.running -= 1;
                continue;
            }
        }
        st.sleeping += 1;
        st = inner.wake.wait(st).unwrap_or_else(PoisonError::into_inner);
        st.sleeping -= 1;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::time::Duration;

    #[test]
    fn runs_every_job_and_stops() {
        let pool = Pool::new(2, 8).unwrap();
        let s = pool.submitter();
        let done = Arc::new(AtomicUsize::new(0));
        for i in 0..1000 {
            let done = Arc::clone(&done);
            s.submit(Box::new(move || {
                if i % 100 == 0 {
                    thread::sleep(Duration::from_millis(1));
                }
                done.fetch_add(1, Ordering::SeqCst);
            }));
        }
        pool.join();
        assert_eq!(done.load(Ordering::SeqCst), 1000);
        // After join, submissions run inline.
        let d2 = Arc::new(AtomicUsize::new(0));
        let d = Arc::clone(&d2);
        s.submit(Box::new(move || {
            d.fetch_add(1, Ordering::SeqCst);
        }));
        assert_eq!(d2.load(Ordering::SeqCst), 1);
    }

    #[test]
    fn slow_jobs_raise_concurrency() {
        let pool = Pool::new(1, 8).unwrap();
        let s = pool.submitter();
        let running = Arc::new(AtomicUsize::new(0));
        let peak = Arc::new(AtomicUsize::new(0));
        for _ in 0..64 {
            let (running, peak) = (Arc::clone(&running), Arc::clone(&peak));
            s.submit(Box::new(move || {
                let now = running.fetch_add(1, Ordering::SeqCst) + 1;
                peak.fetch_max(now, Ordering::SeqCst);
                thread::sleep(Duration::from_millis(5));
                running.fetch_sub(1, Ordering::SeqCst);
            }));
        }
        pool.join();
        assert!(peak.load(Ordering::SeqCst) > 1, "slow jobs ran in parallel");
    }
}
