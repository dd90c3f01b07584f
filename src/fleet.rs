//! The fleet store (`[store] backend = "redis"`): what the gateways of a
//! fleet share through one Redis, beside each one's own local store, which
//! stays the source of truth for its registrations. Owns:
//!
//! - a session per registration, `<prefix>session:<container_id>` (JSON:
//!   container_id, organization_uuid, source_ip, gateway, jti, created_at,
//!   expires_at) with a TTL of the token's remaining life, gone with the
//!   registration;
//! - revocations: a sorted set `<prefix>revoked` (jti by expiry) and a
//!   message on the channel `<prefix>revocations`, which every gateway
//!   subscribes to and applies (and keeps in its local store, so a restart
//!   still refuses them). Pub/sub rather than keyspace notifications: it
//!   needs no server configuration (`notify-keyspace-events`), and the
//!   sorted set is what a gateway reads to catch up after missing messages;
//! - health: `sluice_store_up` is 1 while Redis answers; when it does not,
//!   the gateway serves from its local state and retries with backoff, and
//!   when it answers again it re-seeds what an empty Redis lost (its
//!   registrations' sessions and every revocation it knows that has not
//!   expired), then tells the fleet to re-read the sorted set. "Up" is
//!   Redis answering and the re-seed written, never the catch-up read; a
//!   re-seed that fails waits longer each time (up to `MAX_RESEED_WAIT`).
//!
//! Everything read from Redis is input from peers, as hostile as a
//! sandbox's: a revocation's jti must look like one, its expiry is read
//! as the double Redis stores and cut to the longest life a token may
//! have here (`auth.max_ttl_s`), an entry that does not parse is skipped
//! and counted (`sluice_fleet_entries_rejected_total`, logged once), and
//! one read applies at most `MAX_READ` revocations.
//!
//! The client is the `redis` crate (its tokio connection manager for
//! commands, a pub/sub connection for the channel).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use futures_util::StreamExt;
use tokio::sync::mpsc;

use crate::identity::Registry;
use crate::identity::store::{Change, SandboxRecord, Store};
use crate::identity::token::{Verifier, claims_unverified, now_s};
use crate::shutdown::Shutdown;

/// How often Redis is asked whether it is there, and the longest wait
/// between reconnection attempts.
const PING_EVERY: Duration = Duration::from_millis(500);
const MAX_BACKOFF: Duration = Duration::from_secs(5);
/// A full read of the revocations, whatever the messages said.
const SYNC_EVERY: Duration = Duration::from_secs(30);
const TIMEOUT: Duration = Duration::from_secs(1);
/// The longest wait between re-seeds that fail: a fleet that cannot
/// re-seed does not drive Redis with a write burst every ping.
const MAX_RESEED_WAIT: Duration = Duration::from_secs(30);
/// Revocations one catch-up read applies at most (the nearest expiries
/// first): a peer that floods the set cannot make a read unbounded.
const MAX_READ: usize = 100_000;
/// Revocations a gateway holds at most before it refuses the fleet's new
/// ones (about 100 B each): far above what a fleet revokes within the
/// longest token life, far below what hurts.
const MAX_HELD: usize = 1_000_000;

/// This gateway's side of the fleet store.
pub struct Fleet {
    client: redis::Client,
    prefix: String,
    gateway: String,
    up: AtomicBool,
    /// A `sync` message asks for a read of the revocations; many coalesce
    /// into one, on the command connection.
    sync_now: tokio::sync::Notify,
    /// Whether a refused fleet entry was logged already (once is enough;
    /// the counter has the rest).
    rejected_logged: AtomicBool,
}

impl std::fmt::Debug for Fleet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Fleet")
            .field("prefix", &self.prefix)
            .field("gateway", &self.gateway)
            .field("up", &self.is_up())
            .finish()
    }
}

