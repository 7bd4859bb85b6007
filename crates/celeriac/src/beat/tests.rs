//! Next-run tables (DST transitions in Europe/Berlin and America/New_York), missed-tick
//! policies, and the lease/claim contract of every store.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use super::schedule::{Schedule, crontab, parse_tz};
use super::store::{BeatStore, Claim, memory::MemoryStore};
use super::{Beat, BeatOptions, Entry, Missed};
use chrono::{DateTime, Utc};
use chrono_tz::Tz;
use std::sync::Arc;
use std::time::Duration;

fn t(s: &str) -> DateTime<Utc> {
    DateTime::parse_from_rfc3339(s).unwrap_or_else(|e| panic!("{s}: {e}")).with_timezone(&Utc)
}

/// Ticks in `(from, to]` by walking forward with `next_after`.
fn forward(s: &Schedule, tz: Tz, from: DateTime<Utc>, to: DateTime<Utc>) -> Vec<DateTime<Utc>> {
    let mut out = Vec::new();
    let mut cur = from;
    while let Some(n) = s.next_after(cur, tz) {
        if n > to {
            break;
        }
        assert!(n > cur, "next_after moves forward: {n} after {cur}");
        out.push(n);
        cur = n;
    }
    out
}

#[test]
fn next_run_table_with_dst_transitions() {
    // (minute, hour, day_of_week, day_of_month, month_of_year), zone, window (from, to], ticks.
    type Case = ([&'static str; 5], &'static str, &'static str, &'static str, &'static [&'static str]);
    let cases: &[Case] = &[
        // Berlin, spring forward 2026-03-29 02:00 CET -> 03:00 CEST: 02:30 does not exist that
        // day and runs once, at 03:00 CEST; the days around it keep 02:30 local.
        (
            ["30", "2", "*", "*", "*"],
            "Europe/Berlin",
            "2026-03-28T00:00:00Z",
            "2026-03-31T00:00:00Z",
            &["2026-03-28T01:30:00Z", "2026-03-29T01:00:00Z", "2026-03-30T00:30:00Z"],
        ),
        // Berlin, fall back 2026-10-25 03:00 CEST -> 02:00 CET: 02:30 happens twice; runs once,
        // at the first (CEST).
        (
            ["30", "2", "*", "*", "*"],
            "Europe/Berlin",
            "2026-10-24T00:00:00Z",
            "2026-10-27T00:00:00Z",
            &["2026-10-24T00:30:00Z", "2026-10-25T00:30:00Z", "2026-10-26T01:30:00Z"],
        ),
        // New York, spring forward 2026-03-08 02:00 EST -> 03:00 EDT.
        (
            ["30", "2", "*", "*", "*"],
            "America/New_York",
            "2026-03-07T00:00:00Z",
            "2026-03-10T00:00:00Z",
            &["2026-03-07T07:30:00Z", "2026-03-08T07:00:00Z", "2026-03-09T06:30:00Z"],
        ),
        // New York, fall back 2026-11-01 02:00 EDT -> 01:00 EST: 01:30 happens twice, runs once.
        (
            ["30", "1", "*", "*", "*"],
            "America/New_York",
            "2026-10-31T00:00:00Z",
            "2026-11-03T00:00:00Z",
            &["2026-10-31T05:30:00Z", "2026-11-01T05:30:00Z", "2026-11-02T06:30:00Z"],
        ),
        // ... and 02:30 (after the repeated hour) runs once, in EST.
        (
            ["30", "2", "*", "*", "*"],
            "America/New_York",
            "2026-10-31T12:00:00Z",
            "2026-11-02T00:00:00Z",
            &["2026-11-01T07:30:00Z"],
        ),
        // Hourly across Berlin's spring gap: every real hour, 02:00 local does not exist.
        (
            ["0", "*", "*", "*", "*"],
            "Europe/Berlin",
            "2026-03-28T22:30:00Z",
            "2026-03-29T03:00:00Z",
            &[
                "2026-03-28T23:00:00Z",
                "2026-03-29T00:00:00Z",
                "2026-03-29T01:00:00Z",
                "2026-03-29T02:00:00Z",
                "2026-03-29T03:00:00Z",
            ],
        ),
        // Hourly across Berlin's fall back: 02:00 CEST and 02:00 CET both run.
        (
            ["0", "*", "*", "*", "*"],
            "Europe/Berlin",
            "2026-10-24T23:30:00Z",
            "2026-10-25T03:00:00Z",
            &["2026-10-25T00:00:00Z", "2026-10-25T01:00:00Z", "2026-10-25T02:00:00Z", "2026-10-25T03:00:00Z"],
        ),
        // Hourly across New York's fall back: 01:00 EDT, 01:00 EST, 02:00 EST.
        (
            ["0", "*", "*", "*", "*"],
            "America/New_York",
            "2026-11-01T04:30:00Z",
            "2026-11-01T07:00:00Z",
            &["2026-11-01T05:00:00Z", "2026-11-01T06:00:00Z", "2026-11-01T07:00:00Z"],
        ),
        // */15 in UTC.
        (
            ["*/15", "*", "*", "*", "*"],
            "UTC",
            "2026-01-01T10:00:00Z",
            "2026-01-01T11:00:00Z",
            &["2026-01-01T10:15:00Z", "2026-01-01T10:30:00Z", "2026-01-01T10:45:00Z", "2026-01-01T11:00:00Z"],
        ),
        // */15 across Berlin's spring gap: 01:45 CET, then 03:00 and 03:15 CEST.
        (
            ["*/15", "*", "*", "*", "*"],
            "Europe/Berlin",
            "2026-03-29T00:40:00Z",
            "2026-03-29T01:20:00Z",
            &["2026-03-29T00:45:00Z", "2026-03-29T01:00:00Z", "2026-03-29T01:15:00Z"],
        ),
        // A stepped range.
        (
            ["0-30/10", "9", "*", "*", "*"],
            "UTC",
            "2026-01-01T08:00:00Z",
            "2026-01-01T10:00:00Z",
            &["2026-01-01T09:00:00Z", "2026-01-01T09:10:00Z", "2026-01-01T09:20:00Z", "2026-01-01T09:30:00Z"],
        ),
        // mon-fri (2026-01-01 is a Thursday): Friday the 2nd, Monday the 5th.
        (
            ["0", "9", "mon-fri", "*", "*"],
            "UTC",
            "2026-01-01T12:00:00Z",
            "2026-01-06T00:00:00Z",
            &["2026-01-02T09:00:00Z", "2026-01-05T09:00:00Z"],
        ),
        // Celery's day 0 is Sunday, as is `sun`.
        (["0", "9", "0", "*", "*"], "UTC", "2026-01-01T00:00:00Z", "2026-01-08T00:00:00Z", &["2026-01-04T09:00:00Z"]),
        (["0", "9", "sun", "*", "*"], "UTC", "2026-01-01T00:00:00Z", "2026-01-08T00:00:00Z", &["2026-01-04T09:00:00Z"]),
        // A list of week days.
        (
            ["0", "9", "1,3", "*", "*"],
            "UTC",
            "2026-01-01T00:00:00Z",
            "2026-01-08T00:00:00Z",
            &["2026-01-05T09:00:00Z", "2026-01-07T09:00:00Z"],
        ),
        // Days of month.
        (
            ["0", "0", "*", "1,15", "*"],
            "UTC",
            "2026-01-01T00:00:00Z",
            "2026-03-01T00:00:00Z",
            &["2026-01-15T00:00:00Z", "2026-02-01T00:00:00Z", "2026-02-15T00:00:00Z", "2026-03-01T00:00:00Z"],
        ),
        // Months by name.
        (
            ["0", "0", "*", "1", "jan,jul"],
            "UTC",
            "2026-01-01T00:00:00Z",
            "2027-01-02T00:00:00Z",
            &["2026-07-01T00:00:00Z", "2027-01-01T00:00:00Z"],
        ),
        // Day of month and day of week both restricted: both must match (Celery), the first
        // Monday of each month.
        (
            ["0", "0", "mon", "1-7", "*"],
            "UTC",
            "2026-01-01T00:00:00Z",
            "2026-03-31T00:00:00Z",
            &["2026-01-05T00:00:00Z", "2026-02-02T00:00:00Z", "2026-03-02T00:00:00Z"],
        ),
        // A zone's daily job in local time (Berlin in winter is UTC+1).
        (
            ["0", "8", "*", "*", "*"],
            "Europe/Berlin",
            "2026-01-01T00:00:00Z",
            "2026-01-01T23:00:00Z",
            &["2026-01-01T07:00:00Z"],
        ),
    ];
    for ([m, h, dow, dom, moy], zone, from, to, want) in cases {
        let tz = parse_tz(zone).unwrap();
        let s = Schedule::Crontab(crontab(m, h, dow, dom, moy).unwrap());
        let want: Vec<DateTime<Utc>> = want.iter().map(|w| t(w)).collect();
        let name = format!("{s} in {zone} over ({from}, {to}]");
        assert_eq!(forward(&s, tz, t(from), t(to)), want, "next_after: {name}");
        let (back, dropped) = s.ticks_between(t(from), t(to), tz, 1000);
        assert_eq!((back, dropped), (want.clone(), false), "ticks_between: {name}");
        if want.len() > 1 {
            let (newest, dropped) = s.ticks_between(t(from), t(to), tz, 1);
            assert_eq!((newest, dropped), (vec![want[want.len() - 1]], true), "bounded: {name}");
        }
    }
}

