//! `im-bench fanout`: one group, MEMBERS connections, group messages at a rate; reports
//! deliveries per second and per server CPU-second, and latency from the send to each member
//! and to the last member.
//!
//! The harness must cost less than what it measures (on a 2-core box it shares the CPUs with
//! the server): the members' sockets are read by one thread in a plain level-triggered epoll
//! loop — up to 1,024 ready sockets per `epoll_wait`, one `read` of up to 256 KiB each (a
//! socket with more left is reported again), no task or waker per socket — and a frame is
//! only counted: its opcode and prefix tell a delivery, and the send stamp is found with
//! `memchr`'s substring search, no JSON parsing. Sending runs on the main thread. The harness
//! reports its own CPU beside the server's.

use crate::proc;
use crate::ws;
use gateway_core::codec::opcode;
use hdrhistogram::Histogram;
use serde::Serialize;
use std::collections::HashMap;
use std::io::Write;
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpStream};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

#[derive(clap::Args)]
pub struct FanoutArgs {
    #[arg(long, default_value = "127.0.0.1:8090")]
    pub addr: SocketAddr,
    #[arg(long, env = "IM_JWT_SECRET")]
    pub secret: String,
    /// The group (seed it with `seed-users --group`).
    #[arg(long)]
    pub group: u64,
    /// Members to connect: user ids first..first+members; the first one sends.
    #[arg(long, default_value_t = 10_000_000)]
    pub first: u64,
    #[arg(long, default_value_t = 10_000, value_parser = clap::value_parser!(u64).range(2..=50_000))]
    pub members: u64,
    /// Group messages to send, one every `interval_ms`.
    #[arg(long, default_value_t = 20)]
    pub messages: u64,
    #[arg(long, default_value_t = 500)]
    pub interval_ms: u64,
    /// Send this many messages per second instead (a throughput run), paced on a schedule.
    #[arg(long)]
    pub rate: Option<f64>,
    /// Members that take turns sending [default: enough to keep each under 50 messages/s,
    /// half the gateway's per-connection rate limit].
    #[arg(long)]
    pub senders: Option<u64>,
    /// The server is `im-bench baseline`: it re-broadcasts each `send` frame as it is to
    /// every other connection, so count those instead of `msg` frames.
    #[arg(long)]
    pub baseline: bool,
    /// Server processes' PIDs (gateways, standalone `im`, or the baseline), for their CPU.
    #[arg(long = "gateway-pid")]
    pub gateway_pids: Vec<u32>,
    #[arg(long)]
    pub json: Option<std::path::PathBuf>,
}

#[derive(Serialize)]
pub struct FanoutResult {
    members_online: u64,
    messages: u64,
    deliveries: u64,
    deliveries_expected: u64,
    errors: u64,
    /// Send → a member's `msg`, over every (member, message).
    latency_p50_us: u64,
    latency_p99_us: u64,
    latency_max_us: u64,
    /// Send → the last member's `msg`, per message.
    all_members_p50_us: u64,
    all_members_p99_us: u64,
    /// Offered messages per second (`--rate`, or 1000 / `--interval-ms`).
    offered_msgs_per_s: f64,
    senders: u64,
    /// From the first send to the last delivery.
    window_secs: f64,
    deliveries_per_s: f64,
    /// Server CPU over the window (utime + stime of every `--gateway-pid`).
    gateway_cpu_secs: Option<f64>,
    /// Server CPU ÷ window: how many cores it used.
    gateway_cores: Option<f64>,
    /// Deliveries ÷ server CPU seconds: deliveries per second per core.
    deliveries_per_cpu_s: Option<f64>,
    /// The harness's CPU over the same window, and in all (connecting included).
    harness_window_cpu_secs: f64,
    harness_cpu_secs: f64,
    /// `read` calls that returned data, and `epoll_wait` calls that returned sockets: how
    /// many frames a read and sockets a wait carried.
    harness_reads: u64,
    harness_waits: u64,
}