/// What the fleet needs of this gateway.
#[derive(Clone)]
pub struct Local {
    pub registry: Arc<Registry>,
    pub verifier: Arc<Verifier>,
    pub store: Arc<Store>,
    /// The data plane, once it is made: what a peer's token replacement
    /// re-checks the live connections with.
    pub gateway: Arc<std::sync::OnceLock<Arc<crate::proxy::Gateway>>>,
}

#[derive(serde::Serialize)]
struct Session<'a> {
    container_id: &'a str,
    organization_uuid: Option<&'a str>,
    source_ip: std::net::IpAddr,
    gateway: &'a str,
    jti: &'a str,
    created_at: u64,
    expires_at: u64,
}

impl Fleet {
    /// Checks the URL; connects later, in [`run`](Fleet::run).
    pub fn new(url: &str, prefix: &str, gateway: &str) -> redis::RedisResult<Fleet> {
        Ok(Fleet {
            client: redis::Client::open(url)?,
            prefix: prefix.to_owned(),
            gateway: gateway.to_owned(),
            up: AtomicBool::new(false),
            sync_now: tokio::sync::Notify::new(),
            rejected_logged: AtomicBool::new(false),
        })
    }

    pub fn is_up(&self) -> bool {
        self.up.load(Ordering::Acquire)
    }

    fn set_up(&self, up: bool) {
        self.up.store(up, Ordering::Release);
        ::metrics::gauge!(crate::metrics::STORE_UP).set(if up { 1.0 } else { 0.0 });
    }

    fn key(&self, what: &str) -> String {
        format!("{}{what}", self.prefix)
    }

    fn session_key(&self, id: &str) -> String {
        self.key(&format!("session:{id}"))
    }

    fn channel(&self) -> String {
        self.key("revocations")
    }

    /// Adds one local change to a pipeline.
    fn add(&self, pipe: &mut redis::Pipeline, change: &Change, now: u64) {
        match change {
            Change::Put(record) => self.add_session(pipe, record, now),
            Change::Remove(id) => {
                pipe.del(self.session_key(id)).ignore();
            }
            Change::Revoke { jti, exp } => {
                pipe.zadd(self.key("revoked"), jti, *exp).ignore();
                pipe.publish(self.channel(), format!("revoke {jti} {exp}"))
                    .ignore();
            }
            Change::Forget(jti) => {
                pipe.zrem(self.key("revoked"), jti).ignore();
            }
            // Kept in the sorted set as a revocation (a gateway that misses
            // the message closes the old token's connections when it reads
            // the set: it fails closed); the message carries the new token.
            Change::Replace { jti, exp, token } => {
                pipe.zadd(self.key("revoked"), jti, *exp).ignore();
                pipe.publish(self.channel(), format!("replace {jti} {exp} {token}"))
                    .ignore();
            }
        }
    }

    fn add_session(&self, pipe: &mut redis::Pipeline, record: &SandboxRecord, now: u64) {
        let Ok(claims) = claims_unverified(&record.token) else {
            return;
        };
        let ttl = claims.exp.saturating_sub(now);
        if ttl == 0 {
            return;
        }
        let session = Session {
            container_id: &record.container_id,
            organization_uuid: claims.organization_uuid.as_deref(),
            source_ip: record.source_ip,
            gateway: &self.gateway,
            jti: &claims.jti,
            created_at: now,
            expires_at: claims.exp,
        };
        if let Ok(json) = serde_json::to_string(&session) {
            pipe.set_ex(self.session_key(&record.container_id), json, ttl)
                .ignore();
        }
    }