#[test]
fn intervals_and_one_offs() {
    let every = Schedule::every_secs(1.0).unwrap();
    let utc = chrono_tz::UTC;
    assert_eq!(every.next_after(t("2026-01-01T10:00:00.300Z"), utc), Some(t("2026-01-01T10:00:01Z")));
    assert_eq!(every.next_after(t("2026-01-01T10:00:01Z"), utc), Some(t("2026-01-01T10:00:02Z")));
    let (ticks, dropped) = every.ticks_between(t("2026-01-01T10:00:00Z"), t("2026-01-01T10:00:03.5Z"), utc, 100);
    assert_eq!(ticks, vec![t("2026-01-01T10:00:01Z"), t("2026-01-01T10:00:02Z"), t("2026-01-01T10:00:03Z")]);
    assert!(!dropped);
    let quarter = Schedule::every_secs(900.0).unwrap();
    assert_eq!(quarter.next_after(t("2026-01-01T10:07:00Z"), utc), Some(t("2026-01-01T10:15:00Z")));
    let once = Schedule::At(t("2026-05-01T12:00:00Z"));
    assert_eq!(once.next_after(t("2026-05-01T11:00:00Z"), utc), Some(t("2026-05-01T12:00:00Z")));
    assert_eq!(once.next_after(t("2026-05-01T12:00:00Z"), utc), None);
    assert!(Schedule::every_secs(0.0).is_err() && Schedule::every_secs(f64::NAN).is_err());
}

