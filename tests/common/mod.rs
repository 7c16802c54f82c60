//! Test harness: real `redis-server` processes on free ports, sidecache in-process or as the
//! built binary, and a raw RESP client that returns replies as the exact bytes received.
//!
//! Readiness is probed (connect + PING), never slept for. When `redis-server` is missing, tests
//! fail with a message saying how to install it; they never skip.

#![allow(dead_code)]

pub mod relay;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use sidecache::Config;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;

/// How long anything in a test may take before the test fails instead of hanging.
pub const PATIENCE: Duration = Duration::from_secs(20);

fn which(bin: &str) -> Option<PathBuf> {
    std::env::var_os("PATH")?.to_str()?.split(':').map(|d| PathBuf::from(d).join(bin)).find(|p| p.is_file())
}

/// The path of `redis-server`, or a panic that says how to get it.
pub fn redis_server_bin() -> PathBuf {
    which("redis-server").unwrap_or_else(|| {
        panic!(
            "redis-server is not installed: the tests need a real Redis. Install it with \
             `apt-get install -y redis-server redis-tools` (scripts/test.sh does this for you)."
        )
    })
}

/// A port nobody listens on right now.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").expect("bind an ephemeral port").local_addr().unwrap().port()
}

/// A `redis-server` child process on its own port and directory; killed on drop.
pub struct RedisServer {
    pub port: u16,
    child: Option<Child>,
    dir: PathBuf,
    extra: Vec<String>,
}

impl RedisServer {
    /// Starts a Redis with no persistence.
    pub fn start() -> RedisServer {
        Self::start_with(&[])
    }

    /// Starts a Redis with extra `--option value` arguments.
    pub fn start_with(extra: &[&str]) -> RedisServer {
        let extra: Vec<String> = extra.iter().map(|s| s.to_string()).collect();
        for _ in 0..5 {
            let port = free_port();
            let mut server = RedisServer { port, child: None, dir: PathBuf::new(), extra: extra.clone() };
            if server.spawn() {
                return server;
            }
        }
        panic!("could not start redis-server after 5 attempts");
    }

