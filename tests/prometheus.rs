//! Prometheus integration, with the real tools from Debian's `prometheus` package: the live
//! `/metrics` output of a running sidecache passes `promtool check metrics`, and a real
//! Prometheus scrapes sidecache, loads `config/prometheus/alerts.yml`, and answers a query for
//! a sidecache counter.
//!
//! Without `promtool`/`prometheus` these tests fail with an install hint; they never skip.

mod common;

use std::io::Write;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::{Client, PATIENCE, ProxyProcess, RedisServer, free_port, http_get};

/// The counter the scrape test waits for: the near-cache's hits of the `master` rule.
fn scraped_counter() -> &'static str {
    r#"sidecache_cache_hits_total{rule="master"}"#
}

/// The sidecache configuration of these tests: a near-cache rule for `master:`.
fn proxy_config() -> &'static str {
    r#"
[near_cache]
enabled = true
[[near_cache.rules]]
name = "master"
prefix = "master:"
"#
}

fn which(bin: &str) -> Option<PathBuf> {
    std::env::var_os("PATH")?.to_str()?.split(':').map(|d| PathBuf::from(d).join(bin)).find(|p| p.is_file())
}

/// The path of a tool from Debian's `prometheus` package, or a panic that says how to get it.
fn prometheus_tool(bin: &str) -> PathBuf {
    which(bin).unwrap_or_else(|| {
        panic!(
            "{bin} is not installed: these tests need the real Prometheus tools. Install them with \
             `apt-get install -y prometheus` (.ci/run does this for you)."
        )
    })
}

fn repo_path(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(rel)
}

/// A scratch directory removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new(tag: &str) -> TempDir {
        let dir = std::env::temp_dir().join(format!("sidecache-{tag}-{}-{}", std::process::id(), free_port()));
        std::fs::create_dir_all(&dir).expect("create temp dir");
        TempDir(dir)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Starts sidecache (the built binary) with `proxy_config()` in front of `redis`.
async fn start_sidecache(redis: &RedisServer, dir: &TempDir) -> ProxyProcess {
    let config = dir.0.join("sidecache.toml");
    std::fs::write(&config, proxy_config()).expect("write sidecache config");
    ProxyProcess::start(&redis.url(), &["--config", config.to_str().unwrap()]).await
}

