//! The thin N-API binding of tapmanager-core: no logic of its own, only conversions.
//! One module per area of the core.
#![deny(clippy::undocumented_unsafe_blocks)]
// Under `cargo test`/`clippy --all-targets` napi-derive does not register exports, so they look unused.
#![cfg_attr(test, allow(dead_code))]

mod container;
mod dhcp;
mod durable;
mod error;
mod fd;
mod inbox;
mod net;
mod uvwait;
