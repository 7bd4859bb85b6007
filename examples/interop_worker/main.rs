//! Placeholder, replaced by the interop worker.
fn main() {}
