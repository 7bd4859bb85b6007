//! Shared by the peer benches: command-line flags and the JSON line each prints.

use std::time::Duration;

/// `--url redis://...` and `--n N` from the command line.
pub struct Args {
    pub url: String,
    pub n: usize,
}

impl Args {
    pub fn parse() -> Args {
        let mut url = "redis://127.0.0.1:6379/12".to_owned();
        let mut n = 100_000;
        let mut it = std::env::args().skip(1);
        while let Some(flag) = it.next() {
            let value = it.next().unwrap_or_else(|| panic!("{flag} needs a value"));
            match flag.as_str() {
                "--url" => url = value,
                "--n" => n = value.parse().expect("--n takes a number"),
                other => panic!("unknown flag {other}"),
            }
        }
        Args { url, n }
    }
}

/// Prints the figure as one JSON line, the shape `compare_table.py` reads.
pub fn report(peer: &str, n: usize, enqueue: Duration, burn: Duration) {
    println!(
        "{{\"peer\":\"{peer}\",\"scenario\":\"{peer} no-op\",\"tasks\":{n},\"enqueue_per_s\":{:.1},\"tasks_per_s\":{:.1},\"worker_rss_mib\":{:.1}}}",
        n as f64 / enqueue.as_secs_f64(),
        n as f64 / burn.as_secs_f64(),
        rss_mib()
    );
}

/// Peak resident set of this process (producer and worker run in one process here).
pub fn rss_mib() -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1).and_then(|k| k.parse::<f64>().ok()))
        })
        .map_or(0.0, |kib| kib / 1024.0)
}

/// Prints progress to stderr every 5 s, and gives up (exit 1) when nothing moved for 30 s, so
/// a stalled peer shows where it stopped instead of hanging the comparison.
pub fn watch(done: &'static std::sync::atomic::AtomicUsize, n: usize) {
    std::thread::spawn(move || {
        let (mut last, mut still) = (0, 0);
        loop {
            std::thread::sleep(Duration::from_secs(5));
            let now = done.load(std::sync::atomic::Ordering::Relaxed);
            eprintln!("{now} of {n} done");
            still = if now == last { still + 5 } else { 0 };
            last = now;
            if still >= 30 {
                eprintln!("stalled at {now} of {n} for 30 s; giving up");
                std::process::exit(1);
            }
        }
    });
}