    /// Runs until shutdown: connects (retrying with backoff), forwards the
    /// local store's changes, watches Redis's health, re-seeds it after an
    /// outage and follows the fleet's revocations.
    pub async fn run(
        self: Arc<Fleet>,
        local: Local,
        mut changes: mpsc::UnboundedReceiver<Vec<Change>>,
        shutdown: Shutdown,
    ) {
        self.set_up(false);
        let config = redis::aio::ConnectionManagerConfig::new()
            .set_connection_timeout(Some(TIMEOUT))
            .set_response_timeout(Some(TIMEOUT))
            .set_number_of_retries(1)
            .set_max_delay(MAX_BACKOFF);
        let mut backoff = Duration::from_millis(100);
        let mut conn = loop {
            let attempt = tokio::time::timeout(
                TIMEOUT * 2,
                self.client
                    .get_connection_manager_with_config(config.clone()),
            );
            tokio::select! {
                r = attempt => match r {
                    Ok(Ok(c)) => break c,
                    Ok(Err(e)) => tracing::debug!(error = %e, "redis: not connected"),
                    Err(_) => tracing::debug!("redis: connection timed out"),
                },
                _ = shutdown.stopping() => return,
            }
            // Changes made meanwhile are in the local store; the re-seed
            // after connecting carries them.
            while changes.try_recv().is_ok() {}
            tokio::select! {
                _ = tokio::time::sleep(backoff) => {}
                _ = shutdown.stopping() => return,
            }
            backoff = (backoff * 2).min(MAX_BACKOFF);
        };
        tokio::spawn(Arc::clone(&self).follow(local.clone(), shutdown.clone()));
        let mut ping = tokio::time::interval(PING_EVERY);
        ping.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut sync = tokio::time::interval(SYNC_EVERY);
        sync.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        // When the next re-seed may be tried, and how long after that.
        let mut reseed_at = tokio::time::Instant::now();
        let mut reseed_wait = PING_EVERY;
        loop {
            tokio::select! {
                batch = changes.recv() => {
                    let Some(batch) = batch else { return };
                    // While Redis is away, changes wait in the local store
                    // for the re-seed.
                    if !self.is_up() {
                        continue;
                    }
                    let mut pipe = redis::pipe();
                    let now = now_s();
                    for change in &batch {
                        self.add(&mut pipe, change, now);
                    }
                    if let Err(e) = pipe.query_async::<()>(&mut conn).await {
                        tracing::warn!(error = %e, "redis: a change was not shared; re-seeding when it answers");
                        self.set_up(false);
                    }
                }
                _ = ping.tick() => {
                    let alive = redis::cmd("PING").query_async::<String>(&mut conn).await.is_ok();
                    if alive && !self.is_up() && tokio::time::Instant::now() >= reseed_at {
                        match self.reseed(&mut conn, &local).await {
                            Ok(()) => {
                                self.set_up(true);
                                reseed_wait = PING_EVERY;
                                tracing::info!("redis: connected; sessions and revocations shared");
                                // Up does not wait for (or depend on) the read.
                                if let Err(e) = self.catch_up(&mut conn, &local).await {
                                    tracing::warn!(error = %e, "redis: revocations not read");
                                }
                            }
                            Err(e) => {
                                reseed_wait = (reseed_wait * 2).min(MAX_RESEED_WAIT);
                                tracing::warn!(error = %e, retry_in = ?reseed_wait, "redis: re-seed failed");
                            }
                        }
                        reseed_at = tokio::time::Instant::now() + reseed_wait;
                    } else if !alive && self.is_up() {
                        tracing::warn!("redis: not answering; serving from local state");
                        self.set_up(false);
                    }
                }
                _ = self.sync_now.notified() => {
                    if self.is_up() && let Err(e) = self.catch_up(&mut conn, &local).await {
                        tracing::debug!(error = %e, "redis: revocations not read");
                    }
                }
                _ = sync.tick() => {
                    if self.is_up() && let Err(e) = self.catch_up(&mut conn, &local).await {
                        tracing::debug!(error = %e, "redis: revocations not read");
                    }
                }
                _ = shutdown.stopping() => return,
            }
        }
    }

