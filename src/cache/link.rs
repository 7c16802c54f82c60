//! The invalidation link: one dedicated RESP3 connection that keeps the near-cache coherent.
//!
//! Owns: connecting (with the upstream URL's credentials), reading the server's command table,
//! choosing the mode (`CLIENT TRACKING ON BCAST PREFIX …` for the smallest set of prefixes that
//! covers every rule; else, or when configured, the `pubsub` fallback that subscribes to the
//! invalidation channel and publishes this instance's writes on it), the heartbeat, and
//! reconnecting with backoff. In tracking mode the link subscribes to the channel too, for the
//! one announcement Redis's tracking does not make: `SWAPDB` (announced as "flush everything"
//! by the instance that ran it; a `SWAPDB` sent straight to Redis is not seen). Every way the
//! link can fail takes the cache down (flushed and bypassed) until a new link is established,
//! which starts from an empty cache.
//!
//! The heartbeat is a probe through the invalidation path itself: in tracking mode the link
//! writes a key under its own tracked prefix and expects the invalidation back; in pub/sub mode
//! it publishes a probe message and expects to receive it, within `heartbeat_timeout` of
//! sending it. The time from the probe's acknowledgement to its invalidation is the exported
//! invalidation lag.
//!
//! A shared data connection opened again after a failure ends the link too (`Upstream::
//! reconnected`): the address may now lead to another server, and the link reconnects so that
//! invalidations come from the server the data comes from.

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use tokio::io::AsyncWriteExt;
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::{Announce, CommandTable, NearCache, Source};
use crate::config::CoherenceMode;
use crate::protocol::encode::{self, Proto};
use crate::protocol::value::{self, Agg, Value};
use crate::upstream::conn::{self, FrameReader};
use crate::upstream::{Handshake, Upstream};

/// The client name of the link connection (visible in `CLIENT LIST`).
pub const LINK_NAME: &str = "sidecache-coherence";
/// Prefix of the probe keys the heartbeat writes.
pub const PROBE_PREFIX: &str = "__sidecache:probe:";

/// True for a probe key of any instance (`PROBE_PREFIX` and 16 hex digits): another
/// instance's heartbeat, which invalidates nothing here. Other keys under the prefix are
/// ordinary keys a rule may cover.
fn is_probe_key(key: &[u8]) -> bool {
    key.strip_prefix(PROBE_PREFIX.as_bytes())
        .is_some_and(|id| id.len() == 16 && id.iter().all(|c| c.is_ascii_digit() || (b'a'..=b'f').contains(c)))
}

/// Keeps the link up until `stop`; never returns earlier.
pub async fn run(cache: Arc<NearCache>, upstream: Arc<Upstream>, stop: CancellationToken) {
    let probe = Bytes::from(format!("{PROBE_PREFIX}{:016x}", fastrand::u64(..)));
    let max_backoff = upstream.max_backoff().max(Duration::from_millis(100));
    let mut backoff = Duration::from_millis(50);
    loop {
        let started = Instant::now();
        let reason = tokio::select! {
            r = session(&cache, &upstream, &probe) => r,
            _ = stop.cancelled() => return,
        };
        cache.set_announcer(None);
        cache.set_down(&reason);
        if started.elapsed() > max_backoff * 4 {
            backoff = Duration::from_millis(50);
        }
        let jitter = Duration::from_millis(fastrand::u64(0..=backoff.as_millis() as u64 / 2));
        tokio::select! {
            _ = tokio::time::sleep(backoff + jitter) => {}
            _ = stop.cancelled() => return,
        }
        backoff = (backoff * 2).min(max_backoff);
    }
}

struct Link {
    rd: OwnedReadHalf,
    wr: OwnedWriteHalf,
    reader: FrameReader,
}

impl Link {
    async fn send(&mut self, args: &[&[u8]]) -> Result<(), String> {
        let mut out = BytesMut::new();
        encode::command(&mut out, args);
        self.wr.write_all(&out).await.map_err(|e| format!("invalidation link write failed: {e}"))
    }

    async fn frame(&mut self) -> Result<Bytes, String> {
        self.reader.next(&mut self.rd).await.map_err(|e| format!("invalidation link lost: {e}"))
    }

