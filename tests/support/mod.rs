//! Real processes for the end-to-end tests: a Kafka-protocol broker (nisshi), MariaDB, Redis,
//! and `im gateway` / `im logic` / `im persist` as separate processes of the binary under test.
//! Every child is killed when its guard drops, so a failing test leaves nothing running.
#![allow(dead_code)]

pub mod load;
pub mod relay;
pub mod tls;

use serde_json::{json, Value};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};

use std::time::{Duration, Instant};
use tungstenite::stream::MaybeTlsStream;
use tungstenite::WebSocket;

pub const SECRET: &str = "e2e-test-secret";

pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

pub fn wait_port(addr: SocketAddr, what: &str, within: Duration) {
    let end = Instant::now() + within;
    while TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_err() {
        assert!(
            Instant::now() < end,
            "{what} did not listen on {addr} within {within:?}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A child process killed on drop; its output goes to a log file kept for failures.
pub struct Proc {
    pub name: String,
    child: Option<Child>,
    pub log: PathBuf,
}

impl Proc {
    pub fn spawn(name: &str, mut cmd: Command, dir: &std::path::Path) -> Proc {
        let log = dir.join(format!("{name}.log"));
        let f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)
            .unwrap();
        cmd.stdout(f.try_clone().unwrap())
            .stderr(f)
            .stdin(Stdio::null());
        let child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("spawning {name}: {e}"));
        Proc {
            name: name.into(),
            child: Some(child),
            log,
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().unwrap().id()
    }

    /// SIGKILL: no goodbye, no flush.
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// SIGTERM and wait for the exit (killed after 15 s): its status, None if it had to be
    /// killed or was already gone.
    pub fn stop(&mut self) -> Option<std::process::ExitStatus> {
        let mut c = self.child.take()?;
        // SAFETY: signalling our own child by pid.
        unsafe { libc::kill(c.id() as i32, libc::SIGTERM) };
        let end = Instant::now() + Duration::from_secs(15);
        while Instant::now() < end {
            if let Ok(Some(status)) = c.try_wait() {
                return Some(status);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = c.kill();
        let _ = c.wait();
        None
    }

    pub fn alive(&mut self) -> bool {
        self.child
            .as_mut()
            .is_some_and(|c| matches!(c.try_wait(), Ok(None)))
    }

    pub fn log_tail(&self) -> String {
        let s = std::fs::read(&self.log).unwrap_or_default();
        let start = s.len().saturating_sub(4000);
        String::from_utf8_lossy(&s[start..]).into_owned()
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// The Kafka-protocol broker the tests run: nisshi (`scripts/test` installs it and exports
/// `IM_BROKER`), or any binary with its `broker --listener-url ... --storage-engine ...` flags.
fn broker_path() -> PathBuf {
    if let Ok(p) = std::env::var("IM_BROKER") {
        return p.into();
    }
    let home = std::env::var("HOME").unwrap_or_else(|_| "/root".into());
    let p = PathBuf::from(home).join(".cache/im-tools/bin/nisshi");
    assert!(
        p.exists(),
        "the Kafka-protocol broker for tests is missing at {} (set IM_BROKER, or run scripts/test, \
         which installs nisshi 0.6.0 there)",
        p.display()
    );
    p
}

/// A scratch directory for one test's processes and logs (kept under target/ for reading
/// after a failure; replaced by the next run).
pub fn scratch(test: &str) -> PathBuf {
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(format!("e2e-{test}"));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// A broker (nisshi) on a free port, storing in SQLite in its own directory.
pub fn broker(dir: &std::path::Path) -> (Proc, String) {
    broker_on(dir, free_port())
}

/// The broker on `port`, its storage in `dir/broker` (a restart finds its topics there).
pub fn broker_on(dir: &std::path::Path, port: u16) -> (Proc, String) {
    broker_at(dir, port, "127.0.0.1", "127.0.0.1")
}

/// The broker listening on `listen:port` and telling clients to come to `host:port`.
pub fn broker_at(dir: &std::path::Path, port: u16, listen: &str, host: &str) -> (Proc, String) {
    let bdir = dir.join("broker");
    std::fs::create_dir_all(&bdir).unwrap();
    let mut cmd = Command::new(broker_path());
    cmd.current_dir(&bdir).args([
        "broker",
        "--listener-url",
        &format!("tcp://{listen}:{port}"),
        "--advertised-listener-url",
        &format!("tcp://{host}:{port}"),
        "--storage-engine",
        "sqlite://broker.db",
    ]);
    let p = Proc::spawn("broker", cmd, dir);
    wait_port(
        format!("{host}:{port}").parse().unwrap(),
        "the broker",
        Duration::from_secs(20),
    );
    (p, format!("{host}:{port}"))
}

/// A network namespace of the test's own, linked to the host by a veth pair
/// (`HOST_IP` on the host's end, `NS_IP` inside), with an nftables table inside that can cut
/// the link (`cut`) or drop a share of its packets (`lossy`) without touching the host's
/// interfaces. Deleted on drop (the veth pair goes with it).
pub struct Netns {
    pub name: String,
}

impl Netns {
    pub const HOST_IP: &'static str = "10.213.7.1";
    pub const NS_IP: &'static str = "10.213.7.2";
    const NS_IF: &'static str = "imfault1";
    const HOST_IF: &'static str = "imfault0";

    pub fn create(name: &str) -> Netns {
        assert!(
            Command::new("nft").arg("--version").output().is_ok(),
            "nft (Debian package nftables) is needed: scripts/test installs it"
        );
        // Left over by a killed run: gone first.
        let _ = Command::new("ip").args(["netns", "del", name]).output();
        let _ = Command::new("ip")
            .args(["link", "del", Self::HOST_IF])
            .output();
        let ns = Netns {
            name: name.to_string(),
        };
        let host = format!("{}/30", Self::HOST_IP);
        let inside = format!("{}/30", Self::NS_IP);
        ip(&["netns", "add", name]);
        ip(&[
            "link",
            "add",
            Self::HOST_IF,
            "type",
            "veth",
            "peer",
            "name",
            Self::NS_IF,
        ]);
        ip(&["link", "set", Self::NS_IF, "netns", name]);
        ip(&["addr", "add", &host, "dev", Self::HOST_IF]);
        ip(&["link", "set", Self::HOST_IF, "up"]);
        ns.exec(&["ip", "addr", "add", &inside, "dev", Self::NS_IF]);
        ns.exec(&["ip", "link", "set", Self::NS_IF, "up"]);
        ns.exec(&["ip", "link", "set", "lo", "up"]);
        ns.nft(
            "table inet imfault {\n\
               chain in { type filter hook input priority 0; policy accept; }\n\
               chain out { type filter hook output priority 0; policy accept; }\n\
             }\n",
        );
        ns
    }

    /// A command inside the namespace, for `Proc::spawn`.
    pub fn command(&self, program: &str) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.name, program]);
        c
    }

    fn exec(&self, args: &[&str]) {
        let out = self.command(args[0]).args(&args[1..]).output().unwrap();
        assert!(
            out.status.success(),
            "{args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    fn nft(&self, script: &str) {
        let mut child = self
            .command("nft")
            .args(["-f", "-"])
            .stdin(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        child
            .stdin
            .take()
            .unwrap()
            .write_all(script.as_bytes())
            .unwrap();
        let out = child.wait_with_output().unwrap();
        assert!(
            out.status.success(),
            "nft: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// Drops `rule`'s packets on the link, both ways (after flushing what was there).
    fn drop_on_link(&self, rule: &str) {
        let i = Self::NS_IF;
        self.nft(&format!(
            "flush chain inet imfault in\nflush chain inet imfault out\n\
             add rule inet imfault in iifname {i} {rule} drop\n\
             add rule inet imfault out oifname {i} {rule} drop\n"
        ));
    }

    /// Every packet on the link is dropped: the namespace is cut off.
    pub fn cut(&self) {
        self.drop_on_link("");
    }

    /// `percent` % of the packets on the link are dropped, at random.
    pub fn lossy(&self, percent: u32) {
        self.drop_on_link(&format!("numgen random mod 100 < {percent}"));
    }

    /// The link carries everything again.
    pub fn heal(&self) {
        self.nft("flush chain inet imfault in\nflush chain inet imfault out\n");
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .output();
    }
}

fn ip(args: &[&str]) {
    let out = Command::new("ip").args(args).output().unwrap();
    assert!(
        out.status.success(),
        "ip {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A fresh MariaDB database (dropped first if a previous run left it).
pub fn fresh_db(test: &str) -> String {
    fresh_db_on(test, 3306)
}

/// `fresh_db` on the server at `port`.
pub fn fresh_db_on(test: &str, port: u16) -> String {
    let name = format!("im_e2e_{test}");
    let out = Command::new("mysql")
        .args(["-h127.0.0.1", &format!("-P{port}"), "-uroot", "-e"])
        .arg(format!(
            "DROP DATABASE IF EXISTS {name}; CREATE DATABASE {name}"
        ))
        .output()
        .expect("the mysql client (MariaDB is required: .ci/run starts it)");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    format!("mysql://root@127.0.0.1:{port}/{name}")
}

pub fn mysql_query(db_url: &str, sql: &str) -> String {
    let (server, db) = db_url.rsplit_once('/').unwrap();
    let port = server.rsplit(':').next().unwrap();
    let out = Command::new("mysql")
        .args([
            "-h127.0.0.1",
            &format!("-P{port}"),
            "-uroot",
            "-N",
            "-B",
            db,
            "-e",
            sql,
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{sql}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// A Redis database of its own for each test (presence keys use user ids, which every
/// test's fresh database hands out from 1).
pub fn fresh_redis(index: u32) -> String {
    let out = Command::new("redis-cli")
        .args(["-n", &index.to_string(), "FLUSHDB"])
        .output()
        .expect("redis-cli (Redis is required: .ci/run starts it)");
    assert!(out.status.success());
    format!("redis://127.0.0.1:6379/{index}")
}

/// The children's `RUST_LOG`: `IM_TEST_LOG` when set (e.g. `info,librdkafka=debug` with
/// `IM_KAFKA_DEBUG=cgrp` to see consumer-group steps), else `info`.
pub fn log_filter() -> String {
    std::env::var("IM_TEST_LOG").unwrap_or_else(|_| "info".into())
}

pub fn im() -> Command {
    Command::new(env!("CARGO_BIN_EXE_im"))
}

/// The services of one deployment.
pub struct Cluster {
    pub dir: PathBuf,
    pub brokers: String,
    pub db: String,
    pub redis: String,
    pub api: SocketAddr,
    pub broker: Proc,
    pub logic: Proc,
    pub persist: Proc,
    pub gateways: Vec<(Proc, SocketAddr)>,
    /// A Redis of this deployment's own (`start_with_private_redis`), to break.
    pub redis_server: Option<PrivateRedis>,
    /// A MariaDB of this deployment's own (`start_with_private_mysql`), to break.
    pub mysql_server: Option<PrivateMysql>,
    /// The network namespace gateway 0 runs in (`start_with_netns_gateway`). Last, so the
    /// processes are gone before it is deleted.
    pub netns: Option<Netns>,
}

/// A `mariadbd` of one test's own: its datadir (made by `mariadb-install-db`), a free port.
pub struct PrivateMysql {
    pub proc: Proc,
    pub port: u16,
    dir: PathBuf,
}

impl PrivateMysql {
    pub fn start(dir: &std::path::Path) -> PrivateMysql {
        let data = dir.join("mysql");
        let out = Command::new("mariadb-install-db")
            .arg("--no-defaults")
            .arg(format!("--datadir={}", data.display()))
            .args(["--user=root", "--auth-root-authentication-method=normal"])
            .arg("--skip-test-db")
            .output()
            .expect("mariadb-install-db (Debian package mariadb-server) is required");
        assert!(
            out.status.success(),
            "mariadb-install-db: {}",
            String::from_utf8_lossy(&out.stdout)
        );
        Self::start_on(dir, free_port())
    }

    fn start_on(dir: &std::path::Path, port: u16) -> PrivateMysql {
        let data = dir.join("mysql");
        let mut cmd = Command::new("/usr/sbin/mariadbd");
        cmd.arg("--no-defaults")
            .arg(format!("--datadir={}", data.display()))
            .args(["--user=root", "--bind-address=127.0.0.1", "--skip-log-bin"])
            .arg(format!("--port={port}"))
            .arg(format!("--socket={}", dir.join("mysql.sock").display()))
            .arg(format!("--pid-file={}", dir.join("mysql.pid").display()))
            .args(["--innodb-buffer-pool-size=64M", "--max-connections=200"]);
        let proc = Proc::spawn("mariadb", cmd, dir);
        let end = Instant::now() + Duration::from_secs(60);
        while !Command::new("mysqladmin")
            .args(["-h127.0.0.1", &format!("-P{port}"), "-uroot", "ping"])
            .output()
            .is_ok_and(|o| o.status.success())
        {
            assert!(Instant::now() < end, "the private mariadbd did not start");
            std::thread::sleep(Duration::from_millis(200));
        }
        PrivateMysql {
            proc,
            port,
            dir: dir.to_path_buf(),
        }
    }

    /// Starts it again on its port and datadir (after `proc.stop()` or `kill9()`).
    pub fn restart(&mut self) {
        *self = Self::start_on(&self.dir.clone(), self.port);
    }
}

/// A `redis-server` of one test's own, on a free port, with an append-only file in its
/// directory (a restart finds its keys, as a production Redis with persistence does).
pub struct PrivateRedis {
    pub proc: Proc,
    pub port: u16,
    dir: PathBuf,
}

impl PrivateRedis {
    pub fn start(dir: &std::path::Path) -> PrivateRedis {
        Self::start_on(dir, free_port())
    }

    fn start_on(dir: &std::path::Path, port: u16) -> PrivateRedis {
        Self::start_bound(dir, port, "127.0.0.1")
    }

    /// On `port`, listening on `bind` (addresses separated by spaces, 127.0.0.1 first).
    pub fn start_bound(dir: &std::path::Path, port: u16, bind: &str) -> PrivateRedis {
        let rdir = dir.join("redis");
        std::fs::create_dir_all(&rdir).unwrap();
        let mut cmd = Command::new("redis-server");
        cmd.current_dir(&rdir)
            .args(["--port", &port.to_string(), "--bind"])
            .args(bind.split_whitespace())
            // Protected mode refuses every address but loopback; the other one is the
            // test's own veth link.
            .args(["--protected-mode", "no"])
            .args(["--save", "", "--appendonly", "yes", "--dir", "."]);
        let proc = Proc::spawn("redis", cmd, dir);
        wait_port(
            format!("127.0.0.1:{port}").parse().unwrap(),
            "redis-server",
            Duration::from_secs(20),
        );
        PrivateRedis {
            proc,
            port,
            dir: dir.to_path_buf(),
        }
    }

    /// Starts it again on its port and files (after `proc.kill9()`).
    pub fn restart(&mut self) {
        *self = Self::start_on(&self.dir.clone(), self.port);
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }
}

/// No extra arguments for the gateways or logic.
const NO_ARGS: (&[&str], &[&str]) = (&[], &[]);

impl Cluster {
    pub fn start(test: &str, redis_index: u32, gateways: usize) -> Cluster {
        let redis = fresh_redis(redis_index);
        Self::start_on(scratch(test), test, redis, None, gateways)
    }

    /// `start`, with `args` added to every gateway's command line.
    pub fn start_with_gateway_args(
        test: &str,
        redis_index: u32,
        gateways: usize,
        args: &[&str],
    ) -> Cluster {
        Self::start_with_args(test, redis_index, gateways, args, &[])
    }

    /// `start`, with `gateway_args` added to every gateway's command line and `logic_args`
    /// to logic's.
    pub fn start_with_args(
        test: &str,
        redis_index: u32,
        gateways: usize,
        gateway_args: &[&str],
        logic_args: &[&str],
    ) -> Cluster {
        let redis = fresh_redis(redis_index);
        let args = (gateway_args, logic_args);
        Self::start_with_db(scratch(test), test, redis, None, None, gateways, None, args)
    }

    /// A deployment with a MariaDB of its own, which the test may stop.
    pub fn start_with_private_mysql(test: &str, redis_index: u32, gateways: usize) -> Cluster {
        let dir = scratch(test);
        let server = PrivateMysql::start(&dir);
        let redis = fresh_redis(redis_index);
        Self::start_with_db(
            dir,
            test,
            redis,
            None,
            Some(server),
            gateways,
            None,
            NO_ARGS,
        )
    }

    /// A deployment with a Redis of its own, which the test may kill.
    /// Two gateways, the first in a network namespace of the test's own (`Netns`): the
    /// broker and a private Redis listen on the host's end of the link, and every process
    /// reaches them there.
    pub fn start_with_netns_gateway(test: &str) -> Cluster {
        let dir = scratch(test);
        let ns = Netns::create("im-fault");
        let bind = format!("127.0.0.1 {}", Netns::HOST_IP);
        let server = PrivateRedis::start_bound(&dir, free_port(), &bind);
        let redis = format!("redis://{}:{}", Netns::HOST_IP, server.port);
        Self::start_with_db(dir, test, redis, Some(server), None, 2, Some(ns), NO_ARGS)
    }

    pub fn start_with_private_redis(test: &str, gateways: usize) -> Cluster {
        let dir = scratch(test);
        let server = PrivateRedis::start(&dir);
        Self::start_on(dir, test, server.url(), Some(server), gateways)
    }

    fn start_on(
        dir: PathBuf,
        test: &str,
        redis: String,
        redis_server: Option<PrivateRedis>,
        gateways: usize,
    ) -> Cluster {
        Self::start_with_db(
            dir,
            test,
            redis,
            redis_server,
            None,
            gateways,
            None,
            NO_ARGS,
        )
    }

    #[allow(clippy::too_many_arguments)]
    fn start_with_db(
        dir: PathBuf,
        test: &str,
        redis: String,
        redis_server: Option<PrivateRedis>,
        mysql_server: Option<PrivateMysql>,
        gateways: usize,
        netns: Option<Netns>,
        (gateway_args, logic_args): (&[&str], &[&str]),
    ) -> Cluster {
        let (broker, brokers) = match &netns {
            Some(_) => broker_at(&dir, free_port(), "0.0.0.0", Netns::HOST_IP),
            None => broker(&dir),
        };
        let db = fresh_db_on(test, mysql_server.as_ref().map_or(3306, |m| m.port));
        let api: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
        let logic =
            Self::spawn_logic_as(&dir, &brokers, &db, &redis, api, "logic-test", logic_args);
        wait_port(api, "im logic", Duration::from_secs(60));
        let persist = Self::spawn_persist(&dir, &brokers, &db);
        let mut gws = Vec::new();
        for i in 0..gateways {
            let inside = netns.as_ref().filter(|_| i == 0);
            let host = inside.map_or("127.0.0.1", |_| Netns::NS_IP);
            let addr: SocketAddr = format!("{host}:{}", free_port()).parse().unwrap();
            let mut cmd = match inside {
                Some(ns) => ns.command(env!("CARGO_BIN_EXE_im")),
                None => im(),
            };
            cmd.args([
                "gateway",
                "--ws-listen",
                &addr.to_string(),
                "--jwt-secret",
                SECRET,
            ])
            .args([
                "--gateway-id",
                &format!("gw{i}"),
                "--shards",
                "2",
                "--no-pin",
            ])
            .args(["--kafka-brokers", &brokers, "--redis-url", &redis])
            .args(["--msgs-per-sec-max", "1000"])
            .args(gateway_args)
            // In the registry under its own address, unless the test names a shared one.
            .args(if gateway_args.contains(&"--public-ws-url") {
                vec![]
            } else {
                vec!["--public-ws-url".to_string(), format!("ws://{addr}/ws")]
            })
            // Stopped at once unless a test drains on purpose (--drain-window-s).
            .env("IM_DRAIN_WINDOW_S", "0")
            .env("RUST_LOG", "info");
            let p = Proc::spawn(&format!("gateway{i}"), cmd, &dir);
            wait_port(addr, "im gateway", Duration::from_secs(60));
            gws.push((p, addr));
        }
        Cluster {
            dir,
            brokers,
            db,
            redis,
            api,
            broker,
            logic,
            persist,
            gateways: gws,
            redis_server,
            mysql_server,
            netns,
        }
    }

    /// Another logic instance of this deployment (`id`: its logic id and log name).
    pub fn spawn_another_logic(&self, id: &str) -> (Proc, SocketAddr) {
        self.spawn_another_logic_with(id, &[])
    }

    /// Another logic instance, with `extra` arguments.
    pub fn spawn_another_logic_with(&self, id: &str, extra: &[&str]) -> (Proc, SocketAddr) {
        let api: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
        let (dir, brokers, db, redis) = (&self.dir, &self.brokers, &self.db, &self.redis);
        let p = Self::spawn_logic_as(dir, brokers, db, redis, api, id, extra);
        wait_port(api, id, Duration::from_secs(60));
        (p, api)
    }

    fn spawn_logic_as(
        dir: &std::path::Path,
        brokers: &str,
        db: &str,
        redis: &str,
        api: SocketAddr,
        id: &str,
        extra: &[&str],
    ) -> Proc {
        let mut cmd = im();
        cmd.args(["logic", "--api-listen", &api.to_string(), "--mysql-url", db])
            .args([
                "--jwt-secret",
                SECRET,
                "--kafka-brokers",
                brokers,
                "--redis-url",
                redis,
            ])
            .args(["--argon2-m-kib", "8", "--logic-id", id])
            .args(extra)
            .env("RUST_LOG", log_filter());
        let name = if id == "logic-test" { "logic" } else { id };
        Proc::spawn(name, cmd, dir)
    }

    pub fn spawn_persist(dir: &std::path::Path, brokers: &str, db: &str) -> Proc {
        let mut cmd = im();
        cmd.args(["persist", "--mysql-url", db, "--kafka-brokers", brokers])
            .env("RUST_LOG", "info");
        Proc::spawn("persist", cmd, dir)
    }

    pub fn restart_logic(&mut self) {
        self.restart_logic_with(&[]);
    }

    /// Starts the first logic instance again (on its API port), with `extra` arguments.
    pub fn restart_logic_with(&mut self, extra: &[&str]) {
        let (dir, brokers, db, redis) = (&self.dir, &self.brokers, &self.db, &self.redis);
        self.logic = Self::spawn_logic_as(dir, brokers, db, redis, self.api, "logic-test", extra);
        wait_port(self.api, "im logic", Duration::from_secs(60));
    }

    /// Starts the broker again on its port and storage (after `broker.kill9()`).
    pub fn restart_broker(&mut self) {
        let port: u16 = self.brokers.rsplit(':').next().unwrap().parse().unwrap();
        self.broker = broker_on(&self.dir, port).0;
    }

    pub fn restart_persist(&mut self) {
        self.persist = Self::spawn_persist(&self.dir, &self.brokers, &self.db);
    }

    /// Logs of every process, for a failure message.
    pub fn logs(&self) -> String {
        let mut s = String::new();
        for p in [&self.broker, &self.logic, &self.persist]
            .into_iter()
            .chain(self.gateways.iter().map(|(p, _)| p))
        {
            s += &format!("\n===== {} =====\n{}", p.name, p.log_tail());
        }
        s
    }

    /// Registers a user through the REST API; (user id, token).
    pub fn user(&self, name: &str) -> (u64, String) {
        let v = self.register_and_login(name);
        (
            v["user_id"].as_str().unwrap().parse().unwrap(),
            v["token"].as_str().unwrap().to_string(),
        )
    }

    /// Registers `name` and logs in: login's whole answer (`ws_url` too).
    pub fn register_and_login(&self, name: &str) -> Value {
        let (st, v) = http(
            self.api,
            "POST",
            "/api/v1/users/register",
            None,
            &json!({"username": name, "password": "password-123"}),
        );
        assert_eq!(st, 201, "{v}");
        let (st, v) = http(
            self.api,
            "POST",
            "/api/v1/auth/login",
            None,
            &json!({"username": name, "password": "password-123"}),
        );
        assert_eq!(st, 200, "{v}");
        v
    }

    /// Creates a (private) group over REST as `owner` and joins each of `members` to it by
    /// an invite link; its id.
    pub fn group(&self, owner: &str, name: &str, members: &[&str]) -> u64 {
        group(self.api, owner, name, members)
    }

    pub fn ws(&self, gateway: usize, token: &str) -> Ws {
        Ws::connect(self.gateways[gateway].1, token)
    }
}

/// Creates a private group over `api` as `owner` and joins each of `members` to it by an
/// invite link, as people do; its id.
pub fn group(api: SocketAddr, owner: &str, name: &str, members: &[&str]) -> u64 {
    let (st, v) = http(
        api,
        "POST",
        "/api/v1/groups/create",
        Some(owner),
        &json!({ "name": name }),
    );
    assert_eq!(st, 201, "{v}");
    let gid: u64 = v["group_id"].as_str().unwrap().parse().unwrap();
    let (st, v) = http(
        api,
        "POST",
        &format!("/api/v1/groups/{gid}/invites"),
        Some(owner),
        &json!({}),
    );
    assert_eq!(st, 201, "{v}");
    let token = v["token"].as_str().unwrap();
    for t in members {
        let (st, v) = http(
            api,
            "POST",
            &format!("/api/v1/invites/{token}/join"),
            Some(t),
            &Value::Null,
        );
        assert_eq!(st, 200, "{v}");
    }
    gid
}

/// A minimal HTTP/1.1 client (one request per connection).
pub fn http(
    addr: SocketAddr,
    method: &str,
    path: &str,
    token: Option<&str>,
    body: &Value,
) -> (u16, Value) {
    let s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    http_on(s, method, path, token, body)
}

/// `http` over a stream of the caller's (TLS: `tls::connect`).
pub fn http_on<S: Read + Write>(
    mut s: S,
    method: &str,
    path: &str,
    token: Option<&str>,
    body: &Value,
) -> (u16, Value) {
    let body = if body.is_null() {
        String::new()
    } else {
        body.to_string()
    };
    let auth = token
        .map(|t| format!("Authorization: Bearer {t}\r\n"))
        .unwrap_or_default();
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: t\r\nConnection: close\r\n{auth}Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let mut r = BufReader::new(s);
    let mut status = String::new();
    r.read_line(&mut status).unwrap();
    let code: u16 = status.split_whitespace().nth(1).unwrap().parse().unwrap();
    let mut len = None;
    loop {
        let mut line = String::new();
        r.read_line(&mut line).unwrap();
        if line == "\r\n" || line.is_empty() {
            break;
        }
        if let Some(v) = line.to_ascii_lowercase().strip_prefix("content-length:") {
            len = v.trim().parse::<usize>().ok();
        }
    }
    let mut buf = Vec::new();
    match len {
        Some(n) => {
            buf.resize(n, 0);
            r.read_exact(&mut buf).unwrap();
        }
        None => {
            r.read_to_end(&mut buf).unwrap();
        }
    }
    (code, serde_json::from_slice(&buf).unwrap_or(Value::Null))
}

/// GET a text resource (`/metrics`).
pub fn get_text(addr: SocketAddr, path: &str) -> (u16, String) {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut all = String::new();
    let _ = s.read_to_string(&mut all);
    let code = all
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = all
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    (code, body)
}

/// The value of a Prometheus sample line starting with `name` (labels included).
pub fn metric(text: &str, name: &str) -> Option<u64> {
    text.lines()
        .find(|l| l.starts_with(name))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

pub struct Ws {
    ws: WebSocket<MaybeTlsStream<TcpStream>>,
    /// Whether `presence` frames are read (`with_presence`); by default they are skipped,
    /// so that tests of other things need not expect a contact's comings and goings.
    presence: bool,
}

impl Ws {
    pub fn connect(addr: SocketAddr, token: &str) -> Ws {
        let (ws, _) =
            tungstenite::connect(format!("ws://{addr}/ws?token={token}")).expect("upgrade");
        if let MaybeTlsStream::Plain(s) = ws.get_ref() {
            s.set_read_timeout(Some(Duration::from_millis(200)))
                .unwrap();
        }
        Ws {
            ws,
            presence: false,
        }
    }

    /// An upgrade that may fail (a gateway that is down).
    pub fn try_connect(addr: SocketAddr, token: &str) -> Result<Ws, String> {
        let s =
            TcpStream::connect_timeout(&addr, Duration::from_secs(2)).map_err(|e| e.to_string())?;
        s.set_read_timeout(Some(Duration::from_secs(5)))
            .map_err(|e| e.to_string())?;
        let (ws, _) = tungstenite::client(
            format!("ws://{addr}/ws?token={token}"),
            MaybeTlsStream::Plain(s),
        )
        .map_err(|e| e.to_string())?;
        if let MaybeTlsStream::Plain(s) = ws.get_ref() {
            s.set_read_timeout(Some(Duration::from_millis(200)))
                .map_err(|e| e.to_string())?;
        }
        Ok(Ws {
            ws,
            presence: false,
        })
    }

    /// This connection's reads return `presence` frames too.
    pub fn with_presence(mut self) -> Ws {
        self.presence = true;
        self
    }

    /// A text frame, unless it is one the reader skips.
    fn parse(&self, text: &str) -> Option<Value> {
        let v: Value = serde_json::from_str(text).unwrap();
        (self.presence || v["type"] != "presence").then_some(v)
    }

    pub fn send(&mut self, v: Value) {
        self.try_send(v).unwrap();
    }

    /// `send` that reports a lost connection.
    pub fn try_send(&mut self, v: Value) -> Result<(), String> {
        self.ws
            .send(tungstenite::Message::text(v.to_string()))
            .map_err(|e| e.to_string())
    }

    /// `recv` that reports a lost connection (or a close frame) instead of panicking.
    pub fn try_recv(&mut self, within: Duration) -> Result<Option<Value>, String> {
        let end = Instant::now() + within;
        loop {
            match self.ws.read() {
                Ok(tungstenite::Message::Text(t)) => {
                    if let Some(v) = self.parse(&t) {
                        return Ok(Some(v));
                    }
                }
                Ok(tungstenite::Message::Close(f)) => return Err(format!("closed: {f:?}")),
                Ok(_) => {}
                Err(tungstenite::Error::Io(e))
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                    ) => {}
                Err(e) => return Err(e.to_string()),
            }
            if Instant::now() >= end {
                return Ok(None);
            }
        }
    }

    /// The next JSON frame within `within`, or None.
    pub fn recv(&mut self, within: Duration) -> Option<Value> {
        let end = Instant::now() + within;
        loop {
            match self.ws.read() {
                Ok(tungstenite::Message::Text(t)) => {
                    if let Some(v) = self.parse(&t) {
                        return Some(v);
                    }
                }
                Ok(_) => {}
                Err(tungstenite::Error::Io(e))
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                    ) => {}
                Err(e) => panic!("websocket: {e}"),
            }
            if Instant::now() >= end {
                return None;
            }
        }
    }

    /// Frames until `pred` matches one (returned) or `within` passes (panics), keeping the
    /// others in `seen`.
    pub fn until(
        &mut self,
        within: Duration,
        seen: &mut Vec<Value>,
        pred: impl Fn(&Value) -> bool,
    ) -> Value {
        let end = Instant::now() + within;
        while Instant::now() < end {
            if let Some(v) = self.recv(Duration::from_millis(200)) {
                if pred(&v) {
                    return v;
                }
                seen.push(v);
            }
        }
        panic!("no matching frame within {within:?}; saw {seen:?}");
    }

    /// Everything that arrives within `within`.
    pub fn drain(&mut self, within: Duration) -> Vec<Value> {
        let end = Instant::now() + within;
        let mut out = Vec::new();
        while Instant::now() < end {
            if let Some(v) = self.recv(Duration::from_millis(100)) {
                out.push(v);
            }
        }
        out
    }

    /// Reads until the server's close frame: its code (None if the connection just ended).
    pub fn close_code(&mut self, within: Duration) -> Option<u16> {
        let end = Instant::now() + within;
        while Instant::now() < end {
            match self.ws.read() {
                Ok(tungstenite::Message::Close(f)) => return f.map(|f| u16::from(f.code)),
                Ok(_) => {}
                Err(tungstenite::Error::Io(e))
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                    ) => {}
                Err(_) => return None,
            }
        }
        panic!("no close within {within:?}");
    }

    /// The HTTP status of an upgrade attempt (101 when it worked).
    pub fn upgrade_status(addr: SocketAddr, token: &str) -> u16 {
        match tungstenite::connect(format!("ws://{addr}/ws?token={token}")) {
            Ok(_) => 101,
            Err(tungstenite::Error::Http(resp)) => resp.status().as_u16(),
            Err(e) => panic!("upgrade: {e}"),
        }
    }

    pub fn close(mut self) {
        let _ = self.ws.close(None);
        let _ = self.ws.flush();
    }
}

/// A webhook receiver on a free local port (offline push, docs/PROTOCOL.md): answers its first
/// request 503, as a busy receiver would, and the rest 204; hands each whole request (head and
/// body) to the channel. Returns its URL (`http://…/hook`).
pub fn webhook_receiver() -> (String, std::sync::mpsc::Receiver<String>) {
    let (url, raw) = push_receiver("204 No Content");
    let (tx, rx) = std::sync::mpsc::channel::<String>();
    std::thread::spawn(move || {
        for req in raw {
            if tx.send(String::from_utf8_lossy(&req).to_string()).is_err() {
                return;
            }
        }
    });
    (format!("{url}/hook"), rx)
}

/// A push receiver (a webhook's, or a stand-in for a browser's push service) on a free local
/// port: answers its first request 503, the rest `status`; hands each whole request, bytes,
/// to the channel. Returns its origin (`http://127.0.0.1:port`).
pub fn push_receiver(status: &'static str) -> (String, std::sync::mpsc::Receiver<Vec<u8>>) {
    http_receiver("503 Busy", status)
}

/// An HTTP receiver on a free local port: answers its first request `first`, the rest
/// `status`; hands each whole request, bytes, to the channel. Returns its origin.
pub fn http_receiver(
    first: &'static str,
    status: &'static str,
) -> (String, std::sync::mpsc::Receiver<Vec<u8>>) {
    use std::io::{Read, Write};
    let hook = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}", hook.local_addr().unwrap());
    let (tx, rx) = std::sync::mpsc::channel::<Vec<u8>>();
    std::thread::spawn(move || {
        for (i, s) in hook.incoming().enumerate() {
            let Ok(mut s) = s else { return };
            s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
            let mut req = Vec::new();
            let mut chunk = [0u8; 4096];
            // The request ends with its body (Content-Length), then we answer.
            while let Ok(n) = s.read(&mut chunk) {
                req.extend_from_slice(&chunk[..n]);
                let done = req
                    .windows(4)
                    .position(|w| w == b"\r\n\r\n")
                    .is_some_and(|end| {
                        let head = String::from_utf8_lossy(&req[..end]).to_string();
                        let len: usize = head
                            .lines()
                            .find_map(|l| l.strip_prefix("Content-Length: "))
                            .and_then(|v| v.parse().ok())
                            .unwrap_or(0);
                        req.len() >= end + 4 + len
                    });
                if n == 0 || done {
                    break;
                }
            }
            let status = if i == 0 { first } else { status };
            let answer = format!("HTTP/1.1 {status}\r\nContent-Length: 0\r\n\r\n");
            let _ = s.write_all(answer.as_bytes());
            if tx.send(req).is_err() {
                return;
            }
        }
    });
    (url, rx)
}

/// A push request's head (as text) and body (bytes).
pub fn split_request(req: &[u8]) -> (String, Vec<u8>) {
    let end = req
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .expect("a whole request");
    (
        String::from_utf8_lossy(&req[..end]).to_string(),
        req[end + 4..].to_vec(),
    )
}

/// A header of a request head.
pub fn header_of<'a>(head: &'a str, name: &str) -> Option<&'a str> {
    head.lines().find_map(|l| {
        let (n, v) = l.split_once(": ")?;
        n.eq_ignore_ascii_case(name).then_some(v)
    })
}

/// A webhook request's body, and whether its signature is right for `secret`.
pub fn webhook_body(req: &str, secret: &str) -> (Value, bool) {
    let header = |name: &str| req.lines().find_map(|l| l.strip_prefix(name)).unwrap_or("");
    let body = req.split("\r\n\r\n").nth(1).unwrap_or("");
    let ts: u64 = header("X-Im-Timestamp: ").parse().unwrap_or(0);
    let want = logic::push::webhook::signature(secret.as_bytes(), ts, body.as_bytes());
    let signed = header("X-Im-Signature: ") == format!("sha256={want}");
    (serde_json::from_str(body).unwrap_or(Value::Null), signed)
}

/// One exported span, as the test's collector read it.
#[derive(Debug, Clone)]
pub struct Span {
    pub service: String,
    pub trace: String,
    pub id: String,
    pub parent: Option<String>,
    pub name: String,
    pub start: u64,
    pub end: u64,
    pub attrs: std::collections::HashMap<String, Value>,
}

/// The spans of OTLP/HTTP JSON export requests (`ExportTraceServiceRequest`).
pub fn spans_of(body: &[u8]) -> Vec<Span> {
    let v: Value = serde_json::from_slice(body).expect("an OTLP JSON body");
    let mut out = Vec::new();
    for rs in v["resourceSpans"].as_array().unwrap() {
        let service = rs["resource"]["attributes"]
            .as_array()
            .unwrap()
            .iter()
            .find(|a| a["key"] == "service.name")
            .map(|a| a["value"]["stringValue"].as_str().unwrap().to_string())
            .unwrap();
        for ss in rs["scopeSpans"].as_array().unwrap() {
            for s in ss["spans"].as_array().unwrap() {
                let num = |k: &str| s[k].as_str().unwrap().parse::<u64>().unwrap();
                let attrs = s["attributes"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|a| {
                        let v = a["value"].as_object().unwrap().values().next().unwrap();
                        (a["key"].as_str().unwrap().to_string(), v.clone())
                    })
                    .collect();
                out.push(Span {
                    service: service.clone(),
                    trace: s["traceId"].as_str().unwrap().to_string(),
                    id: s["spanId"].as_str().unwrap().to_string(),
                    parent: s["parentSpanId"].as_str().map(str::to_string),
                    name: s["name"].as_str().unwrap().to_string(),
                    start: num("startTimeUnixNano"),
                    end: num("endTimeUnixNano"),
                    attrs,
                });
            }
        }
    }
    out
}

/// Reads export requests from the test's collector (`http_receiver`) until `whole` finds a
/// whole trace among the spans so far (given every span, it answers that trace's), within
/// `within`; `context` is printed if none comes.
pub fn collect_trace(
    requests: &std::sync::mpsc::Receiver<Vec<u8>>,
    within: Duration,
    whole: impl Fn(&[Span]) -> Option<Vec<Span>>,
    context: impl Fn() -> String,
) -> Vec<Span> {
    let mut spans: Vec<Span> = Vec::new();
    let end = std::time::Instant::now() + within;
    loop {
        if let Some(t) = whole(&spans) {
            return t;
        }
        let left = end.saturating_duration_since(std::time::Instant::now());
        match requests.recv_timeout(left) {
            Ok(req) => {
                let (head, body) = split_request(&req);
                assert!(head.starts_with("POST /v1/traces HTTP/1.1"), "{head}");
                assert_eq!(header_of(&head, "content-type"), Some("application/json"));
                spans.extend(spans_of(&body));
            }
            Err(_) => panic!("the trace is not whole: {spans:#?}\n{}", context()),
        }
    }
}

/// The trace of the first `im.send` among `spans` if it holds each of `names` once and
/// `delivers` `im.deliver` spans.
pub fn trace_with(spans: &[Span], names: &[&str], delivers: usize) -> Option<Vec<Span>> {
    let root = spans.iter().find(|s| s.name == "im.send")?;
    let of: Vec<&Span> = spans.iter().filter(|s| s.trace == root.trace).collect();
    let named = |n: &str| of.iter().filter(|s| s.name == n).count();
    (names.iter().all(|n| named(n) == 1) && named("im.deliver") == delivers)
        .then(|| of.into_iter().cloned().collect())
}