    /// Runs until shutdown: takes slices of the organisation budgets for
    /// this gateway when they run low (`INCRBY` on the day's key, which
    /// lives two days), so no splice waits on Redis. While Redis is away
    /// no slice is granted: the flows of an organisation whose slices are
    /// spent wait (see [`crate::limits::org`]).
    pub async fn lease(
        self: Arc<Fleet>,
        orgs: Arc<crate::limits::org::OrgBudgets>,
        shutdown: Shutdown,
    ) {
        if orgs.is_empty() {
            return;
        }
        let woken = orgs.woken();
        let mut conn: Option<redis::aio::MultiplexedConnection> = None;
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = woken.notified() => {}
                _ = tick.tick() => {}
                _ = shutdown.stopping() => return,
            }
            let day = crate::limits::day_of(now_s());
            for budget in orgs.all() {
                if !budget.wants_slice(day) {
                    continue;
                }
                if conn.is_none() {
                    let connect = self.client.get_multiplexed_async_connection();
                    conn = tokio::time::timeout(TIMEOUT, connect)
                        .await
                        .ok()
                        .and_then(Result::ok);
                }
                let Some(c) = conn.as_mut() else {
                    tracing::debug!("redis: no slice of an organisation budget (not connected)");
                    break;
                };
                let key = self.key(&format!("org:{}:{day}", budget.uuid));
                let slice = budget.slice();
                let mut pipe = redis::pipe();
                pipe.incr(&key, slice).expire(&key, 2 * 86_400).ignore();
                match tokio::time::timeout(TIMEOUT, pipe.query_async::<(u64,)>(c)).await {
                    Ok(Ok((total,))) => budget.leased(day, slice, total),
                    Ok(Err(e)) => {
                        tracing::debug!(error = %e, "redis: no slice of an organisation budget");
                        conn = None;
                    }
                    Err(_) => conn = None,
                }
            }
        }
    }

    /// What an empty Redis lost: this gateway's registrations' sessions and
    /// every live revocation it knows (each already within the longest
    /// token life); then the fleet is told to re-read the revocations.
    async fn reseed(
        &self,
        conn: &mut redis::aio::ConnectionManager,
        local: &Local,
    ) -> redis::RedisResult<()> {
        let now = now_s();
        let mut pipe = redis::pipe();
        for s in local.registry.list() {
            self.add_session(&mut pipe, &SandboxRecord::of(&s, None), now);
        }
        for (jti, exp) in local.verifier.revoked() {
            if exp >= now {
                pipe.zadd(self.key("revoked"), jti, exp).ignore();
            }
        }
        pipe.zrembyscore(self.key("revoked"), 0, now.saturating_sub(1))
            .ignore();
        pipe.publish(self.channel(), "sync").ignore();
        pipe.query_async::<()>(conn).await
    }

    /// Applies the revocations in the sorted set that this gateway does
    /// not know yet (and keeps them in the local store): only those whose
    /// expiry lies between now and the longest life a token may have here
    /// (anything later revokes no token this gateway accepts), at most
    /// `MAX_READ` of them, each read as stored and skipped when it does
    /// not parse.
    async fn catch_up(
        &self,
        conn: &mut redis::aio::ConnectionManager,
        local: &Local,
    ) -> redis::RedisResult<()> {
        let now = now_s();
        let latest = local.verifier.latest_exp(now);
        let raw: Vec<redis::Value> = redis::cmd("ZRANGEBYSCORE")
            .arg(self.key("revoked"))
            .arg(now)
            .arg(latest)
            .arg("WITHSCORES")
            .arg("LIMIT")
            .arg(0)
            .arg(MAX_READ)
            .query_async(conn)
            .await?;
        let (entries, rejected) = parse_scored(raw);
        self.rejected(rejected);
        let entries = self.valid(entries);
        let over = apply_revocations(local, entries).await;
        self.rejected(over);
        Ok(())
    }

    /// Counts (and logs once) fleet entries that were refused.
    fn rejected(&self, count: usize) {
        if count == 0 {
            return;
        }
        ::metrics::counter!(crate::metrics::FLEET_REJECTED).increment(count as u64);
        if !self.rejected_logged.swap(true, Ordering::Relaxed) {
            tracing::warn!(
                count,
                "redis: fleet entries that do not parse were skipped (counted in sluice_fleet_entries_rejected_total; logged once)"
            );
        }
    }

    /// The entries whose jti looks like one; the rest counted.
    fn valid(&self, entries: Vec<(String, u64)>) -> Vec<(String, u64)> {
        let before = entries.len();
        let kept: Vec<_> = entries.into_iter().filter(|(j, _)| is_jti(j)).collect();
        self.rejected(before - kept.len());
        kept
    }

    /// Follows the revocation channel, resubscribing after any loss.
    async fn follow(self: Arc<Fleet>, local: Local, shutdown: Shutdown) {
        let mut backoff = Duration::from_millis(100);
        loop {
            match tokio::time::timeout(TIMEOUT * 2, self.client.get_async_pubsub()).await {
                Ok(Ok(mut pubsub)) => {
                    if pubsub.subscribe(self.channel()).await.is_ok() {
                        backoff = Duration::from_millis(100);
                        let mut messages = pubsub.on_message();
                        loop {
                            tokio::select! {
                                m = messages.next() => {
                                    let Some(m) = m else { break };
                                    let Ok(text) = m.get_payload::<String>() else { continue };
                                    self.on_message(&text, &local).await;
                                }
                                _ = shutdown.stopping() => return,
                            }
                        }
                    }
                }
                Ok(Err(e)) => tracing::debug!(error = %e, "redis: cannot subscribe"),
                Err(_) => tracing::debug!("redis: subscribing timed out"),
            }
            tokio::select! {
                _ = tokio::time::sleep(backoff) => {}
                _ = shutdown.stopping() => return,
            }
            backoff = (backoff * 2).min(MAX_BACKOFF);
        }
    }

    async fn on_message(&self, text: &str, local: &Local) {
        match parse_message(text) {
            Some(Message::Revoke(jti, exp)) => {
                let over = apply_revocations(local, vec![(jti.to_owned(), exp)]).await;
                self.rejected(over);
            }
            Some(Message::Replace(jti, exp, token)) => {
                let over = apply_replacement(local, jti, exp, token).await;
                self.rejected(over);
            }
            Some(Message::Sync) => self.sync_now.notify_one(),
            None => self.rejected(1),
        }
    }
}

