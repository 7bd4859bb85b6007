//! The Redis broker seen from outside, against a real Redis server (skipped with a message
//! when none is reachable, a failure under `CELERIAC_REQUIRE_SERVICES=1`):
//! - `publish_many` queues a batch in order, in kombu's buckets, with the bindings declared;
//! - restores (dead Celeriac node, visibility timeout) route through `_kombu.binding.*` when
//!   the routing key is not the queue name, as kombu's do; a consuming worker declares its
//!   queues before anything is published to them;
//! - `rediss://` (TLS) against a private `redis-server --tls-port` with a CA made here.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use celeriac::broker::{self, Broker, redis::queue_key};
use celeriac::protocol::{Message, TaskBody, TaskHeaders};
use celeriac::{App, Config, TaskResult, task};
use chrono::Utc;
use std::sync::Arc;
use std::time::Duration;

async fn conn(url: &str) -> redis::aio::MultiplexedConnection {
    redis::Client::open(url).unwrap().get_multiplexed_async_connection().await.unwrap()
}

async fn list(url: &str, key: &str) -> Vec<Vec<u8>> {
    redis::cmd("LRANGE").arg(key).arg(0).arg(-1).query_async(&mut conn(url).await).await.unwrap()
}

async fn members(url: &str, key: &str) -> Vec<String> {
    let mut m: Vec<String> = redis::cmd("SMEMBERS").arg(key).query_async(&mut conn(url).await).await.unwrap();
    m.sort();
    m
}

fn config(visibility: f64) -> Config {
    let mut c = Config::default();
    c.broker_transport_options.insert("visibility_timeout".into(), toml::Value::Float(visibility));
    c
}

async fn open(url: &str, visibility: f64) -> Arc<dyn Broker> {
    broker::from_url(url, &config(visibility)).await.unwrap()
}

fn message(n: u32, priority: u8) -> Message {
    let headers = TaskHeaders::new("b.batch", uuid::Uuid::new_v4().to_string());
    let body = TaskBody { args: vec![n.into()], kwargs: serde_json::Map::new(), embed: None };
    let mut m = Message::new(headers, &body, "unused");
    m.properties.priority = priority;
    m
}

#[tokio::test]
async fn publish_many_queues_a_batch_in_order_in_one_go() {
    let Some(url) = common::redis_url(14).await else { return };
    let broker = open(&url, 3600.0).await;
    assert_eq!(broker.stats().await.unwrap(), [], "no queue declared yet");
    let batch: Vec<(String, Message)> = (0..40u32)
        .map(|n| {
            (if n % 2 == 0 { "batch.a" } else { "batch.b" }.to_owned(), message(n, if n % 4 == 1 { 6 } else { 0 }))
        })
        .collect();
    let refs: Vec<(&str, &Message)> = batch.iter().map(|(q, m)| (q.as_str(), m)).collect();
    broker.publish_many(&refs).await.unwrap();

    // LPUSH order: the newest at the left, so the list reversed is the publishing order.
    for (queue, priority) in [("batch.a", 0), ("batch.b", 0), ("batch.b", 6)] {
        let mut got = list(&url, &queue_key(queue, priority)).await;
        got.reverse();
        let want: Vec<Vec<u8>> = batch
            .iter()
            .filter(|(q, m)| q == queue && queue_key(q, m.properties.priority) == queue_key(queue, priority))
            .map(|(_, m)| m.to_wire())
            .collect();
        assert!(!want.is_empty());
        assert_eq!(got, want, "{queue} bucket {priority}");
    }
    assert_eq!(members(&url, "_kombu.binding.batch.a").await, ["batch.a\x06\x16\x06\x16batch.a"]);
    assert_eq!(members(&url, "_kombu.binding_permanent.batch.b").await, ["batch.b\x06\x16\x06\x16batch.b"]);
    let counts: Vec<(String, u64)> = broker.stats().await.unwrap().into_iter().map(|q| (q.queue, q.ready)).collect();
    assert_eq!(counts, [("batch.a".to_owned(), 20), ("batch.b".to_owned(), 20)]);

    // Consumed in the same order, priority 0 first.
    let got = broker.fetch(&["batch.b".to_owned()], 100, Duration::from_secs(1)).await.unwrap();
    let ids: Vec<String> = got.iter().map(|d| Message::from_wire(&d.payload).unwrap().headers.id).collect();
    let zero: Vec<&str> = batch
        .iter()
        .filter(|(q, m)| q == "batch.b" && m.properties.priority == 0)
        .map(|(_, m)| m.headers.id.as_str())
        .collect();
    let six: Vec<&str> = batch
        .iter()
        .filter(|(q, m)| q == "batch.b" && m.properties.priority == 6)
        .map(|(_, m)| m.headers.id.as_str())
        .collect();
    assert_eq!(ids, [zero, six].concat());

    // A queue named twice in one fetch is served once: each message once, each recorded in
    // kombu's `unacked`, nothing left in a holding list.
    let twice = ["batch.a".to_owned(), "batch.a".to_owned()];
    let got = broker.fetch(&twice, 100, Duration::from_secs(1)).await.unwrap();
    let mut ids: Vec<String> = got.iter().map(|d| Message::from_wire(&d.payload).unwrap().headers.id).collect();
    ids.sort();
    ids.dedup();
    assert_eq!((got.len(), ids.len()), (20, 20));
    let unacked: usize = redis::cmd("HLEN").arg("unacked").query_async(&mut conn(&url).await).await.unwrap();
    assert_eq!(unacked, 40, "batch.b's 20 and batch.a's 20, none acked yet");
    let holding: Vec<String> =
        redis::cmd("KEYS").arg("celeriac.inflight.*").query_async(&mut conn(&url).await).await.unwrap();
    assert!(holding.is_empty(), "holding lists left: {holding:?}");

    // The default implementation (a loop) on another transport gives the same queue contents.
    let memory = broker::from_url("memory://", &Config::default()).await.unwrap();
    memory.publish_many(&refs).await.unwrap();
    let got = memory.fetch(&["batch.a".to_owned()], 100, Duration::from_millis(100)).await.unwrap();
    assert_eq!(got.len(), 20);
}

