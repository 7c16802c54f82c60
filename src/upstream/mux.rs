//! A multiplexed, pipelined upstream connection shared by many sessions.
//!
//! Owns: one socket, driven by two tasks. The writer takes every batch queued on a bounded
//! channel, records the batches' waiters in the in-flight FIFO *before* writing, and writes all
//! queued batches in one system call; the reader frames replies and hands them to the oldest
//! waiter. Redis answers a connection's commands in order, so the FIFO matches replies to
//! commands. A waiter may take the replies of several consecutive commands of one session:
//! they arrive back to back and are handed over as one span. Waiters whose session is gone are
//! skipped (their replies are dropped).
//!
//! When the socket fails, the handle reports itself dead, so the pool opens a fresh connection:
//! a late reply can never be handed to the wrong command. Replies that arrived complete are
//! still delivered; every reply still owed becomes an error: the precise one (a reply that
//! could not be framed) for the waiter it belongs to, "connection lost" for those behind it.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;

use super::conn::FrameReader;
use super::{ReplyBudget, UpstreamError};
use crate::metrics::Metrics;

/// The answer to one forwarded command.
pub type Reply = Result<Bytes, UpstreamError>;

/// Where the replies to one or more consecutive commands go.
#[derive(Debug)]
pub struct Waiter {
    /// Gets the replies, back to back, once all have arrived.
    pub tx: oneshot::Sender<Reply>,
    /// The session's output budget, charged as the replies arrive.
    pub budget: Option<Arc<ReplyBudget>>,
    /// How many consecutive commands' replies this waiter takes (at least one).
    pub replies: usize,
}

impl Waiter {
    /// A waiter for the reply to one command.
    pub fn one(tx: oneshot::Sender<Reply>, budget: Option<Arc<ReplyBudget>>) -> Waiter {
        Waiter { tx, budget, replies: 1 }
    }
}

/// Commands encoded back to back, and their waiters, in order.
#[derive(Debug, Default)]
pub struct Batch {
    /// The encoded commands.
    pub payload: BytesMut,
    /// The waiters, in order; their `replies` add up to the commands in `payload`.
    pub waiters: Vec<Waiter>,
}

/// The waiter being answered, off the in-flight FIFO: its replies may straddle reads.
struct Current {
    waiter: Waiter,
    /// Replies still to come.
    left: usize,
    /// Replies gathered so far; `None` once the session's budget refused them (the rest is read
    /// and dropped).
    got: Option<BytesMut>,
}

struct InFlight {
    waiters: VecDeque<Waiter>,
    closed: bool,
    /// When the connection last made progress: a reply arrived, or commands were queued on an
    /// idle connection. Commands waiting longer than the timeout since then mean Redis is stuck.
    progress: Instant,
}

/// A cloneable handle to a multiplexed connection.
#[derive(Clone, Debug)]
pub struct MuxHandle {
    tx: mpsc::Sender<Batch>,
    /// Set when the connection fails; an atomic load, checked on every command.
    alive: Arc<AtomicBool>,
}

/// Batches queued per connection before senders wait.
const QUEUE: usize = 1024;
/// Bytes gathered into one write at most.
const MAX_WRITE: usize = 1024 * 1024;

impl MuxHandle {
    /// Starts the driver tasks for an already handshaken connection. When commands wait
    /// `timeout` without any reply (zero: never), the connection is discarded.
    pub fn spawn(stream: TcpStream, reader: FrameReader, timeout: Duration) -> MuxHandle {
        let (rd, wr) = stream.into_split();
        let (tx, rx) = mpsc::channel(QUEUE);
        let dead = CancellationToken::new();
        let alive = Arc::new(AtomicBool::new(true));
        let inflight =
            Arc::new(Mutex::new(InFlight { waiters: VecDeque::new(), closed: false, progress: Instant::now() }));
        Metrics::get().upstream_connections.increment(1.0);
        tokio::spawn(write_loop(wr, rx, inflight.clone(), dead.clone()));
        tokio::spawn(read_loop(rd, reader, inflight, dead, alive.clone(), timeout));
        MuxHandle { tx, alive }
    }

    /// False once the connection has failed.
    pub fn is_alive(&self) -> bool {
        self.alive.load(Ordering::Relaxed) && !self.tx.is_closed()
    }

    /// How many handles to this connection exist (the pool's own included).
    pub fn holders(&self) -> usize {
        self.tx.strong_count()
    }