#[test]
fn crontab_fields_follow_celery_syntax() {
    for bad in
        [["60", "*", "*", "*", "*"], ["*", "24", "*", "*", "*"], ["*", "*", "*", "0", "*"], ["*", "*", "*", "*", "13"]]
    {
        let [m, h, dow, dom, moy] = bad;
        assert!(crontab(m, h, dow, dom, moy).is_err(), "{bad:?} is out of range");
    }
    for bad in ["*/0", "L", "5#2", "1-", "?", "1 2"] {
        assert!(crontab(bad, "*", "*", "*", "*").is_err(), "{bad:?} is not Celery's syntax");
    }
    assert!(crontab("*/15", "9-17", "MON-fri", "1-31/2", "jan-jun").is_ok());
}

/// The task messages waiting on `queue`, as (entry, tick) from their beat headers.
async fn sent_ticks(app: &crate::App, queue: &str) -> Vec<(String, DateTime<Utc>)> {
    let mut out = Vec::new();
    loop {
        let got = app.broker().fetch(&[queue.to_owned()], 100, Duration::from_millis(10)).await.unwrap();
        if got.is_empty() {
            return out;
        }
        for d in got {
            let m = crate::protocol::Message::from_wire(&d.payload).unwrap();
            let entry = m.headers.extra.get("beat_entry").and_then(|v| v.as_str()).unwrap().to_owned();
            let tick = t(m.headers.extra.get("beat_tick").and_then(|v| v.as_str()).unwrap());
            out.push((entry, tick));
            app.broker().ack(&d).await.unwrap();
        }
    }
}

