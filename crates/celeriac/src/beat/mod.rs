//! Beat: sends tasks on a schedule, from any number of instances, each tick exactly once.
//!
//! - [`schedule`]: Celery's `crontab`, intervals, one-off times; time zones and DST.
//! - [`entry`]: what to send (task, arguments, queue, options, missed-tick policy), in code
//!   or from the `[beat_schedule.<name>]` tables of the config.
//! - [`store`]: the lease with a fencing token and the last sent tick per entry, in the
//!   broker (Redis keys, SQLite rows) or in memory.
//! - [`leader`]: the loop that holds the lease and sends.
//!
//! ```
//! use celeriac::beat::{Entry, Missed, crontab};
//! # fn main() -> Result<(), celeriac::beat::ScheduleError> {
//! let nightly = Entry::new("nightly", "reports.nightly", crontab("30", "2", "mon-fri", "*", "*")?)
//!     .timezone(celeriac::beat::tz::Europe::Berlin)
//!     .queue("reports")
//!     .missed(Missed::RunOnce);
//! # let _ = nightly; Ok(()) }
//! ```

pub mod entry;
pub mod leader;
pub mod schedule;
pub mod store;

/// Time zones (`tz::Europe::Berlin`), re-exported from `chrono-tz`.
pub use chrono_tz as tz;
pub use entry::{Entry, EntryError, Missed, entries_from_config};
pub use leader::{Beat, BeatError, BeatOptions, EntryStatus};
pub use schedule::{Crontab, Schedule, ScheduleError, crontab, parse_tz};
pub use store::{BeatStore, Claim, LastSent, Leader, StoreError};

#[cfg(test)]
mod tests;