    /// True when both handles drive the same connection.
    pub fn is_same(&self, other: &MuxHandle) -> bool {
        self.tx.same_channel(&other.tx)
    }

    /// Queues a batch. On failure the batch comes back untouched: none of it was sent.
    pub async fn send(&self, batch: Batch) -> Result<(), Batch> {
        if !self.is_alive() {
            return Err(batch);
        }
        self.tx.send(batch).await.map_err(|e| e.0)
    }
}

fn fail_all(waiters: impl IntoIterator<Item = Waiter>, err: &UpstreamError) {
    for w in waiters {
        let _ = w.tx.send(Err(err.clone()));
    }
}

async fn write_loop(
    mut wr: tokio::net::tcp::OwnedWriteHalf,
    mut rx: mpsc::Receiver<Batch>,
    inflight: Arc<Mutex<InFlight>>,
    dead: CancellationToken,
) {
    let mut out = BytesMut::new();
    let stopped = dead.cancelled();
    tokio::pin!(stopped);
    loop {
        let first = tokio::select! {
            biased;
            _ = &mut stopped => break,
            b = rx.recv() => match b {
                Some(b) => b,
                None => break,
            },
        };
        // Let the sessions that are ready right now queue their commands too, so that many
        // clients' commands leave in one write (and Redis reads them in one read).
        tokio::task::yield_now().await;
        let mut batches = vec![first];
        let mut size = batches[0].payload.len();
        while size < MAX_WRITE {
            match rx.try_recv() {
                Ok(b) => {
                    size += b.payload.len();
                    batches.push(b);
                }
                Err(_) => break,
            }
        }
        let mut rejected = Vec::new();
        {
            let mut q = inflight.lock().unwrap_or_else(|p| p.into_inner());
            if q.waiters.is_empty() {
                q.progress = Instant::now();
            }
            for b in &mut batches {
                if q.closed {
                    rejected.append(&mut b.waiters);
                } else {
                    q.waiters.extend(b.waiters.drain(..));
                }
            }
        }
        if !rejected.is_empty() {
            fail_all(rejected, &UpstreamError::Lost);
            break;
        }
        let result = if batches.len() == 1 {
            let payload = std::mem::take(&mut batches[0].payload);
            tokio::select! { biased; r = wr.write_all(&payload) => r, _ = &mut stopped => break }
        } else {
            out.clear();
            for b in &batches {
                out.extend_from_slice(&b.payload);
            }
            tokio::select! { biased; r = wr.write_all(&out) => r, _ = &mut stopped => break }
        };
        if let Err(e) = result {
            tracing::warn!(error = %e, "Upstream write failed; dropping the connection.");
            break;
        }
        if out.capacity() > MAX_WRITE * 2 {
            out = BytesMut::new();
        }
    }
    dead.cancel();
    rx.close();
    while let Ok(b) = rx.try_recv() {
        fail_all(b.waiters, &UpstreamError::Lost);
    }
}