/// A Python client's envelope on `queue`, routed by `exchange` / `routing_key`.
fn routed_envelope(id: &str, exchange: &str, routing_key: &str) -> Vec<u8> {
    serde_json::json!({
        "body": "W1tdLCB7fSwge31d", "content-encoding": "utf-8", "content-type": "application/json",
        "headers": {"lang": "py", "task": "b.routed", "id": id},
        "properties": {"delivery_tag": format!("tag-{id}"), "body_encoding": "base64", "priority": 0,
                       "delivery_info": {"exchange": exchange, "routing_key": routing_key}},
    })
    .to_string()
    .into_bytes()
}

async fn len(url: &str, key: &str) -> usize {
    list(url, key).await.len()
}

#[tokio::test]
async fn restores_route_through_kombu_bindings() {
    let Some(url) = common::redis_url(13).await else { return };
    let (queue, exchange, routing_key) = ("routed.actual", "routed.exchange", "rk.not.the.queue");

    // A worker's broker declares the binding (as a consuming worker does), claims a message
    // and dies without acking it.
    let dying = open(&url, 3600.0).await;
    dying.declare_queue(queue, exchange, routing_key).await.unwrap();
    assert_eq!(
        members(&url, &format!("_kombu.binding.{exchange}")).await,
        [format!("{routing_key}\x06\x16\x06\x16{queue}")]
    );
    dying.publish_raw(queue, &routed_envelope("dead-node", exchange, routing_key), 0, Utc::now()).await.unwrap();
    assert_eq!(dying.fetch(&[queue.to_owned()], 10, Duration::from_secs(1)).await.unwrap().len(), 1);
    drop(dying);
    let mut c = conn(&url).await;
    let alive: Vec<String> = redis::cmd("KEYS").arg("celeriac.alive.*").query_async(&mut c).await.unwrap();
    redis::cmd("DEL").arg(&alive).query_async::<()>(&mut c).await.unwrap(); // dead, not 10 s from now

    // Another node's recovery gives it back to the bound queue, not to a list named after
    // the routing key.
    let survivor = open(&url, 3600.0).await;
    survivor.fetch(&["routed.other".to_owned()], 1, Duration::from_millis(50)).await.unwrap();
    let back = common::eventually(Duration::from_secs(15), || async { len(&url, queue).await == 1 }).await;
    assert!(back, "the dead node's message is back on {queue}");
    assert_eq!(len(&url, routing_key).await, 0);
    let mut restored = list(&url, queue).await;
    let env: serde_json::Value = serde_json::from_slice(&restored.pop().unwrap()).unwrap();
    assert_eq!(env["headers"]["redelivered"], true);
    drop(survivor);

    // The visibility timeout (a node that claimed and never renewed): the same routing.
    let slow = open(&url, 1.0).await;
    let claimed = slow.fetch(&[queue.to_owned()], 10, Duration::from_secs(1)).await.unwrap();
    assert_eq!(claimed.len(), 1);
    assert_eq!(len(&url, queue).await, 0);
    let back = common::eventually(Duration::from_secs(15), || async { len(&url, queue).await == 1 }).await;
    assert!(back, "restored after the visibility timeout to {queue}");
    assert_eq!(len(&url, routing_key).await, 0);
    // The late ack of the restored delivery does not remove anyone else's claim.
    assert!(!slow.ack(&claimed[0]).await.unwrap());
}

