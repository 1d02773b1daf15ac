//! The `ferry connector` commands for connector authors: `new` scaffolds a
//! crate, `check` reports what ferry sees in a component, `dev` builds a
//! crate and serves it in a local ferry. `status` asks a running ferry for
//! its sync health.

pub mod check;
pub mod dev;
pub mod new;
pub mod status;