/// A peer replaced the token `jti` by `token`: verified here in full (a
/// peer's word is not enough), then applied as the control plane applies
/// its own (the connections the new token still allows are kept, the rest
/// closed `policy_changed`, a sandbox registered here under the old token
/// holds the new one) and kept in the local store. A replacement that
/// does not verify is a revocation: the old token's connections close.
async fn apply_replacement(local: &Local, jti: &str, exp: u64, token: &str) -> usize {
    if local.verifier.is_revoked(jti) {
        return 0;
    }
    let generation = local.verifier.generation();
    let grant = match local.verifier.verify_fresh(token) {
        Ok(g) => g,
        Err(e) => {
            tracing::warn!(jti, error = %e, "a fleet replacement token does not verify; the old token is revoked");
            return apply_revocations(local, vec![(jti.to_owned(), exp)]).await;
        }
    };
    let Some(gateway) = local.gateway.get() else {
        return apply_revocations(local, vec![(jti.to_owned(), exp)]).await;
    };
    let exp = exp.min(local.verifier.latest_exp(now_s()));
    let (kept, closed) = gateway.replace_token(jti, exp, &grant, token, generation);
    tracing::info!(container_id = %grant.claims.container_id, kept, closed, "a token replacement from the fleet applied");
    let mut changes = vec![Change::Revoke {
        jti: jti.to_owned(),
        exp,
    }];
    if let Some(s) = local.registry.get_by_id(&grant.claims.container_id)
        && s.grant().claims.jti == grant.claims.jti
    {
        changes.push(Change::Put(SandboxRecord::of(&s, None)));
    }
    if let Err(e) = local.store.apply_unshared(changes).await {
        tracing::error!(error = %crate::error_chain(&e), "cannot keep the fleet's replacement");
    }
    0
}

