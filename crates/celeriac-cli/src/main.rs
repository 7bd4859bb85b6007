//! The `celeriac` command for operations that need no task code: `call` (by name), `result`,
//! `purge`, `dlq`, `inspect`, and a `worker` with no tasks of its own (which dead-letters
//! everything it receives as unknown, so prefer a worker built with `celeriac::cli::main`).

fn main() -> std::process::ExitCode {
    celeriac::cli::run_without_tasks()
}
