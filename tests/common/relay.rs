//! A fault relay between sidecache and Redis, for what real Redis cannot do on demand: it can
//! hold back Redis's replies on data connections while the invalidation link (recognised by
//! its client name in the handshake) keeps flowing, so an invalidation overtakes a read reply.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

/// A running relay; stops accepting when dropped.
pub struct Relay {
    pub port: u16,
    hold: watch::Sender<bool>,
    task: tokio::task::JoinHandle<()>,
}

impl Relay {
    /// Relays 127.0.0.1:<port> to Redis at `upstream_port`.
    pub async fn start(upstream_port: u16) -> Relay {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind relay");
        let port = listener.local_addr().unwrap().port();
        let (hold, _) = watch::channel(false);
        let holds = hold.clone();
        let task = tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let Ok(server) = TcpStream::connect(("127.0.0.1", upstream_port)).await else { continue };
                let _ = client.set_nodelay(true);
                let _ = server.set_nodelay(true);
                let exempt = Arc::new(AtomicBool::new(false));
                let (mut cr, mut cw) = client.into_split();
                let (mut sr, mut sw) = server.into_split();
                let seen = exempt.clone();
                tokio::spawn(async move {
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
                let mut held = holds.subscribe();
                tokio::spawn(async move {
                    let mut buf = vec![0u8; 64 * 1024];
                    loop {
                        let n = match sr.read(&mut buf).await {
                            Ok(0) | Err(_) => break,
                            Ok(n) => n,
                        };
                        while *held.borrow_and_update() && !exempt.load(Ordering::SeqCst) {
                            if held.changed().await.is_err() {
                                return;
                            }
                        }
                        if cw.write_all(&buf[..n]).await.is_err() {
                            break;
                        }
                    }
                });
            }
        });
        Relay { port, hold, task }
    }

    /// Holds back (true) or releases (false) replies on data connections.
    pub fn hold(&self, on: bool) {
        self.hold.send_replace(on);
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
