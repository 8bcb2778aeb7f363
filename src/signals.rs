//! SIGINT and SIGTERM, taken synchronously: the main thread blocks them before any other
//! thread exists (every thread inherits the mask, so no thread is interrupted), then waits
//! for them with `sigtimedwait` while the service runs on other threads, and turns the first
//! one into the service's `shutdown` watch.

use std::time::Duration;
use tokio::sync::watch;

/// How often the main thread looks at whether the service stopped by itself.
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
    pub fn wait(&self, timeout: Duration) -> Option<i32> {
        let ts = libc::timespec {
            tv_sec: timeout.as_secs() as libc::time_t,
            tv_nsec: timeout.subsec_nanos() as libc::c_long,
        };
        // SAFETY: the set is initialised; info may be null.
        let sig = unsafe { libc::sigtimedwait(&self.set, std::ptr::null_mut(), &ts) };
        (sig > 0).then_some(sig)
    }

    /// Runs `service` on a thread of its own with a `shutdown` watch that turns true at the
    /// first signal; returns what the service returns, whether it stopped by itself or
    /// because of the signal. The service bounds its own stop.
    pub fn run_until_signal<F>(&self, name: &str, service: F) -> Result<(), String>
    where
        F: FnOnce(watch::Receiver<bool>) -> Result<(), String> + Send + 'static,
    {
        let (stop, shutdown) = watch::channel(false);
        let worker = std::thread::Builder::new()
            .name(name.into())
            .spawn(move || service(shutdown))
            .map_err(|e| format!("spawning {name}: {e}"))?;
        while !worker.is_finished() {
            if let Some(sig) = self.wait(POLL) {
                log::info!("signal {sig}: stopping");
                let _ = stop.send(true);
                break;
            }
        }
        worker
            .join()
            .unwrap_or_else(|_| Err(format!("{name} panicked")))
    }
}