pub fn fanout(a: FanoutArgs) -> FanoutResult {
    gateway_core::gateway::raise_nofile();
    let socks = connect_all(&a);
    eprintln!("fanout: {} members connected", socks.len());
    // What a delivery looks like: the protocol's `msg`, or the baseline's echo of `send`.
    let want: &'static [u8] = if a.baseline {
        b"{\"type\":\"send\""
    } else {
        b"{\"type\":\"msg\""
    };
    let reader = Reader::start(&socks, want);
    // Presence is written by the gateway's bridge in batches; give it a moment.
    std::thread::sleep(Duration::from_secs(2));
    let cpu = |pids: &[u32]| {
        pids.iter()
            .filter_map(|&p| proc::cpu_time(p))
            .sum::<Duration>()
    };
    let cpu0 = cpu(&a.gateway_pids);
    let own0 = proc::own_cpu_time();
    let rate = a
        .rate
        .unwrap_or(1000.0 / a.interval_ms.max(1) as f64)
        .max(0.001);
    let senders = a
        .senders
        .unwrap_or((rate / 50.0).ceil() as u64)
        .clamp(1, a.members);
    let mut writers: Vec<TcpStream> = socks[..senders as usize]
        .iter()
        .map(|s| s.try_clone().expect("clone a sender's socket"))
        .collect();
    // 100-byte contents: a 20-digit send stamp (for latency) and padding.
    let padding = "x".repeat(80);
    let interval = Duration::from_secs_f64(1.0 / rate);
    let epoch = reader.epoch;
    let now_us = || epoch.elapsed().as_micros() as u64;
    let mut stamps = Vec::with_capacity(a.messages as usize);
    let first_send = now_us();
    let start = Instant::now();
    for k in 0..a.messages {
        let t = now_us();
        stamps.push(t);
        let text = format!(
            r#"{{"type":"send","cid":"f{k}-{t}","group":"{}","content":"{t:020}{padding}"}}"#,
            a.group
        );
        if write_all_nonblocking(
            &mut writers[(k % senders) as usize],
            &ws::frame(opcode::TEXT, text.as_bytes()),
        )
        .is_err()
        {
            reader.shared.errors.fetch_add(1, Ordering::Relaxed);
        }
        // On a schedule: a late send does not push the later ones back.
        let next = start + interval.mul_f64((k + 1) as f64);
        if let Some(d) = next.checked_duration_since(Instant::now()) {
            std::thread::sleep(d);
        }
    }
    // Wait (bounded) for the stragglers.
    let expected = a.messages * (a.members - 1);
    let end = Instant::now() + Duration::from_secs(30);
    while reader.shared.deliveries.load(Ordering::Relaxed) < expected && Instant::now() < end {
        std::thread::sleep(Duration::from_millis(5));
    }
    let gateway_cpu =
        (!a.gateway_pids.is_empty()).then(|| (cpu(&a.gateway_pids) - cpu0).as_secs_f64());
    let harness_window_cpu = (proc::own_cpu_time() - own0).as_secs_f64();
    let r = reader.stop();
    let deliveries = r.deliveries;
    let window_secs = (r.last_delivery_us.saturating_sub(first_send) as f64 / 1e6).max(1e-6);
    let mut all = Histogram::<u64>::new_with_bounds(1, 120_000_000, 3).expect("bounds");
    for t in &stamps {
        if let Some((n, last)) = r.per_msg.get(t) {
            if *n == a.members - 1 {
                let _ = all.record(last.saturating_sub(*t).max(1));
            }
        }
    }
    drop(writers);
    FanoutResult {
        members_online: socks.len() as u64,
        messages: a.messages,
        deliveries,
        deliveries_expected: expected,
        errors: r.errors,
        latency_p50_us: r.latency.value_at_quantile(0.5),
        latency_p99_us: r.latency.value_at_quantile(0.99),
        latency_max_us: r.latency.max(),
        all_members_p50_us: all.value_at_quantile(0.5),
        all_members_p99_us: all.value_at_quantile(0.99),
        offered_msgs_per_s: rate,
        senders,
        window_secs,
        deliveries_per_s: deliveries as f64 / window_secs,
        gateway_cpu_secs: gateway_cpu,
        gateway_cores: gateway_cpu.map(|c| c / window_secs),
        deliveries_per_cpu_s: gateway_cpu.map(|c| deliveries as f64 / c.max(1e-9)),
        harness_window_cpu_secs: harness_window_cpu,
        harness_cpu_secs: proc::own_cpu_time().as_secs_f64(),
        harness_reads: r.reads,
        harness_waits: r.waits,
    }
}

/// Connects and upgrades every member (with tokio, from explicit source ports), and hands
/// back plain non-blocking sockets for the reader thread.
fn connect_all(a: &FanoutArgs) -> Vec<TcpStream> {
    crate::run_local(async {
        let src_ip = IpAddr::V4(Ipv4Addr::new(127, 0, 3, 1));
        let mut socks = Vec::with_capacity(a.members as usize);
        for i in 0..a.members {
            let user = a.first + i;
            let src = SocketAddr::new(src_ip, 10_000 + i as u16);
            let mut s = ws::tcp_connect(src, a.addr).await.expect("connect");
            let token = im_shared::jwt::sign(
                a.secret.as_bytes(),
                &im_shared::jwt::Claims::new(user, im_shared::unix_ms() / 1000, 3600),
            );
            ws::upgrade(&mut s, a.addr, &token).await.expect("upgrade");
            // Still non-blocking; no longer registered with tokio.
            socks.push(s.into_std().expect("a plain socket"));
        }
        socks
    })
}