    /// Sends a command and returns its reply (no pushes are expected before tracking is on).
    async fn call(&mut self, args: &[&[u8]]) -> Result<Bytes, String> {
        self.send(args).await?;
        loop {
            let f = self.frame().await?;
            if f.first() != Some(&b'>') {
                return Ok(f);
            }
        }
    }
}

fn text(frame: &[u8]) -> String {
    String::from_utf8_lossy(frame).trim_end().to_string()
}

/// One link, from connect to failure; returns why it ended.
async fn session(cache: &Arc<NearCache>, upstream: &Upstream, probe: &Bytes) -> String {
    match session_inner(cache, upstream, probe).await {
        Ok(()) => "invalidation link closed".into(),
        Err(reason) => reason,
    }
}

/// Ends at `at`, or never.
async fn until(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at.into()).await,
        None => std::future::pending().await,
    }
}

async fn session_inner(cache: &Arc<NearCache>, upstream: &Upstream, probe: &Bytes) -> Result<(), String> {
    let cfg = cache.config.clone();
    let initial = upstream.initial_key();
    let hs = Handshake {
        creds: initial.creds.clone(),
        db: initial.db,
        proto: Proto::Resp3,
        name: Some(Bytes::from_static(LINK_NAME.as_bytes())),
    };
    let (stream, reader) = tokio::time::timeout(
        cfg.heartbeat_timeout.max(upstream.endpoint().connect_timeout),
        conn::open(upstream.endpoint(), &hs),
    )
    .await
    .map_err(|_| "invalidation link: connect timed out".to_string())?
    .map_err(|e| format!("invalidation link: cannot connect: {e}"))?;
    let (rd, wr) = stream.into_split();
    let mut link = Link { rd, wr, reader };

    let table = link.call(&[b"COMMAND"]).await?;
    let table = value::parse(&table)
        .and_then(|v| CommandTable::from_reply(&v))
        .ok_or_else(|| format!("invalidation link: unexpected COMMAND reply {:.80}", text(&table)))?;

    let mode = match cfg.coherence {
        CoherenceMode::Auto | CoherenceMode::Tracking => {
            let prefixes = cache.tracked_prefixes();
            let mut args: Vec<&[u8]> = vec![b"CLIENT", b"TRACKING", b"ON", b"BCAST"];
            for p in &prefixes {
                args.push(b"PREFIX");
                args.push(p);
            }
            let reply = link.call(&args).await?;
            if !crate::protocol::reply::is_error(&reply) {
                CoherenceMode::Tracking
            } else if cfg.coherence == CoherenceMode::Tracking {
                return Err(format!("invalidation link: CLIENT TRACKING refused: {}", text(&reply)));
            } else {
                tracing::warn!(reply = %text(&reply), "CLIENT TRACKING refused; using pub/sub coherence.");
                CoherenceMode::Pubsub
            }
        }
        _ => CoherenceMode::Pubsub,
    };
    let channel = Bytes::from(cfg.pubsub_channel.clone());
    // Both modes subscribe (see the module header); tracking mode can do without it.
    link.send(&[b"SUBSCRIBE", &channel]).await?;
    let refused = loop {
        let f = link.frame().await?;
        if crate::protocol::reply::is_error(&f) {
            break Some(f);
        }
        if f.first() == Some(&b'>') {
            break None;
        }
    };
    let mut announcements = None;
    match refused {
        Some(f) if mode == CoherenceMode::Pubsub => {
            return Err(format!("invalidation link: SUBSCRIBE refused: {}", text(&f)));
        }
        Some(f) => {
            tracing::warn!(reply = %text(&f), "SUBSCRIBE to the announce channel refused; a SWAPDB through another instance will not be seen.");
            cache.set_announcer(None);
        }
        None => {
            let (tx, rx) = mpsc::unbounded_channel();
            cache.set_announcer(Some(tx));
            announcements = Some(rx);
        }
    }
    cache.set_up(mode, table);
    tracing::info!(
        mode = mode.as_str(),
        prefixes = cache.tracked_prefixes().len(),
        "Near-cache coherence established."
    );

    let mut heartbeat = tokio::time::interval(cfg.heartbeat);
    heartbeat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut outstanding: Option<(Instant, Option<Instant>)> = None;
    let probe_message = {
        let mut m = BytesMut::from(&b"p:"[..]);
        m.extend_from_slice(probe);
        m.freeze()
    };
    loop {
        let missed_at = outstanding.map(|(sent, _)| sent + cfg.heartbeat_timeout);
        tokio::select! {
            _ = until(missed_at) => {
                return Err(format!("invalidation link: heartbeat missed for {:?}", cfg.heartbeat_timeout));
            }
            _ = upstream.reconnected() => {
                return Err("a shared upstream connection was opened again; the invalidation link follows it".into());
            }
            _ = heartbeat.tick() => {
                match outstanding {
                    Some(_) => {}
                    None => {
                        if mode == CoherenceMode::Tracking {
                            link.send(&[b"SET", probe, b"1", b"PX", b"60000"]).await?;
                        } else {
                            link.send(&[b"PUBLISH", &channel, &probe_message]).await?;
                        }
                        outstanding = Some((Instant::now(), None));
                    }
                }
            }
            what = recv(&mut announcements) => {
                let Some(what) = what else { continue };
                let mut out = BytesMut::new();
                match what {
                    Announce::All => encode::command(&mut out, &[&b"PUBLISH"[..], &channel, b"*"]),
                    Announce::Keys(keys) => {
                        for k in keys {
                            let mut m = BytesMut::from(&b"k:"[..]);
                            m.extend_from_slice(&k);
                            encode::command(&mut out, &[&b"PUBLISH"[..], &channel, &m]);
                        }
                    }
                }
                link.wr.write_all(&out).await.map_err(|e| format!("invalidation link write failed: {e}"))?;
            }
            frame = link.frame() => {
                let frame = frame?;
                if frame.first() != Some(&b'>') {
                    // The acknowledgement of a probe (or of a PUBLISH, in pub/sub mode).
                    if mode == CoherenceMode::Tracking && let Some((_, acked @ None)) = &mut outstanding {
                        *acked = Some(Instant::now());
                        if crate::protocol::reply::is_error(&frame) {
                            // The probe could not be written (out of memory, ACL): the link
                            // answered, so it is alive; no lag sample this round.
                            tracing::debug!(reply = %text(&frame), "Heartbeat probe refused.");
                            outstanding = None;
                        }
                    }
                    continue;
                }
                match value::parse(&frame) {
                    Some(Value::Agg(Agg::Push, items)) => {
                        if handle_push(cache, mode, probe, &probe_message, &items) && let Some((sent, acked)) = outstanding.take() {
                            cache.record_lag(acked.map_or_else(|| sent.elapsed(), |a| a.elapsed()));
                        }
                    }
                    _ => return Err("invalidation link: unreadable push frame".into()),
                }
            }
        }
    }
}