/// A message on the revocations channel.
#[derive(Debug, PartialEq)]
pub enum Message<'a> {
    Revoke(&'a str, u64),
    /// The token `jti` (expiring then) replaced by this one.
    Replace(&'a str, u64, &'a str),
    Sync,
}

/// Parses a channel message; `None` for anything that is not exactly a
/// revocation of a jti-shaped id with a whole-number expiry, or a sync.
pub fn parse_message(text: &str) -> Option<Message<'_>> {
    let mut words = text.split(' ');
    match (words.next(), words.next(), words.next(), words.next()) {
        (Some("revoke"), Some(jti), Some(exp), None) if is_jti(jti) => {
            Some(Message::Revoke(jti, parse_score(exp)?))
        }
        (Some("replace"), Some(jti), Some(exp), Some(token))
            if is_jti(jti) && is_token_shaped(token) && words.next().is_none() =>
        {
            Some(Message::Replace(jti, parse_score(exp)?, token))
        }
        (Some("sync"), None, None, None) => Some(Message::Sync),
        _ => None,
    }
}

/// A compact JWT's shape: three base64url parts, within the size every
/// verifier accepts (what it says is the verifier's to judge).
fn is_token_shaped(token: &str) -> bool {
    token.len() <= crate::identity::token::MAX_TOKEN_BYTES
        && token.split('.').count() == 3
        && token
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
}

