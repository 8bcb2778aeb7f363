//! `im-bench`: the whole-system harness. `hold` opens and holds connections and measures the
//! gateway's memory per connection; `p2p` measures 1:1 delivery throughput and latency.
//! Micro-benchmarks (criterion) live in `benches/`.

mod api;
mod baseline;
mod broker_probe;
mod drain;
mod fanout;
mod gateway;
mod hold;
mod otlp_sink;
mod p2p;
mod persist_local;
mod pipeline;
mod presence;
mod proc;
mod raw_fanout;
mod scrape;
mod ws;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "im-bench", about = "Load harness for the im gateway")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Open and hold N connections; report connect rates and gateway bytes per connection.
    Hold(hold::HoldArgs),
    /// Hold N idle connections pinging every --ping-interval-s and report what the
    /// heartbeats cost the gateway: CPU (user and kernel apart) and CPU per ping.
    Heartbeat(hold::HoldArgs),
    /// 1:1 messages between pairs of users: delivered/s and latency percentiles.
    P2p(p2p::P2pArgs),
    /// How long a user's arrival and departure take to reach a contact, beside a message.
    Presence(presence::PresenceArgs),
    /// Logins per second against the REST API (argon2id is the cost).
    Logins(api::LoginsArgs),
    /// History page latency (seed the database with `seed-messages` first).
    History(api::HistoryArgs),
    /// Print SQL that stores N messages, for `history`.
    SeedMessages(api::SeedArgs),
    /// Print SQL for benchmark users (and a group of them), for runs against `im logic`.
    SeedUsers(pipeline::SeedUsersArgs),
    /// Group messages to every online member: deliveries per server CPU-second and latency to
    /// each and to the last member (one epoll reader thread; it reports its own CPU).
    Fanout(fanout::FanoutArgs),
    /// Broker produce rate, persist rows/s on a backlog, and single-row INSERTs.
    PersistRate(pipeline::PersistRateArgs),
    /// The broker alone along the message's three hops, with the pipeline's client settings.
    BrokerProbe(broker_probe::BrokerProbeArgs),
    /// persist alone (in-process bus → MariaDB or SQLite) against single-row INSERTs and a
    /// bare multi-row INSERT into a primary-key-only table (the floor), in one run.
    PersistLocal(persist_local::PersistLocalArgs),
    /// The baseline server (tokio + tokio-tungstenite, a task per connection) for ratios.
    Baseline(baseline::BaselineArgs),
    /// The fan-out floor: each `send` re-framed once and written to every other connection
    /// by a plain loop (run `fanout --baseline` against it).
    RawFanout(raw_fanout::RawFanoutArgs),
    /// Internal: one client process of `hold`.
    #[command(hide = true)]
    Worker(hold::WorkerArgs),
    /// N connections on one gateway, then SIGTERM to it: how long its drain takes to move
    /// every client to another gateway.
    Drain(drain::DrainArgs),
    /// An OTLP/HTTP collector that counts spans and keeps nothing (tracing's cost, measured
    /// by benches/tracing.sh).
    OtlpSink(otlp_sink::OtlpSinkArgs),
    /// Internal: one client process of `drain`.
    #[command(hide = true)]
    DrainWorker(drain::DrainWorkerArgs),
}

/// Runs `f` to completion on a single-threaded tokio runtime with a `LocalSet` (the harness's
/// clients are `!Send` tasks on one core).
pub(crate) fn run_local<T>(f: impl std::future::Future<Output = T>) -> T {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    tokio::task::LocalSet::new().block_on(&rt, f)
}

fn write_json<T: serde::Serialize>(path: Option<&std::path::Path>, v: &T) {
    let Some(path) = path else { return };
    let text = serde_json::to_string_pretty(v).expect("serialise");
    if let Err(e) = std::fs::write(path, text + "\n") {
        eprintln!("im-bench: writing {}: {e}", path.display());
    }
}

fn main() {
    match Cli::parse().cmd {
        Cmd::Drain(a) => {
            let json = a.json.clone();
            let r = drain::drain(a);
            drain::print(&r);
            write_json(json.as_deref(), &r);
        }
        Cmd::DrainWorker(a) => drain::worker(a),
        Cmd::OtlpSink(a) => {
            let json = a.json.clone();
            let r = otlp_sink::sink(a);
            otlp_sink::print(&r);
            write_json(json.as_deref(), &r);
        }
        Cmd::Hold(a) => {
            let json = a.json.clone();
            let r = hold::hold(a);
            hold::print(&r);
            write_json(json.as_deref(), &r);
        }
        Cmd::Heartbeat(a) => {
            let json = a.json.clone();
            let r = hold::hold(a);
            hold::print_heartbeat(&r);
            write_json(json.as_deref(), &r);
        }
        Cmd::P2p(a) => {
            let json = a.json.clone();
            let r = p2p::p2p(a);
            p2p::print(&r);
            write_json(json.as_deref(), &r);
        }
        Cmd::Presence(a) => {
            let json = a.json.clone();
            let r = presence::presence(a);
            presence::print(&r);
            write_json(json.as_deref(), &r);
        }
        Cmd::Logins(a) => {
            let json = a.json.clone();
            let r = api::logins(a);
            api::print("logins", &r);
            write_json(json.as_deref(), &r);
        }
        Cmd::History(a) => {
            let json = a.json.clone();
            let r = api::history(a);
            api::print("history pages", &r);
            write_json(json.as_deref(), &r);
        }
        Cmd::SeedMessages(a) => api::seed(a),
        Cmd::SeedUsers(a) => pipeline::seed_users(a),
        Cmd::Fanout(a) => {
            let json = a.json.clone();
            let r = fanout::fanout(a);
            fanout::print(&r);
            write_json(json.as_deref(), &r);
        }
        Cmd::PersistRate(a) => {
            let json = a.json.clone();
            let r = pipeline::persist_rate(a);
            pipeline::print_persist(&r);
            write_json(json.as_deref(), &r);
        }
        Cmd::BrokerProbe(a) => {
            let json = a.json.clone();
            let r = broker_probe::run(a);
            broker_probe::print(&r);
            write_json(json.as_deref(), &r);
        }
        Cmd::PersistLocal(a) => {
            let json = a.json.clone();
            let r = persist_local::run(a);
            persist_local::print(&r);
            write_json(json.as_deref(), &r);
        }
        Cmd::Baseline(a) => baseline::run(a),
        Cmd::RawFanout(a) => raw_fanout::run(a),
        Cmd::Worker(a) => hold::worker(a),
    }
}
