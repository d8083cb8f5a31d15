//! Atomic, durable file replacement and removal (core `durable` module) for the state store and the CNI cache:
//! each call is one hand-off to a libuv pool thread (an `AsyncTask`, where Node's own `fs` calls ran them before)
//! that does every syscall, and one completion. A failure rejects with an `Error` whose `code` is the core's
//! stable code and whose message names the step and the path.

use std::path::PathBuf;

use napi::bindgen_prelude::{AsyncTask, Buffer, Either};
use napi_derive::napi;
use tapmanager_core::durable::{self, Durability};

use crate::error::UvTask;

/// Options of `replaceFile`.
#[napi(object)]
#[derive(Debug, Clone, Default)]
pub struct ReplaceFileOptions {
    /// fsync the file before the rename and the dir after it (default true): once the Promise resolves the new
    /// file survives a power loss. `false`: atomic only (a reader or a killed process never sees a torn file).
    pub durable: Option<bool>,
}

/// Atomically replaces `dir/name` with `data`: writes `dir/tempName` (created `O_EXCL|O_NOFOLLOW`, mode 0600),
/// fsyncs and closes it, renames it over `name` (a symlink there is replaced, not followed) and fsyncs `dir`.
/// A missing `dir` is created (mode 0700, with its parents). On failure the temp file is removed (an entry
/// already at `tempName` fails with `ERR_EXISTS` and is left). `name` and `tempName` are plain file names.
#[napi(ts_return_type = "Promise<void>")]
pub fn replace_file(
    dir: String,
    name: String,
    temp_name: String,
    data: Either<String, Buffer>,
    opts: Option<ReplaceFileOptions>,
) -> AsyncTask<UvTask<()>> {
    let data = match data {
        Either::A(s) => s.into_bytes(),
        Either::B(b) => b.to_vec(),
    };
    let durability = match opts.and_then(|o| o.durable) {
        Some(false) => Durability::Atomic,
        _ => Durability::Durable,
    };
    AsyncTask::new(UvTask::new(move || {
        durable::replace_file(&PathBuf::from(dir), &name, &temp_name, &data, durability)
    }))
}

/// Removes `dir/name` (the entry itself, a symlink is not followed) and fsyncs `dir`. Resolves to `false` when
/// there was none (or no `dir`), `true` once it is removed durably.
#[napi(ts_return_type = "Promise<boolean>")]
pub fn remove_file(dir: String, name: String) -> AsyncTask<UvTask<bool>> {
    AsyncTask::new(UvTask::new(move || durable::remove_file(&PathBuf::from(dir), &name)))
}
