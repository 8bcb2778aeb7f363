//! Snowflake worker ids leased from Redis, one per logic instance (`im_shared::snowflake`
//! says why two minters must never share one).
//!
//! - A lease is the key `<prefix><worker>` set with `SET NX PX ttl` to a value unique to this
//!   process (`<holder>/<pid>/<nonce>`), so a restarted instance never mistakes its
//!   predecessor's key for its own: it takes another free id instead of waiting.
//! - `acquire` tries the wanted id only (`--worker-id`: refuse to start if it is held), or
//!   every id from a hint on; none free, or Redis unreachable, is an error and the process does
//!   not start.
//! - A keeper task renews every `renew_every` with a compare-and-extend script. After each
//!   renewal Redis confirmed, the process may mint until `ttl` − `margin` after *the moment
//!   the renewal was sent*: Redis's key outlives that, so nobody else can hold the id while
//!   this process still mints with it.
//! - Redis down: renewals fail, the process keeps minting until that deadline, then its sends
//!   get a retryable error (5032) until Redis answers again and the lease is renewed or
//!   retaken. A renewal that finds the key gone or someone else's (the lease ran out during
//!   an outage and another instance took the id) stops minting at once and leases another id.
//! - On shutdown the keeper deletes its key (if still its own), so the id is free at once.
//!
//! Clocks: ids carry wall-clock milliseconds. The next holder of an id mints no earlier than
//! `margin` after this one stopped (in real time), so the two cannot overlap unless their
//! hosts' clocks differ by more than `margin` (default 2 s); keep hosts on NTP. A Redis that
//! fails over to a replica that had not yet seen a lease can hand the id out twice; run the
//! lease store as one primary (or accept that window).

use im_shared::snowflake::{WorkerLease, WORKER_MAX};
use redis::aio::ConnectionManager;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::watch;

/// Where and how long leases are held.
#[derive(Clone, Debug)]
pub struct LeaseSettings {
    /// Key prefix; the worker id follows it.
    pub prefix: String,
    /// The key's TTL in Redis.
    pub ttl: Duration,
    /// How often the keeper renews (well under `ttl`, so a renewal or two may fail).
    pub renew_every: Duration,
    /// Taken off each renewal's validity: the clock-rate and clock-skew allowance.
    pub margin: Duration,
}

impl Default for LeaseSettings {
    fn default() -> LeaseSettings {
        LeaseSettings {
            prefix: "im:snowflake:worker:".into(),
            ttl: Duration::from_secs(10),
            renew_every: Duration::from_secs(2),
            margin: Duration::from_secs(2),
        }
    }
}

/// Extends the key only if it is still ours: 1 extended, 0 gone or someone else's.
const RENEW: &str = "if redis.call('GET', KEYS[1]) == ARGV[1] then \
     return redis.call('PEXPIRE', KEYS[1], ARGV[2]) else return 0 end";
/// Deletes the key only if it is still ours.
const RELEASE: &str = "if redis.call('GET', KEYS[1]) == ARGV[1] then \
     return redis.call('DEL', KEYS[1]) else return 0 end";

/// A held lease: the shared `WorkerLease` the generators read, and its keeper task.
pub struct HeldLease {
    pub lease: Arc<WorkerLease>,
    /// The keeper: renews until `stop` turns true, then releases the key.
    pub keeper: tokio::task::JoinHandle<()>,
}

/// Leases a worker id for `holder` (a name for operators: which instance holds an id), and
/// starts its keeper; it stops and releases the id when `stop` turns true.
/// `want`: exactly this id or an error; else the first free one from `hint` on.
pub async fn acquire(
    redis_url: &str,
    holder: &str,
    want: Option<u16>,
    hint: u16,
    settings: LeaseSettings,
    stop: watch::Receiver<bool>,
) -> Result<HeldLease, String> {
    let client = redis::Client::open(redis_url).map_err(|e| format!("redis url: {e}"))?;
    let conn = tokio::time::timeout(settings.ttl, ConnectionManager::new(client))
        .await
        .map_err(|_| "redis did not answer".to_string())?
        .map_err(|e| e.to_string())?;
    let value = format!(
        "{holder}/{}/{:016x}",
        std::process::id(),
        im_shared::conv::mix64(im_shared::unix_ms() ^ ((std::process::id() as u64) << 32))
    );
    let mut keeper = Keeper {
        conn,
        value,
        settings,
        worker: 0,
    };
    let lease = Arc::new(WorkerLease::none());
    let (worker, sent) = keeper.take(want, hint).await?;
    lease.grant(worker, keeper.valid_until(sent));
    log::info!(
        "leased Snowflake worker {worker} as {} (ttl {:?}, renewed every {:?})",
        keeper.value,
        keeper.settings.ttl,
        keeper.settings.renew_every
    );
    let keeper = tokio::spawn(keeper.keep(lease.clone(), hint, stop));
    Ok(HeldLease { lease, keeper })
}

