//! Output formats: one module per view over the same flow.
pub mod report;
pub mod trace;