async fn memory_app() -> crate::App {
    crate::App::builder().broker_url("memory://").build().await.unwrap()
}

fn beat(app: &crate::App, store: &Arc<MemoryStore>, holder: &str, entries: Vec<Entry>) -> Beat {
    let options =
        BeatOptions { lease: Duration::from_millis(300), holder: holder.to_owned(), ..BeatOptions::default() };
    Beat::with_store(app, store.clone()).entries(entries).options(options)
}

#[tokio::test]
async fn missed_ticks_follow_each_policy() {
    let app = memory_app().await;
    let every = || Schedule::every_secs(1.0).unwrap();
    let entries = vec![
        Entry::new("all", "t.all", every()).queue("q").missed(Missed::RunAll { max: 100 }),
        Entry::new("capped", "t.capped", every()).queue("q").missed(Missed::RunAll { max: 3 }),
        Entry::new("once", "t.once", every()).queue("q").missed(Missed::RunOnce),
        Entry::new("skip", "t.skip", every()).queue("q").missed(Missed::Skip),
        Entry::new("off", "t.off", every()).queue("q").enabled(false),
    ];
    let store = Arc::new(MemoryStore::new());
    let mut b = beat(&app, &store, "a", entries);
    // The first pass only starts the count: nothing is due at the moment beat starts.
    b.step(t("2026-01-01T10:00:00Z")).await.unwrap();
    b.step(t("2026-01-01T10:00:01.010Z")).await.unwrap();
    let mut first = sent_ticks(&app, "q").await;
    first.sort();
    let tick1 = t("2026-01-01T10:00:01Z");
    let names: Vec<_> = first.iter().map(|(n, at)| (n.as_str(), *at)).collect();
    assert_eq!(names, vec![("all", tick1), ("capped", tick1), ("once", tick1), ("skip", tick1)]);
    // Ten seconds of downtime later.
    b.step(t("2026-01-01T10:00:11.200Z")).await.unwrap();
    let later = sent_ticks(&app, "q").await;
    let of =
        |name: &str| -> Vec<DateTime<Utc>> { later.iter().filter(|(n, _)| n == name).map(|(_, at)| *at).collect() };
    let secs = |range: std::ops::RangeInclusive<u32>| -> Vec<DateTime<Utc>> {
        range.map(|s| t(&format!("2026-01-01T10:00:{s:02}Z"))).collect()
    };
    assert_eq!(of("all"), secs(2..=11), "run all: every missed tick, oldest first");
    assert_eq!(of("capped"), secs(9..=11), "run all, bounded: the newest max");
    assert_eq!(of("once"), secs(11..=11), "run once: the latest");
    assert_eq!(of("skip"), secs(11..=11), "skip: the tick due now (within the grace) still runs");
    assert!(of("off").is_empty());
    // A longer outage: the tick due now is already later than the grace for `skip`.
    b.step(t("2026-01-01T10:00:30.000Z")).await.unwrap();
    b.step(t("2026-01-01T10:00:38.000Z")).await.unwrap();
    let last = sent_ticks(&app, "q").await;
    let skipped: Vec<_> = last.iter().filter(|(n, _)| n == "skip").collect();
    assert_eq!(skipped.len(), 2, "skip sends only ticks due now: {last:?}");
    // Nothing is sent twice: the last ticks are recorded.
    b.step(t("2026-01-01T10:00:38.500Z")).await.unwrap();
    assert!(sent_ticks(&app, "q").await.is_empty());
    let stored = store.last_sent().await.unwrap();
    assert_eq!(stored["skip"].tick, t("2026-01-01T10:00:38Z"));
}

