//! One client connection: read a batch of commands, route each, answer in request order.
//!
//! Owns: the per-client state Redis keeps per connection (credentials, database, protocol,
//! name, transaction, watches, subscriptions, reply mode), the choice of where each command runs,
//! and the ordering of replies. Does not own: framing (`protocol`), command recognition
//! (`command`) or the upstream sockets (`upstream`).
//!
//! One task per client, running two futures, polled reader first. The *reader* parses a batch,
//! decides for each command, and pushes one reply *slot* per command, in order, onto a bounded
//! queue (`SlotQueue`; the bound is `max_pipeline`: when the client's replies pile up, the
//! reader stops reading it). The *writer* resolves slots in order — a local reply, a oneshot
//! filled by a multiplexed connection, or N frames from the session's dedicated connection —
//! and writes everything that is ready in one write.
//!
//! Where commands run:
//! - stateless commands are queued on the session's slot of the pool for its (user, db,
//!   protocol), in one batch per read;
//! - while the session needs a connection of its own (`MULTI`, `WATCH`, subscriptions,
//!   `CLIENT REPLY OFF`, `CLIENT TRACKING`/`ID`/…, `MONITOR`) or for one blocking command, they
//!   go to a dedicated connection opened with the session's state replayed;
//! - before commands move from one connection to the other, the reader waits (a barrier slot)
//!   until every reply from the previous one is in: a session's commands reach Redis in order;
//! - sidecache's own commands are answered by their modules (`cache::command`, `locks`); a
//!   lock command holds the commands after it until it is answered, so that they run after it
//!   (and after a `LOCK.ACQUIRE … WAIT` as after a blocking command).
//!
//! `SELECT`, `AUTH` and `HELLO` move the session to another pool; the pool's handshake checks
//! them first, so errors are Redis's own. Each is also sent to Redis on every use, and the
//! session adopts the new state only when Redis accepts it, even when the pool exists.

use std::collections::HashSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::sync::{mpsc, oneshot};

use crate::cache::{Lookup, NearCache, Who, WriteGuard};
use crate::command::{Command, Family, Kind, SubKind};
use crate::protocol::encode::{self, Proto};
use crate::protocol::reply;
use crate::protocol::{RequestError, RequestParser};
use crate::server::Context;
use crate::signal::Signal;
use crate::ttl::Plan;
use crate::upstream::{
    Batch, Creds, Handshake, MuxHandle, Pinned, PinnedFrame, PoolKey, ReplyBudget, UpstreamError, Waiter,
};

/// Bytes gathered before the writer flushes even if more replies are ready.
const FLUSH_AT: usize = 64 * 1024;
/// Read buffer reservation per read: it starts small and doubles while reads fill it.
const READ_MIN: usize = 512;
const READ_MAX: usize = 16 * 1024;
/// A read buffer that grew beyond this is given back once no frame is pending in it.
const READ_KEEP: usize = 4 * 1024;
/// While a client waits for a reply, its socket is read until this much is buffered.
const HOLD_READ_MAX: usize = 64 * 1024;
/// How long a closing session waits for its last replies to be written (outside a shutdown).
const CLOSE_WAIT: Duration = Duration::from_secs(5);

/// Timing and labelling of one command, recorded when its reply is ready.
#[derive(Debug, Clone, Copy)]
struct Meta {
    family: Family,
    start: Instant,
}

/// The commands of a slot, for the metrics: usually one.
enum Metas {
    One(Meta),
    Many(Vec<Meta>),
}

impl Metas {
    fn len(&self) -> usize {
        match self {
            Metas::One(_) => 1,
            Metas::Many(v) => v.len(),
        }
    }

    fn push(&mut self, meta: Meta) {
        match self {
            Metas::One(first) => *self = Metas::Many(vec![*first, meta]),
            Metas::Many(v) => v.push(meta),
        }
    }

    fn as_slice(&self) -> &[Meta] {
        match self {
            Metas::One(m) => std::slice::from_ref(m),
            Metas::Many(v) => v,
        }
    }
}

/// Pooled commands queued back to back, not yet closed into a waiter and a slot.
struct Group {
    tx: oneshot::Sender<crate::upstream::mux::Reply>,
    rx: oneshot::Receiver<crate::upstream::mux::Reply>,
    metas: Metas,
}

impl Slot {
    /// The commands this slot answers, as counted against `max_pipeline`.
    fn commands(&self) -> usize {
        match self {
            Slot::Upstream(_, metas) => metas.len(),
            _ => 1,
        }
    }
}

/// One reply position in the client's stream.
enum Slot {
    /// A reply sidecache computed.
    Local(Bytes, Option<Meta>),
    /// The replies to one or more consecutive commands, coming back to back from a
    /// multiplexed connection; one `Meta` per command.
    Upstream(oneshot::Receiver<crate::upstream::mux::Reply>, Metas),
    /// A reply that a feature module computes (near-cache fill, TTL policy, locks): the
    /// future yields the bytes to write and how many budget bytes they were charged.
    Later(Later, Meta),
    /// A reply the client waits for before its next commands run (a lock command, which may
    /// wait like a blocking command): the reader sends nothing more until it resolves, so the
    /// dedicated connection's messages and pushes, which Redis delivers to a blocked client,
    /// may pass it.
    Waiting(Later, Meta),
    /// `count` frames coming from the dedicated connection; the first `skip` and the last
    /// `tail` are sidecache's own and not shown; the first shown one is also sent to `report`.
    /// `strip` lists elements of an `EXEC` reply that answer sidecache's own queued commands.
    /// `guard` marks keys written by the command; it is released once the reply is in, before
    /// the client sees it.
    Pinned {
        count: usize,
        skip: usize,
        tail: usize,
        strip: Vec<usize>,
        meta: Option<Meta>,
        report: Option<oneshot::Sender<Bytes>>,
        monitor: bool,
        guard: Option<WriteGuard>,
        /// A (un)subscribe command: see `PubSubCmd`.
        pubsub: Option<PubSubCmd>,
    },
    /// From now on, frames of this dedicated connection arrive here.
    Attach(mpsc::Receiver<PinnedFrame>),
    /// The dedicated connection is being closed on purpose (its end is not a failure).
    Detach,
    /// Signals the reader once every earlier slot is resolved.
    Barrier(oneshot::Sender<()>),
    /// Write everything before this, then close the connection.
    Close,
}

/// How the writer counts the replies of a pub/sub (un)subscribe command: Redis answers one
/// frame per channel, or one error for the whole command (an ACL refusal); an unsubscribe from
/// everything gets one frame per subscription Redis holds, which only the writer knows (from
/// Redis's confirmations: a refused subscription is not one).
#[derive(Debug, Clone, Copy)]
enum PubSubCmd {
    /// An (un)subscribe of `kind`; `all`: from every subscription of that kind.
    Subscription { kind: SubKind, all: bool },
    /// An `EXEC` whose transaction (un)subscribed: its reply holds the confirmations.
    Exec,
}

/// A reply computed by a feature module: resolves to the reply bytes and the number of bytes
/// charged to the session's output budget for it (released once written).
pub type Later = std::pin::Pin<Box<dyn std::future::Future<Output = (Bytes, usize)> + Send>>;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ReplyMode {
    On,
    Off,
    SkipNext,
}

/// Connection state as Redis would keep it for this client.
#[derive(Debug, Clone)]
struct State {
    creds: Option<Creds>,
    db: u32,
    proto: Proto,
    name: Option<Bytes>,
    in_multi: bool,
    /// A command was refused locally while queuing: `EXEC` must abort, as Redis's would.
    multi_dirty: bool,
    /// Commands queued in the transaction so far, sidecache's own included.
    multi_len: usize,
    /// Positions of sidecache's own queued commands (TTL policy), removed from `EXEC`'s reply.
    multi_hidden: Vec<usize>,
    /// A pub/sub (un)subscribe is queued in the transaction.
    multi_pubsub: bool,
    /// A `SELECT` queued in the transaction: the database the commands queued after it run in,
    /// and the position of its reply in `EXEC`'s (which says whether it took effect).
    multi_db: Option<(u32, usize)>,
    watching: bool,
    /// The dedicated connection's state is authoritative for good (connection-scoped commands).
    sticky: bool,
    monitor: bool,
    reply_mode: ReplyMode,
    channels: HashSet<Bytes>,
    patterns: HashSet<Bytes>,
    shards: HashSet<Bytes>,
}

impl State {
    fn new(key: &PoolKey) -> State {
        State {
            creds: key.creds.clone(),
            db: key.db,
            proto: key.proto,
            name: None,
            in_multi: false,
            multi_dirty: false,
            multi_len: 0,
            multi_hidden: Vec::new(),
            multi_pubsub: false,
            multi_db: None,
            watching: false,
            sticky: false,
            monitor: false,
            reply_mode: ReplyMode::On,
            channels: HashSet::new(),
            patterns: HashSet::new(),
            shards: HashSet::new(),
        }
    }

    fn key(&self) -> PoolKey {
        PoolKey { creds: self.creds.clone(), db: self.db, proto: self.proto }
    }

    fn set_key(&mut self, key: PoolKey) {
        self.creds = key.creds;
        self.db = key.db;
        self.proto = key.proto;
    }

    /// `self.key() == *key`, without building the key.
    fn has_key(&self, key: &PoolKey) -> bool {
        key.db == self.db && key.proto == self.proto && key.creds == self.creds
    }

    fn needs_pin(&self) -> bool {
        self.in_multi
            || self.watching
            || self.sticky
            || self.monitor
            || self.reply_mode != ReplyMode::On
            || !self.channels.is_empty()
            || !self.patterns.is_empty()
            || !self.shards.is_empty()
    }

    /// RESP2 subscribed mode, where Redis runs only (un)subscribe commands, PING, QUIT and RESET.
    fn resp2_subscribed(&self) -> bool {
        self.proto == Proto::Resp2
            && (!self.channels.is_empty() || !self.patterns.is_empty() || !self.shards.is_empty())
    }

    fn subs(&mut self, kind: SubKind) -> &mut HashSet<Bytes> {
        match kind {
            SubKind::Channel => &mut self.channels,
            SubKind::Pattern => &mut self.patterns,
            SubKind::Shard => &mut self.shards,
        }
    }

