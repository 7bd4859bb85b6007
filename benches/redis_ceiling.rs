//! The Redis-bound ceiling for Celery-format messages on this machine: how fast a loop with
//! no task queue around it can fill and drain a kombu queue list with real envelopes. The
//! numbers `celeriac bench` is compared with in `benches/compare.sh`.
//!
//! ```text
//! cargo run --release -p celeriac --example redis_ceiling -- [--url redis://127.0.0.1:6379/12] [--n 200000]
//! ```
//!
//! Figures (one JSON line each): pipelined LPUSH fill; one consumer taking 100 at a time
//! (`LMPOP ... COUNT 100`, each envelope decoded with serde_json); one message per round
//! trip (`RPOP`); and the batched drain plus kombu's unacked bookkeeping done naively
//! (pipelined `ZADD`+`HSET` per batch, then `ZREM`+`HDEL`), on one connection and on four.

#![allow(missing_docs)]

use std::time::Instant;

const QUEUE: &str = "ceiling";

/// A kombu envelope of the usual size (about 600 bytes), as Celery 5.7 writes them.
fn envelope(i: u64) -> Vec<u8> {
    let body = base64_body();
    format!(
        "{{\"body\": \"{body}\", \"content-encoding\": \"utf-8\", \"content-type\": \"application/json\", \"headers\": {{\"lang\": \"py\", \"task\": \"celeriac.bench.noop\", \"id\": \"{i:08x}-2294-5777-b51f-443b61d1d4f9\", \"shadow\": null, \"eta\": null, \"expires\": null, \"group\": null, \"group_index\": null, \"retries\": 0, \"timelimit\": [null, null], \"root_id\": \"{i:08x}-2294-5777-b51f-443b61d1d4f9\", \"parent_id\": null, \"argsrepr\": \"()\", \"kwargsrepr\": \"{{}}\", \"origin\": \"gen8294@vm\", \"ignore_result\": true}}, \"properties\": {{\"correlation_id\": \"{i:08x}-2294-5777-b51f-443b61d1d4f9\", \"reply_to\": \"f4bd4e5f-5a5e-3a4f-9a3c-2c5c5c5c5c5c\", \"delivery_mode\": 2, \"delivery_info\": {{\"exchange\": \"\", \"routing_key\": \"celery\"}}, \"priority\": 0, \"body_encoding\": \"base64\", \"delivery_tag\": \"{i:08x}-aaaa-bbbb-cccc-dddddddddddd\"}}}}"
    )
    .into_bytes()
}

fn base64_body() -> &'static str {
    // [[], {}, {"callbacks": null, "errbacks": null, "chain": null, "chord": null}]
    "W1tdLCB7fSwgeyJjYWxsYmFja3MiOiBudWxsLCAiZXJyYmFja3MiOiBudWxsLCAiY2hhaW4iOiBudWxsLCAiY2hvcmQiOiBudWxsfV0="
}

async fn fill(conn: &mut redis::aio::MultiplexedConnection, n: u64) -> redis::RedisResult<f64> {
    let _: () = redis::cmd("DEL").arg(QUEUE).query_async(conn).await?;
    let started = Instant::now();
    let mut i = 0;
    while i < n {
        let mut pipe = redis::pipe();
        for j in i..(i + 1000).min(n) {
            pipe.cmd("LPUSH").arg(QUEUE).arg(envelope(j)).ignore();
        }
        pipe.query_async::<()>(conn).await?;
        i += 1000;
    }
    Ok(n as f64 / started.elapsed().as_secs_f64())
}

fn decode(raw: &[u8]) -> String {
    let v: serde_json::Value = serde_json::from_slice(raw).unwrap_or_default();
    v["properties"]["delivery_tag"].as_str().unwrap_or_default().to_owned()
}