async fn read_loop(
    mut rd: tokio::net::tcp::OwnedReadHalf,
    mut reader: FrameReader,
    inflight: Arc<Mutex<InFlight>>,
    dead: CancellationToken,
    alive: Arc<AtomicBool>,
    timeout: Duration,
) {
    let stopped = dead.cancelled();
    tokio::pin!(stopped);
    // The stall check runs a few times per timeout; with no timeout it never fires.
    let period =
        if timeout.is_zero() { Duration::from_secs(3600) } else { (timeout / 4).max(Duration::from_millis(5)) };
    let mut stall_check = tokio::time::interval(period);
    stall_check.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut current: Option<Current> = None;
    let mut ready = Vec::new();
    let err = loop {
        let filled = tokio::select! {
            biased;
            _ = &mut stopped => break UpstreamError::Lost,
            // `fill` keeps what it read in `reader`, so interrupting it loses no bytes.
            f = reader.fill(&mut rd) => f,
            _ = stall_check.tick() => {
                let q = inflight.lock().unwrap_or_else(|p| p.into_inner());
                let waiting = !q.waiters.is_empty() || current.is_some();
                if !timeout.is_zero() && waiting && q.progress.elapsed() > timeout {
                    tracing::warn!(timeout = ?timeout, "Upstream stopped answering; dropping the connection.");
                    break UpstreamError::Timeout(timeout);
                }
                continue;
            }
        };
        let handed = filled.and_then(|()| hand_out(&mut reader, &inflight, &mut current, &mut ready));
        // Sent after the lock is released: a send wakes the session.
        for (tx, span) in ready.drain(..) {
            let _ = tx.send(Ok(span));
        }
        if let Err(e) = handed {
            if let UpstreamError::Protocol(_) = e {
                Metrics::get().protocol_error("upstream_reply");
            }
            tracing::warn!(error = %e, "Upstream connection ended.");
            break e;
        }
    };
    alive.store(false, Ordering::Relaxed);
    dead.cancel();
    Metrics::get().upstream_connections.decrement(1.0);
    let waiters = {
        let mut q = inflight.lock().unwrap_or_else(|p| p.into_inner());
        q.closed = true;
        std::mem::take(&mut q.waiters)
    };
    let err = match err {
        UpstreamError::Closed | UpstreamError::Io(_) => UpstreamError::Lost,
        other => other,
    };
    // A reply that could not be framed is the first waiter's; the commands queued behind it
    // were sent too and may have run, which is all their clients can be told.
    let behind = match err {
        UpstreamError::Protocol(_) => UpstreamError::Lost,
        ref other => other.clone(),
    };
    let mut waiters = waiters.into_iter();
    let first = match current {
        Some(Current { waiter, left, got: Some(got) }) => Some((waiter, left, got)),
        Some(Current { waiter, got: None, .. }) => {
            // Over its session's output cap: that session is being closed anyway.
            fail_all([waiter], &err);
            None
        }
        None => waiters.next().map(|w| {
            let left = w.replies;
            (w, left, BytesMut::new())
        }),
    };
    // Replies that arrived complete before the failure are delivered. Of those still missing,
    // the first gets the error, and the commands behind it (of the same waiter too) get what
    // those of other waiters get.
    if let Some((waiter, left, mut got)) = first {
        if got.is_empty() && left == 1 {
            // Nothing but the error: as an error, so the session knows Redis gave no verdict.
            fail_all([waiter], &err);
            return fail_all(waiters, &behind);
        }
        got.extend_from_slice(&err.to_reply());
        let reply = behind.to_reply();
        for _ in 1..left {
            got.extend_from_slice(&reply);
        }
        let _ = waiter.tx.send(Ok(got.freeze()));
    }
    fail_all(waiters, &behind);
}

/// Hands every complete reply in `reader` to its waiter, in order, under one lock: a waiter's
/// replies go into `ready` as one span once all have arrived (charged to its session's budget
/// as they arrive; dropped if over it). A reply with no waiter means the stream is out of step:
/// an error.
fn hand_out(
    reader: &mut FrameReader,
    inflight: &Mutex<InFlight>,
    current: &mut Option<Current>,
    ready: &mut Vec<(oneshot::Sender<Reply>, Bytes)>,
) -> Result<(), UpstreamError> {
    let mut q = inflight.lock().unwrap_or_else(|p| p.into_inner());
    q.progress = Instant::now();
    loop {
        let mut cur = match current.take() {
            Some(cur) => cur,
            None => match q.waiters.pop_front() {
                Some(waiter) => Current { left: waiter.replies, waiter, got: Some(BytesMut::new()) },
                None if reader.buffered_many(1)?.is_some() => {
                    tracing::warn!("Upstream sent a reply nobody asked for; dropping the connection.");
                    return Err(UpstreamError::Protocol(crate::protocol::ReplyError::InvalidLength));
                }
                None => return Ok(()),
            },
        };
        let scanned = match reader.buffered_many(cur.left) {
            Ok(scanned) => scanned,
            Err(e) => {
                // The reply that could not be framed is this waiter's: it gets the error.
                *current = Some(cur);
                return Err(e);
            }
        };
        let Some((span, n)) = scanned else {
            *current = Some(cur);
            return Ok(());
        };
        cur.left -= n;
        if cur.got.is_some() && !cur.waiter.budget.as_ref().is_none_or(|b| b.charge(span.len())) {
            cur.got = None;
        }
        if cur.left > 0 {
            if let Some(got) = &mut cur.got {
                got.extend_from_slice(&span);
            }
            *current = Some(cur);
        } else if let Some(mut got) = cur.got {
            // All the replies in one read (the usual case): the span itself, not a copy.
            let replies = if got.is_empty() {
                span
            } else {
                got.extend_from_slice(&span);
                got.freeze()
            };
            ready.push((cur.waiter.tx, replies));
        }
    }
}
