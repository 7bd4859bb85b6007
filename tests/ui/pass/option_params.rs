//! `Option<T>` parameters: optional arguments that may be left out of a call.

use celeriac::{TaskResult, task};

#[task]
async fn greet(name: String, greeting: Option<String>, times: Option<u32>) -> TaskResult<String> {
    let greeting = greeting.unwrap_or_else(|| "hello".to_owned());
    Ok(vec![format!("{greeting}, {name}"); times.unwrap_or(1) as usize].join("; "))
}

fn main() {
    let runtime = tokio::runtime::Builder::new_current_thread().build().expect("a runtime");
    let once = runtime.block_on(greet::call("ada".into(), None, None)).ok();
    assert_eq!(once.as_deref(), Some("hello, ada"));
    let twice = runtime.block_on(greet::call("ada".into(), Some("hi".into()), Some(2))).ok();
    assert_eq!(twice.as_deref(), Some("hi, ada; hi, ada"));
    let signature = greet::s("ada".into(), None, Some(3));
    assert_eq!(signature.args, [serde_json::json!("ada"), serde_json::Value::Null, serde_json::json!(3)]);
}
