//! `im gateway --processes N`: N gateway processes sharing one port with `SO_REUSEPORT`, each
//! with its own gateway id — how one host holds more connections than one process's
//! open-file limit allows. The parent only supervises: if one child dies, the others are
//! stopped too (a half-up gateway is worse than none), and a shutdown stops them all.

use crate::Shutdown;
use std::path::Path;
use std::process::Child;
use std::time::Duration;

/// How often the parent looks at its children and at `shutdown`.
const POLL: Duration = Duration::from_millis(500);

/// Runs `exe args --process-index i` for i in 0..n until `shutdown` says stop or a child
/// exits; then sends every child SIGTERM and waits for them.
pub fn supervise(
    n: usize,
    exe: &Path,
    args: &[String],
    mut shutdown: impl Shutdown,
) -> Result<(), String> {
    let mut children: Vec<Child> = Vec::with_capacity(n);
    for i in 0..n {
        let child = std::process::Command::new(exe)
            .args(args)
            .arg("--process-index")
            .arg(i.to_string())
            .spawn();
        match child {
            Ok(c) => children.push(c),
            Err(e) => {
                stop_all(children);
                return Err(format!("starting gateway process {i}: {e}"));
            }
        }
    }
    log::info!(
        "supervising {n} gateway processes: {:?}",
        children.iter().map(|c| c.id()).collect::<Vec<_>>()
    );
    let mut failed = false;
    while !shutdown.wait(POLL) {
        if children
            .iter_mut()
            .any(|c| matches!(c.try_wait(), Ok(Some(_))))
        {
            log::error!("a gateway process exited; stopping the others");
            failed = true;
            break;
        }
    }
    stop_all(children);
    if failed {
        Err("a gateway process exited unexpectedly".into())
    } else {
        Ok(())
    }
}

fn stop_all(children: Vec<Child>) {
    for c in &children {
        // SAFETY: signalling our own child processes by pid.
        unsafe { libc::kill(c.id() as i32, libc::SIGTERM) };
    }
    for mut c in children {
        let _ = c.wait();
    }
}
