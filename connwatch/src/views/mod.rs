//! Output formats: one module per view over the same flow, and the words and numbers
//! they share. `transitions` formats `trace` rows, `text` the `watch`/`snapshot` report
//! (human and JSON), `screen` the `top` screen, `metrics` the Prometheus exposition;
//! `reason` writes the sentence behind each flag, `format` the compact numbers.
pub mod format;
pub mod metrics;
pub mod reason;
pub mod screen;
pub mod text;
pub mod transitions;
