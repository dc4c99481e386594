//! Output formats: one module per view over the same flow, and the words and numbers
//! they share (`format`, `reason`).
pub mod format;
pub mod metrics;
pub mod reason;
pub mod report;
pub mod top;
pub mod trace;
