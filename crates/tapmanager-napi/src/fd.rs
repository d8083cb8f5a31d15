//! Placeholder: filled in by the fd work.
use napi_derive::napi;

/// Returns the version of the native addon (a smoke test of the binding).
#[napi]
pub fn native_version() -> String {
    env!("CARGO_PKG_VERSION").to_string()
}