struct Keeper {
    conn: ConnectionManager,
    value: String,
    settings: LeaseSettings,
    /// The id held (or last held).
    worker: u16,
}

impl Keeper {
    fn key(&self, worker: u16) -> String {
        format!("{}{worker}", self.settings.prefix)
    }

    fn valid_until(&self, sent: Instant) -> Instant {
        sent + self.settings.ttl.saturating_sub(self.settings.margin)
    }

    /// Takes `want`, or the first free id from `hint` on; with the instant the winning
    /// request was sent.
    async fn take(&mut self, want: Option<u16>, hint: u16) -> Result<(u16, Instant), String> {
        let candidates: Vec<u16> = match want {
            Some(w) => vec![w],
            None => (0..=WORKER_MAX)
                .map(|i| (hint.wrapping_add(i)) & WORKER_MAX)
                .collect(),
        };
        for w in candidates {
            let sent = Instant::now();
            let set: Option<String> = self
                .call(
                    redis::cmd("SET")
                        .arg(self.key(w))
                        .arg(&self.value)
                        .arg("NX")
                        .arg("PX")
                        .arg(self.settings.ttl.as_millis() as u64),
                )
                .await?;
            if set.is_some() {
                self.worker = w;
                return Ok((w, sent));
            }
        }
        Err(match want {
            Some(w) => {
                let by: Option<String> = self.call(redis::cmd("GET").arg(self.key(w))).await?;
                format!(
                    "Snowflake worker id {w} is leased by {} until its TTL runs out; give another --worker-id, or none to take a free one",
                    by.unwrap_or_else(|| "another instance".into())
                )
            }
            None => format!(
                "all {} Snowflake worker ids are leased ({}*): too many logic instances",
                WORKER_MAX as u32 + 1,
                self.settings.prefix
            ),
        })
    }

    /// `script` (`RENEW`, `RELEASE`) on the key of the id held, with this holder's value.
    fn script(&self, script: &str) -> redis::Cmd {
        let mut cmd = redis::cmd("EVAL");
        cmd.arg(script)
            .arg(1)
            .arg(self.key(self.worker))
            .arg(&self.value);
        cmd
    }

    /// One command, bounded by the lease's TTL (a Redis that stops answering is down).
    async fn call<T: redis::FromRedisValue>(&mut self, cmd: &redis::Cmd) -> Result<T, String> {
        match tokio::time::timeout(self.settings.ttl, cmd.query_async(&mut self.conn)).await {
            Ok(r) => r.map_err(|e| format!("redis: {e}")),
            Err(_) => Err("redis did not answer".into()),
        }
    }

    /// Renews until `stop`, re-leasing after a loss; then releases the key.
    async fn keep(mut self, lease: Arc<WorkerLease>, hint: u16, mut stop: watch::Receiver<bool>) {
        let mut tick = tokio::time::interval(self.settings.renew_every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        tick.tick().await;
        let mut down_since: Option<Instant> = None;
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                _ = stop.wait_for(|s| *s) => break,
            }
            let sent = Instant::now();
            let renewed: Result<i64, String> = self
                .call(self.script(RENEW).arg(self.settings.ttl.as_millis() as u64))
                .await;
            match renewed {
                Ok(1) => {
                    lease.grant(self.worker, self.valid_until(sent));
                    if let Some(t) = down_since.take() {
                        log::info!(
                            "Snowflake worker {}: lease renewed after {:?} without Redis",
                            self.worker,
                            t.elapsed()
                        );
                    }
                }
                Ok(_) => {
                    // Gone or someone else's: whatever we minted was under a valid lease,
                    // but not one more id with this worker.
                    lease.revoke();
                    log::error!(
                        "Snowflake worker {}: the lease was lost (its key expired or is held by another); leasing another id",
                        self.worker
                    );
                    match self.take(None, hint).await {
                        Ok((w, sent)) => {
                            lease.grant(w, self.valid_until(sent));
                            log::info!("leased Snowflake worker {w} as {}", self.value);
                            down_since = None;
                        }
                        Err(e) => log::error!("leasing a Snowflake worker id: {e}"),
                    }
                }
                Err(e) => {
                    if down_since.is_none() {
                        down_since = Some(sent);
                        log::warn!(
                            "Snowflake worker {}: renewing the lease: {e}; minting stops when it runs out",
                            self.worker
                        );
                    }
                }
            }
        }
        lease.revoke();
        let released: Result<i64, String> = self.call(&self.script(RELEASE)).await;
        if let Err(e) = released {
            log::warn!(
                "releasing Snowflake worker {}: {e} (it frees itself after its TTL)",
                self.worker
            );
        }
    }
}