/// Writes a small frame on a non-blocking socket, waiting (bounded) while its buffer is full.
fn write_all_nonblocking(s: &mut TcpStream, mut buf: &[u8]) -> std::io::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(1);
    while !buf.is_empty() {
        match s.write(buf) {
            Ok(n) => buf = &buf[n..],
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock && Instant::now() < deadline => {
                std::thread::sleep(Duration::from_micros(200));
            }
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// What the sender and the reader thread share while the run goes.
#[derive(Default)]
struct Shared {
    deliveries: AtomicU64,
    errors: AtomicU64,
    stop: AtomicBool,
}

/// The reader thread's tally, handed back when it stops.
struct Tally {
    deliveries: u64,
    errors: u64,
    latency: Histogram<u64>,
    /// Per message (by send stamp): deliveries and the latest arrival.
    per_msg: HashMap<u64, (u64, u64)>,
    last_delivery_us: u64,
    reads: u64,
    waits: u64,
}

struct Reader {
    shared: Arc<Shared>,
    epoch: Instant,
    thread: std::thread::JoinHandle<Tally>,
}

/// Ready sockets one `epoll_wait` may return.
const EVENTS_MAX: usize = 1024;
/// One `read`'s buffer: a socket with more than this pending is reported again.
const READ_BYTES: usize = 256 * 1024;
/// The most of an incomplete frame kept per connection (the gateway's frames are far smaller).
const PARTIAL_BYTES_MAX: usize = 1 << 20;

impl Reader {
    fn start(socks: &[TcpStream], want: &'static [u8]) -> Reader {
        let shared = Arc::new(Shared::default());
        let epoch = Instant::now();
        // SAFETY: plain syscalls on an fd we create and own.
        let ep = unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) };
        assert!(
            ep >= 0,
            "epoll_create1: {}",
            std::io::Error::last_os_error()
        );
        let fds: Vec<i32> = socks.iter().map(|s| s.as_raw_fd()).collect();
        for (i, &fd) in fds.iter().enumerate() {
            // Level-triggered: one read per wakeup, and whatever is left is reported again.
            let mut ev = libc::epoll_event {
                events: libc::EPOLLIN as u32,
                u64: i as u64,
            };
            // SAFETY: `ev` is a valid epoll_event; `fd` stays open for the reader's life
            // (the caller keeps `socks` until `stop`).
            let rc = unsafe { libc::epoll_ctl(ep, libc::EPOLL_CTL_ADD, fd, &mut ev) };
            assert_eq!(rc, 0, "epoll_ctl: {}", std::io::Error::last_os_error());
        }
        let sh = shared.clone();
        let thread = std::thread::Builder::new()
            .name("fanout-reader".into())
            .spawn(move || read_loop(ep, fds, want, epoch, &sh))
            .expect("spawn the reader");
        Reader {
            shared,
            epoch,
            thread,
        }
    }

    fn stop(self) -> Tally {
        self.shared.stop.store(true, Ordering::Release);
        self.thread.join().expect("the reader thread")
    }
}