    fn spawn(&mut self) -> bool {
        let bin = redis_server_bin();
        self.dir = std::env::temp_dir().join(format!("sidecache-test-redis-{}-{}", std::process::id(), self.port));
        std::fs::create_dir_all(&self.dir).expect("create redis dir");
        let port = self.port.to_string();
        let dir = self.dir.to_string_lossy().to_string();
        let mut args: Vec<&str> =
            vec!["--port", &port, "--bind", "127.0.0.1", "--save", "", "--appendonly", "no", "--dir", &dir];
        args.extend(self.extra.iter().map(String::as_str));
        let child = Command::new(bin).args(&args).stdout(Stdio::null()).stderr(Stdio::null()).spawn();
        let Ok(mut child) = child else { return false };
        let deadline = Instant::now() + PATIENCE;
        while Instant::now() < deadline {
            if let Ok(Some(_)) = child.try_wait() {
                return false; // exited: most likely the port was taken meanwhile
            }
            if ping_blocking(self.port) {
                self.child = Some(child);
                return true;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        let _ = child.kill();
        false
    }

    /// Address of the server.
    pub fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// `redis://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.as_ref().map(|c| c.id()).expect("running")
    }

    /// SIGKILLs the server (the port stays reserved for `restart`).
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Starts the server again on the same port.
    pub fn restart(&mut self) {
        self.kill();
        let deadline = Instant::now() + PATIENCE;
        while !self.spawn() {
            assert!(Instant::now() < deadline, "redis-server did not restart on port {}", self.port);
        }
    }

    /// Sends a signal to the server process.
    pub fn signal(&self, sig: i32) {
        unsafe {
            libc::kill(self.pid() as i32, sig);
        }
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.kill();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn ping_blocking(port: u16) -> bool {
    use std::io::{Read, Write};
    let Ok(mut s) = std::net::TcpStream::connect(("127.0.0.1", port)) else { return false };
    let _ = s.set_read_timeout(Some(Duration::from_millis(500)));
    if s.write_all(b"PING\r\n").is_err() {
        return false;
    }
    let mut buf = [0u8; 64];
    matches!(s.read(&mut buf), Ok(n) if n > 0 && (buf[..n].starts_with(b"+PONG") || buf[..n].starts_with(b"-")))
}

/// A configuration for tests: ephemeral ports, the given upstream.
pub fn test_config(upstream: &str) -> Config {
    let mut c = Config {
        listen: "127.0.0.1:0".into(),
        admin_listen: "127.0.0.1:0".into(),
        shutdown_grace: Duration::from_secs(5),
        ..Default::default()
    };
    c.upstream.url = upstream.into();
    c
}

/// Sidecache running in-process on the current tokio runtime; stopped on drop.
pub struct Proxy {
    pub addr: SocketAddr,
    pub admin: SocketAddr,
    pub reload: sidecache::ReloadHandle,
    stop: CancellationToken,
    done: Option<tokio::task::JoinHandle<()>>,
}

impl Proxy {
    /// Starts a proxy in front of `redis` with the default test configuration.
    pub async fn start(redis: &RedisServer) -> Proxy {
        Self::start_config(test_config(&redis.url())).await
    }

    /// Starts a proxy with a configuration changed by `edit`.
    pub async fn start_with(redis: &RedisServer, edit: impl FnOnce(&mut Config)) -> Proxy {
        let mut c = test_config(&redis.url());
        edit(&mut c);
        Self::start_config(c).await
    }

    /// Starts a proxy with exactly this configuration.
    pub async fn start_config(config: Config) -> Proxy {
        config.validate().expect("test configuration is valid");
        let server = sidecache::Server::bind(config).await.expect("bind sidecache");
        let addr = server.local_addr();
        let admin = server.admin_addr();
        let reload = server.reload_handle();
        let stop = CancellationToken::new();
        let done = tokio::spawn(server.run(stop.clone()));
        Proxy { addr, admin, reload, stop, done: Some(done) }
    }

    /// Stops accepting and waits for the drain to finish.
    pub async fn shutdown(mut self) {
        self.stop.cancel();
        if let Some(done) = self.done.take() {
            tokio::time::timeout(PATIENCE, done).await.expect("proxy shut down in time").expect("proxy task");
        }
    }

    /// Connects a raw client.
    pub async fn client(&self) -> Client {
        Client::connect(&self.addr.to_string()).await
    }

    /// GETs an admin path; returns (status, body).
    pub async fn http_get(&self, path: &str) -> (u16, String) {
        http_get(self.admin, path).await
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

/// A minimal HTTP/1.1 GET.
pub async fn http_get(addr: SocketAddr, path: &str) -> (u16, String) {
    let mut s = TcpStream::connect(addr).await.expect("connect admin");
    let req = format!("GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n");
    s.write_all(req.as_bytes()).await.unwrap();
    let mut raw = Vec::new();
    tokio::time::timeout(PATIENCE, s.read_to_end(&mut raw)).await.expect("admin answered").unwrap();
    let text = String::from_utf8_lossy(&raw).to_string();
    let status = text.split(' ').nth(1).and_then(|s| s.parse().ok()).expect("status line");
    let body = text.split_once("\r\n\r\n").map(|(_, b)| b.to_string()).unwrap_or_default();
    (status, body)
}

/// A raw RESP client. Replies are returned as the exact bytes of one RESP frame, found with the
/// `redis-protocol` decoder (independent of sidecache's own framing).
pub struct Client {
    pub stream: TcpStream,
    buf: BytesMut,
}

/// Encodes a command as a RESP array of bulk strings.
pub fn encode(args: &[&[u8]]) -> Vec<u8> {
    let mut out = format!("*{}\r\n", args.len()).into_bytes();
    for a in args {
        out.extend_from_slice(format!("${}\r\n", a.len()).as_bytes());
        out.extend_from_slice(a);
        out.extend_from_slice(b"\r\n");
    }
    out
}

/// Encodes several commands into one pipeline.
pub fn pipeline(cmds: &[&[&str]]) -> Vec<u8> {
    let mut out = Vec::new();
    for c in cmds {
        let args: Vec<&[u8]> = c.iter().map(|a| a.as_bytes()).collect();
        out.extend(encode(&args));
    }
    out
}

impl Client {
    /// Connects to `addr`.
    pub async fn connect(addr: &str) -> Client {
        let stream = TcpStream::connect(addr).await.unwrap_or_else(|e| panic!("connect {addr}: {e}"));
        stream.set_nodelay(true).unwrap();
        Client { stream, buf: BytesMut::new() }
    }

    /// Sends raw bytes.
    pub async fn send_raw(&mut self, bytes: &[u8]) {
        self.stream.write_all(bytes).await.expect("write to server");
    }

    /// Sends one command.
    pub async fn send(&mut self, args: &[&[u8]]) {
        self.send_raw(&encode(args)).await;
    }

    /// Reads one reply frame (raw bytes).
    pub async fn read(&mut self) -> Bytes {
        tokio::time::timeout(PATIENCE, self.read_inner()).await.expect("a reply within the test's patience")
    }

    async fn read_inner(&mut self) -> Bytes {
        loop {
            if !self.buf.is_empty() {
                // RESP2 first (its nulls are not RESP3), then RESP3 for its own types.
                let mut probe = self.buf.clone();
                match redis_protocol::resp2::decode::decode_bytes_mut(&mut probe) {
                    Ok(Some((_frame, n, raw))) => {
                        let _ = self.buf.split_to(n);
                        return raw;
                    }
                    Ok(None) => {}
                    Err(_) => match redis_protocol::resp3::decode::complete::decode_bytes_mut(&mut self.buf) {
                        Ok(Some((_frame, _n, raw))) => return raw,
                        Ok(None) => {}
                        Err(e) => panic!("undecodable reply {:?}: {e:?}", String::from_utf8_lossy(&self.buf)),
                    },
                }
            }
            let n = self.stream.read_buf(&mut self.buf).await.expect("read from server");
            assert!(n > 0, "server closed the connection; pending bytes: {:?}", String::from_utf8_lossy(&self.buf));
            if self.buf.capacity() - self.buf.len() < 4096 {
                self.buf.reserve(64 * 1024);
            }
        }
    }

    /// Sends a command and reads its reply.
    pub async fn cmd(&mut self, args: &[&str]) -> Bytes {
        let args: Vec<&[u8]> = args.iter().map(|a| a.as_bytes()).collect();
        self.send(&args).await;
        self.read().await
    }

    /// Sends a binary command and reads its reply.
    pub async fn cmd_bin(&mut self, args: &[&[u8]]) -> Bytes {
        self.send(args).await;
        self.read().await
    }

    /// Reads until the server closes the connection; returns what arrived before the close.
    pub async fn read_until_closed(&mut self) -> Bytes {
        let work = async {
            loop {
                match self.stream.read_buf(&mut self.buf).await {
                    Ok(0) | Err(_) => return self.buf.split().freeze(),
                    Ok(_) => {}
                }
            }
        };
        tokio::time::timeout(PATIENCE, work).await.expect("server closed the connection in time")
    }
}

/// Shorthand for a byte-string literal reply.
pub fn b(s: &str) -> Bytes {
    Bytes::copy_from_slice(s.as_bytes())
}

/// Polls `f` until it returns true or the patience runs out.
pub async fn eventually<F, Fut>(what: &str, mut f: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + PATIENCE;
    loop {
        if f().await {
            return;
        }
        assert!(Instant::now() < deadline, "timed out waiting for: {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Path of the built `sidecache` binary.
pub fn sidecache_bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_sidecache"))
}

/// The `sidecache` binary as a child process.
pub struct ProxyProcess {
    pub child: tokio::process::Child,
    pub addr: SocketAddr,
    pub admin: SocketAddr,
    pub log: std::sync::Arc<std::sync::Mutex<String>>,
}

impl ProxyProcess {
    /// Starts the binary with `args` (plus ephemeral ports) and waits for its start line.
    pub async fn start(upstream: &str, args: &[&str]) -> ProxyProcess {
        Self::start_with_open_files(upstream, args, None).await
    }

    /// `start`, with the open-files limit (soft and hard) set to `nofile` when given.
    pub async fn start_with_open_files(upstream: &str, args: &[&str], nofile: Option<u64>) -> ProxyProcess {
        use tokio::io::AsyncBufReadExt;
        let mut cmd = tokio::process::Command::new(sidecache_bin());
        cmd.args(["--listen", "127.0.0.1:0", "--admin-listen", "127.0.0.1:0", "--upstream", upstream])
            .args(args)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        if let Some(n) = nofile {
            let limit = libc::rlimit { rlim_cur: n, rlim_max: n };
            // SAFETY: setrlimit is async-signal-safe; nothing else runs between fork and exec.
            unsafe {
                cmd.pre_exec(move || {
                    if libc::setrlimit(libc::RLIMIT_NOFILE, &limit) != 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                    Ok(())
                });
            }
        }
        let mut child = cmd.spawn().expect("spawn sidecache binary");
        let stderr = child.stderr.take().unwrap();
        let mut lines = tokio::io::BufReader::new(stderr).lines();
        let log = std::sync::Arc::new(std::sync::Mutex::new(String::new()));
        let (addr, admin) = tokio::time::timeout(PATIENCE, async {
            while let Some(line) = lines.next_line().await.expect("read sidecache log") {
                log.lock().unwrap().push_str(&line);
                log.lock().unwrap().push('\n');
                if line.contains("sidecache started") {
                    let field = |name: &str| -> SocketAddr {
                        let at = line.find(&format!("{name}=")).expect("address field") + name.len() + 1;
                        line[at..].split_whitespace().next().unwrap().parse().expect("socket address")
                    };
                    return (field("listen"), field("admin"));
                }
            }
            panic!("sidecache exited before starting; log:\n{}", log.lock().unwrap());
        })
        .await
        .expect("sidecache started in time");
        let sink = log.clone();
        tokio::spawn(async move {
            while let Ok(Some(line)) = lines.next_line().await {
                sink.lock().unwrap().push_str(&line);
                sink.lock().unwrap().push('\n');
            }
        });
        ProxyProcess { child, addr, admin, log }
    }

    /// Sends a signal.
    pub fn signal(&self, sig: i32) {
        let pid = self.child.id().expect("running") as i32;
        unsafe {
            libc::kill(pid, sig);
        }
    }

    /// Resident set size in bytes, from /proc.
    pub fn rss_bytes(&self) -> u64 {
        rss_of(self.child.id().expect("running"))
    }
}

/// Resident set size of a process, in bytes.
pub fn rss_of(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("read /proc status");
    let line = status.lines().find(|l| l.starts_with("VmRSS:")).expect("VmRSS line");
    let kib: u64 = line.split_whitespace().nth(1).unwrap().parse().unwrap();
    kib * 1024
}

/// Reads one `INFO` field from a Redis, on a fresh direct connection.
pub async fn info_field(addr: &str, field: &str) -> String {
    let mut c = Client::connect(addr).await;
    let info = c.cmd(&["INFO", "everything"]).await;
    let text = String::from_utf8_lossy(&info).to_string();
    text.lines().find_map(|l| l.strip_prefix(&format!("{field}:"))).map(|v| v.trim().to_string()).unwrap_or_default()
}
