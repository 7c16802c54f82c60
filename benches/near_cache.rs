//! Near-cache end-to-end figures (`cargo bench --bench near_cache`), printed as a table:
//!
//! - **Invalidation lag**: a writer `SET`s a key directly on Redis; a reader polls a peer
//!   sidecache instance (which had the old value cached) until it returns the new value. The lag
//!   is the time from the write's acknowledgement to the first read that returns the new value
//!   (the polling read's own round trip is included, so this is an upper bound).
//! - **Hit latency behind a slow link**: Redis behind a relay that delays each direction by
//!   1 ms (2 ms round trip); `GET` of a hot key directly over the link versus through sidecache
//!   (whose upstream is the same link) once the key is cached.
//!
//! Needs `redis-server` on the PATH. Starts everything on free loopback ports.

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use sidecache::Config;
use sidecache::config::CacheRuleConfig;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

struct Redis(Child, u16);

impl Drop for Redis {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

// The child is waited for in `Redis::drop`.
#[allow(clippy::zombie_processes)]
fn start_redis() -> Redis {
    let port = free_port();
    let child = Command::new("redis-server")
        .args(["--port", &port.to_string(), "--save", "", "--appendonly", "no", "--bind", "127.0.0.1"])
        .stdout(Stdio::null())
        .spawn()
        .expect("redis-server on the PATH (apt-get install redis-server)");
    for _ in 0..500 {
        if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
            return Redis(child, port);
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    panic!("redis-server did not start");
}

struct Conn {
    s: TcpStream,
    buf: Vec<u8>,
}

impl Conn {
    async fn new(port: u16) -> Conn {
        let s = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
        s.set_nodelay(true).unwrap();
        Conn { s, buf: Vec::new() }
    }

    /// Sends a command and returns its (single-line or bulk) reply.
    async fn cmd(&mut self, args: &[&str]) -> Vec<u8> {
        let mut out = format!("*{}\r\n", args.len());
        for a in args {
            out.push_str(&format!("${}\r\n{a}\r\n", a.len()));
        }
        self.s.write_all(out.as_bytes()).await.unwrap();
        loop {
            if let Some(end) = complete(&self.buf) {
                return self.buf.drain(..end).collect();
            }
            let mut chunk = [0u8; 4096];
            let n = self.s.read(&mut chunk).await.unwrap();
            assert!(n > 0, "connection closed");
            self.buf.extend_from_slice(&chunk[..n]);
        }
    }
}

/// Length of the first complete simple or bulk reply in `buf`.
fn complete(buf: &[u8]) -> Option<usize> {
    let line = buf.windows(2).position(|w| w == b"\r\n")? + 2;
    if buf[0] != b'$' {
        return Some(line);
    }
    let n: i64 = std::str::from_utf8(&buf[1..line - 2]).ok()?.parse().ok()?;
    if n < 0 {
        return Some(line);
    }
    let end = line + n as usize + 2;
    (buf.len() >= end).then_some(end)
}

async fn start_proxy(upstream: u16, stop: &CancellationToken) -> (u16, std::net::SocketAddr) {
    let mut c = Config { listen: "127.0.0.1:0".into(), admin_listen: "127.0.0.1:0".into(), ..Default::default() };
    c.upstream.url = format!("redis://127.0.0.1:{upstream}");
    c.near_cache.rules =
        vec![CacheRuleConfig { name: "bench".into(), prefix: "bench:".into(), db: None, max_ttl: None }];
    let server = sidecache::Server::bind(c).await.unwrap();
    let port = server.local_addr().port();
    let admin = server.admin_addr();
    tokio::spawn(server.run(stop.clone()));
    // Wait until coherence is established (readyz 200).
    for _ in 0..1000 {
        if let Ok(mut s) = TcpStream::connect(admin).await {
            let _ = s.write_all(b"GET /readyz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").await;
            let mut r = String::new();
            let _ = s.read_to_string(&mut r).await;
            if r.starts_with("HTTP/1.1 200") {
                return (port, admin);
            }
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("sidecache never became ready");
}

/// A relay that delays every chunk by `delay` in each direction.
async fn delay_relay(upstream: u16, delay: Duration) -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move {
        while let Ok((client, _)) = listener.accept().await {
            let server = TcpStream::connect(("127.0.0.1", upstream)).await.unwrap();
            client.set_nodelay(true).unwrap();
            server.set_nodelay(true).unwrap();
            let (cr, cw) = client.into_split();
            let (sr, sw) = server.into_split();
            tokio::spawn(pump(cr, sw, delay));
            tokio::spawn(pump(sr, cw, delay));
        }
    });
    port
}

async fn pump(mut rd: tokio::net::tcp::OwnedReadHalf, wr: tokio::net::tcp::OwnedWriteHalf, delay: Duration) {
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<(Instant, Vec<u8>)>();
    tokio::spawn(async move {
        let mut wr = wr;
        while let Some((at, data)) = rx.recv().await {
            tokio::time::sleep_until((at + delay).into()).await;
            if wr.write_all(&data).await.is_err() {
                return;
            }
        }
    });
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        match rd.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => {
                if tx.send((Instant::now(), buf[..n].to_vec())).is_err() {
                    return;
                }
            }
        }
    }
}