async fn recv(rx: &mut Option<mpsc::UnboundedReceiver<Announce>>) -> Option<Announce> {
    match rx {
        Some(rx) => rx.recv().await,
        None => std::future::pending().await,
    }
}

/// Applies one push; true when it answered this link's heartbeat probe.
fn handle_push(cache: &NearCache, mode: CoherenceMode, probe: &Bytes, probe_message: &Bytes, items: &[Value]) -> bool {
    let kind = items.first().and_then(Value::as_bytes).map(|b| b.as_ref());
    match (mode, kind) {
        (CoherenceMode::Tracking, Some(b"invalidate")) => match items.get(1) {
            // A null invalidation: FLUSHALL / FLUSHDB, or the server dropped tracking state.
            Some(Value::Null) => {
                cache.flush();
                false
            }
            Some(Value::Agg(_, keys)) => {
                let mut probed = false;
                for k in keys.iter().filter_map(Value::as_bytes) {
                    if k == probe {
                        probed = true;
                    } else if !is_probe_key(k) {
                        cache.invalidate(k, Source::Tracking);
                    }
                }
                probed
            }
            _ => false,
        },
        // Both modes: tracking mode gets "flush everything" (`SWAPDB`) here, and applying the
        // keys an instance in pub/sub mode announces costs nothing but a lookup.
        (_, Some(b"message")) => {
            let Some(payload) = items.get(2).and_then(Value::as_bytes) else { return false };
            if payload == probe_message {
                return mode == CoherenceMode::Pubsub;
            }
            if let Some(key) = payload.strip_prefix(b"k:") {
                cache.invalidate(key, Source::Pubsub);
            } else if payload.as_ref() == b"*" {
                cache.flush();
            }
            false
        }
        _ => false,
    }
}