/// A jti as sluice mints them and as it accepts them from peers.
pub fn is_jti(jti: &str) -> bool {
    !jti.is_empty()
        && jti.len() <= 128
        && jti
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

/// A score as Redis stores it (a double, in any of its printed forms) as
/// whole seconds; `None` for what is not a finite, non-negative number.
/// Values past `u64::MAX` saturate (and are cut to the longest token life
/// when applied).
pub fn parse_score(text: &str) -> Option<u64> {
    if let Ok(n) = text.parse::<u64>() {
        return Some(n);
    }
    let f: f64 = text.parse().ok()?;
    (f.is_finite() && f >= 0.0).then_some(f as u64)
}

/// `ZRANGEBYSCORE … WITHSCORES` as RESP2 (a flat list) or RESP3 (pairs)
/// gives it: the (jti, expiry) pairs that parse, and how many did not.
fn parse_scored(raw: Vec<redis::Value>) -> (Vec<(String, u64)>, usize) {
    use redis::Value;
    let text = |v: &Value| -> Option<String> {
        match v {
            Value::BulkString(b) => String::from_utf8(b.clone()).ok(),
            Value::SimpleString(s) => Some(s.clone()),
            Value::Int(i) => Some(i.to_string()),
            Value::Double(d) => Some(d.to_string()),
            _ => None,
        }
    };
    let mut out = Vec::new();
    let mut bad = 0;
    let mut pair = |member: Option<&Value>, score: Option<&Value>| match (
        member.and_then(text),
        score.and_then(text).as_deref().and_then(parse_score),
    ) {
        (Some(m), Some(s)) => out.push((m, s)),
        _ => bad += 1,
    };
    if raw.iter().all(|v| matches!(v, Value::Array(_))) {
        for v in &raw {
            if let Value::Array(p) = v {
                pair(p.first(), p.get(1));
            }
        }
    } else {
        for chunk in raw.chunks(2) {
            pair(chunk.first(), chunk.get(1));
        }
    }
    (out, bad)
}

/// Revokes (locally, durably, without sharing again) what is new here,
/// each expiry cut to the longest life a token may have.
///
/// Past `MAX_HELD` revocations held, the fleet's new ones are refused
/// (and counted): a peer that floods revocations cannot grow a gateway's
/// memory without bound. This gateway's own revocations are always kept.
async fn apply_revocations(local: &Local, all: Vec<(String, u64)>) -> usize {
    let latest = local.verifier.latest_exp(now_s());
    let mut over = 0;
    let fresh: Vec<Change> = all
        .into_iter()
        .filter(|(jti, exp)| {
            if !is_jti(jti) || local.verifier.is_revoked(jti) {
                return false;
            }
            if local.verifier.revoked_len() >= MAX_HELD {
                over += 1;
                return false;
            }
            local.verifier.revoke(jti, *exp)
        })
        .map(|(jti, exp)| Change::Revoke {
            jti,
            exp: exp.min(latest),
        })
        .collect();
    if fresh.is_empty() {
        return over;
    }
    tracing::info!(count = fresh.len(), "revocations from the fleet applied");
    if let Err(e) = local.store.apply_unshared(fresh).await {
        tracing::error!(error = %crate::error_chain(&e), "cannot keep the fleet's revocations");
    }
    over
}

#[cfg(test)]
mod tests {
    use super::*;
    use redis::Value;

    #[test]
    fn channel_messages_parse_strictly() {
        assert_eq!(
            parse_message("revoke abc-1 1700000000"),
            Some(Message::Revoke("abc-1", 1_700_000_000))
        );
        assert_eq!(parse_message("sync"), Some(Message::Sync));
        assert_eq!(
            parse_message("replace abc 1700000000 aa.bb.cc"),
            Some(Message::Replace("abc", 1_700_000_000, "aa.bb.cc"))
        );
        for bad in [
            "replace abc 10",
            "replace abc 10 aa.bb",
            "replace abc 10 aa.bb.cc extra",
            "replace a;b 10 aa.bb.cc",
            "replace abc 10 aa.b b.cc",
            "replace abc 10 a+a.bb.cc",
        ] {
            assert_eq!(parse_message(bad), None, "{bad:?}");
        }
        let long = format!("replace abc 10 {}.b.c", "a".repeat(9000));
        assert_eq!(parse_message(&long), None);
        assert_eq!(
            parse_message("revoke abc 1.7e9"),
            Some(Message::Revoke("abc", 1_700_000_000))
        );
        for bad in [
            "",
            "revoke",
            "revoke abc",
            "revoke abc -5",
            "revoke abc inf",
            "revoke abc nan",
            "revoke a;b 10",
            "revoke abc 10 extra",
            "sync now",
            "REVOKE abc 10",
        ] {
            assert_eq!(parse_message(bad), None, "{bad:?}");
        }
        let huge = "revoke abc 99999999999999999999999999";
        assert_eq!(parse_message(huge), Some(Message::Revoke("abc", u64::MAX)));
    }

    #[test]
    fn scored_reads_skip_what_does_not_parse_in_either_protocol() {
        let b = |s: &str| Value::BulkString(s.as_bytes().to_vec());
        let flat = vec![
            b("good"),
            b("1700000000"),
            b("float"),
            b("1700000000.5"),
            b("sci"),
            b("1e30"),
            b("inf"),
            b("inf"),
            Value::BulkString(vec![0xff, 0xfe]),
            b("5"),
            b("odd"),
        ];
        let (ok, bad) = parse_scored(flat);
        let names: Vec<&str> = ok.iter().map(|(j, _)| j.as_str()).collect();
        assert_eq!(names, ["good", "float", "sci"]);
        assert_eq!(bad, 3);
        let pairs = vec![
            Value::Array(vec![b("a"), Value::Double(1.7e9)]),
            Value::Array(vec![b("b"), Value::Double(f64::INFINITY)]),
            Value::Array(vec![b("c")]),
        ];
        let (ok, bad) = parse_scored(pairs);
        assert_eq!(ok, vec![("a".to_owned(), 1_700_000_000)]);
        assert_eq!(bad, 2);
    }
}
