//! Compile-time behaviour of `#[celeriac::task]`, checked with `trybuild`.
//!
//! `tests/ui/fail/*.rs` must not compile, and each must fail with the message recorded beside
//! it in a `.stderr` file: these are the errors a user sees, so they say what to write instead.
//! `tests/ui/pass/*.rs` must compile and run (their `main` asserts what the macro generated).
//!
//! After changing a message on purpose, regenerate the snapshots with
//! `TRYBUILD=overwrite cargo test -p celeriac --test macro_ui` and read the diff.
//!
//! Not for: running tasks on a worker (see `worker_basics.rs`).

#![allow(clippy::unwrap_used, clippy::expect_used)]

#[test]
fn task_macro_ui() {
    let cases = trybuild::TestCases::new();
    // Paths are relative to the `celeriac` crate's manifest directory.
    cases.compile_fail("../../tests/ui/fail/*.rs");
    cases.pass("../../tests/ui/pass/*.rs");
}
