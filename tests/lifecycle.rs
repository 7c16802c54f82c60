//! Lifecycle: configuration and CLI, admin endpoints, upstream failure and recovery, shutdown,
//! reload, client limits.

mod common;

use std::time::Duration;

use common::*;
use sidecache::Config;

fn metric(text: &str, series: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix(series).and_then(|rest| rest.trim().parse().ok()))
        .unwrap_or_else(|| panic!("series {series} not in metrics:\n{text}"))
}

#[test]
fn reference_config_file_is_valid_and_shows_the_defaults() {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("config/sidecache.toml");
    let loaded = Config::load(Some(&path), &[], &Default::default()).expect("config/sidecache.toml loads");
    assert_eq!(loaded.to_redacted_toml(), Config::default().to_redacted_toml(), "reference file drifted from defaults");
}

#[test]
fn check_config_lists_every_problem_and_exits_64() {
    let dir = std::env::temp_dir().join(format!("sidecache-check-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let bad = dir.join("bad.toml");
    std::fs::write(&bad, "listen = \"not an address\"\n[upstream]\nurl = \"http://x\"\n[limits]\nmax_clients = 0\n")
        .unwrap();
    let out = std::process::Command::new(sidecache_bin())
        .args(["--config", bad.to_str().unwrap(), "--check-config"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(64));
    let err = String::from_utf8_lossy(&out.stderr);
    for key in ["listen", "upstream.url", "limits.max_clients"] {
        assert!(err.contains(key), "problem with {key} not reported: {err}");
    }
    let unknown = dir.join("unknown.toml");
    std::fs::write(&unknown, "[limits]\nmax_clientz = 3\n").unwrap();
    let out = std::process::Command::new(sidecache_bin())
        .args(["--config", unknown.to_str().unwrap(), "--check-config"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(64));
    assert!(String::from_utf8_lossy(&out.stderr).contains("max_clientz"));
    // Keys that do not even parse are listed together with the rest, not just the first.
    let mixed = dir.join("mixed.toml");
    std::fs::write(
        &mixed,
        "listen = \"nope\"\nshutdown_grace = \"10\"\nbogus = 1\n[limits]\nmax_clients = 0\n\
         max_bulk_bytes = \"lots\"\nmax_args = \"many\"\n[upstream]\nurl = \"http://x\"\n",
    )
    .unwrap();
    let out = std::process::Command::new(sidecache_bin())
        .args(["--config", mixed.to_str().unwrap(), "--check-config"])
        .env("SIDECACHE_LOCKS__MAX_LEASE", "forever")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(64));
    let err = String::from_utf8_lossy(&out.stderr);
    for key in [
        "listen:",
        "shutdown_grace:",
        "`bogus`",
        "limits.max_clients:",
        "limits.max_bulk_bytes:",
        "limits.max_args:",
        "upstream.url:",
        "locks.max_lease:",
    ] {
        assert!(err.contains(key), "problem {key} not reported: {err}");
    }
    assert_eq!(err.lines().count(), 8, "{err}");
    let out = std::process::Command::new(sidecache_bin()).args(["--check-config"]).output().unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", String::from_utf8_lossy(&out.stderr));
    // A bad option, the two ports alike, a password in a URL that does not parse: 64, and the
    // password is not shown.
    let run = |args: &[&str]| std::process::Command::new(sidecache_bin()).args(args).output().unwrap();
    assert_eq!(run(&["--log-format", "xml", "--check-config"]).status.code(), Some(64));
    let out = run(&["--listen", "127.0.0.1:7100", "--admin-listen", "127.0.0.1:7100", "--check-config"]);
    assert_eq!(out.status.code(), Some(64));
    assert!(String::from_utf8_lossy(&out.stderr).contains("admin_listen"));
    let out = run(&["--upstream", "redis://app:pa/ss3cret@127.0.0.1:6390", "--check-config"]);
    assert_eq!(out.status.code(), Some(64));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("upstream.url") && !err.contains("ss3cret"), "{err}");
}

#[test]
fn print_config_redacts_secrets_and_applies_precedence() {
    let dir = std::env::temp_dir().join(format!("sidecache-print-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("c.toml");
    std::fs::write(&file, "listen = \"127.0.0.1:7000\"\nlog_level = \"debug\"\n[upstream]\nurl = \"redis://app:hunter2@10.1.2.3:6390/4\"\n")
        .unwrap();
    let out = std::process::Command::new(sidecache_bin())
        .args(["--config", file.to_str().unwrap(), "--print-config", "--listen", "127.0.0.1:7100"])
        .env("SIDECACHE_LOG_LEVEL", "warn")
        .env("SIDECACHE_LIMITS__MAX_CLIENTS", "77")
        .output()
        .unwrap();
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(!text.contains("hunter2"), "password leaked: {text}");
    assert!(text.contains("redis://app:***@10.1.2.3:6390/4"), "{text}");
    assert!(text.contains("listen = \"127.0.0.1:7100\""), "CLI wins over file: {text}");
    assert!(text.contains("log_level = \"warn\""), "env wins over file: {text}");
    assert!(text.contains("max_clients = 77"), "{text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_endpoints_report_health_and_metrics() {
    // The binary, so the metrics are this instance's alone (the recorder is process-wide).
    let redis = RedisServer::start();
    let proc = ProxyProcess::start(&redis.url(), &[]).await;
    assert_eq!(http_get(proc.admin, "/livez").await.0, 200);
    // Other methods: 405, with the methods that are allowed.
    {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut s = tokio::net::TcpStream::connect(proc.admin).await.unwrap();
        s.write_all(b"POST /metrics HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
            .await
            .unwrap();
        let mut resp = String::new();
        s.read_to_string(&mut resp).await.unwrap();
        assert!(resp.starts_with("HTTP/1.1 405"), "{resp}");
        assert!(resp.to_ascii_lowercase().contains("\r\nallow: get, head\r\n"), "{resp}");
    }
    let admin = proc.admin;
    eventually("readyz to turn 200", || async move { http_get(admin, "/readyz").await.0 == 200 }).await;
    let mut c = Client::connect(&proc.addr.to_string()).await;
    c.cmd(&["SET", "k", "v"]).await;
    c.cmd(&["GET", "k"]).await;
    let (status, body) = http_get(proc.admin, "/metrics").await;
    assert_eq!(status, 200);
    assert_eq!(metric(&body, "sidecache_commands_total{family=\"string\"}"), 2.0);
    assert!(body.contains("# TYPE sidecache_command_duration_seconds histogram"), "histogram, not summary:\n{body}");
    assert!(body.contains("sidecache_command_duration_seconds_bucket{family=\"string\",le=\"0.001\"}"));
    assert_eq!(metric(&body, "sidecache_client_connections"), 1.0);
    assert_eq!(metric(&body, "sidecache_upstream_up"), 1.0);
    assert!(body.contains("sidecache_protocol_errors_total{kind=\"invalid_bulk_length\"}"));
    assert_eq!(http_get(proc.admin, "/nope").await.0, 404);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_killed_gives_quick_errors_then_recovers() {
    let mut redis = RedisServer::start();
    let proxy = Proxy::start_with(&redis, |c| c.upstream.max_backoff = Duration::from_millis(200)).await;
    let mut c = proxy.client().await;
    assert_eq!(c.cmd(&["SET", "k", "before"]).await, b("+OK\r\n"));
    redis.kill();
    // Every command gets an error reply (never a hang), and the connection stays usable.
    for _ in 0..5 {
        let reply = c.cmd(&["GET", "k"]).await;
        assert!(reply.starts_with(b"-ERR sidecache: upstream"), "{reply:?}");
        let text = String::from_utf8_lossy(&reply);
        assert_eq!(text.matches("upstream").count(), 1, "one cause, said once: {text:?}");
    }
    let p = &proxy;
    eventually("readyz to turn 503", || async move { p.http_get("/readyz").await.0 == 503 }).await;
    let (_, body) = proxy.http_get("/readyz").await;
    assert!(body.starts_with("upstream unreachable"), "{body}");
    redis.restart();
    // Redis restarted empty (no persistence): the same client recovers without reconnecting.
    let c = std::sync::Arc::new(tokio::sync::Mutex::new(c));
    eventually("commands to succeed again", || {
        let c = c.clone();
        async move { c.lock().await.cmd(&["SET", "k", "after"]).await == b("+OK\r\n") }
    })
    .await;
    assert_eq!(c.lock().await.cmd(&["GET", "k"]).await, b("$5\r\nafter\r\n"));
    eventually("readyz to turn 200 again", || async move { p.http_get("/readyz").await.0 == 200 }).await;
    // New clients work too.
    let mut fresh = proxy.client().await;
    assert_eq!(fresh.cmd(&["GET", "k"]).await, b("$5\r\nafter\r\n"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_lets_the_inflight_pipeline_finish_and_exits_zero() {
    let redis = RedisServer::start();
    let mut proc = ProxyProcess::start(&redis.url(), &[]).await;
    let mut c = Client::connect(&proc.addr.to_string()).await;
    // A blocking command in flight (answered by its timeout) plus a pipeline behind it.
    let mut pipeline = encode(&[b"BLPOP", b"nothing", b"1"]);
    for _ in 0..1000 {
        pipeline.extend(encode(&[b"INCR", b"n"]));
    }
    c.send_raw(&pipeline).await;
    let addr = redis.addr();
    eventually("BLPOP to be blocked in Redis", || async { info_field(&addr, "blocked_clients").await == "1" }).await;
    proc.signal(libc::SIGTERM);
    assert_eq!(c.read().await, b("*-1\r\n"), "the blocked command completes");
    for i in 1..=1000 {
        assert_eq!(c.read().await, bytes::Bytes::from(format!(":{i}\r\n")));
    }
    let status = tokio::time::timeout(PATIENCE, proc.child.wait()).await.expect("exited in time").unwrap();
    assert_eq!(status.code(), Some(0), "log:\n{}", proc.log.lock().unwrap());
    // New connections are refused after shutdown.
    assert!(tokio::net::TcpStream::connect(proc.addr).await.is_err());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_reloads_policy_without_dropping_clients() {
    let redis = RedisServer::start();
    let dir = std::env::temp_dir().join(format!("sidecache-hup-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("c.toml");
    std::fs::write(&file, "[security]\ndeny = [\"FLUSHALL\"]\n").unwrap();
    let proc = ProxyProcess::start(&redis.url(), &["--config", file.to_str().unwrap()]).await;
    let mut c = Client::connect(&proc.addr.to_string()).await;
    assert_eq!(c.cmd(&["FLUSHALL"]).await, b("-NOPERM this command is disabled by sidecache\r\n"));
    assert_eq!(c.cmd(&["ECHO", "x"]).await, b("$1\r\nx\r\n"));
    std::fs::write(&file, "[security]\ndeny = [\"ECHO\"]\n").unwrap();
    proc.signal(libc::SIGHUP);
    let log = proc.log.clone();
    eventually("the reload to be logged", || {
        let log = log.clone();
        async move { log.lock().unwrap().contains("Configuration reloaded") }
    })
    .await;
    assert_eq!(c.cmd(&["ECHO", "x"]).await, b("-NOPERM this command is disabled by sidecache\r\n"));
    assert_eq!(c.cmd(&["FLUSHALL"]).await, b("+OK\r\n"));
    const UNAPPLIED: &str = "Changed keys that apply only at start keep their running values";
    assert!(!log.lock().unwrap().contains(UNAPPLIED), "only live keys changed, yet: {}", log.lock().unwrap());
    // A key read only at start is accepted, not applied, and named in a warning.
    std::fs::write(&file, "[security]\ndeny = [\"ECHO\"]\n[upstream]\npool_size = 3\n").unwrap();
    proc.signal(libc::SIGHUP);
    eventually("the warning about upstream.pool_size", || {
        let log = log.clone();
        async move {
            let log = log.lock().unwrap();
            log.lines().any(|l| l.contains(UNAPPLIED) && l.contains("upstream.pool_size"))
        }
    })
    .await;
    assert_eq!(c.cmd(&["ECHO", "x"]).await, b("-NOPERM this command is disabled by sidecache\r\n"));
    // An invalid file is rejected and the running policy stays.
    std::fs::write(&file, "[security]\ndeny = 5\n").unwrap();
    proc.signal(libc::SIGHUP);
    eventually("the rejection to be logged", || {
        let log = log.clone();
        async move { log.lock().unwrap().contains("New configuration rejected") }
    })
    .await;
    assert_eq!(c.cmd(&["ECHO", "x"]).await, b("-NOPERM this command is disabled by sidecache\r\n"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_beyond_max_clients_get_redis_error() {
    let redis = RedisServer::start();
    let proxy = Proxy::start_with(&redis, |c| c.limits.max_clients = 2).await;
    let mut a = proxy.client().await;
    let mut b_ = proxy.client().await;
    assert_eq!(a.cmd(&["PING"]).await, b("+PONG\r\n"));
    assert_eq!(b_.cmd(&["PING"]).await, b("+PONG\r\n"));
    let mut third = proxy.client().await;
    assert_eq!(third.read_until_closed().await, b("-ERR max number of clients reached\r\n"));
    drop(a);
    let addr = proxy.addr;
    eventually("a slot to free up", || async move {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
        s.write_all(b"PING\r\n").await.unwrap();
        let mut buf = [0u8; 64];
        let n = s.read(&mut buf).await.unwrap_or(0);
        &buf[..n] == b"+PONG\r\n"
    })
    .await;
    assert_eq!(b_.cmd(&["PING"]).await, b("+PONG\r\n"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_clients_use_no_upstream_connections() {
    let redis = RedisServer::start();
    let proxy = Proxy::start(&redis).await;
    let mut idle = Vec::new();
    for _ in 0..200 {
        idle.push(proxy.client().await);
    }
    for c in idle.iter_mut().take(50) {
        assert_eq!(c.cmd(&["PING"]).await, b("+PONG\r\n"));
    }
    // Redis's own count: the pool, the proxy's health check, and this INFO connection.
    let connected: u32 = info_field(&redis.addr(), "connected_clients").await.parse().unwrap();
    let pooled = connected - 2;
    assert!(pooled <= 2, "200 clients (50 active) use {pooled} upstream connections; pool size is 2");
}

/// The reply to a command on a shared connection that Redis stopped answering.
const STALLED: &str = "-ERR sidecache: upstream did not answer within 300ms; the command may or may not have run\r\n";

/// Redis, sidecache in front of it with a 300 ms command timeout, and a client; `k` holds `v`.
/// A short command timeout (`STALLED`) and a short reconnect backoff, for the stall tests.
fn quick_stall(c: &mut Config) {
    c.upstream.command_timeout = Duration::from_millis(300);
    c.upstream.max_backoff = Duration::from_millis(100);
}

async fn stall_rig() -> (RedisServer, Proxy, Client) {
    let redis = RedisServer::start();
    let proxy = Proxy::start_with(&redis, quick_stall).await;
    let mut c = proxy.client().await;
    assert_eq!(c.cmd(&["SET", "k", "v"]).await, b("+OK\r\n"));
    (redis, proxy, c)
}

/// Waits until the same client's `GET k` is answered with `expected` again (after a reconnect
/// with backoff).
async fn recovers(c: Client, expected: &'static str) {
    let c = std::sync::Arc::new(tokio::sync::Mutex::new(c));
    eventually("commands to succeed on a fresh upstream connection", || {
        let c = c.clone();
        async move { c.lock().await.cmd(&["GET", "k"]).await == b(expected) }
    })
    .await;
}

/// Pipelined commands share one upstream waiter; when the connection times out with them in
/// flight, each command still gets its own error reply.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_upstream_gives_one_error_per_pipelined_command() {
    let (redis, _proxy, mut c) = stall_rig().await;
    redis.signal(libc::SIGSTOP);
    let mut pipeline = Vec::new();
    for _ in 0..5 {
        pipeline.extend(encode(&[b"GET", b"k"]));
    }
    c.send_raw(&pipeline).await;
    let mut replies = Vec::new();
    for _ in 0..5 {
        replies.push(c.read().await);
    }
    redis.signal(libc::SIGCONT);
    for reply in replies {
        assert_eq!(reply, b(STALLED));
    }
    recovers(c, "$1\r\nv\r\n").await;
}

/// A fake Redis, for what real Redis cannot do on demand: stop in the middle of the replies to
/// one pipelined read. It answers `PING` with `+PONG` and other commands with a null, except
/// that on a connection where `GET stall` arrives, it answers the first `GET stall` with `$1 v`
/// and then sends nothing more on that connection (which stays open).
async fn half_answering_upstream() -> std::net::SocketAddr {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind fake upstream");
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut buf = Vec::new();
                let mut chunk = vec![0u8; 16 * 1024];
                let mut stalled = false;
                loop {
                    let n = match s.read(&mut chunk).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => n,
                    };
                    buf.extend_from_slice(&chunk[..n]);
                    let mut out = Vec::new();
                    while let Some((args, used)) = parse_command(&buf) {
                        buf.drain(..used);
                        if stalled {
                            continue;
                        }
                        match args.iter().map(|a| a.to_ascii_uppercase()).collect::<Vec<_>>().as_slice() {
                            [ping] if ping == b"PING" => out.extend_from_slice(b"+PONG\r\n"),
                            [get, key] if get == b"GET" && key == b"STALL" => {
                                out.extend_from_slice(b"$1\r\nv\r\n");
                                stalled = true;
                            }
                            _ => out.extend_from_slice(b"$-1\r\n"),
                        }
                    }
                    if !out.is_empty() && s.write_all(&out).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    addr
}

/// One complete command (an array of bulk strings) at the start of `buf`, and its length.
fn parse_command(buf: &[u8]) -> Option<(Vec<Vec<u8>>, usize)> {
    fn line(buf: &[u8], at: usize) -> Option<(usize, usize)> {
        let end = at + buf.get(at..)?.windows(2).position(|w| w == b"\r\n")?;
        let n = std::str::from_utf8(&buf[at + 1..end]).ok()?.parse().ok()?;
        Some((n, end + 2))
    }
    assert_eq!(buf.first().copied().unwrap_or(b'*'), b'*', "sidecache sends arrays of bulk strings");
    let (count, mut at) = line(buf, 0)?;
    let mut args = Vec::with_capacity(count);
    for _ in 0..count {
        let (len, start) = line(buf, at)?;
        args.push(buf.get(start..start + len)?.to_vec());
        at = start + len + 2;
        if buf.len() < at {
            return None;
        }
    }
    Some((args, at))
}

/// The replies to a pipelined read come back as one span per waiter; when the reply stream stops
/// after the first of them, the waiter is still being answered (no longer in the in-flight queue)
/// and the stall check must still time it out: the reply that came, then one error per command
/// still unanswered, then recovery.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upstream_that_stops_half_way_through_a_pipelines_replies_gives_errors_not_a_hang() {
    let addr = half_answering_upstream().await;
    let proxy = Proxy::start_config({
        let mut c = test_config(&format!("redis://{addr}"));
        quick_stall(&mut c);
        c
    })
    .await;
    let mut c = proxy.client().await;
    assert_eq!(c.cmd(&["GET", "k"]).await, b("$-1\r\n"));
    let mut pipeline = Vec::new();
    for _ in 0..3 {
        pipeline.extend(encode(&[b"GET", b"stall"]));
    }
    c.send_raw(&pipeline).await;
    assert_eq!(c.read().await, b("$1\r\nv\r\n"), "the reply that came before the stream stopped");
    for i in 1..3 {
        assert_eq!(c.read().await, b(STALLED), "reply {i} of a group whose replies stopped after the first");
    }
    // The stuck connection was dropped: the next commands go over a fresh one.
    recovers(c, "$-1\r\n").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stalled_upstream_gives_errors_not_hangs() {
    let (redis, _proxy, mut c) = stall_rig().await;
    redis.signal(libc::SIGSTOP);
    let reply = c.cmd(&["GET", "k"]).await;
    redis.signal(libc::SIGCONT);
    assert_eq!(reply, b(STALLED));
    recovers(c, "$1\r\nv\r\n").await;
}

/// Connections Redis lists for database `db`.
async fn connections_in_db(redis: &RedisServer, db: u32) -> usize {
    let mut c = Client::connect(&redis.addr()).await;
    let list = c.cmd(&["CLIENT", "LIST"]).await;
    String::from_utf8_lossy(&list).lines().filter(|l| l.contains(&format!(" db={db} "))).count()
}

/// A pool no session holds is closed after `POOL_UNUSED_SWEEPS` sweeps, its connections with
/// it; a pool a session holds, and the initial pool, stay.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pools_no_session_uses_are_closed_by_the_sweep_and_others_stay() {
    use sidecache::protocol::encode::Proto;
    use sidecache::upstream::{Endpoint, POOL_UNUSED_SWEEPS, PoolKey, Upstream};
    let redis = RedisServer::start();
    let (host, port) = redis.addr().rsplit_once(':').map(|(h, p)| (h.to_string(), p.parse().unwrap())).unwrap();
    let endpoint = Endpoint {
        host,
        port,
        connect_timeout: Duration::from_secs(2),
        command_timeout: Duration::from_secs(5),
        limits: Default::default(),
    };
    let upstream = Upstream::new(endpoint, None, 0, 2, Duration::from_secs(1));
    let key = |db| PoolKey { creds: None, db, proto: Proto::Resp2 };
    let initial = upstream.pool(&upstream.initial_key()).await.expect("pool for db 0");
    let held = upstream.pool(&key(3)).await.expect("pool for db 3");
    // Session 0 gets slot 0: the connection the pool was made with.
    let session_handle = upstream.connection(&held, 0).await.expect("connection for db 3");
    let idle = upstream.pool(&key(4)).await.expect("pool for db 4");
    drop((initial, held, idle));
    assert_eq!(upstream.pool_count(), 3);
    assert_eq!(connections_in_db(&redis, 4).await, 1, "the db 4 pool has its first connection");

    for sweep in 1..POOL_UNUSED_SWEEPS {
        assert_eq!(upstream.sweep(), 0, "sweep {sweep} closes nothing yet");
    }
    assert_eq!(upstream.sweep(), 1, "the unused db 4 pool is closed");
    assert_eq!(upstream.pool_count(), 2);
    eventually("Redis no longer lists the db 4 connection", || async { connections_in_db(&redis, 4).await == 0 }).await;
    for _ in 0..POOL_UNUSED_SWEEPS * 2 {
        assert_eq!(upstream.sweep(), 0, "the held db 3 pool and the initial pool stay");
    }
    assert_eq!(connections_in_db(&redis, 3).await, 1);

    // Let go of the db 3 connection: the pool goes after the same number of sweeps.
    drop(session_handle);
    for _ in 1..POOL_UNUSED_SWEEPS {
        assert_eq!(upstream.sweep(), 0);
    }
    assert_eq!(upstream.sweep(), 1, "the db 3 pool is closed once nobody holds it");
    eventually("Redis no longer lists the db 3 connection", || async { connections_in_db(&redis, 3).await == 0 }).await;
    // The next client of db 3 gets a new pool.
    let again = upstream.pool(&key(3)).await.expect("a new pool for db 3");
    upstream.connection(&again, 0).await.expect("a connection of the new pool");
    assert_eq!(connections_in_db(&redis, 3).await, 1);
    assert_eq!(upstream.pool_count(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_waits_within_shutdown_grace_for_a_reply_that_takes_longer_than_five_seconds() {
    let redis = RedisServer::start();
    let proxy = ProxyProcess::start(&redis.url(), &[]).await; // shutdown_grace: the default 10 s
    let mut c = Client::connect(&proxy.addr.to_string()).await;
    c.send(&[b"BLPOP", b"late", b"0"]).await;
    eventually("the BLPOP reached Redis", || async { info_field(&redis.addr(), "blocked_clients").await == "1" }).await;
    proxy.signal(libc::SIGTERM);
    // Draining: not ready for new traffic, still alive.
    eventually("/readyz fails once shutdown begins", || async { http_get(proxy.admin, "/readyz").await.0 == 503 })
        .await;
    assert_eq!(http_get(proxy.admin, "/readyz").await.1, "shutting down\n");
    assert_eq!(http_get(proxy.admin, "/livez").await.0, 200);
    tokio::time::sleep(Duration::from_millis(5_500)).await;
    let mut direct = Client::connect(&redis.addr()).await;
    assert_eq!(direct.cmd(&["LPUSH", "late", "v"]).await, b(":1\r\n"));
    assert_eq!(c.read().await, b("*2\r\n$4\r\nlate\r\n$1\r\nv\r\n"), "the reply 5.5 s into the drain");
    let mut proxy = proxy;
    let status = tokio::time::timeout(PATIENCE, proxy.child.wait()).await.expect("exited").unwrap();
    assert_eq!(status.code(), Some(0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn memory_of_a_large_reply_is_given_back_when_its_client_leaves() {
    let redis = RedisServer::start();
    let proxy = ProxyProcess::start(&redis.url(), &[]).await;
    let mut c = Client::connect(&proxy.addr.to_string()).await;
    assert_eq!(c.cmd(&["PING"]).await, b("+PONG\r\n"));
    let base = proxy.rss_bytes();
    let value = vec![b'x'; 40 << 20];
    assert_eq!(c.cmd_bin(&[b"SET", b"big", &value]).await, b("+OK\r\n"));
    assert_eq!(c.cmd(&["GET", "big"]).await.len(), (40 << 20) + 13);
    drop(c);
    let p = &proxy;
    eventually("RSS back within 16 MiB of the baseline", || async move { p.rss_bytes() < base + (16 << 20) }).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_clients_is_lowered_to_what_the_open_files_limit_holds() {
    let redis = RedisServer::start();
    // (128 − 64 reserved) / 2 descriptors per client = 32 clients.
    let proxy = ProxyProcess::start_with_open_files(&redis.url(), &[], Some(128)).await;
    let addr = proxy.addr.to_string();
    let mut clients = Vec::new();
    let (mut served, mut refused) = (0, 0);
    for _ in 0..120 {
        let mut c = Client::connect(&addr).await;
        let reply = c.cmd(&["PING"]).await;
        if reply == b("+PONG\r\n") {
            served += 1;
        } else {
            assert_eq!(reply, b("-ERR max number of clients reached\r\n"));
            refused += 1;
        }
        clients.push(c);
    }
    assert_eq!((served, refused), (32, 88));
    assert_eq!(http_get(proxy.admin, "/livez").await.0, 200);
    assert!(proxy.log.lock().unwrap().contains("lowered_to=32"), "{}", proxy.log.lock().unwrap());
    assert_eq!(clients[0].cmd(&["PING"]).await, b("+PONG\r\n"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_of_a_redis_that_never_answered_share_one_attempt_and_its_backoff() {
    let redis = RedisServer::start();
    let proxy = Proxy::start_with(&redis, |c| c.upstream.connect_timeout = Duration::from_millis(300)).await;
    eventually("the health check connected", || async { proxy.http_get("/readyz").await.0 == 200 }).await;
    let before = info_field(&redis.addr(), "total_connections_received").await;
    redis.signal(libc::SIGSTOP);
    let mut tasks = Vec::new();
    for _ in 0..20 {
        let addr = proxy.addr.to_string();
        tasks.push(tokio::spawn(async move { Client::connect(&addr).await.cmd(&["PING"]).await }));
    }
    for t in tasks {
        let reply = t.await.unwrap();
        assert!(reply.starts_with(b"-ERR sidecache: upstream"), "{reply:?}");
    }
    redis.signal(libc::SIGCONT);
    let count = |s: String| s.trim().parse::<u64>().unwrap();
    let opened = count(info_field(&redis.addr(), "total_connections_received").await) - count(before) - 1;
    assert!(opened <= 6, "{opened} connections opened for 20 clients of an unresponsive Redis");
}

/// `SELECT`, `AUTH` and `HELLO` that get no verdict from Redis (stopped here; slower than the
/// connect timeout in general) close the client after the error: Redis never fails them for
/// being slow, so the commands pipelined behind them must not run in the state the client
/// meant to leave.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_state_change_redis_gives_no_verdict_on_closes_the_client_rather_than_run_the_rest_elsewhere() {
    let redis = RedisServer::start();
    let proxy = Proxy::start_with(&redis, |c| {
        quick_stall(c);
        c.upstream.connect_timeout = Duration::from_millis(300);
    })
    .await;
    let mut direct = Client::connect(&redis.addr()).await;
    assert_eq!(direct.cmd(&["ACL", "SETUSER", "alice", "on", ">apw", "~a:*", "+@all"]).await, b("+OK\r\n"));
    let scripts: [&[&[&str]]; 3] = [
        &[&["SELECT", "5"], &["SET", "nv:k", "meant-for-db5"]],
        &[&["AUTH", "alice", "apw"], &["SET", "nv:k", "meant-for-alice"]],
        &[&["HELLO", "3", "AUTH", "alice", "apw"], &["SET", "nv:k", "meant-for-alice"]],
    ];
    for script in scripts {
        let mut c = proxy.client().await;
        assert_eq!(c.cmd(&["PING"]).await, b("+PONG\r\n"));
        redis.signal(libc::SIGSTOP);
        c.send_raw(&pipeline(script)).await;
        let got = c.read_until_closed().await;
        redis.signal(libc::SIGCONT);
        let text = String::from_utf8_lossy(&got);
        assert!(
            text.starts_with("-ERR sidecache: ") && text.matches("\r\n").count() == 1,
            "{:?}: one error, then the connection closed; got {text:?}",
            script[0]
        );
        let mut check = Client::connect(&redis.addr()).await;
        for db in ["0", "5"] {
            assert_eq!(check.cmd(&["SELECT", db]).await, b("+OK\r\n"));
            assert_eq!(check.cmd(&["EXISTS", "nv:k"]).await, b(":0\r\n"), "{:?}: the SET ran in db {db}", script[0]);
        }
        // The proxy recovers for the next round.
        eventually("the proxy to reach Redis again", || async {
            proxy.client().await.cmd(&["PING"]).await == b("+PONG\r\n")
        })
        .await;
    }
}

/// Like Redis, which counts a reply as activity, the idle timeout runs from a client's last
/// reply: a client that waited longer than it for a reply is not closed just after getting it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_idle_timeout_counts_from_the_last_reply_too() {
    let redis = RedisServer::start();
    let proxy = Proxy::start_with(&redis, |c| c.limits.idle_timeout = Duration::from_secs(2)).await;
    let mut c = proxy.client().await;
    assert_eq!(c.cmd(&["PING"]).await, b("+PONG\r\n"));
    let mut direct = Client::connect(&redis.addr()).await;
    assert_eq!(direct.cmd(&["CLIENT", "PAUSE", "3000", "WRITE"]).await, b("+OK\r\n"));
    // Answered once the pause ends, about 3 s after it was sent: the idle timer has fired
    // (and been put off) while the reply was awaited.
    assert_eq!(c.cmd(&["SET", "idle:k", "v"]).await, b("+OK\r\n"));
    tokio::time::sleep(Duration::from_millis(1200)).await;
    assert_eq!(c.cmd(&["PING"]).await, b("+PONG\r\n"), "closed less than idle_timeout after its last reply");
    // And a client idle for longer than the timeout after its reply is still closed.
    assert_eq!(c.read_until_closed().await, b(""));
}

/// A dedicated connection opened for a client that leaves at once is counted down in
/// `sidecache_upstream_connections` like any other.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_connections_of_clients_that_left_at_once_are_counted_down() {
    let redis = RedisServer::start();
    let proxy = Proxy::start(&redis).await;
    let mut c = proxy.client().await;
    assert_eq!(c.cmd(&["PING"]).await, b("+PONG\r\n"));
    let series = "sidecache_upstream_connections ";
    let baseline = metric(&proxy.http_get("/metrics").await.1, series);
    for i in 0..30 {
        let mut gone = proxy.client().await;
        let cmd: &[&[u8]] = if i % 2 == 0 { &[b"SUBSCRIBE", b"gauge:c"] } else { &[b"BLPOP", b"gauge:l", b"0"] };
        gone.send(cmd).await;
        drop(gone);
    }
    eventually("the gauge to come back to its baseline", || async {
        metric(&proxy.http_get("/metrics").await.1, series) == baseline
    })
    .await;
}

/// A client whose pipeline sidecache stopped reading (its reply queue full while Redis is
/// slow) is not cut by the frame deadline for the time sidecache itself was not reading.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_frame_deadline_does_not_count_time_sidecache_was_not_reading() {
    let redis = RedisServer::start();
    let proxy = Proxy::start_with(&redis, |c| {
        c.limits.frame_deadline = Duration::from_secs(1);
        c.limits.max_pipeline = 4;
        c.upstream.command_timeout = Duration::ZERO;
    })
    .await;
    let mut c = proxy.client().await;
    assert_eq!(c.cmd(&["PING"]).await, b("+PONG\r\n"));
    redis.signal(libc::SIGSTOP);
    let value = vec![b'v'; 300_000];
    let mut bytes = Vec::new();
    for i in 0..20 {
        bytes.extend(encode(&[b"SET", format!("fd:{i}").as_bytes(), &value]));
    }
    let (mut rd, mut wr) = c.stream.into_split();
    let writer = tokio::spawn(async move { tokio::io::AsyncWriteExt::write_all(&mut wr, &bytes).await.map(|_| wr) });
    tokio::time::sleep(Duration::from_secs(2)).await;
    redis.signal(libc::SIGCONT);
    let mut got = Vec::new();
    let want = b"+OK\r\n".repeat(20);
    tokio::time::timeout(PATIENCE, async {
        while got.len() < want.len() {
            let mut buf = [0u8; 256];
            let n = tokio::io::AsyncReadExt::read(&mut rd, &mut buf).await.expect("read");
            assert!(n > 0, "closed after {:?}", String::from_utf8_lossy(&got));
            got.extend_from_slice(&buf[..n]);
        }
    })
    .await
    .expect("every reply in time");
    assert_eq!(got, want);
    writer.await.unwrap().expect("the whole pipeline was taken");
}

/// A pool slot that cannot connect (Redis at `maxclients`) does not fail the clients it would
/// serve while another slot's connection works; nor does the pools' credential recheck take
/// Redis's client limit for a refusal of their credentials.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_of_a_slot_that_cannot_connect_use_the_pools_working_connection() {
    // Room for the health check and the pool's first connection only.
    let redis = RedisServer::start_with(&["--maxclients", "2"]);
    let proxy = Proxy::start(&redis).await;
    let mut first = proxy.client().await;
    assert_eq!(first.cmd(&["SET", "mc:k", "v"]).await, b("+OK\r\n"));
    for round in 0..3 {
        for i in 0..6 {
            let mut c = proxy.client().await;
            assert_eq!(c.cmd(&["GET", "mc:k"]).await, b("$1\r\nv\r\n"), "round {round}, client {i}");
        }
        // The three rounds span one recheck of the pools' credentials (every 2 s).
        tokio::time::sleep(Duration::from_millis(1100)).await;
    }
}
