//! A TCP relay that adds latency: what `tc netem delay` would do, on a kernel without netem.
//! Clients connect to the relay; it connects to the target and holds every chunk it reads,
//! in each direction, for the current delay before writing it on (in order: a chunk is never
//! written before one read earlier). The delay can change while connections are open.
//! A test's own tool: a few threads per connection, no limits beyond the test's own load.

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc;
use std::sync::Arc;
use std::time::{Duration, Instant};

pub struct DelayRelay {
    pub addr: SocketAddr,
    delay_ms: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
    /// Connections made, for the test's report.
    pub accepted: Arc<AtomicU64>,
}

impl DelayRelay {
    /// Listens on 127.0.0.1 (a free port) and relays to `target` with `delay` each way.
    pub fn start(target: SocketAddr, delay: Duration) -> DelayRelay {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        listener.set_nonblocking(true).unwrap();
        let relay = DelayRelay {
            addr: listener.local_addr().unwrap(),
            delay_ms: Arc::new(AtomicU64::new(delay.as_millis() as u64)),
            stop: Arc::new(AtomicBool::new(false)),
            accepted: Arc::new(AtomicU64::new(0)),
        };
        let (delay, stop, accepted) = (
            relay.delay_ms.clone(),
            relay.stop.clone(),
            relay.accepted.clone(),
        );
        std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                match listener.accept() {
                    Ok((client, _)) => {
                        accepted.fetch_add(1, Ordering::Relaxed);
                        let Ok(server) =
                            TcpStream::connect_timeout(&target, Duration::from_secs(5))
                        else {
                            continue; // the client sees its connection close
                        };
                        client.set_nonblocking(false).unwrap();
                        let _ = client.set_nodelay(true);
                        let _ = server.set_nodelay(true);
                        pipe(&client, &server, &delay);
                        pipe(&server, &client, &delay);
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(10)),
                }
            }
        });
        relay
    }

    pub fn set_delay(&self, delay: Duration) {
        self.delay_ms
            .store(delay.as_millis() as u64, Ordering::Relaxed);
    }
}

impl Drop for DelayRelay {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// `from` → `to`, each chunk held until its time: a reader thread stamps what it reads, a
/// writer thread sleeps until the stamp plus the delay.
fn pipe(from: &TcpStream, to: &TcpStream, delay_ms: &Arc<AtomicU64>) {
    let (mut from, mut to) = (from.try_clone().unwrap(), to.try_clone().unwrap());
    let (tx, rx) = mpsc::channel::<(Instant, Vec<u8>)>();
    std::thread::spawn(move || {
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            match from.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    if tx.send((Instant::now(), buf[..n].to_vec())).is_err() {
                        break;
                    }
                }
            }
        }
        // The writer ends once what was read before the end is written.
    });
    let delay_ms = delay_ms.clone();
    std::thread::spawn(move || {
        for (read_at, chunk) in rx {
            let due = read_at + Duration::from_millis(delay_ms.load(Ordering::Relaxed));
            if let Some(wait) = due.checked_duration_since(Instant::now()) {
                std::thread::sleep(wait);
            }
            if to.write_all(&chunk).is_err() {
                break;
            }
        }
        // The other side closed (or failed): pass the end on.
        let _ = to.shutdown(Shutdown::Write);
    });
}