/// Drains with `LMPOP COUNT 100`; with `unacked`, records and then removes each batch in
/// kombu's unacked hash and index (two more round trips per batch).
async fn drain(mut conn: redis::aio::MultiplexedConnection, unacked: bool) -> redis::RedisResult<u64> {
    let mut got = 0u64;
    loop {
        let popped: Option<(String, Vec<Vec<u8>>)> =
            redis::cmd("LMPOP").arg(1).arg(QUEUE).arg("RIGHT").arg("COUNT").arg(100).query_async(&mut conn).await?;
        let Some((_, batch)) = popped else { return Ok(got) };
        let tags: Vec<String> = batch.iter().map(|m| decode(m)).collect();
        if unacked {
            let mut pipe = redis::pipe();
            for (tag, m) in tags.iter().zip(&batch) {
                pipe.cmd("ZADD").arg("unacked_index").arg(1.0).arg(tag).ignore();
                pipe.cmd("HSET").arg("unacked").arg(tag).arg(m).ignore();
            }
            pipe.query_async::<()>(&mut conn).await?;
            let mut pipe = redis::pipe();
            for tag in &tags {
                pipe.cmd("ZREM").arg("unacked_index").arg(tag).ignore();
                pipe.cmd("HDEL").arg("unacked").arg(tag).ignore();
            }
            pipe.query_async::<()>(&mut conn).await?;
        }
        got += batch.len() as u64;
    }
}

async fn drain_single(mut conn: redis::aio::MultiplexedConnection) -> redis::RedisResult<u64> {
    let mut got = 0u64;
    loop {
        let m: Option<Vec<u8>> = redis::cmd("RPOP").arg(QUEUE).query_async(&mut conn).await?;
        let Some(m) = m else { return Ok(got) };
        std::hint::black_box(decode(&m));
        got += 1;
    }
}

async fn timed<F: std::future::Future<Output = redis::RedisResult<Vec<u64>>>>(f: F) -> redis::RedisResult<(u64, f64)> {
    let started = Instant::now();
    let counts = f.await?;
    Ok((counts.iter().sum(), started.elapsed().as_secs_f64()))
}

fn line(figure: &str, n: u64, per_s: f64) {
    println!("{}", serde_json::json!({"scenario": figure, "tasks": n, "per_s": (per_s * 10.0).round() / 10.0}));
}

#[tokio::main]
async fn main() -> redis::RedisResult<()> {
    let mut url = "redis://127.0.0.1:6379/12".to_owned();
    let mut n: u64 = 200_000;
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--url" => url = args.next().unwrap_or(url),
            "--n" => n = args.next().and_then(|v| v.parse().ok()).unwrap_or(n),
            _ => {}
        }
    }
    let client = redis::Client::open(url)?;
    let mut conn = client.get_multiplexed_async_connection().await?;
    line("ceiling: pipelined LPUSH fill", n, fill(&mut conn, n).await?);
    let (got, secs) =
        timed(async { Ok(vec![drain(client.get_multiplexed_async_connection().await?, false).await?]) }).await?;
    line("ceiling: LMPOP COUNT 100 + serde_json decode", got, got as f64 / secs);
    let single_n = (n / 4).max(1);
    fill(&mut conn, single_n).await?;
    let (got, secs) =
        timed(async { Ok(vec![drain_single(client.get_multiplexed_async_connection().await?).await?]) }).await?;
    line("ceiling: one message per round trip", got, got as f64 / secs);
    for conns in [1usize, 4] {
        fill(&mut conn, n).await?;
        let (got, secs) = timed(async {
            let mut tasks = Vec::new();
            for _ in 0..conns {
                let c = client.get_multiplexed_async_connection().await?;
                tasks.push(tokio::spawn(drain(c, true)));
            }
            let mut counts = Vec::new();
            for t in tasks {
                counts.push(t.await.unwrap_or(Ok(0))?);
            }
            Ok(counts)
        })
        .await?;
        line(&format!("ceiling: batched + unacked bookkeeping, {conns} connection(s)"), got, got as f64 / secs);
    }
    let _: () = redis::cmd("DEL").arg(QUEUE).arg("unacked").arg("unacked_index").query_async(&mut conn).await?;
    Ok(())
}