fn pct(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}

fn show(name: &str, mut v: Vec<Duration>) {
    v.sort();
    println!(
        "{name:<44} n={:<5} p50={:>9.1?} p99={:>9.1?} max={:>9.1?}",
        v.len(),
        pct(&v, 0.5),
        pct(&v, 0.99),
        v[v.len() - 1]
    );
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    if std::env::args().any(|a| a == "--list") {
        println!("near_cache: bench");
        return;
    }
    let redis = start_redis();
    let stop = CancellationToken::new();

    // Invalidation lag: write directly, poll a sidecache that has the old value cached.
    let (peer, _) = start_proxy(redis.1, &stop).await;
    let mut writer = Conn::new(redis.1).await;
    let mut reader = Conn::new(peer).await;
    let mut lags = Vec::new();
    for i in 0..2000u32 {
        let old = format!("v{i}");
        writer.cmd(&["SET", "bench:lag", &old]).await;
        // Make sure the old value is cached on the peer.
        loop {
            let r = reader.cmd(&["GET", "bench:lag"]).await;
            if r.ends_with(format!("{old}\r\n").as_bytes()) {
                break;
            }
        }
        reader.cmd(&["GET", "bench:lag"]).await;
        let new = format!("n{i}");
        writer.cmd(&["SET", "bench:lag", &new]).await;
        let acked = Instant::now();
        loop {
            let r = reader.cmd(&["GET", "bench:lag"]).await;
            if r.ends_with(format!("{new}\r\n").as_bytes()) {
                lags.push(acked.elapsed());
                break;
            }
        }
    }
    show("invalidation lag (write ack -> peer serves new)", lags);
    // For scale: one GET round trip through sidecache (a hit).
    let mut hits = Vec::new();
    for _ in 0..5000 {
        let t = Instant::now();
        reader.cmd(&["GET", "bench:lag"]).await;
        hits.push(t.elapsed());
    }
    show("hit round trip on loopback (for scale)", hits);

    // Hit latency with Redis behind a 1 ms + 1 ms link.
    let slow = delay_relay(redis.1, Duration::from_millis(1)).await;
    let (via, _) = start_proxy(slow, &stop).await;
    let mut direct = Conn::new(slow).await;
    let mut through = Conn::new(via).await;
    direct.cmd(&["SET", "bench:hot", "value"]).await;
    through.cmd(&["GET", "bench:hot"]).await;
    let mut d = Vec::new();
    let mut h = Vec::new();
    for _ in 0..500 {
        let t = Instant::now();
        direct.cmd(&["GET", "bench:hot"]).await;
        d.push(t.elapsed());
        let t = Instant::now();
        through.cmd(&["GET", "bench:hot"]).await;
        h.push(t.elapsed());
    }
    d.sort();
    h.sort();
    let (dp, hp) = (pct(&d, 0.5), pct(&h, 0.5));
    show("GET direct over the 2 ms link", d);
    show("GET hit through sidecache (same link)", h);
    println!("hit p50 / direct p50 = {:.4}", hp.as_secs_f64() / dp.as_secs_f64());
    stop.cancel();
}
