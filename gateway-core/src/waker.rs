//! Waking a thread that sleeps in the kernel (a shard in its io_uring or epoll wait, the
//! bridge's up thread in `poll`): an eventfd per sleeper, written only when the sleeper said
//! it is about to sleep, so busy threads cost no syscall. `WakeSet` collects the sleepers a
//! turn sent to and wakes each once at the end of the turn.

use std::os::fd::RawFd;
use std::sync::atomic::{AtomicBool, Ordering};

/// Wakes a thread sleeping in its event loop.
pub struct Waker {
    efd: RawFd,
    sleeping: AtomicBool,
}

impl Waker {
    pub fn new() -> std::io::Result<Waker> {
        // SAFETY: plain syscall; the fd is owned by the Waker and closed on drop.
        let efd = unsafe { libc::eventfd(0, libc::EFD_NONBLOCK | libc::EFD_CLOEXEC) };
        if efd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(Waker {
            efd,
            sleeping: AtomicBool::new(false),
        })
    }

    pub fn fd(&self) -> RawFd {
        self.efd
    }

    /// Called by another thread after pushing work. Writes the eventfd only when the owner
    /// said it is about to sleep.
    pub fn wake(&self) {
        if self.sleeping.swap(false, Ordering::SeqCst) {
            self.force();
        }
    }

    /// Unconditional wake (shutdown).
    pub fn force(&self) {
        let one: u64 = 1;
        // SAFETY: writes 8 bytes from a valid u64 to our eventfd. EAGAIN (counter full) still
        // leaves it readable, which is all we need.
        unsafe { libc::write(self.efd, (&one as *const u64).cast(), 8) };
    }

    /// The owner announces it will block; it must re-check its rings afterwards.
    pub fn prepare_sleep(&self) {
        self.sleeping.store(true, Ordering::SeqCst);
    }

    pub fn cancel_sleep(&self) {
        self.sleeping.store(false, Ordering::SeqCst);
    }
}

impl Drop for Waker {
    fn drop(&mut self) {
        // SAFETY: we own the fd.
        unsafe { libc::close(self.efd) };
    }
}

/// The shards a turn sent to (a bit per shard, `SHARDS_MAX` of them), woken once each.
#[derive(Clone, Copy, Debug, Default)]
pub struct WakeSet(u64);

impl WakeSet {
    pub fn add(&mut self, shard: usize) {
        self.0 |= 1 << shard;
    }

    /// Wakes every shard added since the last call, and empties the set.
    pub fn wake(&mut self, wakers: &[Waker]) {
        let mut w = std::mem::take(&mut self.0);
        while w != 0 {
            let d = w.trailing_zeros() as usize;
            w &= w - 1;
            wakers[d].wake();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn read(w: &Waker) -> isize {
        let mut buf = 0u64;
        // SAFETY: reads 8 bytes into a u64 from our non-blocking eventfd.
        unsafe { libc::read(w.fd(), (&mut buf as *mut u64).cast(), 8) }
    }

    #[test]
    fn wake_writes_the_eventfd_only_for_a_sleeper() {
        let w = Waker::new().unwrap();
        w.wake();
        assert_eq!(read(&w), -1, "not sleeping: no write");
        w.prepare_sleep();
        w.wake();
        assert_eq!(read(&w), 8);
    }

    #[test]
    fn a_wake_set_wakes_each_member_once() {
        let wakers: Vec<Waker> = (0..3).map(|_| Waker::new().unwrap()).collect();
        for w in &wakers {
            w.prepare_sleep();
        }
        let mut set = WakeSet::default();
        set.add(0);
        set.add(2);
        set.add(2);
        set.wake(&wakers);
        assert_eq!(read(&wakers[0]), 8);
        assert_eq!(read(&wakers[1]), -1);
        assert_eq!(read(&wakers[2]), 8);
        set.wake(&wakers);
        assert_eq!(read(&wakers[0]), -1, "the set empties");
    }
}