fn read_loop(ep: i32, fds: Vec<i32>, want: &[u8], epoch: Instant, shared: &Shared) -> Tally {
    let content = memchr::memmem::Finder::new(b"\"content\":\"");
    let mut t = Tally {
        deliveries: 0,
        errors: 0,
        latency: Histogram::new_with_bounds(1, 120_000_000, 3).expect("bounds"),
        per_msg: HashMap::new(),
        last_delivery_us: 0,
        reads: 0,
        waits: 0,
    };
    // Per connection, the bytes of a frame that has not all arrived.
    let mut partial: Vec<Vec<u8>> = vec![Vec::new(); fds.len()];
    let mut chunk = vec![0u8; READ_BYTES];
    let mut events = vec![libc::epoll_event { events: 0, u64: 0 }; EVENTS_MAX];
    while !shared.stop.load(Ordering::Acquire) {
        // SAFETY: `events` has room for EVENTS_MAX entries.
        let n = unsafe { libc::epoll_wait(ep, events.as_mut_ptr(), EVENTS_MAX as i32, 50) };
        if n <= 0 {
            continue;
        }
        t.waits += 1;
        let (mut got, mut errors, mut now) = (0u64, 0u64, 0u64);
        for ev in &events[..n as usize] {
            let i = ev.u64 as usize;
            // SAFETY: reading into our own buffer from an fd we keep open.
            let r = unsafe { libc::read(fds[i], chunk.as_mut_ptr().cast(), chunk.len()) };
            // Stamped per read: a wait's sockets take a while to read, and the last one's
            // frames must not look as early as the first's.
            now = epoch.elapsed().as_micros() as u64;
            if r <= 0 {
                let again = r < 0
                    && matches!(
                        std::io::Error::last_os_error().kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::Interrupted
                    );
                if !again {
                    // Closed or failed: stop watching it (its frames are counted as missing).
                    // SAFETY: removing an fd we added.
                    unsafe {
                        libc::epoll_ctl(ep, libc::EPOLL_CTL_DEL, fds[i], std::ptr::null_mut())
                    };
                }
                continue;
            }
            t.reads += 1;
            let data = &chunk[..r as usize];
            let mut on_frame = |op: u8, payload: &[u8]| {
                if op != opcode::TEXT {
                    return;
                }
                if payload.starts_with(b"{\"type\":\"error\"") {
                    errors += 1;
                    return;
                }
                if !payload.starts_with(want) {
                    return;
                }
                let Some(at) = content.find(payload) else {
                    return;
                };
                let Some(sent) = parse_stamp(&payload[at + content.needle().len()..]) else {
                    return;
                };
                got += 1;
                let _ = t.latency.record(now.saturating_sub(sent).max(1));
                let e = t.per_msg.entry(sent).or_insert((0, 0));
                e.0 += 1;
                e.1 = e.1.max(now);
            };
            let p = &mut partial[i];
            if p.is_empty() {
                let used = ws::frames_in(data, &mut on_frame);
                p.extend_from_slice(&data[used..]);
            } else {
                p.extend_from_slice(data);
                let used = ws::frames_in(p, &mut on_frame);
                p.drain(..used);
            }
            if p.len() > PARTIAL_BYTES_MAX {
                // No frame of ours is this large: a broken stream. Stop reading it (its
                // frames are counted as missing).
                errors += 1;
                p.clear();
                // SAFETY: removing an fd we added.
                unsafe { libc::epoll_ctl(ep, libc::EPOLL_CTL_DEL, fds[i], std::ptr::null_mut()) };
            }
        }
        if got > 0 {
            t.deliveries += got;
            t.last_delivery_us = now;
            shared.deliveries.fetch_add(got, Ordering::Relaxed);
        }
        t.errors += errors;
    }
    t.errors += shared.errors.load(Ordering::Relaxed);
    // SAFETY: closing the epoll fd we created; the sockets stay the caller's.
    unsafe { libc::close(ep) };
    t
}

/// The 20 ASCII digits of a send stamp.
fn parse_stamp(b: &[u8]) -> Option<u64> {
    let digits = b.get(..20)?;
    digits.iter().try_fold(0u64, |v, &d| {
        d.is_ascii_digit()
            .then(|| v.wrapping_mul(10) + (d - b'0') as u64)
    })
}

pub fn print(r: &FanoutResult) {
    println!(
        "\nfanout: {} members online, {} group messages",
        r.members_online, r.messages
    );
    println!(
        "  deliveries {} of {}  errors {}",
        r.deliveries, r.deliveries_expected, r.errors
    );
    println!(
        "  send → member     p50 {} us  p99 {} us  max {} us",
        r.latency_p50_us, r.latency_p99_us, r.latency_max_us
    );
    println!(
        "  send → all members  p50 {} us  p99 {} us",
        r.all_members_p50_us, r.all_members_p99_us
    );
    println!(
        "  offered {:.0} msgs/s from {} senders; {:.0} deliveries/s over {:.2} s",
        r.offered_msgs_per_s, r.senders, r.deliveries_per_s, r.window_secs
    );
    if let (Some(c), Some(cores), Some(per)) =
        (r.gateway_cpu_secs, r.gateway_cores, r.deliveries_per_cpu_s)
    {
        println!(
            "  server CPU         {c:.2} s ({cores:.2} cores): {per:.0} deliveries per CPU-second"
        );
    }
    println!(
        "  harness CPU        {:.2} s over the window ({:.1} s in all); {:.1} frames per read, {:.0} sockets per wait",
        r.harness_window_cpu_secs,
        r.harness_cpu_secs,
        r.deliveries as f64 / r.harness_reads.max(1) as f64,
        r.harness_reads as f64 / r.harness_waits.max(1) as f64
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stamps_are_twenty_digits() {
        assert_eq!(parse_stamp(b"00000000000000001234xxxx"), Some(1234));
        assert_eq!(parse_stamp(b"0000000000000000123"), None, "too short");
        assert_eq!(parse_stamp(b"0000000000000000123x"), None, "not a digit");
    }
}
