//! Opening one connection to Redis: TCP connect, handshake that replays a session's state
//! (`AUTH`, `HELLO` with the protocol and the name, `SELECT`), and reading framed replies.
//!
//! Owns: the connect timeout, the handshake (one pipelined write, every reply checked), and
//! `FrameReader`, which reads whole replies within the reply limits. Does not own: what runs
//! on the connection afterwards (see `mux` and `pinned`).

use bytes::{Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use super::{Creds, Endpoint, UpstreamError};
use crate::protocol::encode::{self, Proto};
use crate::protocol::reply::{self, ReplyLimits, ReplyScanner};

/// The state a new connection must have before it carries a session's commands.
#[derive(Debug, Clone, Default)]
pub struct Handshake {
    /// Credentials to `AUTH` with, if any.
    pub creds: Option<Creds>,
    /// Database to `SELECT`.
    pub db: u32,
    /// Protocol to switch to with `HELLO`.
    pub proto: Proto,
    /// Client name to set.
    pub name: Option<Bytes>,
}

/// Reads complete replies from a stream, within limits.
#[derive(Debug)]
pub struct FrameReader {
    buf: BytesMut,
    scanner: ReplyScanner,
    limits: ReplyLimits,
}

/// Bytes read from a socket at a time.
const READ_CHUNK: usize = 16 * 1024;
/// A read buffer larger than this is given back once it holds nothing.
const READ_KEEP: usize = 256 * 1024;

impl FrameReader {
    /// A reader with an empty buffer.
    pub fn new(limits: ReplyLimits) -> Self {
        Self { buf: BytesMut::new(), scanner: ReplyScanner::new(), limits }
    }

    /// Returns the next complete reply already in the buffer, without reading.
    pub fn buffered(&mut self) -> Result<Option<Bytes>, UpstreamError> {
        Ok(self.buffered_many(1)?.map(|(frame, _)| frame))
    }

    /// Returns up to `max` complete replies already in the buffer as one span of bytes, and
    /// how many replies it holds (at least one), without reading.
    pub fn buffered_many(&mut self, max: usize) -> Result<Option<(Bytes, usize)>, UpstreamError> {
        let (mut end, mut count) = (0, 0);
        // The scanner's state is relative to `buf[end..]`: an incomplete reply left behind is
        // at the front of the buffer once the span before it is taken.
        while count < max && end < self.buf.len() {
            match self.scanner.scan(&self.buf[end..], &self.limits).map_err(UpstreamError::Protocol)? {
                Some(n) => {
                    end += n;
                    count += 1;
                }
                None => break,
            }
        }
        Ok((count > 0).then(|| (self.buf.split_to(end).freeze(), count)))
    }

    /// Reads once from the stream into the buffer.
    pub async fn fill<R: AsyncRead + Unpin>(&mut self, rd: &mut R) -> Result<(), UpstreamError> {
        self.buf.reserve(READ_CHUNK);
        // Reserving reclaims the whole allocation once the replies split from it are gone: one
        // large reply would otherwise stay allocated for the connection's life.
        if self.buf.is_empty() && self.buf.capacity() > READ_KEEP {
            self.buf = BytesMut::with_capacity(READ_CHUNK);
        }
        let n = rd.read_buf(&mut self.buf).await.map_err(|e| UpstreamError::Io(e.to_string()))?;
        if n == 0 {
            return Err(UpstreamError::Closed);
        }
        Ok(())
    }

    /// Returns the next complete reply, exactly as Redis sent it.
    pub async fn next<R: AsyncRead + Unpin>(&mut self, rd: &mut R) -> Result<Bytes, UpstreamError> {
        loop {
            if let Some(frame) = self.buffered()? {
                return Ok(frame);
            }
            self.fill(rd).await?;
        }
    }
}

/// Connects and runs the handshake; returns the stream and a reader holding any extra bytes.
pub async fn open(ep: &Endpoint, hs: &Handshake) -> Result<(TcpStream, FrameReader), UpstreamError> {
    let work = async {
        let mut stream =
            TcpStream::connect((ep.host.as_str(), ep.port)).await.map_err(|e| UpstreamError::Connect(e.to_string()))?;
        stream.set_nodelay(true).map_err(|e| UpstreamError::Connect(e.to_string()))?;
        let mut out = BytesMut::new();
        let mut expected = 0;
        if let Some(creds) = &hs.creds {
            match &creds.user {
                Some(user) => encode::command(&mut out, &[&b"AUTH"[..], user, &creds.pass]),
                None => encode::command(&mut out, &[&b"AUTH"[..], &creds.pass]),
            }
            expected += 1;
        }
        // The protocol and the name go in one `HELLO`, which Redis runs whatever the user's
        // permissions (as it keeps a connection's name and protocol across `AUTH`): replayed as
        // `CLIENT SETNAME` or checked with `PING`, they would fail for a user that may not run
        // those. Without credentials, `HELLO` also tells whether Redis lets such a client in.
        let hello = hs.proto == Proto::Resp3 || hs.name.is_some() || hs.creds.is_none();
        if hello {
            let proto: &[u8] = if hs.proto == Proto::Resp3 { b"3" } else { b"2" };
            match &hs.name {
                Some(name) => encode::command(&mut out, &[&b"HELLO"[..], proto, b"SETNAME", name]),
                None => encode::command(&mut out, &[&b"HELLO"[..], proto]),
            }
            expected += 1;
        }
        if hs.db != 0 {
            encode::command(&mut out, &[&b"SELECT"[..], itoa::Buffer::new().format(hs.db).as_bytes()]);
            expected += 1;
        }
        let mut reader = FrameReader::new(ep.limits);
        {
            stream.write_all(&out).await.map_err(|e| UpstreamError::Connect(e.to_string()))?;
            let mut first_error = None;
            for _ in 0..expected {
                let frame = reader.next(&mut stream).await.inspect_err(|e| {
                    if let UpstreamError::Protocol(_) = e {
                        crate::metrics::Metrics::get().protocol_error("upstream_reply");
                    }
                })?;
                if reply::is_error(&frame) && first_error.is_none() {
                    first_error = Some(frame);
                }
            }
            if let Some(err) = first_error {
                // `HELLO`'s own wording of `NOAUTH`; a client's command gets the usual one.
                let err = if hs.creds.is_none() && err.starts_with(b"-NOAUTH ") {
                    encode::error("NOAUTH Authentication required.")
                } else {
                    err
                };
                return Err(UpstreamError::Rejected(err));
            }
        }
        Ok((stream, reader))
    };
    match tokio::time::timeout(ep.connect_timeout, work).await {
        Ok(result) => result,
        Err(_) => Err(UpstreamError::Connect(format!("timed out after {:?}", ep.connect_timeout))),
    }
}
