//! Sends canvases built in Rust to Python Celery workers (and mixed Python/Rust workflows) and
//! prints the result as JSON, for the interop tests in `tests/interop/`.
//!
//! ```text
//! interop_client <broker-url> <scenario>
//! ```
//! Scenarios: `chain` (py.add → py.mul → py.add), `group` (py.add ×3), `chord` (py.add ×3 →
//! py.tsum), `mixed_chain` (rust.add → py.mul → rust.add, queues `rust` and `python`),
//! `link` (py.add linked to py.mul).

use anyhow::{Context, bail};
use celeriac::canvas::{chain, chord, group};
use celeriac::{App, Signature};
use serde_json::Value;
use std::time::Duration;

fn py(name: &str, args: &[i64]) -> Signature {
    Signature::new(format!("py.{name}"), args.iter().map(|a| (*a).into()).collect()).queue("python")
}

fn rust(name: &str, args: &[i64]) -> Signature {
    Signature::new(format!("rust.{name}"), args.iter().map(|a| (*a).into()).collect()).queue("rust")
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let url = args.next().context("usage: interop_client <broker-url> <scenario>")?;
    let scenario = args.next().context("usage: interop_client <broker-url> <scenario>")?;
    let app = App::builder().broker_url(&url).result_backend(&url).build().await?;
    let wait = Duration::from_secs(30);
    let value: Value = match scenario.as_str() {
        "chain" => chain([py("add", &[1, 1]), py("mul", &[10]), py("add", &[5])]).delay(&app).await?.get(wait).await?,
        "group" => {
            let g = group((0..3).map(|i| py("add", &[i, i]))).delay(&app).await?;
            let members = app.group_result(g.id()).await?.context("group recorded")?;
            Value::from(members.join::<Value>(wait).await?)
        }
        "chord" => chord((0..3).map(|i| py("add", &[i, i])), py("tsum", &[])).delay(&app).await?.get(wait).await?,
        "mixed_chain" => {
            chain([rust("add", &[1, 1]), py("mul", &[10]), rust("add", &[5])]).delay(&app).await?.get(wait).await?
        }
        "link" => {
            let r = py("add", &[2, 3]).link(py("mul", &[10])).delay(&app).await?;
            let first: Value = r.get(wait).await?;
            // The callback's id is in the parent's children once the parent finished.
            let child = r.children().await?.into_iter().next().context("the link ran as a child")?;
            serde_json::json!([first, child.get::<Value>(wait).await?])
        }
        other => bail!("unknown scenario {other:?}"),
    };
    println!("{value}");
    Ok(())
}
