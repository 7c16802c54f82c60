//! Transparency: every command behaves through sidecache exactly as against Redis directly.
//! Where possible a test runs the same commands against both and compares the reply bytes.

mod common;

use bytes::Bytes;
use common::*;
use tokio::io::AsyncWriteExt;

/// Runs `script` on a direct connection and through the proxy (on separate databases of the
/// same Redis, so state does not collide) and asserts identical reply bytes.
async fn same_as_direct(redis: &RedisServer, proxy: &Proxy, script: &[&[&str]]) {
    let mut direct = Client::connect(&redis.addr()).await;
    let mut via = proxy.client().await;
    assert_eq!(direct.cmd(&["SELECT", "9"]).await, b("+OK\r\n"));
    assert_eq!(via.cmd(&["SELECT", "10"]).await, b("+OK\r\n"));
    same_replies(&mut direct, &mut via, script).await;
}

/// Runs `script` command by command on both connections and asserts identical reply bytes.
/// An empty line reads the next reply of a command that has several.
async fn same_replies(direct: &mut Client, via: &mut Client, script: &[&[&str]]) {
    for cmd in script {
        let (want, got) = match cmd.is_empty() {
            true => (direct.read().await, via.read().await),
            false => (direct.cmd(cmd).await, via.cmd(cmd).await),
        };
        assert_eq!(got, want, "reply to {cmd:?} differs from Redis's");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replies_and_errors_match_redis_byte_for_byte() {
    let redis = RedisServer::start();
    let proxy = Proxy::start(&redis).await;
    same_as_direct(
        &redis,
        &proxy,
        &[
            &["SET", "k", "v"],
            &["GET", "k"],
            &["GET", "missing"],
            &["INCR", "k"],
            &["LPUSH", "k", "x"],
            &["HSET", "h", "a", "1", "b", "2"],
            &["HGETALL", "h"],
            &["NOSUCHCOMMAND", "a", "b"],
            &["GET"],
            &["SET", "k", "v", "BOGUS"],
            &["EXPIRE", "k", "notanumber"],
            &["ZADD", "z", "1.5", "a", "2", "b"],
            &["ZRANGE", "z", "0", "-1", "WITHSCORES"],
            &["EVAL", "return {1, 'two', {3}}", "0"],
            &["EVAL", "return redis.error_reply('MYERR custom')", "0"],
            &["OBJECT", "ENCODING", "h"],
            &["PING"],
            &["PING", "hello"],
            &["ECHO", "bytes"],
            &["CLIENT", "GETNAME"],
            &["SELECT", "notanumber"],
            &["SELECT", "-1"],
            &["SELECT", "99"],
            &["AUTH"],
            &["HELLO", "4"],
            &["HELLO", "x"],
            &["HELLO", "3", "BOGUS"],
            &["CLIENT", "SETNAME", "has space"],
            &["EXEC"],
            &["DISCARD"],
            &["UNWATCH"],
        ],
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn binary_safe_keys_and_values_round_trip() {
    let redis = RedisServer::start();
    let proxy = Proxy::start(&redis).await;
    let mut c = proxy.client().await;
    let key: Vec<u8> = b"k\0\r\n\xff*1\r\n$".to_vec();
    let value: Vec<u8> = (0..=255u8).cycle().take(4096).collect();
    assert_eq!(c.cmd_bin(&[b"SET", &key, &value]).await, b("+OK\r\n"));
    let mut want = format!("${}\r\n", value.len()).into_bytes();
    want.extend_from_slice(&value);
    want.extend_from_slice(b"\r\n");
    assert_eq!(c.cmd_bin(&[b"GET", &key]).await, Bytes::from(want.clone()));
    // And Redis itself stored exactly those bytes under exactly that key.
    let mut direct = Client::connect(&redis.addr()).await;
    assert_eq!(direct.cmd_bin(&[b"GET", &key]).await, Bytes::from(want));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn eight_mib_value_round_trips() {
    let redis = RedisServer::start();
    let proxy = Proxy::start(&redis).await;
    let mut c = proxy.client().await;
    let value: Vec<u8> = (0..8 * 1024 * 1024).map(|i| (i * 31 % 251) as u8).collect();
    assert_eq!(c.cmd_bin(&[b"SET", b"big", &value]).await, b("+OK\r\n"));
    let reply = c.cmd(&["GET", "big"]).await;
    let header = format!("${}\r\n", value.len());
    assert!(reply.starts_with(header.as_bytes()));
    assert_eq!(&reply[header.len()..reply.len() - 2], &value[..], "8 MiB value came back changed");
    assert_eq!(c.cmd(&["STRLEN", "big"]).await, b(":8388608\r\n"));
}

/// The commands of one read share one upstream waiter; here their replies (20 × 100 KB) span
/// many reads of the shared connection, so they are gathered across reads before being handed
/// over, and must come out whole and in order, interleaved with another client's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pipeline_whose_replies_span_many_upstream_reads_arrives_whole_and_in_order() {
    let redis = RedisServer::start();
    let proxy = Proxy::start(&redis).await;
    let mut setup = proxy.client().await;
    let values: Vec<Vec<u8>> = (0..20u8).map(|i| vec![b'a' + i; 100_000]).collect();
    for (i, v) in values.iter().enumerate() {
        assert_eq!(setup.cmd_bin(&[b"SET", format!("big{i}").as_bytes(), v]).await, b("+OK\r\n"));
    }
    let mut c = proxy.client().await;
    let mut other = proxy.client().await;
    let mut pipeline = Vec::new();
    for i in 0..values.len() {
        pipeline.extend(encode(&[b"GET", format!("big{i}").as_bytes()]));
    }
    pipeline.extend(encode(&[b"PING"]));
    c.send_raw(&pipeline).await;
    // Another client's command on the same shared connection, in between.
    assert_eq!(other.cmd(&["ECHO", "between"]).await, b("$7\r\nbetween\r\n"));
    for (i, v) in values.iter().enumerate() {
        let reply = c.read().await;
        let mut want = format!("${}\r\n", v.len()).into_bytes();
        want.extend_from_slice(v);
        want.extend_from_slice(b"\r\n");
        assert!(reply == want[..], "reply {i} differs ({} bytes, want {})", reply.len(), want.len());
    }
    assert_eq!(c.read().await, b("+PONG\r\n"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn twenty_thousand_pipelined_commands_answer_in_order() {
    let redis = RedisServer::start();
    let proxy = Proxy::start(&redis).await;
    let mut c = proxy.client().await;
    let mut pipeline = Vec::new();
    for i in 0..20_000 {
        if i % 2 == 0 {
            pipeline.extend(encode(&[b"INCR", b"counter"]));
        } else {
            pipeline.extend(encode(&[b"ECHO", format!("e{i}").as_bytes()]));
        }
    }
    // Write while reading, as a pipelining client does.
    let (mut rd, mut wr) = c.stream.split();
    let writer = async move {
        use tokio::io::AsyncWriteExt;
        wr.write_all(&pipeline).await.unwrap();
    };
    let reader = async move {
        use tokio::io::AsyncReadExt;
        let mut buf = bytes::BytesMut::new();
        let mut replies = Vec::new();
        while replies.len() < 20_000 {
            match redis_protocol::resp2::decode::decode_bytes_mut(&mut buf).unwrap() {
                Some((_, _, raw)) => replies.push(raw),
                None => {
                    let n = rd.read_buf(&mut buf).await.unwrap();
                    assert!(n > 0, "connection closed after {} replies", replies.len());
                }
            }
        }
        replies
    };
    let (_, replies) =
        tokio::time::timeout(PATIENCE, async { tokio::join!(writer, reader) }).await.expect("pipeline done");
    for (i, r) in replies.iter().enumerate() {
        let want = if i % 2 == 0 {
            format!(":{}\r\n", i / 2 + 1)
        } else {
            let echoed = format!("e{i}");
            format!("${}\r\n{echoed}\r\n", echoed.len())
        };
        assert_eq!(r, &Bytes::from(want), "reply {i} out of order");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resp3_hello_with_auth_and_setname() {
    let redis = RedisServer::start_with(&["--user", "alice", "on", ">secret", "~*", "&*", "+@all"]);
    let proxy = Proxy::start(&redis).await;
    let mut c = proxy.client().await;
    let wrong = c.cmd(&["HELLO", "3", "AUTH", "alice", "nope"]).await;
    assert!(wrong.starts_with(b"-WRONGPASS"), "{wrong:?}");
    let hello = c.cmd(&["HELLO", "3", "AUTH", "alice", "secret", "SETNAME", "app-1"]).await;
    assert!(hello.starts_with(b"%7\r\n"), "HELLO 3 answers a RESP3 map: {hello:?}");
    assert!(hello.windows(7).any(|w| w == b":3\r\n$4\r" || w == b"proto\r\n"), "{hello:?}");
    assert_eq!(c.cmd(&["CLIENT", "GETNAME"]).await, b("$5\r\napp-1\r\n"));
    assert_eq!(c.cmd(&["ACL", "WHOAMI"]).await, b("$5\r\nalice\r\n"));
    c.cmd(&["HSET", "h", "f", "v"]).await;
    assert_eq!(c.cmd(&["HGETALL", "h"]).await, b("%1\r\n$1\r\nf\r\n$1\r\nv\r\n"));
    assert_eq!(c.cmd(&["GET", "missing"]).await, b("_\r\n"));
    assert_eq!(c.cmd(&["CLIENT", "GETNAME"]).await, b("$5\r\napp-1\r\n"));
    // Back to RESP2 on the same connection.
    let hello2 = c.cmd(&["HELLO", "2"]).await;
    assert!(hello2.starts_with(b"*14\r\n"), "{hello2:?}");
    assert_eq!(c.cmd(&["HGETALL", "h"]).await, b("*2\r\n$1\r\nf\r\n$1\r\nv\r\n"));
    assert_eq!(c.cmd(&["GET", "missing"]).await, b("$-1\r\n"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn select_isolates_databases_between_clients() {
    let redis = RedisServer::start();
    let proxy = Proxy::start(&redis).await;
    let mut a = proxy.client().await;
    let mut b_ = proxy.client().await;
    assert_eq!(a.cmd(&["SELECT", "1"]).await, b("+OK\r\n"));
    assert_eq!(a.cmd(&["SET", "k", "in-db1"]).await, b("+OK\r\n"));
    assert_eq!(b_.cmd(&["GET", "k"]).await, b("$-1\r\n"));
    assert_eq!(b_.cmd(&["SET", "k", "in-db0"]).await, b("+OK\r\n"));
    assert_eq!(a.cmd(&["GET", "k"]).await, b("$6\r\nin-db1\r\n"));
    assert_eq!(b_.cmd(&["SELECT", "99"]).await, b("-ERR DB index is out of range\r\n"));
    assert_eq!(b_.cmd(&["GET", "k"]).await, b("$6\r\nin-db0\r\n"));
    let mut direct = Client::connect(&redis.addr()).await;
    direct.cmd(&["SELECT", "1"]).await;
    assert_eq!(direct.cmd(&["GET", "k"]).await, b("$6\r\nin-db1\r\n"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn multi_exec_and_watch_conflict() {
    let redis = RedisServer::start();
    let proxy = Proxy::start(&redis).await;
    let mut c = proxy.client().await;
    let mut other = proxy.client().await;
    assert_eq!(c.cmd(&["MULTI"]).await, b("+OK\r\n"));
    assert_eq!(c.cmd(&["SET", "k", "1"]).await, b("+QUEUED\r\n"));
    assert_eq!(c.cmd(&["INCR", "k"]).await, b("+QUEUED\r\n"));
    assert_eq!(c.cmd(&["EXEC"]).await, b("*2\r\n+OK\r\n:2\r\n"));
    // WATCH conflict: another client changes the key between WATCH and EXEC.
    assert_eq!(c.cmd(&["WATCH", "k"]).await, b("+OK\r\n"));
    assert_eq!(other.cmd(&["SET", "k", "changed"]).await, b("+OK\r\n"));
    assert_eq!(c.cmd(&["MULTI"]).await, b("+OK\r\n"));
    assert_eq!(c.cmd(&["SET", "k", "mine"]).await, b("+QUEUED\r\n"));
    assert_eq!(c.cmd(&["EXEC"]).await, b("*-1\r\n"));
    assert_eq!(c.cmd(&["GET", "k"]).await, b("$7\r\nchanged\r\n"));
    // A queuing error aborts the transaction, as on Redis.
    assert_eq!(c.cmd(&["MULTI"]).await, b("+OK\r\n"));
    assert_eq!(c.cmd(&["NOSUCH"]).await, b("-ERR unknown command 'NOSUCH', with args beginning with: \r\n"));
    assert_eq!(c.cmd(&["EXEC"]).await, b("-EXECABORT Transaction discarded because of previous errors.\r\n"));
    // A command refused by sidecache's policy inside MULTI aborts it the same way.
    assert_eq!(c.cmd(&["MULTI"]).await, b("+OK\r\n"));
    assert_eq!(c.cmd(&["SET", "k", "x"]).await, b("+QUEUED\r\n"));
    assert_eq!(c.cmd(&["DEBUG", "SLEEP", "0"]).await, b("-NOPERM this command is disabled by sidecache\r\n"));
    assert_eq!(c.cmd(&["EXEC"]).await, b("-EXECABORT Transaction discarded because of previous errors.\r\n"));
    assert_eq!(c.cmd(&["GET", "k"]).await, b("$7\r\nchanged\r\n"));
    // Pipelined transaction.
    let mut p = Vec::new();
    for cmd in [&["MULTI"][..], &["INCR", "n"], &["INCR", "n"], &["EXEC"], &["GET", "n"]] {
        let args: Vec<&[u8]> = cmd.iter().map(|a| a.as_bytes()).collect();
        p.extend(encode(&args));
    }
    c.send_raw(&p).await;
    for want in ["+OK\r\n", "+QUEUED\r\n", "+QUEUED\r\n", "*2\r\n:1\r\n:2\r\n", "$1\r\n2\r\n"] {
        assert_eq!(c.read().await, b(want));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pubsub_in_resp2_and_resp3() {
    let redis = RedisServer::start();
    let proxy = Proxy::start(&redis).await;
    let mut sub2 = proxy.client().await;
    sub2.send(&[b"SUBSCRIBE", b"news", b"alerts"]).await;
    assert_eq!(sub2.read().await, b("*3\r\n$9\r\nsubscribe\r\n$4\r\nnews\r\n:1\r\n"));
    assert_eq!(sub2.read().await, b("*3\r\n$9\r\nsubscribe\r\n$6\r\nalerts\r\n:2\r\n"));
    let mut sub3 = proxy.client().await;
    assert!(sub3.cmd(&["HELLO", "3"]).await.starts_with(b"%"));
    sub3.send(&[b"PSUBSCRIBE", b"n*"]).await;
    assert_eq!(sub3.read().await, b(">3\r\n$10\r\npsubscribe\r\n$2\r\nn*\r\n:1\r\n"));
    // RESP3 clients may run normal commands while subscribed.
    assert_eq!(sub3.cmd(&["SET", "k", "v"]).await, b("+OK\r\n"));
    let mut publisher = proxy.client().await;
    assert_eq!(publisher.cmd(&["PUBLISH", "news", "hello"]).await, b(":2\r\n"));
    assert_eq!(sub2.read().await, b("*3\r\n$7\r\nmessage\r\n$4\r\nnews\r\n$5\r\nhello\r\n"));
    assert_eq!(sub3.read().await, b(">4\r\n$8\r\npmessage\r\n$2\r\nn*\r\n$4\r\nnews\r\n$5\r\nhello\r\n"));
    // RESP2 subscribed mode: PING answers the pub/sub way; other commands are refused by Redis.
    assert_eq!(sub2.cmd(&["PING"]).await, b("*2\r\n$4\r\npong\r\n$0\r\n\r\n"));
    let refused = sub2.cmd(&["GET", "k"]).await;
    assert!(refused.starts_with(b"-ERR Can't execute 'get'"), "{refused:?}");
    sub2.send(&[b"UNSUBSCRIBE"]).await;
    // One confirmation per channel, in Redis's own order, the last one with count 0.
    let (first, second) = (sub2.read().await, sub2.read().await);
    let text = format!("{}{}", String::from_utf8_lossy(&first), String::from_utf8_lossy(&second));
    assert!(text.contains("$4\r\nnews\r\n") && text.contains("$6\r\nalerts\r\n"), "{text:?}");
    assert!(first.starts_with(b"*3\r\n$11\r\nunsubscribe\r\n") && first.ends_with(b":1\r\n"), "{first:?}");
    assert!(second.starts_with(b"*3\r\n$11\r\nunsubscribe\r\n") && second.ends_with(b":0\r\n"), "{second:?}");
    // Unsubscribed: a normal client again.
    assert_eq!(sub2.cmd(&["GET", "k"]).await, b("$1\r\nv\r\n"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn blpop_is_woken_by_another_client() {
    let redis = RedisServer::start();
    let proxy = Proxy::start(&redis).await;
    let mut waiter = proxy.client().await;
    let mut pusher = proxy.client().await;
    let mut bystander = proxy.client().await;
    waiter.send(&[b"BLPOP", b"queue", b"0"]).await;
    // The blocked client must not delay anyone else.
    for i in 0..50 {
        assert_eq!(
            bystander.cmd(&["ECHO", &i.to_string()]).await,
            Bytes::from(format!("${}\r\n{i}\r\n", i.to_string().len()))
        );
    }
    let addr = redis.addr();
    eventually("BLPOP to be blocked in Redis", || async { info_field(&addr, "blocked_clients").await == "1" }).await;
    assert_eq!(pusher.cmd(&["RPUSH", "queue", "job"]).await, b(":1\r\n"));
    assert_eq!(waiter.read().await, b("*2\r\n$5\r\nqueue\r\n$3\r\njob\r\n"));
    // Back to normal commands on the same client.
    assert_eq!(waiter.cmd(&["LLEN", "queue"]).await, b(":0\r\n"));
}

/// A client blocked in `BLPOP` leaves (`half_close`: shuts only its sending side; otherwise
/// closes): its dedicated connection must close, so that Redis pops nothing nobody receives.
async fn blocked_client_leaves_and_pops_nothing(redis: &RedisServer, proxy: &Proxy, half_close: bool) {
    let mut waiter = proxy.client().await;
    waiter.send(&[b"BLPOP", b"q", b"0"]).await;
    let addr = redis.addr();
    eventually("BLPOP to be blocked in Redis", || async { info_field(&addr, "blocked_clients").await == "1" }).await;
    let still_reading = if half_close {
        waiter.stream.shutdown().await.unwrap();
        Some(waiter)
    } else {
        drop(waiter);
        None
    };
    eventually("the blocked upstream connection to close", || async {
        info_field(&addr, "blocked_clients").await == "0"
    })
    .await;
    if let Some(mut waiter) = still_reading {
        assert_eq!(waiter.read_until_closed().await, b(""), "no reply, then the close");
    }
    let mut direct = Client::connect(&redis.addr()).await;
    assert_eq!(direct.cmd(&["RPUSH", "q", "precious"]).await, b(":1\r\n"));
    assert_eq!(direct.cmd(&["LPOP", "q"]).await, b("$8\r\nprecious\r\n"), "the element stayed in the list");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_that_disconnects_while_blocked_pops_nothing() {
    let redis = RedisServer::start();
    let proxy = Proxy::start(&redis).await;
    blocked_client_leaves_and_pops_nothing(&redis, &proxy, false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn commands_that_would_take_over_a_shared_connection_stay_with_their_client() {
    let redis = RedisServer::start();
    let proxy = Proxy::start(&redis).await;
    // An HTTP request sent to the port: Redis closes that client's connection without a reply
    // (its cross-protocol scripting guard); sidecache closes the client, not a shared connection.
    for request in [&b"POST / HTTP/1.1\r\nHost: x\r\n\r\n"[..], b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"] {
        let mut got = Vec::new();
        for addr in [redis.addr(), proxy.addr.to_string()] {
            let mut c = Client::connect(&addr).await;
            assert_eq!(c.cmd(&["PING"]).await, b("+PONG\r\n"));
            c.send_raw(request).await;
            got.push(c.read_until_closed().await);
        }
        assert_eq!(got[1], got[0], "{}: through sidecache, then from Redis", String::from_utf8_lossy(request));
    }
    // A client's pipeline on the shared connection is untouched by another's HTTP request.
    let mut counter = proxy.client().await;
    let mut http = proxy.client().await;
    http.send_raw(b"POST / HTTP/1.1\r\n\r\n").await;
    counter.send_raw(&[encode(&[b"INCR", b"n"]), encode(&[b"INCR", b"n"]), encode(&[b"INCR", b"n"])].concat()).await;
    for n in 1..=3 {
        assert_eq!(counter.read().await, b(&format!(":{n}\r\n")));
    }
    assert_eq!(http.read_until_closed().await, b(""));
    // The Lua debugger stays on the connection of the client that asked for it.
    let mut debugger = proxy.client().await;
    assert_eq!(debugger.cmd(&["SCRIPT", "DEBUG", "YES"]).await, b("+OK\r\n"));
    let mut other = proxy.client().await;
    for _ in 0..4 {
        assert_eq!(other.cmd(&["EVAL", "return 1", "0"]).await, b(":1\r\n"));
        assert_eq!(other.cmd(&["GET", "n"]).await, b("$1\r\n3\r\n"));
    }
    drop(debugger);
    // Replication is refused in words; the client and the shared connections stay usable.
    let mut replica = proxy.client().await;
    for name in ["SYNC", "PSYNC"] {
        let args: &[&str] = if name == "SYNC" { &["SYNC"] } else { &["PSYNC", "?", "-1"] };
        let reply = replica.cmd(args).await;
        assert_eq!(
            reply,
            b(&format!(
                "-ERR sidecache: {name} (replication) is not supported through sidecache; connect to Redis directly\r\n"
            ))
        );
        assert_eq!(replica.cmd(&["PING"]).await, b("+PONG\r\n"));
        assert_eq!(other.cmd(&["GET", "n"]).await, b("$1\r\n3\r\n"));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_malformed_client_reply_leaves_replies_off_or_skipped_as_redis_does() {
    let redis = RedisServer::start();
    let proxy = Proxy::start(&redis).await;
    let sequences: [&[&str]; 4] = [
        &["CLIENT REPLY OFF", "CLIENT REPLY BAD", "PING", "GET x"],
        &["CLIENT REPLY OFF", "CLIENT REPLY", "CLIENT REPLY ON extra", "ECHO hidden"],
        &["CLIENT REPLY SKIP", "CLIENT REPLY BAD", "PING"],
        &["CLIENT REPLY SKIP", "CLIENT REPLY BAD", "CLIENT REPLY SKIP", "ECHO hidden", "GET x"],
    ];
    // Each command is sent on its own, paced by a round trip on another connection (as a
    // client typing them), then `CLIENT REPLY ON` and a marker end the transcript: everything
    // before the marker is compared.
    for commands in sequences {
        let mut got = Vec::new();
        for addr in [redis.addr(), proxy.addr.to_string()] {
            let mut c = Client::connect(&addr).await;
            let mut all = Vec::new();
            for command in commands {
                c.send_raw(format!("{command}\r\n").as_bytes()).await;
                let mut other = Client::connect(&addr).await;
                assert_eq!(other.cmd(&["PING"]).await, b("+PONG\r\n"));
            }
            c.send_raw(b"CLIENT REPLY ON\r\nECHO end\r\n").await;
            loop {
                let frame = c.read().await;
                if frame == b("$3\r\nend\r\n") {
                    break;
                }
                all.extend_from_slice(&frame);
            }
            got.push(Bytes::from(all));
        }
        assert_eq!(got[1], got[0], "{commands:?}: through sidecache, then from Redis");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_half_closes_after_its_pipeline_gets_every_reply_as_from_redis() {
    // `printf 'SET a 1\r\nGET a\r\n' | nc -N host port`: the client shuts its sending side
    // once the pipeline is written and reads until the server closes. Redis answers all of it.
    let redis = RedisServer::start();
    let proxy = Proxy::start(&redis).await;
    let mut pipeline = Vec::new();
    for args in [&[&b"INCR"[..], b"ctr"][..], &[b"INCR", b"ctr"], &[b"SET", b"k", b"v"], &[b"GET", b"k"], &[b"PING"]] {
        pipeline.extend_from_slice(&encode(args));
    }
    pipeline.extend_from_slice(b"GET ctr\r\n");
    let half_close = |addr: String, pipeline: Vec<u8>| async move {
        let mut c = Client::connect(&addr).await;
        c.send_raw(&pipeline).await;
        c.stream.shutdown().await.unwrap();
        c.read_until_closed().await
    };
    let direct = half_close(redis.addr(), pipeline.clone()).await;
    assert_eq!(direct, b(":1\r\n:2\r\n+OK\r\n$1\r\nv\r\n+PONG\r\n$1\r\n2\r\n"));
    for round in 0..20 {
        let mut c = Client::connect(&redis.addr()).await;
        assert_eq!(c.cmd(&["DEL", "ctr"]).await.len(), 4);
        let through = half_close(proxy.addr.to_string(), pipeline.clone()).await;
        assert_eq!(through, direct, "round {round}: every reply, then the close");
    }
    // A client blocked in BLPOP that half-closes is gone for Redis too: nothing is popped for it.
    blocked_client_leaves_and_pops_nothing(&redis, &proxy, true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acl_user_auth_and_noperm_errors_pass_through() {
    let redis = RedisServer::start_with(&["--user", "reader", "on", ">pw", "~public:*", "+get", "+ping", "+auth"]);
    let proxy = Proxy::start(&redis).await;
    let mut c = proxy.client().await;
    assert_eq!(c.cmd(&["SET", "public:a", "1"]).await, b("+OK\r\n"));
    let wrong = c.cmd(&["AUTH", "reader", "bad"]).await;
    assert_eq!(wrong, b("-WRONGPASS invalid username-password pair or user is disabled.\r\n"));
    assert_eq!(c.cmd(&["AUTH", "reader", "pw"]).await, b("+OK\r\n"));
    assert_eq!(c.cmd(&["GET", "public:a"]).await, b("$1\r\n1\r\n"));
    let mut direct = Client::connect(&redis.addr()).await;
    direct.cmd(&["AUTH", "reader", "pw"]).await;
    for cmd in [&["SET", "public:a", "2"][..], &["GET", "secret:x"]] {
        let want = direct.cmd(cmd).await;
        assert!(want.starts_with(b"-NOPERM"), "{want:?}");
        assert_eq!(c.cmd(cmd).await, want, "NOPERM error for {cmd:?} passes through verbatim");
    }
    // One-argument AUTH against the passwordless default user gives Redis's own error.
    let mut d = proxy.client().await;
    let mut d_direct = Client::connect(&redis.addr()).await;
    assert_eq!(d.cmd(&["AUTH", "x"]).await, d_direct.cmd(&["AUTH", "x"]).await);
}

/// A pool authenticated with a password proves only that the password was right when the pool
/// was made. After `ACL SETUSER … resetpass`, the old password must fail through sidecache as it
/// does on Redis, and leave the client the user it was, whatever pools sidecache holds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_changed_password_is_refused_even_while_a_pool_holds_the_old_one() {
    let redis = RedisServer::start_with(&["--user", "alice", "on", ">old", "~*", "&*", "+@all"]);
    let proxy = Proxy::start(&redis).await;
    // Pools for (alice, old) in RESP2 and RESP3.
    let mut first = proxy.client().await;
    assert_eq!(first.cmd(&["AUTH", "alice", "old"]).await, b("+OK\r\n"));
    let mut first3 = proxy.client().await;
    assert!(first3.cmd(&["HELLO", "3", "AUTH", "alice", "old"]).await.starts_with(b"%7\r\n"));
    let mut admin = Client::connect(&redis.addr()).await;
    assert_eq!(admin.cmd(&["ACL", "SETUSER", "alice", "resetpass", ">new"]).await, b("+OK\r\n"));

    let script: &[&[&str]] = &[
        &["AUTH", "alice", "old"],
        &["ACL", "WHOAMI"],
        &["HELLO", "3", "AUTH", "alice", "old"],
        &["ACL", "WHOAMI"],
        &["GET", "missing"],
        &["HELLO", "2", "AUTH", "alice", "old", "SETNAME", "x"],
        &["CLIENT", "GETNAME"],
        &["AUTH", "alice", "new"],
        &["ACL", "WHOAMI"],
        &["AUTH", "alice", "old"],
        &["ACL", "WHOAMI"],
        &["HELLO", "3", "AUTH", "alice", "old"],
        &["GET", "missing"],
    ];
    let mut direct = Client::connect(&redis.addr()).await;
    let mut via = proxy.client().await;
    same_replies(&mut direct, &mut via, script).await;
    // The two clients that authenticated before the change stay alice, as on Redis.
    assert_eq!(first.cmd(&["ACL", "WHOAMI"]).await, b("$5\r\nalice\r\n"));
    assert_eq!(first3.cmd(&["ACL", "WHOAMI"]).await, b("$5\r\nalice\r\n"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_setname_and_getname_are_per_client() {
    let redis = RedisServer::start();
    let proxy = Proxy::start(&redis).await;
    let mut a = proxy.client().await;
    let mut other = proxy.client().await;
    assert_eq!(a.cmd(&["CLIENT", "GETNAME"]).await, b("$-1\r\n"));
    assert_eq!(a.cmd(&["CLIENT", "SETNAME", "worker-7"]).await, b("+OK\r\n"));
    assert_eq!(a.cmd(&["CLIENT", "GETNAME"]).await, b("$8\r\nworker-7\r\n"));
    assert_eq!(other.cmd(&["CLIENT", "GETNAME"]).await, b("$-1\r\n"));
    // A dedicated connection carries the name to Redis (CLIENT LIST shows it).
    let list = a.cmd(&["CLIENT", "LIST"]).await;
    assert!(String::from_utf8_lossy(&list).contains("name=worker-7"), "{list:?}");
    assert_eq!(a.cmd(&["CLIENT", "GETNAME"]).await, b("$8\r\nworker-7\r\n"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_command_keeps_the_connection_usable() {
    let redis = RedisServer::start();
    let proxy = Proxy::start(&redis).await;
    let mut c = proxy.client().await;
    let err = c.cmd(&["FOOBAR", "x"]).await;
    assert_eq!(err, b("-ERR unknown command 'FOOBAR', with args beginning with: 'x' \r\n"));
    assert_eq!(c.cmd(&["PING"]).await, b("+PONG\r\n"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inline_commands_work_like_redis() {
    let redis = RedisServer::start();
    let proxy = Proxy::start(&redis).await;
    let mut direct = Client::connect(&redis.addr()).await;
    let mut via = proxy.client().await;
    for line in
        ["PING\r\n", "SET k \"a b\\x41\"\r\n", "GET k\n", "  ECHO   'it\\'s'  \r\n", "%1\r\n", "\r\n\r\nPING x\r\n"]
    {
        direct.send_raw(line.as_bytes()).await;
        via.send_raw(line.as_bytes()).await;
        assert_eq!(via.read().await, direct.read().await, "inline {line:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quit_answers_ok_and_closes() {
    let redis = RedisServer::start();
    let proxy = Proxy::start(&redis).await;
    let mut c = proxy.client().await;
    c.send_raw(&[encode(&[b"SET", b"a", b"1"]), encode(&[b"QUIT"]), encode(&[b"SET", b"a", b"2"])].concat()).await;
    assert_eq!(c.read_until_closed().await, b("+OK\r\n+OK\r\n"));
    let mut direct = Client::connect(&redis.addr()).await;
    assert_eq!(direct.cmd(&["GET", "a"]).await, b("$1\r\n1\r\n"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reset_drops_connection_state() {
    let redis = RedisServer::start();
    let proxy = Proxy::start(&redis).await;
    let mut c = proxy.client().await;
    c.cmd(&["SELECT", "2"]).await;
    c.cmd(&["CLIENT", "SETNAME", "n"]).await;
    c.cmd(&["MULTI"]).await;
    assert_eq!(c.cmd(&["RESET"]).await, b("+RESET\r\n"));
    assert_eq!(c.cmd(&["CLIENT", "GETNAME"]).await, b("$-1\r\n"));
    assert_eq!(c.cmd(&["SET", "where", "db0"]).await, b("+OK\r\n"));
    let mut direct = Client::connect(&redis.addr()).await;
    assert_eq!(direct.cmd(&["GET", "where"]).await, b("$3\r\ndb0\r\n"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn denied_commands_get_noperm_and_connection_stays() {
    let redis = RedisServer::start();
    let proxy = Proxy::start(&redis).await;
    let mut c = proxy.client().await;
    assert_eq!(c.cmd(&["shutdown"]).await, b("-NOPERM this command is disabled by sidecache\r\n"));
    assert_eq!(c.cmd(&["PING"]).await, b("+PONG\r\n"));
    let mut direct = Client::connect(&redis.addr()).await;
    assert_eq!(direct.cmd(&["PING"]).await, b("+PONG\r\n"), "Redis is still up");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_reply_off_and_skip_suppress_replies() {
    let redis = RedisServer::start();
    let proxy = Proxy::start(&redis).await;
    let mut direct = Client::connect(&redis.addr()).await;
    let mut via = proxy.client().await;
    let script = [
        encode(&[b"CLIENT", b"REPLY", b"OFF"]),
        encode(&[b"SET", b"a", b"1"]),
        encode(&[b"CLIENT", b"GETNAME"]),
        encode(&[b"CLIENT", b"REPLY", b"ON"]),
        encode(&[b"CLIENT", b"REPLY", b"SKIP"]),
        encode(&[b"GET", b"a"]),
        encode(&[b"ECHO", b"seen"]),
    ]
    .concat();
    direct.send_raw(&script).await;
    via.send_raw(&script).await;
    for _ in 0..2 {
        assert_eq!(via.read().await, direct.read().await);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn monitor_streams_commands_when_the_operator_allows_it() {
    let redis = RedisServer::start();
    let proxy = Proxy::start_with(&redis, |c| c.security.deny.clear()).await;
    let mut mon = proxy.client().await;
    assert_eq!(mon.cmd(&["MONITOR"]).await, b("+OK\r\n"));
    let mut other = proxy.client().await;
    assert_eq!(other.cmd(&["SET", "watched-key", "1"]).await, b("+OK\r\n"));
    let mut seen = String::new();
    while !seen.contains("watched-key") {
        let line = mon.read().await;
        assert!(line.starts_with(b"+"), "monitor lines are simple strings: {line:?}");
        seen = String::from_utf8_lossy(&line).to_string();
    }
    assert!(seen.contains("\"SET\" \"watched-key\" \"1\""), "{seen}");
}

/// Runs `redis-cli -p PORT ARGS…` and returns its stdout.
fn redis_cli(port: u16, args: &[&str]) -> String {
    let out = std::process::Command::new("redis-cli")
        .args(["-h", "127.0.0.1", "-p", &port.to_string()])
        .args(args)
        .output()
        .expect("redis-cli is installed (apt-get install redis-tools; scripts/test.sh does it)");
    assert!(out.status.success(), "redis-cli {args:?} failed: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_cli_sees_the_same_output_in_resp2_and_resp3() {
    let redis = RedisServer::start();
    let proxy = Proxy::start(&redis).await;
    let port = proxy.addr.port();
    let scripts: [&[&str]; 6] = [
        &["HSET", "h", "f1", "v1", "f2", "2.50"],
        &["HGETALL", "h"],
        &["-3", "HGETALL", "h"],
        &["-3", "ZADD", "z", "1.5", "a"],
        &["-3", "ZSCORE", "z", "a"],
        &["-3", "GET", "missing"],
    ];
    for args in scripts {
        let via = tokio::task::spawn_blocking(move || redis_cli(port, args)).await.unwrap();
        let direct_port = redis.port;
        let direct = tokio::task::spawn_blocking(move || redis_cli(direct_port, args)).await.unwrap();
        // Writes ran twice (once each way) on the same Redis, so compare reads and replies that
        // do not depend on it: HSET answers 2 then 0, ZADD 1 then 0.
        if args.iter().any(|a| *a == "HSET" || *a == "ZADD") {
            assert!(!via.trim().is_empty() && !direct.trim().is_empty());
            continue;
        }
        assert_eq!(via, direct, "redis-cli {args:?}");
    }
    // An interactive-style inline session through a pipe.
    let out = tokio::task::spawn_blocking(move || {
        use std::io::Write;
        let mut child = std::process::Command::new("redis-cli")
            .args(["-h", "127.0.0.1", "-p", &port.to_string()])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .spawn()
            .expect("redis-cli");
        child.stdin.take().unwrap().write_all(b"SET greeting \"hello world\"\nGET greeting\n").unwrap();
        child.wait_with_output().unwrap()
    })
    .await
    .unwrap();
    assert_eq!(String::from_utf8_lossy(&out.stdout), "OK\nhello world\n");
}

/// Malformed `RESET`, `MULTI` and `CLIENT SETNAME` get Redis's arity errors and change nothing
/// (inside `MULTI` they abort the transaction, as on Redis); a `SELECT` Redis refuses leaves the
/// client in its database even when a pool for the other one exists.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_state_commands_change_nothing_as_on_redis() {
    let acl = ["--user", "alice", "on", ">pw", "~*", "&*", "+@all"];
    let plain = RedisServer::start_with(&acl);
    let redis = RedisServer::start_with(&acl);
    let proxy = Proxy::start(&redis).await;
    let mut direct = Client::connect(&plain.addr()).await;
    let mut via = proxy.client().await;
    let mut both = async |script: &[&[&str]]| {
        same_replies(&mut direct, &mut via, script).await;
    };
    both(&[
        &["SELECT", "2"],
        &["RESET", "x"],
        &["SET", "r", "1"],
        &["SELECT", "2"],
        &["GET", "r"],
        &["SELECT", "0"],
        &["MULTI", "x"],
        &["SET", "m", "1"],
        &["GET", "m"],
        &["MULTI"],
        &["SET", "a", "1"],
        &["CLIENT", "SETNAME"],
        &["EXEC"],
        &["GET", "a"],
        &["MULTI"],
        &["CLIENT", "SETNAME", "a", "b"],
        &["EXEC"],
        &["CLIENT", "SETNAME"],
        &["GET", "a"],
        // A pool for (alice, db 3) exists once alice has been there.
        &["AUTH", "alice", "pw"],
        &["SELECT", "3"],
        &["SELECT", "0"],
    ])
    .await;
    for r in [&plain, &redis] {
        let mut admin = Client::connect(&r.addr()).await;
        assert_eq!(admin.cmd(&["ACL", "SETUSER", "alice", "-select"]).await, b("+OK\r\n"));
    }
    both(&[&["SELECT", "3"], &["SET", "s3", "x"], &["GET", "s3"]]).await;
    for r in [&plain, &redis] {
        let mut admin = Client::connect(&r.addr()).await;
        assert_eq!(admin.cmd(&["EXISTS", "s3"]).await, b(":1\r\n"), "the key is in db 0");
    }
}

/// Commands whose replies `CLIENT REPLY SKIP|OFF` suppress run on the dedicated connection;
/// the commands after them go back to the shared one and must not overtake them. Pipelined in
/// one write, as a client sends them; repeated, since an overtaking write wins a race only now
/// and then.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn commands_after_suppressed_replies_never_overtake_them() {
    let redis = RedisServer::start();
    let proxy = Proxy::start(&redis).await;
    let mut direct = Client::connect(&redis.addr()).await;
    let pipeline = |cmds: &[&[&str]]| {
        let mut out = Vec::new();
        for c in cmds {
            let args: Vec<&[u8]> = c.iter().map(|a| a.as_bytes()).collect();
            out.extend(encode(&args));
        }
        out
    };
    for round in 0..100 {
        let mut c = proxy.client().await;
        let (a, b2, r) = (format!("skip:a:{round}"), format!("skip:b:{round}"), format!("off:r:{round}"));
        c.send_raw(&pipeline(&[&["CLIENT", "REPLY", "SKIP"], &["SET", &a, "1"], &["SET", &a, "2"]])).await;
        assert_eq!(c.read().await, b("+OK\r\n"), "round {round}: the second SET's reply");
        assert_eq!(direct.cmd(&["GET", &a]).await, b("$1\r\n2\r\n"), "round {round}: the later SET wins");
        c.send_raw(&pipeline(&[&["CLIENT", "REPLY", "SKIP"], &["SET", &b2, "1"], &["GET", &b2]])).await;
        assert_eq!(c.read().await, b("$1\r\n1\r\n"), "round {round}: GET reads the skipped SET's value");
        c.send_raw(&pipeline(&[&["CLIENT", "REPLY", "OFF"], &["SET", &r, "1"], &["RESET"], &["SET", &r, "2"]])).await;
        assert_eq!(c.read().await, b("+RESET\r\n"));
        assert_eq!(c.read().await, b("+OK\r\n"));
        assert_eq!(direct.cmd(&["GET", &r]).await, b("$1\r\n2\r\n"), "round {round}: the SET after RESET wins");
        assert_eq!(c.cmd(&["PING"]).await, b("+PONG\r\n"), "round {round}: the connection stays in step");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_skip_taken_by_a_command_sidecache_answers_leaves_the_next_reply_shown() {
    let redis = RedisServer::start();
    let proxy = Proxy::start_with(&redis, |c| c.security.deny = vec!["DEBUG".into()]).await;
    let mut c = proxy.client().await;
    // WATCH keeps the client on its dedicated connection, where Redis holds the skip.
    assert_eq!(c.cmd(&["WATCH", "skip:w"]).await, b("+OK\r\n"));
    // Each of these is answered (or refused) by sidecache itself, so Redis never sees it.
    let local: &[&[&str]] = &[
        &["DEBUG", "SLEEP", "0"],
        &["CLIENT", "SETNAME", "a b"],
        &["LOCK.ACQUIRE", "skip:lock", "10000"],
        &["LOCK.ACQUIRE", "skip:lock", "not-a-number"],
    ];
    for cmd in local {
        c.send_raw(&pipeline(&[&["CLIENT", "REPLY", "SKIP"], cmd, &["PING"]])).await;
        assert_eq!(c.read().await, b("+PONG\r\n"), "the reply after a skipped {cmd:?}");
    }
    // The lock was taken although its reply was skipped.
    let info = c.cmd(&["LOCK.INFO", "skip:lock"]).await;
    assert!(info.starts_with(b"*4\r\n$5\r\nfence\r\n:"), "lock held: {:?}", String::from_utf8_lossy(&info));
    assert_eq!(c.cmd(&["SET", "skip:k", "v"]).await, b("+OK\r\n"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_subscribe_is_one_error_and_subscribes_to_nothing() {
    let redis =
        RedisServer::start_with(&["--user", "sub", "on", ">pw", "~*", "resetchannels", "&news", "&sport", "+@all"]);
    let proxy = Proxy::start(&redis).await;
    let script: &[&[&str]] = &[
        &["AUTH", "sub", "pw"],
        &["SUBSCRIBE", "news"],
        &["SUBSCRIBE", "secret"],
        &["SUBSCRIBE", "secret", "other"],
        &["PSUBSCRIBE", "n*"],
        &["UNSUBSCRIBE"],
        &["PING"],
        &["SUBSCRIBE", "news", "secret"],
        &["PUNSUBSCRIBE"],
        &["UNSUBSCRIBE"],
        &["GET", "missing"],
        // RESET ends the subscriptions with the connection.
        &["AUTH", "sub", "pw"],
        &["SUBSCRIBE", "news", "sport", "news"],
        &[],
        &[],
        &["RESET"],
        &["AUTH", "sub", "pw"],
        &["SUBSCRIBE", "secret"],
        &["UNSUBSCRIBE"],
        &["PING"],
    ];
    let mut direct = Client::connect(&redis.addr()).await;
    let mut via = proxy.client().await;
    same_replies(&mut direct, &mut via, script).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn subscribing_inside_a_transaction_subscribes_the_client_as_on_redis() {
    let redis = RedisServer::start();
    let proxy = Proxy::start(&redis).await;
    let mut direct = Client::connect(&redis.addr()).await;
    let mut via = proxy.client().await;
    let before: &[&[&str]] = &[&["MULTI"], &["SUBSCRIBE", "txnews"], &["EXEC"], &["GET", "missing"]];
    same_replies(&mut direct, &mut via, before).await;
    let mut publisher = Client::connect(&redis.addr()).await;
    assert_eq!(publisher.cmd(&["PUBLISH", "txnews", "hi"]).await, b(":2\r\n"));
    let message = direct.read().await;
    assert_eq!(via.read().await, message, "the message");
    same_replies(&mut direct, &mut via, &[&["UNSUBSCRIBE"][..], &["PING"], &["GET", "missing"]]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_transaction_whose_connection_cannot_open_runs_nothing_and_closes() {
    let redis = RedisServer::start_with(&["--user", "alice", "on", ">old", "~*", "&*", "+@all"]);
    let proxy = Proxy::start(&redis).await;
    let mut c = proxy.client().await;
    assert_eq!(c.cmd(&["AUTH", "alice", "old"]).await, b("+OK\r\n"));
    assert_eq!(c.cmd(&["SET", "tx:n", "0"]).await, b("+OK\r\n"));
    let mut admin = Client::connect(&redis.addr()).await;
    assert_eq!(admin.cmd(&["ACL", "SETUSER", "alice", "resetpass", ">new"]).await, b("+OK\r\n"));
    // The client stays alice on its shared connection, but a dedicated one cannot be opened.
    assert_eq!(c.cmd(&["GET", "tx:n"]).await, b("$1\r\n0\r\n"));
    c.send_raw(&pipeline(&[&["MULTI"], &["INCR", "tx:n"], &["INCR", "tx:n"], &["EXEC"]])).await;
    let refused = c.read().await;
    assert!(refused.starts_with(b"-WRONGPASS"), "MULTI's reply: {:?}", String::from_utf8_lossy(&refused));
    let rest = c.read_until_closed().await;
    assert!(rest.is_empty(), "nothing after the error: {:?}", String::from_utf8_lossy(&rest));
    assert_eq!(admin.cmd(&["GET", "tx:n"]).await, b("$1\r\n0\r\n"), "no INCR ran outside the transaction");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_names_are_judged_by_redis_and_queued_inside_multi() {
    let redis = RedisServer::start_with(&["--user", "bob", "on", ">pw", "~*", "&*", "+@all", "-client|setname"]);
    let proxy = Proxy::start(&redis).await;
    let scripts: &[&[&[&str]]] = &[
        &[
            &["AUTH", "bob", "pw"],
            &["CLIENT", "SETNAME", "foo"],
            &["CLIENT", "GETNAME"],
            &["MULTI"],
            &["PING"],
            &["EXEC"],
        ],
        &[
            &["CLIENT", "SETNAME", "n1"],
            &["MULTI"],
            &["CLIENT", "GETNAME"],
            &["CLIENT", "SETNAME", "n2"],
            &["EXEC"],
            &["CLIENT", "GETNAME"],
            &["PING"],
        ],
    ];
    for script in scripts {
        let mut direct = Client::connect(&redis.addr()).await;
        let mut via = proxy.client().await;
        same_replies(&mut direct, &mut via, script).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_password_set_later_is_asked_of_new_clients() {
    let redis = RedisServer::start();
    let proxy = Proxy::start(&redis).await;
    let mut early = proxy.client().await;
    assert_eq!(early.cmd(&["SET", "pw:k", "v"]).await, b("+OK\r\n"));
    let mut admin = Client::connect(&redis.addr()).await;
    assert_eq!(admin.cmd(&["CONFIG", "SET", "requirepass", "sec"]).await, b("+OK\r\n"));
    let want = Client::connect(&redis.addr()).await.cmd(&["GET", "pw:k"]).await;
    assert!(want.starts_with(b"-NOAUTH"), "Redis asks for the password: {:?}", String::from_utf8_lossy(&want));
    eventually("a new client through sidecache gets Redis's NOAUTH", || {
        let proxy = &proxy;
        let want = want.clone();
        async move { proxy.client().await.cmd(&["GET", "pw:k"]).await == want }
    })
    .await;
    let mut late = proxy.client().await;
    assert_eq!(late.cmd(&["GET", "pw:k"]).await, want);
    assert_eq!(late.cmd(&["AUTH", "sec"]).await, b("+OK\r\n"));
    assert_eq!(late.cmd(&["GET", "pw:k"]).await, b("$1\r\nv\r\n"));
    // The client that connected before keeps its access, as its Redis connection would.
    assert_eq!(early.cmd(&["GET", "pw:k"]).await, b("$1\r\nv\r\n"));
}

/// Sends each script as one write, first straight to Redis and then through sidecache, each on
/// a new connection and an emptied Redis, and compares everything up to the reply to the closing `PING end`
/// (after the first `skip` replies, which may differ: `HELLO`'s id). A reply that never comes
/// fails the read.
async fn same_streams(redis: &RedisServer, proxy: &Proxy, scripts: &[(usize, &[&[&str]])]) {
    for (skip, script) in scripts {
        let mut cmds = script.to_vec();
        cmds.push(&["PING", "end"]);
        let mut streams = Vec::new();
        for through_proxy in [false, true] {
            // Both runs start from an empty Redis.
            assert_eq!(Client::connect(&redis.addr()).await.cmd(&["FLUSHALL"]).await, b("+OK\r\n"));
            let mut c = match through_proxy {
                false => Client::connect(&redis.addr()).await,
                true => proxy.client().await,
            };
            c.send_raw(&pipeline(&cmds)).await;
            let mut replies = Vec::new();
            loop {
                let r = c.read().await;
                let end = r == b("$3\r\nend\r\n");
                replies.push(String::from_utf8_lossy(&r).into_owned());
                if end {
                    break;
                }
            }
            streams.push(replies.split_off((*skip).min(replies.len())));
        }
        assert_eq!(streams[1], streams[0], "replies to {script:?} differ from Redis's (right)");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn data_shaped_like_pubsub_frames_is_a_reply_like_any_other() {
    let redis = RedisServer::start();
    let proxy = Proxy::start(&redis).await;
    let scripts: &[(usize, &[&[&str]])] = &[
        (
            1,
            &[
                &["HELLO", "3"],
                &["SUBSCRIBE", "ps:c"],
                &["RPUSH", "ps:l", "message", "x", "y"],
                &["LRANGE", "ps:l", "0", "-1"],
                &["UNSUBSCRIBE"],
                &["GET", "ps:missing"],
            ],
        ),
        (
            1,
            &[
                &["HELLO", "3"],
                &["SUBSCRIBE", "ps:c"],
                &["RPUSH", "ps:l", "subscribe", "fake"],
                &["LRANGE", "ps:l", "0", "-1"],
                &["UNSUBSCRIBE"],
            ],
        ),
        (
            0,
            &[
                &["WATCH", "ps:w"],
                &["EVAL", "return {'subscribe','x',1}", "0"],
                &["EVAL", "return {'message','a','b'}", "0"],
                &["UNWATCH"],
                &["GET", "ps:missing"],
            ],
        ),
    ];
    same_streams(&redis, &proxy, scripts).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_reply_modes_with_transactions_watch_wait_and_reset_match_redis() {
    let redis = RedisServer::start_with(&["--user", "norep", "on", ">pw", "~*", "&*", "+@all", "-client|reply"]);
    let proxy = Proxy::start(&redis).await;
    let scripts: &[(usize, &[&[&str]])] = &[
        (
            0,
            &[
                &["CLIENT", "REPLY", "OFF"],
                &["MULTI"],
                &["SET", "rm:k", "1"],
                &["EXEC"],
                &["CLIENT", "REPLY", "ON"],
                &["GET", "rm:k"],
            ],
        ),
        (
            0,
            &[
                &["CLIENT", "REPLY", "OFF"],
                &["WATCH", "rm:w"],
                &["CLIENT", "REPLY", "ON"],
                &["UNWATCH"],
                &["GET", "rm:x"],
            ],
        ),
        (0, &[&["CLIENT", "REPLY", "OFF"], &["WAIT", "0", "0"], &["CLIENT", "REPLY", "ON"], &["GET", "rm:x"]]),
        (
            0,
            &[
                &["CLIENT", "REPLY", "SKIP"],
                &["MULTI"],
                &["NOSUCHCOMMAND"],
                &["SET", "rm:a", "1"],
                &["EXEC"],
                &["GET", "rm:a"],
            ],
        ),
        (0, &[&["CLIENT", "REPLY", "SKIP"], &["RESET"], &["GET", "rm:x"]]),
        (0, &[&["MULTI"], &["CLIENT", "SETNAME", "a b"], &["SET", "rm:n", "1"], &["EXEC"], &["GET", "rm:n"]]),
        // Refused by Redis, so no mode changes: RESP2 subscribed mode, and an ACL rule.
        (0, &[&["SUBSCRIBE", "rm:ch"], &["CLIENT", "REPLY", "SKIP"], &["PING"], &["UNSUBSCRIBE"]]),
        (0, &[&["SUBSCRIBE", "rm:ch"], &["CLIENT", "REPLY", "OFF"], &["PING"], &["RESET"], &["GET", "rm:x"]]),
        (
            0,
            &[
                &["AUTH", "norep", "pw"],
                &["CLIENT", "REPLY", "OFF"],
                &["SET", "rm:p", "1"],
                &["CLIENT", "REPLY", "SKIP"],
                &["GET", "rm:p"],
            ],
        ),
    ];
    same_streams(&redis, &proxy, scripts).await;
    // Inside MULTI, Redis would answer EXEC with a malformed array: sidecache refuses it.
    let mut c = proxy.client().await;
    c.send_raw(&pipeline(&[&["MULTI"], &["CLIENT", "REPLY", "OFF"], &["SET", "rm:m", "1"], &["EXEC"], &["PING"]]))
        .await;
    assert_eq!(c.read().await, b("+OK\r\n"));
    assert!(c.read().await.starts_with(b"-ERR sidecache: CLIENT REPLY inside MULTI"));
    assert_eq!(c.read().await, b("+QUEUED\r\n"));
    assert!(c.read().await.starts_with(b"-EXECABORT"));
    assert_eq!(c.read().await, b("+PONG\r\n"));
}

/// Redis 7.0 applies `HELLO`'s options one by one: an option that fails or does not parse
/// leaves those before it in effect (a user authenticated, a name set). sidecache does the
/// same for the client, on the shared connections as on a dedicated one, and never lets such
/// a `HELLO` change the user or name of a shared connection other clients use.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hello_options_apply_one_by_one_as_on_redis_and_never_to_other_clients() {
    let redis = RedisServer::start();
    let proxy = Proxy::start(&redis).await;
    let mut admin = Client::connect(&redis.addr()).await;
    assert_eq!(admin.cmd(&["ACL", "SETUSER", "alice", "on", ">apw", "~*", "&*", "+@all"]).await, b("+OK\r\n"));
    let hellos: &[&[&str]] = &[
        &["HELLO", "3", "AUTH", "alice", "apw", "junk"],
        &["HELLO", "2", "SETNAME", "evil", "junk"],
        &["HELLO", "3", "AUTH", "alice", "apw", "AUTH", "alice"],
        &["HELLO", "3", "AUTH", "alice", "apw", "SETNAME", "n m"],
        &["HELLO", "3", "SETNAME", "good", "AUTH", "alice", "bad"],
        &["HELLO", "3", "SETNAME", "good", "SETNAME", "bad name"],
        &["HELLO", "3", "AUTH", "alice", "apw", "AUTH", "alice", "bad"],
        &["HELLO", "3", "AUTH", "alice", "bad", "AUTH", "alice", "apw"],
        &["HELLO", "3", "SETNAME", "bad name", "AUTH", "alice", "apw"],
        &["HELLO", "3", "AUTH", "alice", "apw", "AUTH", "default", "x", "SETNAME", "n m"],
    ];
    let after: &[&[&str]] = &[&["ACL", "WHOAMI"], &["CLIENT", "GETNAME"], &["GET", "hello:missing"]];
    let mut scripts: Vec<Vec<&[&str]>> = Vec::new();
    for hello in hellos {
        // On the shared connections, and on a dedicated one (kept by tracking).
        scripts.push([&[*hello], after].concat());
        scripts.push([&[&["CLIENT", "TRACKING", "on"][..], *hello], after, &[&["CLIENT", "TRACKING", "off"]]].concat());
    }
    let scripts: Vec<(usize, &[&[&str]])> = scripts.iter().map(|s| (0, &s[..])).collect();
    same_streams(&redis, &proxy, &scripts).await;
    // None of it reached other clients.
    for i in 0..6 {
        let mut c = proxy.client().await;
        assert_eq!(c.cmd(&["ACL", "WHOAMI"]).await, b("$7\r\ndefault\r\n"), "fresh client {i}");
        assert_eq!(c.cmd(&["CLIENT", "GETNAME"]).await, b("$-1\r\n"), "fresh client {i}");
    }
    // (alice's own pools are alice's; the fresh clients above show the default user's are not.)
    let list = String::from_utf8_lossy(&admin.cmd(&["CLIENT", "LIST"]).await).into_owned();
    assert!(!list.contains("name=evil"), "a shared connection was named:\n{list}");
}

/// Redis keeps a connection's name and protocol across `AUTH` without asking the user's
/// permission again, so the connections sidecache opens for a client carry them in a way that
/// needs none either: a user without `CLIENT SETNAME` or `PING` works as on Redis.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replaying_a_clients_name_and_protocol_needs_no_permission_redis_would_not_ask() {
    let redis = RedisServer::start();
    let proxy = Proxy::start(&redis).await;
    let mut admin = Client::connect(&redis.addr()).await;
    let app = ["ACL", "SETUSER", "app", "on", ">pw", "~*", "&*", "+@read", "+@write", "+@transaction"];
    assert_eq!(admin.cmd(&[&app[..], &["+@pubsub", "+@blocking", "+ping"]].concat()).await, b("+OK\r\n"));
    let pinned: &[&[&str]] =
        &[&["MULTI"], &["SET", "rp:k", "v"], &["GET", "rp:k"], &["EXEC"], &["BLPOP", "rp:l", "0.1"], &["GET", "rp:k"]];
    let scripts: Vec<Vec<&[&str]>> = vec![
        [&[&["HELLO", "3", "AUTH", "app", "pw", "SETNAME", "svc"][..]], pinned].concat(),
        [&[&["HELLO", "2", "AUTH", "app", "pw", "SETNAME", "svc"][..]], pinned].concat(),
        [&[&["CLIENT", "SETNAME", "svc"][..], &["AUTH", "app", "pw"]], pinned].concat(),
    ];
    let scripts: Vec<(usize, &[&[&str]])> =
        scripts.iter().enumerate().map(|(i, s)| (usize::from(i < 2), &s[..])).collect();
    same_streams(&redis, &proxy, &scripts).await;

    // A default user that may not `PING`: every client's commands still run.
    assert_eq!(admin.cmd(&["ACL", "SETUSER", "default", "-ping"]).await, b("+OK\r\n"));
    tokio::time::sleep(std::time::Duration::from_millis(2500)).await; // past a recheck of the pools
    let mut c = proxy.client().await;
    for (cmd, want) in [
        (&["GET", "rp:none"][..], "$-1\r\n"),
        (&["MULTI"], "+OK\r\n"),
        (&["INCR", "rp:n"], "+QUEUED\r\n"),
        (&["EXEC"], "*1\r\n:1\r\n"),
        (&["PING"], "-NOPERM this user has no permissions to run the 'ping' command\r\n"),
    ] {
        assert_eq!(c.cmd(cmd).await, b(want), "{cmd:?} from the default user without ping");
    }
    assert_eq!(proxy.http_get("/readyz").await.0, 200, "Redis answering NOPERM to the health check is up");
}

/// A client that has not authenticated gets `NOAUTH` for commands that need a dedicated
/// connection, as from Redis, and keeps its connection to authenticate next.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unauthenticated_client_is_refused_as_by_redis_and_can_then_authenticate() {
    let redis = RedisServer::start_with(&["--requirepass", "pw"]);
    let proxy = Proxy::start(&redis).await;
    let script: &[&[&str]] = &[
        &["CLIENT", "ID"],
        &["MULTI"],
        &["WATCH", "ua:k"],
        &["CLIENT", "TRACKING", "on"],
        &["HELLO", "2"],
        &["HELLO", "3", "SETNAME", "early"],
        &["AUTH", "pw"],
        &["CLIENT", "GETNAME"],
        &["PING"],
    ];
    let mut replies = Vec::new();
    for mut c in [Client::connect(&redis.addr()).await, proxy.client().await] {
        c.send_raw(&pipeline(script)).await;
        let mut got = Vec::new();
        for _ in script {
            got.push(String::from_utf8_lossy(&c.read().await).into_owned());
        }
        replies.push(got);
    }
    assert_eq!(replies[1], replies[0], "through sidecache (left) and from Redis (right)");
}