    fn handshake(&self) -> Handshake {
        Handshake { creds: self.creds.clone(), db: self.db, proto: self.proto, name: self.name.clone() }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Target {
    Nowhere,
    Pool,
    Pinned,
}

/// Why the reader stopped.
enum Stop {
    /// The client closed or the connection failed: drop everything now.
    Abort,
    /// Write what is pending, then close (QUIT, protocol error, shutdown).
    Drain,
}

/// Serves one client until it disconnects, is disconnected, or the server shuts down.
///
/// The reader and the writer are two futures of this one task, not two tasks: a reply that
/// arrives wakes one task, and handing a slot from reader to writer never crosses threads.
pub async fn serve(stream: TcpStream, ctx: Arc<Context>, id: u64, stopping: Arc<Signal>) {
    let _ = stream.set_nodelay(true);
    let policy = ctx.policy.load_full();
    let kill = Arc::new(Signal::new());
    let budget = Arc::new(ReplyBudget::new(policy.max_output_bytes, kill.clone()));
    let (rd, wr) = stream.into_split();
    let slots = Arc::new(SlotQueue::new(policy.max_pipeline));
    let activity = Arc::new(Activity::new());
    let written = Arc::new(Signal::new());
    let writer = {
        let written = written.clone();
        let write =
            write_loop(wr, SlotReceiver(slots.clone()), budget.clone(), kill.clone(), ctx.clone(), activity.clone());
        async move {
            write.await;
            written.raise();
        }
    };
    let initial = ctx.upstream.initial_key();
    let locks = crate::locks::SessionLocks::new(ctx.locks.clone());
    let mut session = Reader {
        ctx,
        id,
        state: State::new(&initial),
        slots: SlotSender(slots),
        budget,
        activity,
        batch: None,
        group: None,
        pinned: None,
        pinned_out: BytesMut::new(),
        target: Target::Nowhere,
        sent_since_barrier: false,
        pinned_unconfirmed: false,
        pool: None,
        pending_guard: None,
        multi_guard: None,
        locks: locks.clone(),
        hold: None,
        policy,
        blocking_sent: false,
    };
    let reader = async {
        let stop = session.run(rd, &kill, &stopping).await;
        match stop {
            Stop::Abort => {
                session.pinned = None;
                kill.raise();
            }
            Stop::Drain => {
                let _ = session.flush().await;
                let _ = session.slots.0.push(Slot::Close).await;
                // When the server is stopping, its `shutdown_grace` bounds this wait instead.
                let close_wait = async {
                    if stopping.is_raised() {
                        std::future::pending().await
                    } else {
                        tokio::time::sleep(CLOSE_WAIT).await
                    }
                };
                tokio::select! {
                    _ = written.raised() => {}
                    _ = close_wait => kill.raise(),
                    _ = kill.raised() => {}
                }
            }
        }
        drop(session);
    };
    reader_then_writer(reader, writer).await;
    // Leases are tied to the connection: give its locks back now, not when they expire.
    locks.close().await;
}

struct Reader {
    ctx: Arc<Context>,
    id: u64,
    state: State,
    slots: SlotSender,
    budget: Arc<ReplyBudget>,
    /// What the writer tells the reader: replies awaited, and when it last wrote.
    activity: Arc<Activity>,
    /// Commands for the multiplexed connection, sent at the end of the read batch.
    batch: Option<(MuxHandle, Batch)>,
    /// Consecutive commands at the end of `batch` that share one waiter and one slot.
    group: Option<Group>,
    pinned: Option<Pinned>,
    /// Commands for the dedicated connection, written at the end of the read batch.
    pinned_out: BytesMut,
    target: Target,
    sent_since_barrier: bool,
    /// The last command sent on the dedicated connection gets no reply (`CLIENT REPLY
    /// OFF|SKIP`): no reply there says when Redis has run it.
    pinned_unconfirmed: bool,
    /// The session's pool connection for its current key.
    pool: Option<(PoolKey, MuxHandle)>,
    /// Keys written by the next command sent on the dedicated connection.
    pending_guard: Option<WriteGuard>,
    /// Keys written by the commands queued in the current transaction.
    multi_guard: Option<WriteGuard>,
    /// Locks this connection holds (`LOCK.*`).
    locks: crate::locks::SessionLocks,
    /// Ends when the command the client waits for (a lock command) is answered. Until then the
    /// commands after it are not run, as Redis runs nothing more of a blocked client's
    /// pipeline; the socket is still read, to notice a client that disconnects.
    hold: Option<oneshot::Receiver<()>>,
    /// The policy for the commands of the current read.
    policy: Arc<crate::server::Policy>,
    /// A command that may block (`BLPOP`, `WAIT`…) was sent, and replies were outstanding
    /// when last looked at: its reply may still be to come.
    blocking_sent: bool,
}

impl Reader {
    async fn run(&mut self, rd: OwnedReadHalf, kill: &Signal, stopping: &Signal) -> Stop {
        let mut parser = RequestParser::new();
        let mut buf = BytesMut::new();
        let mut chunk = READ_MIN;
        let mut draining = false;
        let mut frame_started: Option<Instant> = None;
        // Set when the idle timer fired early: the client's last reply is what it counts from.
        let mut idle_from: Option<Instant> = None;
        let metrics = self.ctx.metrics;
        let mut rd = rd;
        loop {
            let (frame_deadline, idle_timeout) = (self.policy.frame_deadline, self.policy.idle_timeout);
            let in_frame = parser.in_frame(&buf);
            let holding = self.hold.is_some();
            // A client waiting for a reply is neither idle nor slow to send: no deadline.
            let deadline = match (in_frame, frame_started) {
                _ if holding => None,
                (true, Some(t)) if !frame_deadline.is_zero() => Some((t + frame_deadline, "frame_deadline")),
                _ if !idle_timeout.is_zero() && !self.state.needs_pin() => {
                    Some((idle_from.take().unwrap_or_else(Instant::now) + idle_timeout, "idle_timeout"))
                }
                _ => None,
            };
            let timer = async {
                match deadline {
                    Some((at, _)) => tokio::time::sleep_until(at.into()).await,
                    None => std::future::pending().await,
                }
            };
            // Wait for readability without holding a buffer, so idle clients cost no buffer.
            // Once the server is stopping, what the client sent before is still read and
            // answered (without waiting): the session ends when its socket has nothing left.
            // While the client waits (`hold`), its socket is read only to notice a disconnect,
            // and the commands read meanwhile are run once the wait ends.
            let mut resume = false;
            if holding && draining {
                tokio::select! {
                    biased;
                    _ = kill.raised() => return Stop::Abort,
                    _ = held(&mut self.hold) => resume = true,
                }
            } else if !draining {
                tokio::select! {
                    biased;
                    _ = kill.raised() => return Stop::Abort,
                    _ = held(&mut self.hold), if holding => resume = true,
                    _ = stopping.raised(), if !in_frame && !holding => draining = true,
                    _ = timer => {
                        let kind = deadline.map_or("idle_timeout", |d| d.1);
                        if kind == "idle_timeout" {
                            // Like Redis, a client waiting for a reply (blocked in BLPOP…) is
                            // not idle, and its idle time counts from its last reply too.
                            if self.activity.awaiting.load(Ordering::Relaxed) > 0 {
                                continue;
                            }
                            let replied = self.activity.last_reply();
                            if replied + idle_timeout > Instant::now() {
                                idle_from = Some(replied);
                                continue;
                            }
                        }
                        metrics.protocol_error(kind);
                        return Stop::Abort;
                    }
                    ready = rd.readable(), if !holding || buf.len() < HOLD_READ_MAX => {
                        if ready.is_err() {
                            return Stop::Abort;
                        }
                    }
                }
            } else if kill.is_raised() {
                return Stop::Abort;
            }
            if resume {
                // The wait ended: the commands read meanwhile come next, before any new read.
                self.hold = None;
                frame_started = None;
            } else {
                // The buffer is kept between reads: once the commands parsed from it are gone,
                // its memory is reused in place rather than allocated again for every read.
                buf.reserve(chunk);
                let spare = buf.capacity() - buf.len();
                let read = if draining {
                    match rd.try_read_buf(&mut buf) {
                        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return Stop::Drain,
                        r => r,
                    }
                } else {
                    // One poll of `read_buf`: unlike `try_read`, a short read clears the
                    // readiness, so the next loop does not spend a system call on EAGAIN.
                    // Spurious readiness: loop.
                    tokio::select! {
                        biased;
                        r = rd.read_buf(&mut buf) => r,
                        _ = std::future::ready(()) => continue,
                    }
                };
                match read {
                    Ok(0) => return self.end_of_input(),
                    Err(_) => return Stop::Abort,
                    Ok(n) if n == spare => chunk = (chunk * 2).min(READ_MAX),
                    Ok(_) => {}
                }
            }
            if self.hold.is_some() {
                continue; // read to notice a disconnect; run after the wait
            }
            // One snapshot of the policy per read: a reload applies from the next read on.
            self.policy = self.ctx.policy.load_full();
            if self.activity.awaiting.load(Ordering::Relaxed) == 0 {
                self.blocking_sent = false;
            }
            let limits = self.policy.request_limits;
            while self.hold.is_none() {
                match parser.next(&mut buf, &limits) {
                    Ok(Some(args)) => {
                        frame_started = None;
                        match self.dispatch(Command::new(args)).await {
                            Ok(true) => {}
                            Ok(false) => return Stop::Drain,
                            Err(stop) => return stop,
                        }
                    }
                    Ok(None) => break,
                    Err(e) => {
                        metrics.protocol_error(e.kind());
                        return self.protocol_error(e).await;
                    }
                }
            }
            // Sending may wait for room in the reply queue (backpressure): a frame started in
            // this read is timed from when reading resumes, not from before that wait.
            if let Err(stop) = self.flush().await {
                return stop;
            }
            if self.hold.is_some() {
                // The rest of the read waits; a frame started in it is timed from the wait's end.
                frame_started = None;
            } else if parser.in_frame(&buf) {
                frame_started.get_or_insert_with(Instant::now);
            } else {
                frame_started = None;
                // A client between commands holds at most a small read buffer.
                if chunk > READ_KEEP {
                    buf = BytesMut::new();
                    chunk = READ_MIN;
                }
            }
        }
    }

    /// The client shut its sending side, or closed. Redis answers the commands it read before
    /// the end of input (a client that only half-closed still reads them), but drops a client
    /// that waits in a blocking command, a subscription or `MONITOR`: then the dedicated
    /// connection is closed, so Redis pops nothing for a client that is gone.
    fn end_of_input(&mut self) -> Stop {
        if self.activity.awaiting.load(Ordering::Relaxed) == 0 {
            self.blocking_sent = false;
        }
        let waits = self.hold.is_some()
            || self.blocking_sent
            || self.state.monitor
            || !self.state.channels.is_empty()
            || !self.state.patterns.is_empty()
            || !self.state.shards.is_empty();
        if waits { Stop::Abort } else { Stop::Drain }
    }

    async fn protocol_error(&mut self, e: RequestError) -> Stop {
        if self.flush().await.is_err() {
            return Stop::Abort;
        }
        let _ = self.slots.0.push(Slot::Local(e.to_reply(), None)).await;
        Stop::Drain
    }

    /// Pushes a slot; before waiting for room, sends what is queued so the writer can progress.
    async fn push(&mut self, slot: Slot) -> Result<(), Stop> {
        // A write's near-cache guard is released once its reply is in, before the client sees it.
        self.close_group().await?;
        let slot = match (self.pending_guard.take(), slot) {
            (Some(guard), Slot::Upstream(rx, Metas::One(meta))) => Slot::Later(
                Box::pin(async move {
                    let reply = rx.await;
                    drop(guard);
                    charged_reply(reply)
                }),
                meta,
            ),
            (Some(guard), Slot::Later(fut, meta)) => Slot::Later(
                Box::pin(async move {
                    let reply = fut.await;
                    drop(guard);
                    reply
                }),
                meta,
            ),
            (Some(guard), Slot::Local(reply, meta)) => {
                drop(guard);
                Slot::Local(reply, meta)
            }
            // Attach, Barrier…: the command's own reply slot comes next.
            (guard, slot) => {
                self.pending_guard = guard;
                slot
            }
        };
        self.push_slot(slot).await
    }

    /// Pushes a slot as it is; waits for room (sending what is queued first).
    async fn push_slot(&mut self, slot: Slot) -> Result<(), Stop> {
        if matches!(slot, Slot::Upstream(..) | Slot::Pinned { .. } | Slot::Later(..) | Slot::Waiting(..)) {
            self.activity.awaiting.fetch_add(1, Ordering::Relaxed);
        }
        match self.slots.0.try_push(slot) {
            Ok(()) => Ok(()),
            Err(Full::Closed) => Err(Stop::Abort),
            Err(Full::Full(slot)) => {
                // No group is open here (pushing closes it first): send what is queued.
                self.send_queued().await?;
                self.slots.0.push(*slot).await.map_err(|_| Stop::Abort)
            }
        }
    }

    /// A locally computed reply (suppressed under `CLIENT REPLY OFF|SKIP`, as Redis would).
    async fn local(&mut self, reply: Bytes, meta: Meta) -> Result<(), Stop> {
        if self.state.in_multi && reply::is_error(&reply) {
            self.state.multi_dirty = true;
        }
        match self.state.reply_mode {
            ReplyMode::Off => return Ok(()),
            ReplyMode::SkipNext => return self.skip_taken_here().await,
            ReplyMode::On => {}
        }
        self.push(Slot::Local(reply, Some(meta))).await
    }

    /// Sends queued commands to their connections.
    async fn flush(&mut self) -> Result<(), Stop> {
        self.close_group().await?;
        self.send_queued().await
    }

    /// Sends the batch and the dedicated connection's commands as they are.
    async fn send_queued(&mut self) -> Result<(), Stop> {
        if let Some((handle, batch)) = self.batch.take()
            && let Err(batch) = handle.send(batch).await
        {
            // The connection died before taking the batch: nothing of it ran.
            let err = UpstreamError::Lost;
            for w in batch.waiters {
                let _ = w.tx.send(Err(err.clone()));
            }
            self.pool = None;
        }
        if !self.pinned_out.is_empty() {
            let bytes = self.pinned_out.split().freeze();
            if let Some(p) = &mut self.pinned
                && p.write(&bytes).await.is_err()
            {
                return Err(Stop::Drain);
            }
        }
        Ok(())
    }

    /// Sends what is queued and waits until every reply before this point is resolved.
    async fn barrier(&mut self) -> Result<(), Stop> {
        if self.sent_since_barrier {
            self.flush().await?;
            let (tx, rx) = oneshot::channel();
            self.push(Slot::Barrier(tx)).await?;
            self.flush().await?;
            rx.await.map_err(|_| Stop::Abort)?;
            self.sent_since_barrier = false;
        }
        Ok(())
    }

    /// Makes `to` the connection for the next commands; waits for the other's replies first.
    async fn switch(&mut self, to: Target) -> Result<(), Stop> {
        if self.target != to {
            self.confirm_pinned().await?;
            self.barrier().await?;
        }
        self.target = to;
        Ok(())
    }

    /// When the last commands on the dedicated connection get no reply (`CLIENT REPLY
    /// OFF|SKIP`), sends one whose reply is awaited and not shown, so that a barrier after it
    /// waits until Redis has run them: a command sent elsewhere next must not overtake them.
    /// `CLIENT REPLY ON` is answered whatever the mode; callers leave the connection or are in
    /// mode ON already.
    async fn confirm_pinned(&mut self) -> Result<(), Stop> {
        if !self.pinned_unconfirmed || self.pinned.is_none() {
            return Ok(());
        }
        self.pinned_unconfirmed = false;
        let sync: &[&[u8]] = &[b"CLIENT", b"REPLY", b"ON"];
        encode::command(&mut self.pinned_out, sync);
        self.sent_since_barrier = true;
        let slot = Slot::Pinned {
            count: 1,
            skip: 1,
            tail: 0,
            strip: Vec::new(),
            meta: None,
            report: None,
            monitor: false,
            guard: None,
            pubsub: None,
        };
        self.push(slot).await
    }

    /// A command that never reached Redis took the reply `CLIENT REPLY SKIP` suppresses. Redis
    /// would still skip the next reply on the dedicated connection, so a hidden `CLIENT REPLY
    /// ON` there takes the skip instead (Redis answers it in every mode).
    async fn skip_taken_here(&mut self) -> Result<(), Stop> {
        self.state.reply_mode = ReplyMode::On;
        if self.pinned.is_none() {
            return Ok(());
        }
        self.switch(Target::Pinned).await?;
        self.pinned_unconfirmed = true;
        self.confirm_pinned().await
    }

    /// Queues a command on the session's multiplexed connection.
    async fn send_pooled(&mut self, args: &[Bytes], meta: Meta) -> Result<(), Stop> {
        // A write the near-cache guards gets a slot of its own (the guard goes with it).
        if self.pending_guard.is_some() {
            return match self.queue_pooled(args).await? {
                Ok(rx) => self.push(Slot::Upstream(rx, Metas::One(meta))).await,
                Err(e) => self.push(Slot::Local(e.to_reply(), Some(meta))).await,
            };
        }
        // A group answers at most what the reply queue has room for (`max_pipeline` counts
        // commands): a fuller one is closed, and its slot waits for room like any other.
        if self.group.as_ref().is_some_and(|g| g.metas.len() >= self.slots.0.room().max(1)) {
            self.close_group().await?;
        }
        if let Err(e) = self.pool_batch().await? {
            return self.push(Slot::Local(e.to_reply(), Some(meta))).await;
        }
        let Some((_, batch)) = &mut self.batch else { unreachable!("pool_batch set it") };
        encode::command(&mut batch.payload, args);
        // Consecutive commands of one read share one waiter and one slot: their replies come
        // back to back. An open group belongs to the current batch: sending the batch, or
        // pushing any other slot or waiter, closes it first.
        match &mut self.group {
            Some(group) => group.metas.push(meta),
            None => {
                let (tx, rx) = oneshot::channel();
                self.group = Some(Group { tx, rx, metas: Metas::One(meta) });
            }
        }
        self.sent_since_barrier = true;
        Ok(())
    }

    /// Makes `self.batch` the batch of the session's pool connection: switches to the pool,
    /// and sends a batch meant for another connection first. `Ok(Err(_))`: no connection.
    async fn pool_batch(&mut self) -> Result<Result<(), UpstreamError>, Stop> {
        self.switch(Target::Pool).await?;
        if let Err(e) = self.ensure_pool().await {
            return Ok(Err(e));
        }
        if !self.batch_is_current() {
            self.flush().await?;
            let Some((_, handle)) = &self.pool else { return Ok(Err(UpstreamError::Lost)) };
            self.batch = Some((handle.clone(), Batch::default()));
        }
        Ok(Ok(()))
    }

    /// True when `self.batch` is for the session's current pool connection.
    fn batch_is_current(&self) -> bool {
        matches!((&self.batch, &self.pool), (Some((h, _)), Some((_, handle))) if h.is_same(handle))
    }

    /// Ends the open group: its waiter joins the batch, its slot the queue.
    async fn close_group(&mut self) -> Result<(), Stop> {
        let Some(group) = self.group.take() else { return Ok(()) };
        let Some((_, batch)) = &mut self.batch else { unreachable!("an open group has a batch") };
        let replies = group.metas.len();
        batch.waiters.push(Waiter { tx: group.tx, budget: Some(self.budget.clone()), replies });
        self.push_slot(Slot::Upstream(group.rx, group.metas)).await
    }

    /// Queues a command on the multiplexed connection without a reply slot: the caller decides
    /// what reaches the client (see `later`). Its reply is charged to the session's budget.
    async fn queue_pooled(
        &mut self,
        args: &[Bytes],
    ) -> Result<Result<oneshot::Receiver<crate::upstream::mux::Reply>, UpstreamError>, Stop> {
        // The open group's waiter goes first. Closing it may send the batch (when the reply
        // queue is full), so the batch is made current after.
        self.close_group().await?;
        if let Err(e) = self.pool_batch().await? {
            return Ok(Err(e));
        }
        let Some((_, batch)) = &mut self.batch else { unreachable!("pool_batch set it") };
        let (tx, rx) = oneshot::channel();
        encode::command(&mut batch.payload, args);
        batch.waiters.push(Waiter::one(tx, Some(self.budget.clone())));
        self.sent_since_barrier = true;
        Ok(Ok(rx))
    }

    /// Queues several commands back to back in one batch on one shared connection (a batch is
    /// written as a unit, so no other client's command comes between them); one receiver each.
    async fn queue_pooled_group(
        &mut self,
        cmds: &[Vec<Bytes>],
    ) -> Result<Result<Vec<oneshot::Receiver<crate::upstream::mux::Reply>>, UpstreamError>, Stop> {
        // The open group's waiter goes first. Closing it may send the batch (when the reply
        // queue is full), so the batch is made current after.
        self.close_group().await?;
        if let Err(e) = self.pool_batch().await? {
            return Ok(Err(e));
        }
        let Some((_, batch)) = &mut self.batch else { unreachable!("pool_batch set it") };
        let mut rxs = Vec::with_capacity(cmds.len());
        for args in cmds {
            let (tx, rx) = oneshot::channel();
            encode::command(&mut batch.payload, args);
            batch.waiters.push(Waiter::one(tx, Some(self.budget.clone())));
            rxs.push(rx);
        }
        self.sent_since_barrier = true;
        Ok(Ok(rxs))
    }

    /// A reply a feature module computes; placed in order like any other.
    async fn later(&mut self, fut: Later, meta: Meta) -> Result<(), Stop> {
        self.push(Slot::Later(fut, meta)).await
    }

    /// Makes `self.pool` a live connection of the pool for the session's current state.
    async fn ensure_pool(&mut self) -> Result<(), UpstreamError> {
        if let Some((k, h)) = &self.pool
            && self.state.has_key(k)
            && h.is_alive()
        {
            return Ok(());
        }
        let key = self.state.key();
        let pool = self.ctx.upstream.pool(&key).await?;
        let handle = self.ctx.upstream.connection(&pool, self.id).await?;
        self.pool = Some((key, handle));
        Ok(())
    }

    /// Opens the dedicated connection if needed.
    async fn ensure_pinned(&mut self) -> Result<(), UpstreamError> {
        if self.pinned.is_some() {
            return Ok(());
        }
        let (pinned, frames) =
            Pinned::open(self.ctx.upstream.endpoint(), &self.state.handshake(), self.budget.clone()).await?;
        self.pinned = Some(pinned);
        self.push(Slot::Attach(frames)).await.map_err(|_| UpstreamError::Lost)?;
        Ok(())
    }

    /// Frames the dedicated connection sends for the next command, given the reply mode.
    fn expected_replies(&mut self, n: usize) -> usize {
        if self.state.monitor {
            // Everything a monitoring connection sends is forwarded as it comes.
            return 0;
        }
        match self.state.reply_mode {
            ReplyMode::On => n,
            ReplyMode::Off => 0,
            ReplyMode::SkipNext => {
                self.state.reply_mode = ReplyMode::On;
                0
            }
        }
    }

    /// Sends commands on the dedicated connection. `hidden` commands go first and their
    /// replies are not shown; `replies` is what the client's command produces.
    async fn send_pinned(
        &mut self,
        hidden: &[&[&[u8]]],
        args: &[Bytes],
        replies: usize,
        meta: Meta,
        report: Option<oneshot::Sender<Bytes>>,
    ) -> Result<bool, Stop> {
        self.send_pinned_ext(hidden, args, replies, meta, report, PinnedExtra::default()).await
    }

    /// `send_pinned`, plus sidecache's own commands after the client's (`extra.tail`, their
    /// replies hidden) and `EXEC` elements to remove (`extra.strip`).
    async fn send_pinned_ext(
        &mut self,
        hidden: &[&[&[u8]]],
        args: &[Bytes],
        replies: usize,
        meta: Meta,
        report: Option<oneshot::Sender<Bytes>>,
        extra: PinnedExtra,
    ) -> Result<bool, Stop> {
        self.switch(Target::Pinned).await?;
        if let Err(e) = self.ensure_pinned().await {
            // The connection state the client has, or asks for with `MULTI`/`WATCH`, cannot
            // exist: close after the error, as when that connection is lost, rather than run
            // the commands that follow outside their transaction or context. Redis refusing a
            // client that has not authenticated is what it would answer `MULTI` itself, and
            // leaves the connection usable.
            let unauthenticated = matches!(&e, UpstreamError::Rejected(r) if r.starts_with(b"-NOAUTH "));
            let stateful = self.state.needs_pin() || (not_queued(args) && !unauthenticated);
            self.local(e.to_reply(), meta).await?;
            return if stateful { Err(Stop::Drain) } else { Ok(false) };
        }
        for h in hidden {
            encode::command(&mut self.pinned_out, h);
        }
        encode::command(&mut self.pinned_out, args);
        for t in &extra.tail {
            encode::command(&mut self.pinned_out, t);
        }
        if self.state.in_multi && !not_queued(args) {
            let first_tail = self.state.multi_len + hidden.len() + 1;
            self.state.multi_hidden.extend(first_tail..first_tail + extra.tail.len());
            self.state.multi_len = first_tail + extra.tail.len();
        }
        self.sent_since_barrier = true;
        // Redis answers the tail unless replies are off altogether (SKIP covered only the
        // client's command).
        let off = self.state.reply_mode == ReplyMode::Off || self.state.monitor;
        let tail = if off { 0 } else { extra.tail.len() };
        // Under OFF Redis answers none of sidecache's own commands either.
        let hidden_replies = if off { 0 } else { hidden.len() };
        let count = hidden_replies + replies + tail;
        self.pinned_unconfirmed = count == 0;
        let monitor = self.state.monitor;
        let guard = self.pending_guard.take();
        let slot = Slot::Pinned {
            count,
            skip: hidden_replies,
            tail,
            strip: extra.strip,
            meta: Some(meta),
            report,
            monitor,
            guard,
            pubsub: extra.pubsub,
        };
        self.push(slot).await?;
        Ok(true)
    }

    /// Runs a command on the dedicated connection and returns its reply (for state tracking).
    async fn pinned_with_report(&mut self, cmd: &Command, meta: Meta) -> Result<Option<Bytes>, Stop> {
        let (tx, rx) = oneshot::channel();
        let replies = self.expected_replies(1);
        let report = (replies == 1).then_some(tx);
        if !self.send_pinned(&[], &cmd.args, replies, meta, report).await? || replies == 0 {
            return Ok(None);
        }
        self.flush().await?;
        Ok(rx.await.ok())
    }

    /// Closes the dedicated connection (its state no longer matches the session's, or the
    /// session was reset). Callers have waited for its replies.
    async fn drop_pinned(&mut self) -> Result<(), Stop> {
        self.pinned_unconfirmed = false;
        if self.pinned.is_some() {
            self.push(Slot::Detach).await?;
            self.pinned = None;
        }
        if self.target == Target::Pinned {
            self.target = Target::Nowhere;
        }
        Ok(())
    }

    /// Routes one command. `Ok(false)` ends the session after pending replies are written.
    async fn dispatch(&mut self, cmd: Command) -> Result<bool, Stop> {
        let meta = Meta { family: cmd.family, start: Instant::now() };
        if self.policy.denies(&cmd) {
            self.local(encode::error("NOPERM this command is disabled by sidecache"), meta).await?;
            return Ok(true);
        }
        let pinned_mode = self.state.needs_pin();
        match cmd.kind {
            Kind::Attack => {
                warn_cross_protocol();
                return Err(Stop::Abort);
            }
            Kind::Replication => {
                let msg = format!(
                    "ERR sidecache: {} (replication) is not supported through sidecache; connect to Redis directly",
                    cmd.display_name().to_uppercase()
                );
                self.local(encode::error(&msg), meta).await?;
            }
            Kind::Quit => {
                self.local(encode::simple("OK"), meta).await?;
                return Ok(false);
            }
            // Malformed: Redis's own arity error, and nothing changes.
            Kind::Reset | Kind::Multi if cmd.args.len() != 1 => self.forward(&cmd, meta, pinned_mode).await?,
            Kind::Reset => {
                let skipped = self.state.reply_mode == ReplyMode::SkipNext;
                self.confirm_pinned().await?;
                self.barrier().await?;
                self.drop_pinned().await?;
                self.target = Target::Nowhere;
                self.state = State::new(&self.ctx.upstream.initial_key());
                // The transaction is discarded with the connection: its writes never run.
                self.multi_guard = None;
                // RESET's own reply is the one a pending `CLIENT REPLY SKIP` suppresses.
                if !skipped {
                    self.push(Slot::Local(encode::simple("RESET"), Some(meta))).await?;
                }
            }
            Kind::Multi => {
                let replies = self.expected_replies(1);
                if self.send_pinned(&[], &cmd.args, replies, meta, None).await? {
                    self.state.in_multi = true;
                }
            }
            Kind::Exec | Kind::Discard if self.state.in_multi => {
                self.pending_guard = self.multi_guard.take();
                let selected = self.state.multi_db.take();
                let pubsub = std::mem::take(&mut self.state.multi_pubsub).then_some(PubSubCmd::Exec);
                let dirty = self.state.multi_dirty && cmd.kind == Kind::Exec;
                self.state.in_multi = false;
                self.state.multi_dirty = false;
                self.state.watching = false;
                self.state.multi_len = 0;
                let strip = std::mem::take(&mut self.state.multi_hidden);
                if dirty {
                    let discard: &[&[u8]] = &[b"DISCARD"];
                    self.send_pinned(&[discard], &[], 0, meta, None).await?;
                    self.local(encode::error("EXECABORT Transaction discarded because of previous errors."), meta)
                        .await?;
                } else {
                    let replies = self.expected_replies(1);
                    let strip = if cmd.kind == Kind::Exec { strip } else { Vec::new() };
                    let extra = PinnedExtra { strip, pubsub, ..Default::default() };
                    // A queued SELECT changed the connection's database if its element of
                    // EXEC's reply is not an error: wait for the reply to know.
                    let selected = selected.filter(|_| cmd.kind == Kind::Exec && replies == 1);
                    let (tx, rx) = oneshot::channel();
                    let report = selected.is_some().then_some(tx);
                    let sent = self.send_pinned_ext(&[], &cmd.args, replies, meta, report, extra).await?;
                    if let Some((db, at)) = selected
                        && sent
                    {
                        self.flush().await?;
                        if let Ok(reply) = rx.await
                            && select_took_effect(&reply, at)
                        {
                            self.state.db = db;
                        }
                    }
                }
            }
            Kind::Watch if !self.state.in_multi && cmd.args.len() > 1 => {
                let replies = self.expected_replies(1);
                if self.send_pinned(&[], &cmd.args, replies, meta, None).await? {
                    self.state.watching = true;
                }
            }
            Kind::Unwatch if !self.state.in_multi => {
                let replies = self.expected_replies(1);
                if pinned_mode {
                    self.send_pinned(&[], &cmd.args, replies, meta, None).await?;
                } else {
                    self.send_pooled(&cmd.args, meta).await?;
                }
                self.state.watching = false;
            }
            // Inside a transaction: the connection's subscriptions are Redis's from now on.
            Kind::Subscribe(_) | Kind::Unsubscribe(_) if self.state.in_multi => {
                self.state.sticky = true;
                self.state.multi_pubsub = true;
                self.forward(&cmd, meta, true).await?
            }
            Kind::Subscribe(kind) if cmd.args.len() > 1 => {
                let replies = self.expected_replies(cmd.args.len() - 1);
                let pubsub = Some(PubSubCmd::Subscription { kind, all: false });
                let extra = PinnedExtra { pubsub, ..Default::default() };
                // Recorded even if Redis refuses it: the session then merely stays on its
                // dedicated connection until it unsubscribes.
                if self.send_pinned_ext(&[], &cmd.args, replies, meta, None, extra).await? {
                    let subs = self.state.subs(kind);
                    subs.extend(cmd.params().iter().cloned());
                }
            }
            Kind::Unsubscribe(kind) if !self.state.in_multi => {
                let named = cmd.args.len() - 1;
                // For an unsubscribe from everything the writer counts Redis's replies.
                let replies = self.expected_replies(named.max(1));
                let pubsub = Some(PubSubCmd::Subscription { kind, all: named == 0 });
                let extra = PinnedExtra { pubsub, ..Default::default() };
                if self.send_pinned_ext(&[], &cmd.args, replies, meta, None, extra).await? {
                    let subs = self.state.subs(kind);
                    if named == 0 {
                        subs.clear();
                    } else {
                        for c in &cmd.args[1..] {
                            subs.remove(c);
                        }
                    }
                }
            }
            Kind::Monitor if !self.state.in_multi => {
                // The slot carries the flag: after its +OK every frame is a monitor line.
                self.state.monitor = true;
                self.state.sticky = true;
                if !self.send_pinned(&[], &cmd.args, 1, meta, None).await? {
                    self.state.monitor = false;
                }
            }
            Kind::Sticky => {
                let replies = self.expected_replies(1);
                // Sticky once sent: a command that got no dedicated connection left no state.
                if self.send_pinned(&[], &cmd.args, replies, meta, None).await? {
                    self.state.sticky = true;
                }
            }
            Kind::ClientReply => self.client_reply(&cmd, meta).await?,
            Kind::Blocking if !self.state.in_multi => {
                self.blocking_sent = true;
                self.pending_guard = self.ctx.cache.as_ref().and_then(|c| c.begin_write(&cmd));
                self.forward(&cmd, meta, true).await?
            }
            Kind::Wait if !self.state.in_multi => {
                self.blocking_sent = true;
                // WAIT counts replicas that acknowledged this connection's last write. The
                // client's writes went over the shared connection, so a PUBLISH on the dedicated
                // one first moves its write offset past them (PUBLISH is propagated to replicas).
                let replies = self.expected_replies(1);
                let barrier: &[&[u8]] = &[b"PUBLISH", b"__sidecache__:wait", b""];
                self.send_pinned(&[barrier], &cmd.args, replies, meta, None).await?;
            }
            Kind::Select | Kind::Auth | Kind::Hello if pinned_mode => self.state_change_pinned(&cmd, meta).await?,
            Kind::Select => self.select(&cmd, meta).await?,
            Kind::Auth => self.auth(&cmd, meta).await?,
            Kind::Hello => self.hello(&cmd, meta).await?,
            Kind::ClientSetName => self.client_setname(&cmd, meta, pinned_mode).await?,
            Kind::Own => self.own(&cmd, meta, pinned_mode).await?,
            // On a dedicated connection Redis knows the name (and answers as it would there:
            // queued inside `MULTI`, refused in RESP2 subscribed mode).
            Kind::ClientGetName if cmd.args.len() == 2 && !pinned_mode => {
                let reply = match &self.state.name {
                    Some(name) => encode::bulk(name),
                    None => encode::null(self.state.proto),
                };
                self.local(reply, meta).await?;
            }
            _ => match self.ctx.cache.clone() {
                Some(cache) => self.through_cache(&cache, &cmd, meta, pinned_mode).await?,
                None => self.forward(&cmd, meta, pinned_mode).await?,
            },
        }
        Ok(true)
    }

    /// sidecache's own commands, answered by the module that owns each. A name no module
    /// answers yet goes to Redis, which answers it as the unknown command it is.
    async fn own(&mut self, cmd: &Command, meta: Meta, pinned_mode: bool) -> Result<(), Stop> {
        let own = matches!(
            cmd.name(),
            b"SIDECACHE" | b"LOCK.ACQUIRE" | b"LOCK.RELEASE" | b"LOCK.EXTEND" | b"LOCK.INFO" | b"SERIAL.NEXT"
        );
        if own && self.state.resp2_subscribed() {
            return self.local(subscribed_refusal(&cmd.display_name()), meta).await;
        }
        match cmd.name() {
            b"SIDECACHE" => {
                let reply = crate::cache::command::run(self.ctx.cache.as_deref(), &self.who(), cmd);
                self.local(reply, meta).await
            }
            b"LOCK.ACQUIRE" | b"LOCK.RELEASE" | b"LOCK.EXTEND" | b"LOCK.INFO" | b"SERIAL.NEXT" => {
                self.lock_command(cmd, meta).await
            }
            _ => self.forward(cmd, meta, pinned_mode).await,
        }
    }

    /// The identity the near-cache partitions by.
    fn who(&self) -> Who {
        let user = match &self.state.creds {
            None => Bytes::new(),
            Some(c) => c.user.clone().unwrap_or(Bytes::from_static(b"default")),
        };
        Who { user, db: self.state.db, proto: self.state.proto }
    }

    /// A plain command while the near-cache is configured: cached reads are answered from
    /// memory or filled; writes invalidate their keys before and after they run.
    async fn through_cache(
        &mut self,
        cache: &Arc<NearCache>,
        cmd: &Command,
        meta: Meta,
        pinned_mode: bool,
    ) -> Result<(), Stop> {
        if pinned_mode {
            // Never from memory here (transactions, watches, the client's own tracking…).
            if let Some(guard) = cache.begin_write(cmd) {
                if self.state.in_multi {
                    // The write runs at EXEC: its keys stay marked until EXEC's reply.
                    match &mut self.multi_guard {
                        Some(g) => g.merge(guard),
                        None => self.multi_guard = Some(guard),
                    }
                } else {
                    self.pending_guard = Some(guard);
                }
            }
            return self.forward(cmd, meta, true).await;
        }
        match crate::cache::reads::plan(cmd) {
            Some(crate::cache::Plan::Single(read)) => self.cached_read(cache, cmd, read, meta).await,
            Some(crate::cache::Plan::Mget(keys)) => self.cached_mget(cache, cmd, keys, meta).await,
            None => {
                // The write's keys are invalidated again when its reply is in (see `push`).
                self.pending_guard = cache.begin_write(cmd);
                self.forward(cmd, meta, false).await
            }
        }
    }

    /// Sends a read and `PTTL` of its key for a fill; the fill completes in its own task, so
    /// readers who joined it get their reply even if this client goes away.
    async fn send_fill(
        &mut self,
        args: &[Bytes],
        fills: Vec<crate::cache::Fill>,
        finish: impl FnOnce(&Bytes, Vec<crate::cache::Fill>, Vec<Option<Bytes>>) -> Bytes + Send + 'static,
    ) -> Result<Result<oneshot::Receiver<(Bytes, usize)>, UpstreamError>, Stop> {
        let read = match self.queue_pooled(args).await? {
            Ok(rx) => rx,
            Err(e) => return Ok(Err(e)),
        };
        let mut ttls = Vec::with_capacity(fills.len());
        for f in &fills {
            let pttl = [Bytes::from_static(b"PTTL"), f.key().clone()];
            ttls.push(self.queue_pooled(&pttl).await?.ok());
        }
        let budget = self.budget.clone();
        let (tx, rx) = oneshot::channel();
        tokio::spawn(async move {
            let (bytes, charged) = charged_reply(read.await);
            let mut pttls = Vec::with_capacity(ttls.len());
            for t in ttls {
                let t = match t {
                    Some(rx) => rx.await.ok().and_then(Result::ok),
                    None => None,
                };
                if let Some(t) = &t {
                    budget.release(t.len());
                }
                pttls.push(t);
            }
            let reply = finish(&bytes, fills, pttls);
            let _ = tx.send((reply, charged));
        });
        Ok(Ok(rx))
    }

    async fn cached_read(
        &mut self,
        cache: &Arc<NearCache>,
        cmd: &Command,
        read: crate::cache::Read,
        meta: Meta,
    ) -> Result<(), Stop> {
        match cache.lookup(&self.who(), &read) {
            Lookup::Skip => self.forward(cmd, meta, false).await,
            Lookup::Hit(bytes) => {
                if cache.sample_verify() {
                    self.verify(cache, cmd, read.key, bytes.clone()).await?;
                }
                self.local(bytes, meta).await
            }
            Lookup::Join(rx) => self.later(Box::pin(async move { (joined(rx.await), 0) }), meta).await,
            Lookup::Lead(fill) => {
                let finish = |reply: &Bytes, fills: Vec<crate::cache::Fill>, pttls: Vec<Option<Bytes>>| {
                    for (fill, pttl) in fills.into_iter().zip(pttls) {
                        fill.complete(reply, pttl.as_ref());
                    }
                    reply.clone()
                };
                match self.send_fill(&cmd.args, vec![fill], finish).await? {
                    Err(e) => self.local(e.to_reply(), meta).await,
                    Ok(rx) => {
                        let fut = async move { rx.await.unwrap_or_else(|_| (UpstreamError::Lost.to_reply(), 0)) };
                        self.later(Box::pin(fut), meta).await
                    }
                }
            }
        }
    }

    async fn cached_mget(
        &mut self,
        cache: &Arc<NearCache>,
        cmd: &Command,
        keys: Vec<Bytes>,
        meta: Meta,
    ) -> Result<(), Stop> {
        enum Part {
            Ready(Bytes),
            Join(oneshot::Receiver<Bytes>),
            Fetched(usize),
        }
        let who = self.who();
        let mut parts = Vec::with_capacity(keys.len());
        let mut fetch: Vec<Bytes> = vec![Bytes::from_static(b"MGET")];
        let mut leads = Vec::new();
        let mut lead_pos = Vec::new();
        let mut cached_any = false;
        for key in keys {
            let read = crate::cache::reads::mget_element(key.clone());
            match cache.lookup(&who, &read) {
                Lookup::Hit(b) => {
                    cached_any = true;
                    parts.push(Part::Ready(b));
                }
                Lookup::Join(rx) => {
                    cached_any = true;
                    parts.push(Part::Join(rx));
                }
                Lookup::Lead(fill) => {
                    cached_any = true;
                    lead_pos.push(fetch.len() - 1);
                    leads.push(fill);
                    parts.push(Part::Fetched(fetch.len() - 1));
                    fetch.push(key);
                }
                Lookup::Skip => {
                    parts.push(Part::Fetched(fetch.len() - 1));
                    fetch.push(key);
                }
            }
        }
        if !cached_any {
            return self.forward(cmd, meta, false).await;
        }
        let proto = self.state.proto;
        let fetched = if fetch.len() > 1 {
            let n = fetch.len() - 1;
            let finish = move |reply: &Bytes, fills: Vec<crate::cache::Fill>, pttls: Vec<Option<Bytes>>| {
                let split = crate::cache::reads::split_mget(reply, n, proto);
                for ((fill, pttl), pos) in fills.into_iter().zip(pttls).zip(lead_pos) {
                    match &split {
                        Some(items) => fill.complete(&items[pos], pttl.as_ref()),
                        None => fill.complete(reply, None),
                    }
                }
                reply.clone()
            };
            match self.send_fill(&fetch, leads, finish).await? {
                Err(e) => return self.local(e.to_reply(), meta).await,
                Ok(rx) => Some((rx, n)),
            }
        } else {
            None
        };
        let fut = async move {
            let mut charged = 0;
            let mut items = None;
            if let Some((rx, n)) = fetched {
                let (reply, c) = rx.await.unwrap_or_else(|_| (UpstreamError::Lost.to_reply(), 0));
                charged = c;
                match crate::cache::reads::split_mget(&reply, n, proto) {
                    Some(split) => items = Some(split),
                    // An error (or an unexpected reply) answers the whole command.
                    None => return (reply, charged),
                }
            }
            let mut out = Vec::with_capacity(parts.len());
            for part in parts {
                out.push(match part {
                    Part::Ready(b) => b,
                    Part::Join(rx) => {
                        let b = joined(rx.await);
                        if crate::protocol::reply::is_error(&b) {
                            return (b, charged);
                        }
                        b
                    }
                    Part::Fetched(i) => items.as_ref().map_or_else(Bytes::new, |v| v[i].clone()),
                });
            }
            (crate::cache::reads::join_mget(&out), charged)
        };
        self.later(Box::pin(fut), meta).await
    }

    /// Shadow verify: re-reads a hit from Redis and counts a difference that no invalidation
    /// explains.
    async fn verify(&mut self, cache: &Arc<NearCache>, cmd: &Command, key: Bytes, hit: Bytes) -> Result<(), Stop> {
        let token = cache.token(&key);
        let Ok(rx) = self.queue_pooled(&cmd.args).await? else { return Ok(()) };
        let budget = self.budget.clone();
        let cache = cache.clone();
        let grace = cache.config.heartbeat;
        tokio::spawn(async move {
            if let Ok(Ok(reply)) = rx.await {
                budget.release(reply.len());
                if reply != hit {
                    // A write that raced the re-read is invalidated within the link's lag.
                    tokio::time::sleep(grace).await;
                    if cache.token_valid(token) {
                        cache.stale_detected(&key);
                    }
                }
            }
        });
        Ok(())
    }

    /// Sends a command where the session's commands go now, as the TTL policy plans it.
    /// `LOCK.*` and `SERIAL.NEXT` (see `locks`): argument errors at once, the rest when its
    /// turn comes. Their scripts run on the lock service's own connection, so the client's
    /// next commands are held until the reply is in: they run after it in Redis, as they would
    /// on one connection (and after a `LOCK.ACQUIRE … WAIT`, as after a blocking command).
    ///
    /// The scripts run as the upstream URL's user. A client logged in as another user gets
    /// Redis's verdict on that user first: `EVAL` of a no-op script that declares the
    /// command's keys, on the session's shared connection, refused where Redis would refuse
    /// the user the scripts (no `EVAL`, or no write access to the keys).
    async fn lock_command(&mut self, cmd: &Command, meta: Meta) -> Result<(), Stop> {
        if self.state.in_multi {
            let msg = format!("ERR '{}' cannot be used inside MULTI", cmd.display_name());
            return self.local(encode::error(&msg), meta).await;
        }
        let reply = match self.locks.command(cmd, self.state.proto) {
            Ok(reply) => reply,
            Err(e) => return self.local(e, meta).await,
        };
        let keys = self.locks.keys(cmd);
        let verdict = match self.locks.acl_probe(&keys, self.state.creds.as_ref()) {
            Some(probe) => match self.queue_pooled(&probe).await? {
                Ok(rx) => Some(rx),
                Err(e) => return self.local(e.to_reply(), meta).await,
            },
            None => None,
        };
        // Its writes are a client's writes like any other: a near-cache that covers the keys
        // must not answer them from memory, to this client or others, once it is answered.
        let guard = match (&self.ctx.cache, cmd.name()) {
            (Some(cache), name) if name != b"LOCK.INFO" => cache.begin_keys(keys),
            _ => None,
        };
        let budget = self.budget.clone();
        let reply: Later = Box::pin(async move {
            let _guard = guard;
            if let Some(rx) = verdict {
                let (verdict, charged) = charged_reply(rx.await);
                if reply::is_error(&verdict) {
                    return (verdict, charged);
                }
                budget.release(charged);
            }
            reply.await
        });
        let reply = match self.state.reply_mode {
            ReplyMode::On => reply,
            mode => {
                // It runs, but its reply is not shown (CLIENT REPLY OFF|SKIP).
                if mode == ReplyMode::SkipNext {
                    self.skip_taken_here().await?;
                }
                Box::pin(async move {
                    reply.await;
                    (Bytes::new(), 0)
                })
            }
        };
        let (done, hold) = oneshot::channel();
        self.hold = Some(hold);
        let reply = Box::pin(async move {
            let out = reply.await;
            let _ = done.send(());
            out
        });
        self.push(Slot::Waiting(reply, meta)).await
    }

    /// Sends a command where the session's commands go now.
    async fn forward(&mut self, cmd: &Command, meta: Meta, pinned_mode: bool) -> Result<(), Stop> {
        let db = match self.state.multi_db {
            Some((db, _)) if self.state.in_multi => db,
            _ => self.state.db,
        };
        let plan = self.policy.ttl.plan(cmd, db);
        let (args, tail) = match plan {
            Plan::Forward => (&cmd.args, Vec::new()),
            Plan::Rewrite(ref args) => (args, Vec::new()),
            Plan::Guard(guards) if pinned_mode => (&cmd.args, guards),
            Plan::Guard(guards) => {
                // Atomic on the shared connection: MULTI, the command, PEXPIRE … NX, EXEC.
                let batch = crate::ttl::guarded_batch(&cmd.args, guards);
                return match self.queue_pooled_group(&batch).await? {
                    Ok(rxs) => self.later(crate::ttl::guarded_reply(rxs), meta).await,
                    Err(e) => self.push(Slot::Local(e.to_reply(), Some(meta))).await,
                };
            }
        };
        if pinned_mode {
            let replies = self.expected_replies(1);
            let extra = PinnedExtra { tail, ..Default::default() };
            self.send_pinned_ext(&[], args, replies, meta, None, extra).await?;
            Ok(())
        } else {
            self.send_pooled(args, meta).await
        }
    }

    async fn client_reply(&mut self, cmd: &Command, meta: Meta) -> Result<(), Stop> {
        let mode = match cmd.args.get(2) {
            Some(a) if cmd.args.len() == 3 && a.eq_ignore_ascii_case(b"ON") => Some(ReplyMode::On),
            Some(a) if cmd.args.len() == 3 && a.eq_ignore_ascii_case(b"OFF") => Some(ReplyMode::Off),
            Some(a) if cmd.args.len() == 3 && a.eq_ignore_ascii_case(b"SKIP") => Some(ReplyMode::SkipNext),
            _ => None,
        };
        let replies = match mode {
            Some(ReplyMode::On) => 1,
            Some(_) => 0,
            None => self.expected_replies(1),
        };
        if self.state.in_multi && mode.is_some() {
            // Redis would queue it and then answer EXEC with an array whose elements the new
            // mode suppresses (a malformed reply): refused, so the transaction aborts.
            let msg =
                "ERR sidecache: CLIENT REPLY inside MULTI is not supported (Redis's EXEC reply would be malformed)";
            return self.local(encode::error(msg), meta).await;
        }
        // A malformed `CLIENT REPLY` while replies are off or skipped gets no reply at all (the
        // mode it would change stays as it is): nothing to learn, and no probe, which would
        // confirm the dedicated connection with a `CLIENT REPLY ON` and so end its mode.
        if replies == 0 && mode.is_some() {
            // OFF and SKIP get no reply when Redis takes them, so its refusal is learned first:
            // RESP2 subscribed mode allows no CLIENT command, and ACL rules are checked by
            // `CLIENT REPLY ON` on the shared connection (a no-op there).
            if self.state.resp2_subscribed() {
                return self.local(subscribed_refusal("client|reply"), meta).await;
            }
            let probe = [cmd.args[0].clone(), cmd.args[1].clone(), Bytes::from_static(b"ON")];
            let verdict = self.pool_verdict(&probe).await?;
            if reply::is_error(&verdict.0) {
                return self.later(Box::pin(std::future::ready(verdict)), meta).await;
            }
            self.budget.release(verdict.1);
        }
        if let Some(mode) = mode {
            // Redis applies the new mode to this very command: ON answers, OFF/SKIP do not.
            self.state.reply_mode = mode;
        }
        self.send_pinned(&[], &cmd.args, replies, meta, None).await?;
        Ok(())
    }

    /// Redis's verdict on a command that changes nothing on the shared connection, where the
    /// session's user is judged by the same ACL rules as on a connection of its own.
    async fn pool_verdict(&mut self, args: &[Bytes]) -> Result<(Bytes, usize), Stop> {
        Ok(match self.queue_pooled(args).await? {
            Ok(rx) => {
                self.flush().await?;
                charged_reply(rx.await)
            }
            Err(e) => (e.to_reply(), 0),
        })
    }

    /// Moves the session to the pool for `key`, answering with Redis's own error when the
    /// pool's handshake fails, else forwarding `args` there for Redis's own reply; true when
    /// Redis accepted (see `try_move`).
    async fn move_to(&mut self, key: PoolKey, args: &[Bytes], meta: Meta) -> Result<bool, Stop> {
        let (accepted, verdict) = self.try_move(key, args, meta).await?;
        self.later(Box::pin(std::future::ready(verdict)), meta).await?;
        Ok(accepted)
    }

    /// Moves the session to the pool for `key` if Redis accepts `args` there, and returns
    /// whether it did with Redis's reply (and the budget it was charged); the caller answers.
    /// The pool's handshake failing is Redis's verdict too.
    ///
    /// Redis judges the command on every use: an existing pool shows only that its credentials
    /// and database were accepted when it was made, and since then a password may have been
    /// reset, a user disabled, or `SELECT` or `HELLO` denied to the user. The session waits for
    /// the reply and keeps its previous state when it is an error, as a Redis connection does.
    ///
    /// When no verdict comes from Redis (it is down, or slower than the connect or command
    /// timeout), the client gets the error and its connection is closed after it: Redis never
    /// fails these commands for being slow, so the commands pipelined behind must not run in
    /// the state the client meant to leave (another database, the URL's user).
    async fn try_move(&mut self, key: PoolKey, args: &[Bytes], meta: Meta) -> Result<(bool, (Bytes, usize)), Stop> {
        self.flush().await?;
        if let Err(e) = self.ctx.upstream.pool(&key).await {
            if let UpstreamError::Rejected(reply) = e {
                return Ok((false, (reply, 0)));
            }
            self.local(e.to_reply(), meta).await?;
            return Err(Stop::Drain);
        }
        // Later commands go to another connection, so earlier ones must be answered first.
        self.barrier().await?;
        self.drop_pinned().await?;
        let before = self.state.key();
        self.state.set_key(key);
        let answer = match self.queue_pooled(args).await? {
            Ok(rx) => {
                self.flush().await?;
                rx.await.unwrap_or(Err(UpstreamError::Lost))
            }
            Err(e) => Err(e),
        };
        let answered = answer.is_ok();
        let verdict = charged_reply(Ok(answer));
        let accepted = !reply::is_error(&verdict.0);
        if !accepted {
            self.state.set_key(before);
        }
        if !answered {
            self.later(Box::pin(std::future::ready(verdict)), meta).await?;
            return Err(Stop::Drain);
        }
        Ok((accepted, verdict))
    }

    async fn select(&mut self, cmd: &Command, meta: Meta) -> Result<(), Stop> {
        let db = match cmd.args.get(1).and_then(|a| crate::protocol::request::parse_i64(a)) {
            Some(db) if cmd.args.len() == 2 && (0..=i64::from(i32::MAX)).contains(&db) => db as u32,
            // Redis answers malformed or negative indexes itself.
            _ => return self.send_pooled(&cmd.args, meta).await,
        };
        let mut key = self.state.key();
        key.db = db;
        self.move_to(key, &cmd.args, meta).await?;
        Ok(())
    }

    async fn auth(&mut self, cmd: &Command, meta: Meta) -> Result<(), Stop> {
        let creds = match cmd.args.len() {
            2 => Creds { user: None, pass: owned(&cmd.args[1]) },
            3 => Creds { user: Some(owned(&cmd.args[1])), pass: owned(&cmd.args[2]) },
            _ => return self.send_pooled(&cmd.args, meta).await,
        };
        let mut key = self.state.key();
        key.creds = Some(creds);
        self.move_to(key, &cmd.args, meta).await?;
        Ok(())
    }

    async fn hello(&mut self, cmd: &Command, meta: Meta) -> Result<(), Stop> {
        let hello = match parse_hello(cmd) {
            // Nothing to apply, only Redis's error to give: any connection answers it alike.
            None => return self.send_pooled(&cmd.args, meta).await,
            Some(h) if h.steps.is_empty() && h.bad_option.is_some() => {
                return self.send_pooled(&cmd.args, meta).await;
            }
            Some(h) => h,
        };
        let proto = hello.proto.unwrap_or(self.state.proto);
        let version = Bytes::from(proto.version().to_string());
        let usual = hello.bad_option.is_none()
            && hello.auths() <= 1
            && hello.steps.iter().all(|s| !matches!(s, HelloStep::Name(n) if check_client_name(n).is_err()));
        if !usual {
            return self.hello_stepwise(cmd, &hello, version, meta).await;
        }
        // The usual form: one verdict from Redis on the whole of it, forwarded without SETNAME
        // (the name is the session's, not the shared connection's) and with AUTH, so that
        // Redis checks the credentials.
        let mut key = self.state.key();
        key.proto = proto;
        let mut forwarded = vec![Bytes::from_static(b"HELLO"), version];
        for step in &hello.steps {
            match step {
                HelloStep::Name(_) => {}
                HelloStep::Auth(creds) => {
                    forwarded.push(Bytes::from_static(b"AUTH"));
                    forwarded.extend(creds.user.clone());
                    forwarded.push(creds.pass.clone());
                    key.creds = Some(creds.clone());
                }
            }
        }
        let (accepted, mut verdict) = self.try_move(key, &forwarded, meta).await?;
        // Redis names the connection before a wrong password or finding the client
        // unauthenticated, which it says in `HELLO`'s own words.
        let named = if accepted { Some(&hello.steps[..]) } else { hello.applied(&verdict.0) };
        let name = named.and_then(|steps| {
            steps.iter().rev().find_map(|s| match s {
                HelloStep::Name(n) => Some(n.clone()),
                HelloStep::Auth(_) => None,
            })
        });
        if let Some(name) = name {
            self.set_name(name).await?;
        }
        if !accepted && hello.auths() == 0 && verdict.0.starts_with(b"-NOAUTH ") {
            verdict = (encode::error(HELLO_NOAUTH), 0);
        }
        self.later(Box::pin(std::future::ready(verdict)), meta).await
    }

    /// `HELLO` with several passwords, a bad name, or an option that does not parse after some
    /// that do: its steps are applied one by one, as Redis applies them, and never sent as
    /// they are to a shared connection, where Redis would apply them for every client on it.
    async fn hello_stepwise(&mut self, cmd: &Command, hello: &Hello, version: Bytes, meta: Meta) -> Result<(), Stop> {
        for step in &hello.steps {
            match step {
                HelloStep::Name(n) => {
                    if let Err(e) = check_client_name(n) {
                        return self.local(e, meta).await;
                    }
                    self.set_name(n.clone()).await?;
                }
                HelloStep::Auth(creds) => {
                    let mut key = self.state.key();
                    key.creds = Some(creds.clone());
                    let auth: Vec<Bytes> = [Bytes::from_static(b"AUTH")]
                        .into_iter()
                        .chain(creds.user.clone())
                        .chain([creds.pass.clone()])
                        .collect();
                    let (accepted, verdict) = self.try_move(key, &auth, meta).await?;
                    if !accepted {
                        // `AUTH` and `HELLO` word a wrong password alike.
                        return self.later(Box::pin(std::future::ready(verdict)), meta).await;
                    }
                    self.budget.release(verdict.1);
                }
            }
        }
        let mut forwarded = vec![Bytes::from_static(b"HELLO"), version];
        match hello.bad_option {
            Some(at) => {
                // The options from the first bad one on: Redis's own syntax error, nothing applied.
                forwarded.extend(cmd.args[at..].iter().cloned());
                self.send_pooled(&forwarded, meta).await
            }
            None => {
                let mut key = self.state.key();
                key.proto = hello.proto.unwrap_or(key.proto);
                self.move_to(key, &forwarded, meta).await.map(drop)
            }
        }
    }

    /// Names the session (an empty name clears it). An idle dedicated connection now has a
    /// stale name: it is reopened when needed.
    async fn set_name(&mut self, name: Bytes) -> Result<(), Stop> {
        self.state.name = if name.is_empty() { None } else { Some(name) };
        if self.pinned.is_some() {
            self.barrier().await?;
            self.drop_pinned().await?;
        }
        Ok(())
    }

    async fn client_setname(&mut self, cmd: &Command, meta: Meta, pinned_mode: bool) -> Result<(), Stop> {
        if cmd.args.len() != 3 {
            // Redis's arity error, where the session's commands go (inside `MULTI` it aborts
            // the transaction).
            return self.forward(cmd, meta, pinned_mode).await;
        }
        if self.state.in_multi {
            // Queued: Redis judges the name at EXEC.
            return self.state_change_pinned(cmd, meta).await;
        }
        let name = owned(&cmd.args[2]);
        if let Err(e) = check_client_name(&name) {
            return self.local(e, meta).await;
        }
        if pinned_mode {
            self.state_change_pinned(cmd, meta).await
        } else {
            // Redis judges whether the user may name its connection: the shared connection,
            // which has no name, runs `CLIENT SETNAME ""` (a no-op there) for its verdict.
            let check = [cmd.args[0].clone(), cmd.args[1].clone(), Bytes::new()];
            let verdict = self.pool_verdict(&check).await?;
            if reply::is_error(&verdict.0) {
                return self.later(Box::pin(std::future::ready(verdict)), meta).await;
            }
            self.budget.release(verdict.1);
            // Without a dedicated connection there is nothing to wait for: a pipeline is not
            // stalled.
            self.set_name(name).await?;
            self.local(encode::simple("OK"), meta).await
        }
    }

    /// Takes on the credentials and name that `HELLO`'s steps gave the dedicated connection.
    fn adopt_hello_steps(&mut self, steps: &[HelloStep]) {
        for step in steps {
            match step {
                HelloStep::Auth(c) => self.state.creds = Some(c.clone()),
                HelloStep::Name(n) => self.state.name = if n.is_empty() { None } else { Some(n.clone()) },
            }
        }
    }

    /// `SELECT`/`AUTH`/`HELLO`/`CLIENT SETNAME` while on a dedicated connection: Redis runs it
    /// there; the session adopts the new state when Redis accepted it.
    async fn state_change_pinned(&mut self, cmd: &Command, meta: Meta) -> Result<(), Stop> {
        if self.state.in_multi {
            // Queued: it takes effect at EXEC, on this connection, which is kept for good.
            self.state.sticky = true;
            let at = self.state.multi_len;
            let shown = at - self.state.multi_hidden.iter().filter(|&&h| h < at).count();
            let replies = self.expected_replies(1);
            let sent = self.send_pinned(&[], &cmd.args, replies, meta, None).await?;
            // The commands queued after it run in that database: the TTL policy plans them so.
            if sent
                && cmd.kind == Kind::Select
                && let Some(db) = cmd.args.get(1).and_then(|a| crate::protocol::request::parse_i64(a))
                && let Ok(db) = u32::try_from(db)
            {
                self.state.multi_db = Some((db, shown));
            }
            return Ok(());
        }
        let Some(reply) = self.pinned_with_report(cmd, meta).await? else {
            // No reply to judge by (CLIENT REPLY OFF): keep the connection's state authoritative.
            self.state.sticky = true;
            return Ok(());
        };
        if reply::is_error(&reply) {
            // A failed `HELLO` may still have authenticated or named the connection.
            if cmd.kind == Kind::Hello
                && let Some(h) = parse_hello(cmd)
            {
                match h.applied(&reply) {
                    Some(steps) => self.adopt_hello_steps(steps),
                    // Which of its passwords failed cannot be told: the connection stays the
                    // session's, whose state Redis knows.
                    None => self.state.sticky = true,
                }
            }
            return Ok(());
        }
        match cmd.kind {
            Kind::Select => {
                if let Some(db) = cmd.args.get(1).and_then(|a| crate::protocol::request::parse_i64(a)) {
                    self.state.db = db as u32;
                }
            }
            Kind::Auth => {
                self.state.creds = match cmd.args.len() {
                    2 => Some(Creds { user: None, pass: owned(&cmd.args[1]) }),
                    _ => Some(Creds { user: Some(owned(&cmd.args[1])), pass: owned(&cmd.args[2]) }),
                };
            }
            Kind::Hello => {
                if let Some(h) = parse_hello(cmd) {
                    if let Some(p) = h.proto {
                        self.state.proto = p;
                    }
                    self.adopt_hello_steps(&h.steps);
                }
            }
            Kind::ClientSetName => {
                let name = owned(&cmd.args[2]);
                self.state.name = if name.is_empty() { None } else { Some(name) };
            }
            _ => {}
        }
        Ok(())
    }
}

/// What `send_pinned_ext` adds to a command on the dedicated connection.
#[derive(Default)]
struct PinnedExtra {
    /// sidecache's own commands sent right after the client's; their replies are not shown.
    tail: Vec<Vec<Bytes>>,
    /// Elements of this `EXEC`'s reply that answer sidecache's own queued commands.
    strip: Vec<usize>,
    /// The command is a pub/sub (un)subscribe.
    pubsub: Option<PubSubCmd>,
}

/// Commands Redis runs at once inside `MULTI` instead of queuing them (`MULTI`, `WATCH`).
fn not_queued(args: &[Bytes]) -> bool {
    args.first().is_some_and(|n| n.eq_ignore_ascii_case(b"MULTI") || n.eq_ignore_ascii_case(b"WATCH"))
}

/// Redis's answer to a `HELLO` without `AUTH` from a client that has not authenticated.
const HELLO_NOAUTH: &str = "NOAUTH HELLO must be called with the client already authenticated, otherwise the \
                            HELLO AUTH <user> <pass> option can be used to authenticate the client and select \
                            the RESP protocol version at the same time";

/// `HELLO [protover [AUTH user pass] [SETNAME name]…]` as Redis 7.0 runs it: the version is
/// checked first, then each option is applied in turn, so an option that fails (a wrong
/// password, a bad name) or does not parse leaves the ones before it in effect.
struct Hello {
    proto: Option<Proto>,
    steps: Vec<HelloStep>,
    /// Index in the arguments of the first option that does not parse; Redis applies the
    /// steps before it and then answers with a syntax error.
    bad_option: Option<usize>,
}

enum HelloStep {
    Auth(Creds),
    Name(Bytes),
}

impl Hello {
    fn auths(&self) -> usize {
        self.steps.iter().filter(|s| matches!(s, HelloStep::Auth(_))).count()
    }

    /// The steps Redis applied when it answered `reply`, an error; `None` when that cannot be
    /// told (one of several `AUTH`s failed). A bad name is refused before the steps after it,
    /// a wrong password likewise; any other error comes after every step.
    fn applied(&self, reply: &[u8]) -> Option<&[HelloStep]> {
        let wrongpass = reply.starts_with(b"-WRONGPASS");
        if wrongpass && self.auths() > 1 {
            return None;
        }
        let stop = self.steps.iter().position(|s| match s {
            HelloStep::Auth(_) => wrongpass,
            HelloStep::Name(n) => check_client_name(n).is_err(),
        });
        Some(&self.steps[..stop.unwrap_or(self.steps.len())])
    }
}

/// Parses `HELLO`; `None` when its version is not one Redis accepts (then nothing is applied).
fn parse_hello(cmd: &Command) -> Option<Hello> {
    let mut h = Hello { proto: None, steps: Vec::new(), bad_option: None };
    let args = cmd.params();
    let mut i = 0;
    if let Some(v) = args.first() {
        h.proto = match crate::protocol::request::parse_i64(v)? {
            2 => Some(Proto::Resp2),
            3 => Some(Proto::Resp3),
            _ => return None,
        };
        i = 1;
    }
    while i < args.len() {
        let more = args.len() - 1 - i;
        if args[i].eq_ignore_ascii_case(b"AUTH") && more >= 2 {
            h.steps.push(HelloStep::Auth(Creds { user: Some(owned(&args[i + 1])), pass: owned(&args[i + 2]) }));
            i += 3;
        } else if args[i].eq_ignore_ascii_case(b"SETNAME") && more >= 1 {
            h.steps.push(HelloStep::Name(owned(&args[i + 1])));
            i += 2;
        } else {
            h.bad_option = Some(i + 1);
            break;
        }
    }
    Some(h)
}

/// Redis's rule for client names: printable, no spaces.
fn check_client_name(name: &[u8]) -> Result<(), Bytes> {
    if name.iter().any(|&c| !(b'!'..=b'~').contains(&c)) {
        return Err(encode::error("ERR Client names cannot contain spaces, newlines or special characters."));
    }
    Ok(())
}

/// What the writer knows about pub/sub on the dedicated connection, from Redis's own replies.
#[derive(Default)]
struct PubSubView {
    /// Channels plus patterns, from the last (un)subscribe confirmation.
    subscriptions: i64,
    /// Shard channels, from the last s(un)subscribe confirmation.
    shard_subscriptions: i64,
    /// The names of the subscriptions, as Redis confirmed them.
    channels: HashSet<Bytes>,
    patterns: HashSet<Bytes>,
    shards: HashSet<Bytes>,
    /// The connection has sent a RESP3 push.
    pushes: bool,
    monitor: bool,
}

impl PubSubView {
    /// Subscriptions of `kind` Redis holds for this connection.
    fn subscribed(&self, kind: SubKind) -> usize {
        match kind {
            SubKind::Channel => self.channels.len(),
            SubKind::Pattern => self.patterns.len(),
            SubKind::Shard => self.shards.len(),
        }
    }

    /// Follows the confirmations among the elements of an `EXEC` reply.
    fn exec_reply(&mut self, frame: &[u8]) {
        for element in reply::elements(frame) {
            self.unsolicited(element, true);
        }
    }

    /// Follows one (un)subscribe confirmation (`kind` is its lowercase first element).
    fn confirmed(&mut self, kind: &[u8], name: Option<&[u8]>, count: Option<i64>) {
        let (set, shard) = match kind {
            b"subscribe" | b"unsubscribe" => (&mut self.channels, false),
            b"psubscribe" | b"punsubscribe" => (&mut self.patterns, false),
            _ => (&mut self.shards, true),
        };
        if let Some(name) = name {
            if kind.ends_with(b"unsubscribe") {
                set.remove(name);
            } else if !set.contains(name) {
                set.insert(Bytes::copy_from_slice(name));
            }
        }
        if let Some(n) = count {
            if shard {
                self.shard_subscriptions = n;
            } else {
                self.subscriptions = n;
            }
        }
    }

    /// True for frames that are not replies to a command: messages, other pushes, monitor lines.
    /// `replying`: the frame may answer an (un)subscribe command (the slot being resolved is
    /// one). Only then, or as a RESP3 push, is a frame shaped like a confirmation taken as one:
    /// a command's data can have that shape too (`LRANGE` of a list holding "subscribe"…).
    fn unsolicited(&mut self, frame: &[u8], replying: bool) -> bool {
        if self.monitor {
            return true;
        }
        let Some(head) = reply::head(frame) else {
            // A push whose first elements are not both strings (an invalidation carries an
            // array of keys) is not a reply all the same.
            let push = frame.first() == Some(&b'>');
            self.pushes |= push;
            return push;
        };
        self.pushes |= head.push;
        let first = head.first.map(|f| f.to_ascii_lowercase());
        let first = first.as_deref();
        let confirmation = matches!(
            first,
            Some(b"subscribe" | b"unsubscribe" | b"psubscribe" | b"punsubscribe" | b"ssubscribe" | b"sunsubscribe")
        );
        if let (true, Some(kind)) = (confirmation, first)
            && (replying || head.push)
        {
            self.confirmed(kind, head.second, head.third_int);
            // A confirmation push that answers no command of the client's is forwarded as is.
            return !replying;
        }
        if head.push {
            return true;
        }
        // Messages are arrays only in RESP2, where a subscribed connection runs nothing that
        // answers with an array of three; in RESP3 (pushes seen) an array is a command's data.
        let subscribed = self.subscriptions > 0 || self.shard_subscriptions > 0;
        subscribed && !self.pushes && head.len >= 3 && matches!(first, Some(b"message" | b"pmessage" | b"smessage"))
    }
}

/// The reply slots between a session's reader and writer, in request order, for at most `cap`
/// commands (a slot for a group of commands counts each of them).
///
/// Both futures run in one task and are polled reader first (`reader_then_writer`), so a slot
/// the reader pushes is seen by the writer in the same poll, with no wake-up and no channel;
/// the mutex is never contended. Only a reader waiting for room is woken, by the writer.
struct SlotQueue {
    inner: std::sync::Mutex<Queue>,
    cap: usize,
    /// Slots queued, and whether the reader is gone: the writer checks for an empty queue,
    /// which it does at every poll, without taking the lock.
    len: AtomicUsize,
    /// Commands the queued slots answer (changed under the lock).
    commands: AtomicUsize,
    reader_gone: std::sync::atomic::AtomicBool,
}

struct Queue {
    slots: std::collections::VecDeque<Slot>,
    writer_gone: bool,
    /// The reader waiting for room.
    room: Option<std::task::Waker>,
}

enum Full {
    /// The queue is at its bound (boxed: a queue is rarely full, and a slot is large).
    Full(Box<Slot>),
    Closed,
}

enum Empty {
    Empty,
    Disconnected,
}

impl SlotQueue {
    fn new(cap: usize) -> SlotQueue {
        let queue = Queue { slots: Default::default(), writer_gone: false, room: None };
        SlotQueue {
            inner: std::sync::Mutex::new(queue),
            cap: cap.max(1),
            len: AtomicUsize::new(0),
            commands: AtomicUsize::new(0),
            reader_gone: Default::default(),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Queue> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Commands that fit before the queue is full.
    fn room(&self) -> usize {
        self.cap.saturating_sub(self.commands.load(Ordering::Relaxed))
    }

    /// Whether `slot` must wait: it does not fit, and the queue holds something (a slot larger
    /// than the bound goes into an empty queue, so it never waits forever).
    fn must_wait(&self, q: &Queue, slot: &Slot) -> bool {
        !q.slots.is_empty() && self.commands.load(Ordering::Relaxed) + slot.commands() > self.cap
    }

    fn add(&self, q: &mut Queue, slot: Slot) {
        self.commands.fetch_add(slot.commands(), Ordering::Relaxed);
        q.slots.push_back(slot);
        self.len.store(q.slots.len(), Ordering::Release);
    }

    fn try_push(&self, slot: Slot) -> Result<(), Full> {
        let mut q = self.lock();
        if q.writer_gone {
            return Err(Full::Closed);
        }
        if self.must_wait(&q, &slot) {
            return Err(Full::Full(Box::new(slot)));
        }
        self.add(&mut q, slot);
        Ok(())
    }

    /// Pushes, waiting for room; fails once the writer is gone.
    async fn push(&self, slot: Slot) -> Result<(), ()> {
        let mut slot = Some(slot);
        std::future::poll_fn(|cx| {
            let mut q = self.lock();
            if q.writer_gone {
                return std::task::Poll::Ready(Err(()));
            }
            if self.must_wait(&q, slot.as_ref().expect("pushed once")) {
                q.room = Some(cx.waker().clone());
                return std::task::Poll::Pending;
            }
            self.add(&mut q, slot.take().expect("pushed once"));
            std::task::Poll::Ready(Ok(()))
        })
        .await
    }

    fn taken(&self, mut q: std::sync::MutexGuard<'_, Queue>) {
        // The waiting reader checks again whether its slot fits.
        if self.commands.load(Ordering::Relaxed) < self.cap
            && let Some(waker) = q.room.take()
        {
            drop(q);
            waker.wake();
        }
    }

    fn try_pop(&self) -> Result<Slot, Empty> {
        if self.len.load(Ordering::Acquire) == 0 {
            return Err(if self.reader_gone.load(Ordering::Acquire) { Empty::Disconnected } else { Empty::Empty });
        }
        let mut q = self.lock();
        match q.slots.pop_front() {
            Some(slot) => {
                self.len.store(q.slots.len(), Ordering::Release);
                self.commands.fetch_sub(slot.commands(), Ordering::Relaxed);
                self.taken(q);
                Ok(slot)
            }
            None if self.reader_gone.load(Ordering::Acquire) => Err(Empty::Disconnected),
            None => Err(Empty::Empty),
        }
    }

    /// The next slot, or `None` once the reader is gone and every slot is taken. Registers no
    /// waker: a push happens while the reader is polled, and the writer is polled right after.
    async fn pop(&self) -> Option<Slot> {
        std::future::poll_fn(|_| match self.try_pop() {
            Ok(slot) => std::task::Poll::Ready(Some(slot)),
            Err(Empty::Disconnected) => std::task::Poll::Ready(None),
            Err(Empty::Empty) => std::task::Poll::Pending,
        })
        .await
    }
}

/// The reader's end; dropping it tells the writer that no slot will follow.
struct SlotSender(Arc<SlotQueue>);

impl Drop for SlotSender {
    fn drop(&mut self) {
        self.0.reader_gone.store(true, Ordering::Release);
    }
}

/// The writer's end; dropping it makes the reader's pushes fail.
struct SlotReceiver(Arc<SlotQueue>);

impl Drop for SlotReceiver {
    fn drop(&mut self) {
        let mut q = self.0.lock();
        q.writer_gone = true;
        let waker = q.room.take();
        q.slots.clear();
        self.0.len.store(0, Ordering::Release);
        self.0.commands.store(0, Ordering::Relaxed);
        drop(q);
        if let Some(waker) = waker {
            waker.wake();
        }
    }
}

/// Runs the session's reader and writer to completion in this task, polling the reader first
/// each time: whatever the reader queued is in front of the writer when the writer is polled
/// (which `SlotQueue` relies on). `tokio::join!` rotates the order.
async fn reader_then_writer(
    reader: impl std::future::Future<Output = ()>,
    writer: impl std::future::Future<Output = ()>,
) {
    let mut reader = std::pin::pin!(reader);
    let mut writer = std::pin::pin!(writer);
    let (mut reader_done, mut writer_done) = (false, false);
    std::future::poll_fn(|cx| {
        if !reader_done {
            reader_done = reader.as_mut().poll(cx).is_ready();
        }
        if !writer_done {
            writer_done = writer.as_mut().poll(cx).is_ready();
        }
        if reader_done && writer_done { std::task::Poll::Ready(()) } else { std::task::Poll::Pending }
    })
    .await
}

struct Writer {
    wr: OwnedWriteHalf,
    out: BytesMut,
    budget: Arc<ReplyBudget>,
    /// Raised when the session must close at once.
    kill: Arc<Signal>,
    pinned: Option<mpsc::Receiver<PinnedFrame>>,
    view: PubSubView,
    ctx: Arc<Context>,
    activity: Arc<Activity>,
}

/// What the writer tells the reader about the client's replies.
struct Activity {
    /// Upstream replies the client is waiting for (the writer counts them down).
    awaiting: AtomicUsize,
    born: Instant,
    /// When replies were last written, in milliseconds since `born`: like Redis, the idle
    /// timeout counts from the client's last command or its last reply, whichever is later.
    replied_ms: AtomicU64,
}

impl Activity {
    fn new() -> Activity {
        Activity { awaiting: AtomicUsize::new(0), born: Instant::now(), replied_ms: AtomicU64::new(0) }
    }

    fn replied(&self) {
        self.replied_ms.store(self.born.elapsed().as_millis() as u64, Ordering::Relaxed);
    }

    fn last_reply(&self) -> Instant {
        self.born + Duration::from_millis(self.replied_ms.load(Ordering::Relaxed))
    }
}

/// Error: the client connection must close now.
struct Closed;

async fn write_loop(
    wr: OwnedWriteHalf,
    mut slots: SlotReceiver,
    budget: Arc<ReplyBudget>,
    kill: Arc<Signal>,
    ctx: Arc<Context>,
    activity: Arc<Activity>,
) {
    let mut w =
        Writer { wr, out: BytesMut::new(), budget, kill, pinned: None, view: PubSubView::default(), ctx, activity };
    let _ = w.run(&mut slots).await;
    let _ = w.flush().await;
    let _ = w.wr.shutdown().await;
}

impl Writer {
    async fn run(&mut self, slots: &mut SlotReceiver) -> Result<(), Closed> {
        loop {
            let slot = match slots.0.try_pop() {
                Ok(slot) => slot,
                Err(Empty::Disconnected) => return Ok(()),
                Err(Empty::Empty) => {
                    self.flush().await?;
                    tokio::select! {
                        biased;
                        _ = self.kill.raised() => return Err(Closed),
                        slot = slots.0.pop() => match slot {
                            Some(slot) => slot,
                            None => return Ok(()),
                        },
                        frame = recv_pinned(&mut self.pinned) => {
                            // Nothing is awaited: this can only be a message or a push.
                            self.pinned_frame(frame)?;
                            continue;
                        }
                    }
                }
            };
            match slot {
                Slot::Local(reply, meta) => {
                    self.out.extend_from_slice(&reply);
                    self.record(meta);
                }
                Slot::Upstream(mut rx, metas) => {
                    let reply = match rx.try_recv() {
                        Ok(r) => r,
                        Err(oneshot::error::TryRecvError::Closed) => Err(UpstreamError::Lost),
                        Err(oneshot::error::TryRecvError::Empty) => {
                            self.flush().await?;
                            tokio::select! {
                                biased;
                                _ = self.kill.raised() => return Err(Closed),
                                r = rx => r.unwrap_or(Err(UpstreamError::Lost)),
                            }
                        }
                    };
                    match reply {
                        Ok(bytes) => {
                            self.budget.release(bytes.len());
                            self.out.extend_from_slice(&bytes);
                        }
                        // The connection failed: one error per command, as each would have got.
                        Err(e) => {
                            let reply = e.to_reply();
                            for _ in 0..metas.len() {
                                self.out.extend_from_slice(&reply);
                            }
                        }
                    }
                    self.activity.awaiting.fetch_sub(1, Ordering::Relaxed);
                    for meta in metas.as_slice() {
                        self.record(Some(*meta));
                    }
                }
                Slot::Later(fut, meta) => self.later(fut, meta, false).await?,
                Slot::Waiting(fut, meta) => self.later(fut, meta, true).await?,
                Slot::Pinned { count, skip, tail, strip, meta, mut report, monitor, guard, pubsub } => {
                    let count = match pubsub {
                        Some(PubSubCmd::Subscription { kind, all: true }) if count > 0 => {
                            self.view.subscribed(kind).max(1)
                        }
                        _ => count,
                    };
                    let mut seen = 0;
                    while seen < count {
                        let frame = match self.pinned.as_mut().map(|rx| rx.try_recv()) {
                            Some(Ok(f)) => Some(f),
                            _ => {
                                self.flush().await?;
                                tokio::select! {
                                    biased;
                                    _ = self.kill.raised() => return Err(Closed),
                                    f = recv_pinned(&mut self.pinned) => f,
                                }
                            }
                        };
                        let frame = match frame {
                            Some(Ok(frame)) => frame,
                            // The dedicated connection is gone, and with it the state Redis kept
                            // for this client: close, as a direct connection would have closed.
                            _ => {
                                tracing::debug!("Dedicated upstream connection lost; closing the client.");
                                return Err(Closed);
                            }
                        };
                        self.budget.release(frame.len());
                        let replying = matches!(pubsub, Some(PubSubCmd::Subscription { .. }));
                        if self.view.unsolicited(&frame, replying) {
                            self.out.extend_from_slice(&frame);
                            continue;
                        }
                        if seen >= skip && seen + tail < count {
                            let frame = if strip.is_empty() { frame } else { crate::ttl::strip_exec(&frame, &strip) };
                            if let Some(tx) = report.take() {
                                let _ = tx.send(frame.clone());
                            }
                            match pubsub {
                                // One error answers a whole (un)subscribe command.
                                Some(PubSubCmd::Subscription { .. }) if reply::is_error(&frame) => seen = count - 1,
                                Some(PubSubCmd::Exec) => self.view.exec_reply(&frame),
                                _ => {}
                            }
                            self.out.extend_from_slice(&frame);
                        }
                        seen += 1;
                    }
                    if monitor {
                        self.view.monitor = true;
                    }
                    drop(guard);
                    self.activity.awaiting.fetch_sub(1, Ordering::Relaxed);
                    self.record(meta);
                }
                // A new connection has no subscriptions.
                Slot::Attach(rx) => {
                    self.pinned = Some(rx);
                    self.view = PubSubView::default();
                }
                Slot::Detach => {
                    self.pinned = None;
                    self.view = PubSubView::default();
                }
                Slot::Barrier(tx) => {
                    let _ = tx.send(());
                }
                Slot::Close => {
                    self.flush().await?;
                    return Ok(());
                }
            }
            if self.out.len() >= FLUSH_AT {
                self.flush().await?;
            }
        }
    }

    /// Writes a computed reply once it resolves. While a client waits (`passable`), nothing
    /// else is in flight on its dedicated connection: what arrives there meanwhile is a
    /// message or a push, written at once, as Redis writes them to a blocked client.
    async fn later(&mut self, mut fut: Later, meta: Meta, passable: bool) -> Result<(), Closed> {
        let (bytes, charged) = match futures_poll_once(&mut fut) {
            Some(r) => r,
            None => {
                self.flush().await?;
                loop {
                    tokio::select! {
                        biased;
                        _ = self.kill.raised() => return Err(Closed),
                        r = &mut fut => break r,
                        frame = recv_pinned(&mut self.pinned), if passable => {
                            self.pinned_frame(frame)?;
                            self.flush().await?;
                        }
                    }
                }
            }
        };
        self.budget.release(charged);
        self.out.extend_from_slice(&bytes);
        self.activity.awaiting.fetch_sub(1, Ordering::Relaxed);
        self.record(Some(meta));
        Ok(())
    }

    fn pinned_frame(&mut self, frame: Option<PinnedFrame>) -> Result<(), Closed> {
        match frame {
            Some(Ok(frame)) => {
                self.budget.release(frame.len());
                self.view.unsolicited(&frame, false);
                self.out.extend_from_slice(&frame);
                Ok(())
            }
            _ => {
                self.pinned = None;
                Err(Closed)
            }
        }
    }

    fn record(&self, meta: Option<Meta>) {
        if let Some(meta) = meta {
            self.ctx.metrics.command(meta.family, meta.start.elapsed().as_secs_f64());
        }
    }

    async fn flush(&mut self) -> Result<(), Closed> {
        if self.out.is_empty() {
            return Ok(());
        }
        let result = tokio::select! {
            biased;
            r = self.wr.write_all(&self.out) => r,
            _ = self.kill.raised() => return Err(Closed),
        };
        result.map_err(|_| Closed)?;
        self.activity.replied();
        if self.out.capacity() > FLUSH_AT * 4 {
            self.out = BytesMut::new();
        } else {
            self.out.clear();
        }
        Ok(())
    }
}

/// A multiplexed connection's reply as the bytes to write and the budget bytes they were
/// charged (errors sidecache writes itself were never charged).
fn charged_reply(r: Result<crate::upstream::mux::Reply, oneshot::error::RecvError>) -> (Bytes, usize) {
    match r {
        Ok(Ok(bytes)) => {
            let n = bytes.len();
            (bytes, n)
        }
        Ok(Err(e)) => (e.to_reply(), 0),
        Err(_) => (UpstreamError::Lost.to_reply(), 0),
    }
}

/// Whether element `at` of an `EXEC` reply (a queued `SELECT`'s) is a success.
fn select_took_effect(exec_reply: &Bytes, at: usize) -> bool {
    use crate::protocol::value::{self, Value};
    match value::parse(exec_reply) {
        Some(Value::Agg(_, items)) => matches!(items.get(at), Some(Value::Simple(_))),
        _ => false,
    }
}

/// A copy of an argument the session keeps (credentials, client name): arguments share the
/// read buffer they were parsed from, which must not stay alive with them.
fn owned(arg: &Bytes) -> Bytes {
    Bytes::copy_from_slice(arg)
}

/// The reply a reader that joined another reader's fill gets.
fn joined(r: Result<Bytes, oneshot::error::RecvError>) -> Bytes {
    r.unwrap_or_else(|_| UpstreamError::Lost.to_reply())
}

/// Polls a future once without waiting: its result when it is already complete.
fn futures_poll_once(fut: &mut Later) -> Option<(Bytes, usize)> {
    let waker = std::task::Waker::noop();
    let mut cx = std::task::Context::from_waker(waker);
    match fut.as_mut().poll(&mut cx) {
        std::task::Poll::Ready(r) => Some(r),
        std::task::Poll::Pending => None,
    }
}

/// Ends when the reply a client waits for is written, or can no longer be.
async fn held(hold: &mut Option<oneshot::Receiver<()>>) {
    match hold {
        Some(rx) => {
            let _ = rx.await;
        }
        None => std::future::pending().await,
    }
}

/// Logs, at most once a minute as Redis does, that a client sent `POST` or `Host:`.
fn warn_cross_protocol() {
    static LAST_MINUTE: AtomicU64 = AtomicU64::new(u64::MAX);
    let minute = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs() / 60);
    if LAST_MINUTE.swap(minute, Ordering::Relaxed) != minute {
        tracing::warn!(
            "Possible security attack: a client sent POST or Host: (an HTTP request to the Redis port); connection closed, as Redis closes it."
        );
    }
}

/// Redis's refusal of a command in RESP2 subscribed mode.
fn subscribed_refusal(name: &str) -> Bytes {
    encode::error(&format!(
        "ERR Can't execute '{name}': only (P|S)SUBSCRIBE / (P|S)UNSUBSCRIBE / PING / QUIT / RESET are allowed in this context"
    ))
}

async fn recv_pinned(rx: &mut Option<mpsc::Receiver<PinnedFrame>>) -> Option<PinnedFrame> {
    match rx {
        Some(rx) => rx.recv().await,
        None => std::future::pending().await,
    }
}
