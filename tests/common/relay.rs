//! A fault relay between sidecache and Redis, for what real Redis cannot do on demand. The
//! invalidation link is recognised by its client name in the handshake. The relay can:
//!
//! - hold back Redis's replies on data connections while the link keeps flowing, so an
//!   invalidation overtakes a read reply (`hold`);
//! - hold back what Redis sends on the link while data connections keep flowing, so an
//!   invalidation arrives late but intact (`hold_link`);
//! - drop what Redis sends on the link, so invalidations are lost while the link stays
//!   connected and the cache goes genuinely stale until the heartbeat times out (`mute_link`);
//! - send new connections to another Redis and close the data connections while the link
//!   stays connected to the first, as a moved DNS name or virtual IP does (`redirect`,
//!   `cut_data`).

use std::sync::atomic::{AtomicBool, AtomicU16, Ordering};
use std::sync::{Arc, Mutex};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

/// What the relay does to Redis → sidecache bytes right now.
#[derive(Clone, Copy, Default)]
struct Faults {
    /// Hold replies on data connections.
    hold_data: bool,
    /// Hold what arrives on the invalidation link.
    hold_link: bool,
    /// Drop what arrives on the invalidation link.
    mute_link: bool,
}

impl Faults {
    fn holds(&self, link: bool) -> bool {
        if link { self.hold_link } else { self.hold_data }
    }
}

/// One relayed connection: whether it is the link, and its two pumps.
type Relayed = (Arc<AtomicBool>, tokio::task::AbortHandle, tokio::task::AbortHandle);

/// A running relay; stops accepting when dropped.
pub struct Relay {
    pub port: u16,
    faults: watch::Sender<Faults>,
    task: tokio::task::JoinHandle<()>,
    target: Arc<AtomicU16>,
    conns: Arc<Mutex<Vec<Relayed>>>,
}

impl Relay {
    /// Relays 127.0.0.1:<port> to Redis at `upstream_port`.
    pub async fn start(upstream_port: u16) -> Relay {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind relay");
        let port = listener.local_addr().unwrap().port();
        let (faults, _) = watch::channel(Faults::default());
        let all = faults.clone();
        let target = Arc::new(AtomicU16::new(upstream_port));
        let conns: Arc<Mutex<Vec<Relayed>>> = Arc::default();
        let (to, registry) = (target.clone(), conns.clone());
        let task = tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let Ok(server) = TcpStream::connect(("127.0.0.1", to.load(Ordering::SeqCst))).await else { continue };
                let _ = client.set_nodelay(true);
                let _ = server.set_nodelay(true);
                let is_link = Arc::new(AtomicBool::new(false));
                let (mut cr, mut cw) = client.into_split();
                let (mut sr, mut sw) = server.into_split();
                let seen = is_link.clone();
                let up = tokio::spawn(async move {
                    let mut buf = vec![0u8; 64 * 1024];
                    loop {
                        let n = match cr.read(&mut buf).await {
                            Ok(0) | Err(_) => break,
                            Ok(n) => n,
                        };
                        if buf[..n].windows(19).any(|w| w == b"sidecache-coherence") {
                            seen.store(true, Ordering::SeqCst);
                        }
                        if sw.write_all(&buf[..n]).await.is_err() {
                            break;
                        }
                    }
                });
                let mut faults = all.subscribe();
                let link = is_link.clone();
                let down = tokio::spawn(async move {
                    let mut buf = vec![0u8; 64 * 1024];
                    loop {
                        let n = match sr.read(&mut buf).await {
                            Ok(0) | Err(_) => break,
                            Ok(n) => n,
                        };
                        let link = is_link.load(Ordering::SeqCst);
                        while faults.borrow_and_update().holds(link) {
                            if faults.changed().await.is_err() {
                                return;
                            }
                        }
                        if link && faults.borrow().mute_link {
                            continue;
                        }
                        if cw.write_all(&buf[..n]).await.is_err() {
                            break;
                        }
                    }
                });
                registry.lock().unwrap().push((link, up.abort_handle(), down.abort_handle()));
            }
        });
        Relay { port, faults, task, target, conns }
    }

    /// New connections go to the Redis at `port` from now on.
    pub fn redirect(&self, port: u16) {
        self.target.store(port, Ordering::SeqCst);
    }

    /// Closes every connection but the invalidation link.
    pub fn cut_data(&self) {
        for (link, up, down) in self.conns.lock().unwrap().iter() {
            if !link.load(Ordering::SeqCst) {
                up.abort();
                down.abort();
            }
        }
    }

    /// Holds back (true) or releases (false) replies on data connections.
    pub fn hold(&self, on: bool) {
        self.faults.send_modify(|f| f.hold_data = on);
    }

    /// Holds back (true) or releases (false) what Redis sends on the invalidation link.
    pub fn hold_link(&self, on: bool) {
        self.faults.send_modify(|f| f.hold_link = on);
    }

    /// Drops (true) what Redis sends on the invalidation link, or stops dropping (false). Bytes
    /// dropped mid-frame leave the link unreadable afterwards, so a test that mutes the link
    /// should not expect it to work again after unmuting.
    pub fn mute_link(&self, on: bool) {
        self.faults.send_modify(|f| f.mute_link = on);
    }

    /// The relay's URL.
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.task.abort();
    }
}
