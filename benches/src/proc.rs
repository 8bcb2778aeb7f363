//! What the harness reads about processes from /proc: memory (PSS), CPU time, kernel socket
//! memory. PSS counts a shared page once across the processes sharing it, so summing it over
//! gateway processes gives their true userspace footprint.

use std::time::Duration;

/// Proportional set size of `pid`, in bytes.
pub fn pss_bytes(pid: u32) -> Option<u64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup")).ok()?;
    kb_field(&text, "Pss:")
}

fn kb_field(text: &str, name: &str) -> Option<u64> {
    let line = text.lines().find(|l| l.starts_with(name))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

/// User + system CPU time of `pid` so far.
pub fn cpu_time(pid: u32) -> Option<Duration> {
    cpu_split(pid).map(|(user, sys)| user + sys)
}

/// User and system (kernel) CPU time of `pid` so far, apart: on loopback most of a
/// connection's cost is the kernel's.
pub fn cpu_split(pid: u32) -> Option<(Duration, Duration)> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command name (which may contain spaces) start after the last ')'.
    let rest = &stat[stat.rfind(')')? + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    let (user, sys): (u64, u64) = (f.get(11)?.parse().ok()?, f.get(12)?.parse().ok()?);
    // SAFETY: sysconf is always safe to call.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as u64;
    let d = |ticks: u64| Duration::from_millis(ticks * 1000 / hz);
    Some((d(user), d(sys)))
}

/// CPU time this process used (not its children: those may include gateways we started).
pub fn own_cpu_time() -> Duration {
    // SAFETY: getrusage fills the struct.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut ru) };
    Duration::new(ru.ru_utime.tv_sec as u64, ru.ru_utime.tv_usec as u32 * 1000)
        + Duration::new(ru.ru_stime.tv_sec as u64, ru.ru_stime.tv_usec as u32 * 1000)
}

/// Kernel memory charged to TCP sockets (pages from /proc/net/sockstat), in bytes.
pub fn tcp_kernel_bytes() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/net/sockstat").ok()?;
    let line = text.lines().find(|l| l.starts_with("TCP:"))?;
    let mut it = line.split_whitespace();
    while let Some(w) = it.next() {
        if w == "mem" {
            return it.next()?.parse::<u64>().ok().map(|p| p * 4096);
        }
    }
    None
}

/// Kernel slab memory (sockets, inodes, dentries, file structs: what a connection costs the
/// kernel beyond its buffers), from /proc/meminfo, in bytes.
pub fn kernel_slab_bytes() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    kb_field(&text, "Slab:")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_our_own_process() {
        let pid = std::process::id();
        assert!(pss_bytes(pid).unwrap() > 0);
        assert!(cpu_time(pid).is_some());
        assert_eq!(kb_field("Rss: 10 kB\nPss:  7 kB\n", "Pss:"), Some(7 * 1024));
        assert!(kernel_slab_bytes().unwrap() > 0);
    }
}