#[task(name = "b.declared")]
async fn declared() -> TaskResult<()> {
    Ok(())
}

/// Clients of database `db` blocked in a command now (`CLIENT LIST`, flag `b`).
async fn blocked_clients(url: &str, db: u8) -> Vec<String> {
    let list: String = redis::cmd("CLIENT").arg("LIST").query_async(&mut conn(url).await).await.unwrap();
    list.lines()
        .filter(|l| {
            l.split(' ').any(|f| f == format!("db={db}"))
                && l.split(' ').any(|f| f.starts_with("flags=") && f.contains('b'))
        })
        .map(str::to_owned)
        .collect()
}

#[tokio::test]
async fn a_worker_declares_its_queues_and_stops_blocking_when_it_stops() {
    let Some(url) = common::redis_url(8).await else { return };
    let url = url.as_str();
    let queue = "declared.on.start";
    let app = App::builder().broker_url(url).task(declared).build().await.unwrap();
    let mut options = common::fast_options(&app, 1);
    options.queues = vec![queue.into()];
    options.poll_wait = Duration::from_secs(5); // long blocking pops
    let (shutdown, worker) = celeriac::Worker::new(&app).options(options).spawn();
    let found = common::eventually(Duration::from_secs(10), || async {
        members(url, &format!("_kombu.binding.{queue}")).await == [format!("{queue}\x06\x16\x06\x16{queue}")]
    })
    .await;
    assert!(found, "the worker declared the binding before anything was published");
    assert!(common::eventually(Duration::from_secs(5), || async { !blocked_clients(url, 8).await.is_empty() }).await);
    // An ETA task an hour away: the worker parks it in the delayed set.
    let mut eta = message(0, 0);
    eta.headers.task = "b.declared".into();
    eta.headers.eta = Some((Utc::now() + chrono::Duration::hours(1)).to_rfc3339());
    app.broker().publish(queue, &eta).await.unwrap();
    let parked = || async {
        let n: u64 = redis::cmd("ZCARD").arg("celeriac.delayed").query_async(&mut conn(url).await).await.unwrap();
        n
    };
    assert!(common::eventually(Duration::from_secs(5), || async { parked().await == 1 }).await);
    assert_eq!(app.broker().parked().await.unwrap().len(), 1);
    // And one parked by a worker that was killed (its liveness key is gone).
    let orphan = message(2, 0).to_wire();
    let member = serde_json::json!([queue, String::from_utf8_lossy(&orphan), "0123456789abcdef"]).to_string();
    redis::cmd("ZADD")
        .arg("celeriac.delayed")
        .arg(4_000_000_000_000i64)
        .arg(member)
        .query_async::<()>(&mut conn(url).await)
        .await
        .unwrap();
    shutdown.graceful();
    worker.await.unwrap();
    // Stopped: no blocking pop left that could take a message for nobody, and the parked ETA
    // tasks (its own and the dead node's) are back on their queue for whichever worker comes.
    assert_eq!(blocked_clients(url, 8).await, Vec::<String>::new());
    assert_eq!(parked().await, 0);
    let mut back = list(url, queue).await;
    back.sort();
    let mut want = vec![eta.to_wire(), orphan];
    want.sort();
    assert_eq!(back, want);
    App::builder().broker_url(url).build().await.unwrap().broker().publish(queue, &message(1, 0)).await.unwrap();
    assert_eq!(len(url, queue).await, 3, "the messages wait on their queue");
}

/// A private TLS redis-server with a CA and a server certificate for 127.0.0.1 made by
/// openssl in a temp dir; `None` (with a message) when either binary is missing or lacks TLS.
struct TlsServer {
    child: std::process::Child,
    port: u16,
    dir: tempfile::TempDir,
}

