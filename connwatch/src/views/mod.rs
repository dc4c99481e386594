//! Output formats: one module per view over the same flow, and the words and numbers
//! they share. `transitions` formats `trace` rows, `text` the `watch`/`snapshot` report
//! (human and JSON), `screen` the `top` screen, `metrics` the Prometheus exposition;
//! `reason` writes the sentence behind each flag, `format` the compact numbers,
//! `row_buf` the rows `trace` writes by the hundred thousand.
pub mod metrics;
mod row_buf;
pub mod screen;
pub mod text;
pub mod transitions;