/// Sends a few commands of several families, so counters and histograms have samples.
async fn traffic(proxy: &ProxyProcess, rounds: usize) {
    // Reads are hits only once the near-cache is coherent.
    common::eventually("near-cache ready", || async { http_get(proxy.admin, "/readyz").await.0 == 200 }).await;
    let mut c = Client::connect(&proxy.addr.to_string()).await;
    assert_eq!(&c.cmd(&["SET", "master:brands", "acme"]).await[..], b"+OK\r\n");
    for _ in 0..rounds {
        assert_eq!(&c.cmd(&["GET", "master:brands"]).await[..], b"$4\r\nacme\r\n");
    }
    c.cmd(&["HSET", "master:departments", "1", "sales"]).await;
    c.cmd(&["PING"]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn live_metrics_pass_promtool_check_metrics() {
    let promtool = prometheus_tool("promtool");
    let redis = RedisServer::start();
    let dir = TempDir::new("promtool");
    let proxy = start_sidecache(&redis, &dir).await;
    traffic(&proxy, 10).await;
    // A protocol error too, so that family has a non-zero sample.
    let mut bad = Client::connect(&proxy.addr.to_string()).await;
    bad.send_raw(b"*1\r\n$x\r\n").await;
    let _ = bad.read_until_closed().await;

    let (status, body) = http_get(proxy.admin, "/metrics").await;
    assert_eq!(status, 200);
    assert!(body.contains("sidecache_commands_total{family=\"string\"}"), "metrics:\n{body}");
    assert!(body.contains("sidecache_command_duration_seconds_bucket{"), "histograms have buckets:\n{body}");

    let mut child = Command::new(&promtool)
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run promtool");
    child.stdin.take().unwrap().write_all(body.as_bytes()).expect("pipe metrics to promtool");
    let out = child.wait_with_output().expect("promtool finished");
    let report = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "promtool check metrics failed ({}):\n{report}\nmetrics:\n{body}", out.status);
    assert!(report.trim().is_empty(), "promtool check metrics reported problems:\n{report}");
}

/// A `prometheus` child process on its own port and storage directory; killed on drop.
struct Prometheus {
    child: Child,
    addr: SocketAddr,
    log: PathBuf,
}

impl Prometheus {
    /// Starts Prometheus scraping `target` every second, with sidecache's alert rules loaded.
    fn start(target: SocketAddr, dir: &TempDir) -> Prometheus {
        let bin = prometheus_tool("prometheus");
        let rules = repo_path("config/prometheus/alerts.yml");
        let config = dir.0.join("prometheus.yml");
        std::fs::write(
            &config,
            format!(
                "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n\
                 rule_files:\n  - {}\n\
                 scrape_configs:\n  - job_name: sidecache\n    scrape_interval: 1s\n    scrape_timeout: 1s\n    \
                 static_configs:\n      - targets: ['{target}']\n",
                rules.display()
            ),
        )
        .expect("write prometheus config");
        let log = dir.0.join("prometheus.log");
        let addr: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
        let child = Command::new(bin)
            .arg(format!("--config.file={}", config.display()))
            .arg(format!("--storage.tsdb.path={}", dir.0.join("data").display()))
            .arg(format!("--web.listen-address={addr}"))
            .arg("--log.level=warn")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).expect("create prometheus log"))
            .spawn()
            .expect("spawn prometheus");
        Prometheus { child, addr, log }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Waits for `/-/ready`.
    async fn wait_ready(&mut self) {
        let deadline = Instant::now() + PATIENCE;
        loop {
            if let Some(status) = self.child.try_wait().expect("poll prometheus") {
                panic!("prometheus exited ({status}); log:\n{}", self.log());
            }
            if let Ok(Ok((200, _))) =
                tokio::time::timeout(Duration::from_secs(1), try_http_get(self.addr, "/-/ready")).await
            {
                return;
            }
            assert!(Instant::now() < deadline, "prometheus not ready in time; log:\n{}", self.log());
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// The value of an instant query that returns one sample, or `None` when it returns none.
    async fn query_value(&self, promql: &str) -> Option<f64> {
        let q = percent_encoding::utf8_percent_encode(promql, percent_encoding::NON_ALPHANUMERIC);
        let (status, body) = http_get(self.addr, &format!("/api/v1/query?query={q}")).await;
        assert_eq!(status, 200, "query {promql}: {body}");
        assert!(body.contains(r#""status":"success""#), "query {promql}: {body}");
        single_value(&body)
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `http_get` that reports a refused connection instead of panicking.
async fn try_http_get(addr: SocketAddr, path: &str) -> std::io::Result<(u16, String)> {
    tokio::net::TcpStream::connect(addr).await?;
    Ok(http_get(addr, path).await)
}

/// The sample value of a one-element vector result: `…"value":[<ts>,"<v>"]…`.
fn single_value(body: &str) -> Option<f64> {
    let at = body.find(r#""value":["#)?;
    let rest = &body[at..];
    let open = rest.find(",\"")? + 2;
    let close = open + rest[open..].find('"')?;
    rest[open..close].parse().ok()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prometheus_scrapes_sidecache_and_its_query_api_returns_the_counter() {
    let redis = RedisServer::start();
    let dir = TempDir::new("prometheus");
    let proxy = start_sidecache(&redis, &dir).await;
    let mut prom = Prometheus::start(proxy.admin, &dir);
    prom.wait_ready().await;

    // The alert rules loaded without errors.
    let (status, rules) = http_get(prom.addr, "/api/v1/rules").await;
    assert_eq!(status, 200);
    assert!(rules.contains("SidecacheUpstreamDown") && rules.contains("SidecacheHitRatioCollapse"), "rules: {rules}");
    assert!(!rules.contains(r#""health":"err""#), "a rule failed to evaluate: {rules}");

    const READS: usize = 25;
    traffic(&proxy, READS).await;
    let query = scraped_counter();
    let deadline = Instant::now() + PATIENCE;
    let value = loop {
        match prom.query_value(query).await {
            // The first read of the key is a miss; every later one a hit.
            Some(v) if v >= (READS - 1) as f64 => break v,
            other => {
                assert!(
                    Instant::now() < deadline,
                    "Prometheus never returned {query} >= {} (last: {other:?}); prometheus log:\n{}",
                    READS - 1,
                    prom.log()
                );
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
        }
    };
    assert!(value >= (READS - 1) as f64);
    // The scrape target is healthy and sidecache reports Redis up through Prometheus too.
    assert_eq!(prom.query_value(r#"up{job="sidecache"}"#).await, Some(1.0));
    assert_eq!(prom.query_value("sidecache_upstream_up").await, Some(1.0));
}

#[test]
fn single_value_reads_one_sample() {
    let body = r#"{"status":"success","data":{"resultType":"vector","result":[{"metric":{"__name__":"x"},"value":[1700000000.123,"42"]}]}}"#;
    assert_eq!(single_value(body), Some(42.0));
    assert_eq!(single_value(r#"{"status":"success","data":{"resultType":"vector","result":[]}}"#), None);
}