#[tokio::test]
async fn only_the_leader_sends_and_a_successor_does_not_resend() {
    let app = memory_app().await;
    let entries =
        vec![Entry::new("e", "t.e", Schedule::every_secs(1.0).unwrap()).queue("q").missed(Missed::RunAll { max: 100 })];
    let store = Arc::new(MemoryStore::new());
    let mut a = beat(&app, &store, "a", entries.clone());
    let mut b = beat(&app, &store, "b", entries);
    a.step(t("2026-01-01T10:00:00Z")).await.unwrap();
    b.step(t("2026-01-01T10:00:00Z")).await.unwrap();
    assert!(a.token().is_some() && b.token().is_none(), "one leader");
    for s in 1..=3 {
        let now = t(&format!("2026-01-01T10:00:{s:02}.010Z"));
        a.step(now).await.unwrap();
        b.step(now).await.unwrap();
    }
    assert_eq!((a.sent(), b.sent()), (3, 0));
    // `a` stops renewing (dies); after the lease `b` takes over with a newer token.
    let old = a.token().unwrap();
    tokio::time::sleep(Duration::from_millis(350)).await;
    b.step(t("2026-01-01T10:00:06.010Z")).await.unwrap();
    let new = b.token().expect("b leads after the lease ran out");
    assert!(new > old, "a new fencing token");
    // The deposed leader's token no longer claims anything.
    let stale = store.claim("a", old, "e", t("2026-01-01T10:00:07Z")).await.unwrap();
    assert_eq!(stale, Claim::NotLeader);
    a.step(t("2026-01-01T10:00:07.010Z")).await.unwrap();
    assert!(a.token().is_none(), "a sees it lost the lease");
    b.step(t("2026-01-01T10:00:07.010Z")).await.unwrap();
    let mut ticks: Vec<_> = sent_ticks(&app, "q").await.into_iter().map(|(_, at)| at).collect();
    ticks.sort();
    let want: Vec<_> = (1..=7).map(|s| t(&format!("2026-01-01T10:00:{s:02}Z"))).collect();
    assert_eq!(ticks, want, "each tick once, the takeover's gap caught up");
}

