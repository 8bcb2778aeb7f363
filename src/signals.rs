//! SIGINT and SIGTERM, taken synchronously: the main thread blocks them before any other
//! thread exists (every thread inherits the mask, so no thread is interrupted); a watcher
//! thread takes them with `sigtimedwait` and turns the first into the service's `shutdown`
//! watch.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::watch;

/// How often the watcher looks at whether the service stopped by itself.
const POLL: Duration = Duration::from_millis(500);

/// The blocked signals, to wait on.
pub struct Signals {
    set: libc::sigset_t,
}

impl Signals {
    /// Blocks SIGINT and SIGTERM in this thread and every thread it spawns later.
    pub fn block() -> Signals {
        // SAFETY: sigset manipulation on a local set; pthread_sigmask on this thread.
        unsafe {
            let mut set: libc::sigset_t = std::mem::zeroed();
            libc::sigemptyset(&mut set);
            libc::sigaddset(&mut set, libc::SIGINT);
            libc::sigaddset(&mut set, libc::SIGTERM);
            libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
            Signals { set }
        }
    }

    /// Waits up to `timeout` for SIGINT or SIGTERM; the signal number, or None on timeout.
    pub fn take(&self, timeout: Duration) -> Option<i32> {
        let ts = libc::timespec {
            tv_sec: timeout.as_secs() as libc::time_t,
            tv_nsec: timeout.subsec_nanos() as libc::c_long,
        };
        // SAFETY: the set is initialised; info may be null.
        let sig = unsafe { libc::sigtimedwait(&self.set, std::ptr::null_mut(), &ts) };
        (sig > 0).then_some(sig)
    }

    /// Runs `service` on this thread with a `shutdown` watch that turns true at the first
    /// signal; returns what the service returns, whether it stopped by itself or because of
    /// the signal. The service bounds its own stop. The signals are taken by a small watcher
    /// thread that allocates nothing while it waits (a gateway process's fixed memory is
    /// multiplied by the processes of a host).
    pub fn run_until_signal<F>(self, service: F) -> Result<(), String>
    where
        F: FnOnce(watch::Receiver<bool>) -> Result<(), String>,
    {
        let (stop, shutdown) = watch::channel(false);
        let done = Arc::new(AtomicBool::new(false));
        let watcher_done = done.clone();
        let watcher = std::thread::Builder::new()
            .name("im-signals".into())
            .spawn(move || {
                while !watcher_done.load(Ordering::Acquire) {
                    if let Some(sig) = self.take(POLL) {
                        log::info!("signal {sig}: stopping");
                        let _ = stop.send(true);
                        return;
                    }
                }
            })
            .map_err(|e| format!("spawning the signal watcher: {e}"))?;
        let result = service(shutdown);
        done.store(true, Ordering::Release);
        let _ = watcher.join();
        result
    }
}

/// A gateway waits for the signal on its main thread.
impl im_gateway::Shutdown for Signals {
    fn wait(&mut self, timeout: Duration) -> bool {
        match self.take(timeout) {
            Some(sig) => {
                log::info!("signal {sig}: stopping");
                true
            }
            None => false,
        }
    }
}