impl TlsServer {
    fn start() -> Option<TlsServer> {
        let dir = tempfile::tempdir().unwrap();
        let run = |args: &[&str]| {
            std::process::Command::new("openssl")
                .args(args)
                .current_dir(dir.path())
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::null())
                .status()
                .is_ok_and(|s| s.success())
        };
        std::fs::write(dir.path().join("ext.cnf"), "subjectAltName=IP:127.0.0.1,DNS:localhost\n").unwrap();
        let made = run(&[
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            "ca.key",
            "-out",
            "ca.crt",
            "-days",
            "1",
            "-subj",
            "/CN=celeriac test CA",
        ]) && run(&[
            "req",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            "server.key",
            "-out",
            "server.csr",
            "-subj",
            "/CN=127.0.0.1",
        ]) && run(&[
            "x509",
            "-req",
            "-in",
            "server.csr",
            "-CA",
            "ca.crt",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-out",
            "server.crt",
            "-days",
            "1",
            "-extfile",
            "ext.cnf",
        ]);
        if !made {
            eprintln!("SKIPPED: no openssl binary to make test certificates");
            return None;
        }
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let child = std::process::Command::new("redis-server")
            .args(["--port", "0", "--tls-port", &port.to_string(), "--bind", "127.0.0.1", "--save", ""])
            .args(["--tls-cert-file", "server.crt", "--tls-key-file", "server.key", "--tls-ca-cert-file", "ca.crt"])
            .args(["--tls-auth-clients", "no"])
            .current_dir(dir.path())
            .stdout(std::process::Stdio::null())
            .spawn();
        let Ok(mut child) = child else {
            eprintln!("SKIPPED: no redis-server binary to run a TLS server");
            return None;
        };
        for _ in 0..50 {
            if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
                return Some(TlsServer { child, port, dir });
            }
            if child.try_wait().ok().flatten().is_some() {
                eprintln!("SKIPPED: redis-server would not start with --tls-port (built without TLS?)");
                return None;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let _ = child.kill();
        eprintln!("SKIPPED: the TLS redis-server did not listen");
        None
    }

    fn ca(&self) -> String {
        self.dir.path().join("ca.crt").display().to_string()
    }
}

impl Drop for TlsServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

async fn connect_error(url: &str) -> String {
    match broker::from_url(url, &Config::default()).await {
        Ok(_) => panic!("{url} connected"),
        Err(e) => e.to_string(),
    }
}

#[tokio::test]
async fn rediss_urls_speak_tls() {
    // A plain server on 6379 answering a TLS hello: a TLS error, not "unsupported scheme".
    if common::redis_url(11).await.is_some() {
        let e = connect_error("rediss://127.0.0.1:6379/11").await;
        eprintln!("rediss:// to a plain server: {e}");
        assert!(e.contains("TLS"), "{e}");
        assert!(!e.contains("unsupported"), "{e}");
    }
    let Some(server) = TlsServer::start() else { return };
    let port = server.port;

    // Verified against the CA given in kombu's `ssl_ca_certs` query parameter.
    let url = format!("rediss://127.0.0.1:{port}/0?ssl_cert_reqs=required&ssl_ca_certs={}", server.ca());
    let tls = open(&url, 3600.0).await;
    tls.publish("tls.q", &message(7, 0)).await.unwrap();
    let got = tls.fetch(&["tls.q".to_owned()], 1, Duration::from_secs(2)).await.unwrap();
    assert_eq!(got.len(), 1);
    assert!(tls.ack(&got[0]).await.unwrap());
    // Blocking pops over TLS: a message published after the fetch started wakes it.
    let waiting = {
        let tls = tls.clone();
        tokio::spawn(async move { tls.fetch(&["tls.q".to_owned()], 1, Duration::from_secs(5)).await })
    };
    tokio::time::sleep(Duration::from_millis(200)).await;
    tls.publish("tls.q", &message(8, 0)).await.unwrap();
    assert_eq!(waiting.await.unwrap().unwrap().len(), 1);

    // The system's roots do not know this CA: a clear certificate error.
    let text = connect_error(&format!("rediss://127.0.0.1:{port}/0")).await;
    eprintln!("rediss:// with an unknown CA: {text}");
    assert!(text.contains("TLS") && text.to_lowercase().contains("certificate"), "{text}");
    // kombu's `ssl_cert_reqs=none` (its default for rediss://) skips verification.
    let insecure = open(&format!("rediss://127.0.0.1:{port}/0?ssl_cert_reqs=CERT_NONE"), 3600.0).await;
    insecure.publish("tls.q", &message(9, 0)).await.unwrap();
    assert_eq!(insecure.fetch(&["tls.q".to_owned()], 1, Duration::from_secs(2)).await.unwrap().len(), 1);

    // The result backend opens rediss:// through the redis crate (`#insecure`: no verification).
    let backend = celeriac::backend::from_url(&format!("rediss://127.0.0.1:{port}/0#insecure")).await.unwrap();
    let meta = celeriac::protocol::ResultMeta::new("tls-result", celeriac::State::Success, serde_json::json!(42));
    backend.store(&meta, None).await.unwrap();
    assert_eq!(backend.get("tls-result").await.unwrap().map(|m| m.result), Some(serde_json::json!(42)));
}