/// The contract every store keeps (run for memory, SQLite and, when reachable, Redis).
async fn store_contract(store: &dyn BeatStore) {
    let lease = Duration::from_millis(400);
    let a = store.acquire("a", lease).await.unwrap().expect("a free lease is taken");
    assert_eq!(store.acquire("b", lease).await.unwrap(), None, "a held lease is not");
    assert_eq!(store.acquire("a", lease).await.unwrap(), Some(a), "the holder renews with the same token");
    let leader = store.leader().await.unwrap().unwrap();
    assert_eq!((leader.holder.as_str(), leader.token), ("a", a));
    let tick = t("2026-01-01T10:00:01Z");
    assert_eq!(store.claim("a", a, "e", tick).await.unwrap(), Claim::Claimed);
    assert_eq!(store.claim("a", a, "e", tick).await.unwrap(), Claim::AlreadySent);
    assert_eq!(store.claim("b", a, "e", t("2026-01-01T10:00:02Z")).await.unwrap(), Claim::NotLeader);
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(store.leader().await.unwrap(), None, "the lease runs out");
    let b = store.acquire("b", lease).await.unwrap().expect("an expired lease is taken");
    assert!(b > a, "with a newer token");
    assert_eq!(store.claim("a", a, "e", t("2026-01-01T10:00:02Z")).await.unwrap(), Claim::NotLeader, "fenced");
    assert_eq!(store.claim("b", b, "e", tick).await.unwrap(), Claim::AlreadySent, "the old leader's tick stays");
    assert_eq!(store.claim("b", b, "e", t("2026-01-01T10:00:02Z")).await.unwrap(), Claim::Claimed);
    let last = store.last_sent().await.unwrap();
    assert_eq!((last["e"].tick, last["e"].token), (t("2026-01-01T10:00:02Z"), b));
    store.release("a", a).await.unwrap();
    assert!(store.leader().await.unwrap().is_some(), "only the holder releases");
    store.release("b", b).await.unwrap();
    assert_eq!(store.leader().await.unwrap(), None);
    let c = store.acquire("a", lease).await.unwrap().expect("a released lease is free at once");
    assert!(c > b);
}

#[tokio::test]
async fn memory_store_keeps_the_contract() {
    store_contract(&MemoryStore::new()).await;
}

#[cfg(feature = "sqlite")]
#[tokio::test]
async fn sqlite_store_keeps_the_contract() {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("sqlite://{}", dir.path().join("beat.db").display());
    store_contract(&super::store::sqlite::SqliteStore::connect(&url).await.unwrap()).await;
}

#[cfg(feature = "redis")]
#[tokio::test]
async fn redis_store_keeps_the_contract() {
    let url = "redis://127.0.0.1:6379/9";
    let prefix = format!("contract-{}:", uuid::Uuid::new_v4().simple());
    let store = match tokio::time::timeout(
        Duration::from_secs(3),
        super::store::redis::RedisStore::connect(url, &prefix),
    )
    .await
    {
        Ok(Ok(s)) => s,
        outcome => {
            if std::env::var("CELERIAC_REQUIRE_SERVICES").is_ok_and(|v| v == "1") {
                panic!("Redis is required (CELERIAC_REQUIRE_SERVICES=1) but {url} is not reachable: {outcome:?}");
            }
            eprintln!("SKIPPED: Redis not reachable at {url}; set CELERIAC_REQUIRE_SERVICES=1 to make this a failure");
            return;
        }
    };
    store_contract(&store).await;
}

#[tokio::test]
async fn entries_come_from_the_config_and_from_code() {
    let app = crate::App::builder()
        .broker_url("memory://")
        .set("timezone", "America/New_York")
        .set(
            "beat_schedule",
            toml::Value::Table(
                toml::from_str("[a]\ntask = \"t.a\"\nevery = 5\n[b]\ntask = \"t.b\"\ncron = \"0 * * * *\"").unwrap(),
            ),
        )
        .beat_entry(Entry::new("b", "t.code", Schedule::every_secs(2.0).unwrap()))
        .build()
        .await
        .unwrap();
    let names: Vec<_> = app.beat_entries().iter().map(|e| (e.name.as_str(), e.task.as_str())).collect();
    assert_eq!(names, vec![("a", "t.a"), ("b", "t.code")], "code replaces a configured entry of the same name");
    assert_eq!(app.timezone(), chrono_tz::America::New_York);
    let err = crate::App::builder().broker_url("memory://").set("timezone", "Nowhere/Land").build().await.unwrap_err();
    assert!(err.to_string().contains("unknown time zone"), "{err}");
    let err = crate::App::builder()
        .broker_url("memory://")
        .set("beat_schedule", toml::Value::Table(toml::from_str("[x]\ntask = \"t\"\nevery = -1").unwrap()))
        .build()
        .await
        .unwrap_err();
    assert!(err.to_string().contains("beat_schedule.x") && err.to_string().contains("bad interval"), "{err}");
}
