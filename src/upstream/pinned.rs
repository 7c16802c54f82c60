//! A dedicated upstream connection owned by one session (transactions, pub/sub, blocking
//! commands, connection-scoped `CLIENT` subcommands).
//!
//! Owns: the write half (the session writes commands to it directly) and a reader task that
//! forwards every frame Redis sends, replies and pushes alike, on a bounded channel to the
//! session's writer, which knows how many replies to expect. Dropping a `Pinned` aborts the
//! reader and closes the socket at once: a client that disconnects while blocked in `BLPOP`
//! must not make Redis pop an element nobody receives.

use std::sync::Arc;

use bytes::Bytes;
use tokio::io::AsyncWriteExt;
use tokio::net::tcp::OwnedWriteHalf;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use super::conn::{self, Handshake};
use super::{Endpoint, ReplyBudget, UpstreamError};
use crate::metrics::Metrics;

/// Frames in flight from a dedicated connection to its session before Redis is left to buffer.
const FRAME_QUEUE: usize = 64;

/// A frame from a dedicated connection, or the error that ended it.
pub type PinnedFrame = Result<Bytes, UpstreamError>;

/// The session's side of a dedicated connection.
#[derive(Debug)]
pub struct Pinned {
    wr: OwnedWriteHalf,
    reader: JoinHandle<()>,
}

impl Pinned {
    /// Opens a dedicated connection with the session's state; returns it and its frame stream.
    pub async fn open(
        ep: &Endpoint,
        hs: &Handshake,
        budget: Arc<ReplyBudget>,
    ) -> Result<(Pinned, mpsc::Receiver<PinnedFrame>), UpstreamError> {
        let (stream, mut reader) = conn::open(ep, hs).await?;
        let (mut rd, wr) = stream.into_split();
        let (tx, rx) = mpsc::channel(FRAME_QUEUE);
        // Counted down when the reader's future is dropped: also when it is aborted before it
        // first ran (a client that leaves at once).
        let gauge = Gauge::up();
        let task = tokio::spawn(async move {
            let _gauge = gauge;
            loop {
                let frame = reader.next(&mut rd).await;
                let end = frame.is_err();
                if let Ok(f) = &frame
                    && !budget.charge(f.len())
                {
                    // Over the client's output cap: it is being disconnected.
                    break;
                }
                if tx.send(frame).await.is_err() || end {
                    break;
                }
            }
        });
        Ok((Pinned { wr, reader: task }, rx))
    }

    /// Writes encoded commands.
    pub async fn write(&mut self, bytes: &[u8]) -> Result<(), UpstreamError> {
        self.wr.write_all(bytes).await.map_err(|e| UpstreamError::Io(e.to_string()))
    }
}

/// One open dedicated connection in `sidecache_upstream_connections`, for as long as it lives.
struct Gauge;

impl Gauge {
    fn up() -> Gauge {
        Metrics::get().upstream_connections.increment(1.0);
        Gauge
    }
}

impl Drop for Gauge {
    fn drop(&mut self) {
        Metrics::get().upstream_connections.decrement(1.0);
    }
}

impl Drop for Pinned {
    fn drop(&mut self) {
        self.reader.abort();
    }
}
