//! Maps core errors to JavaScript errors whose `code` is the core's stable code.

use std::future::Future;
use std::panic::{catch_unwind, AssertUnwindSafe};

use napi::bindgen_prelude::{PromiseRaw, ToNapiValue, TypeName};
use napi::{Env, Task};
use tapmanager_core::{Error as CoreError, ErrorCode, Result as CoreResult};

/// A status type carrying the stable code; napi-rs puts `AsRef<str>` of the status into `err.code`.
#[derive(Debug, Clone)]
pub struct Code(pub String);

impl AsRef<str> for Code {
    fn as_ref(&self) -> &str {
        &self.0
    }
}

impl From<napi::Status> for Code {
    fn from(s: napi::Status) -> Self {
        Code(s.as_ref().to_string())
    }
}

/// The binding's error type.
pub type JsError = napi::Error<Code>;

/// The binding's result type.
#[allow(dead_code)]
pub type JsResult<T> = std::result::Result<T, JsError>;

/// Converts a core error into a JavaScript error with `err.code`.
#[allow(dead_code)]
pub fn to_js(e: CoreError) -> JsError {
    napi::Error::new(Code(e.code.as_str().to_string()), e.message)
}

/// Builds an `ERR_INVALID` error for bad arguments from JavaScript.
#[allow(dead_code)]
pub fn invalid(msg: impl Into<String>) -> JsError {
    napi::Error::new(Code("ERR_INVALID".to_string()), msg.into())
}

/// Runs a core future on napi's tokio runtime and returns its Promise, settled on the JavaScript thread with
/// `done(value)`. A core error rejects the Promise with a JavaScript `Error` whose `code` is the core's stable
/// code (async exports cannot return `napi::Error<Code>` directly, and napi's own `Error` could only carry a
/// napi status as code, so the error object is built in the completion callback).
pub fn spawn_future_promise<'env, T, V, F, C>(env: &'env Env, fut: F, done: C) -> napi::Result<PromiseRaw<'env, V>>
where
    T: Send + 'static,
    V: ToNapiValue,
    F: Future<Output = CoreResult<T>> + Send + 'static,
    C: FnOnce(T) -> V + 'static,
{
    env.spawn_future_with_callback(async move { Ok(fut.await) }, move |env, r| match r {
        Ok(t) => Ok(done(t)),
        Err(e) => Err(rejection(env, e)),
    })
}

/// A core error as the value a Promise rejects with: a JavaScript `Error` with the core's `code`, made on the
/// JavaScript thread (napi hands a retained value back as it is).
fn rejection(env: &Env, e: CoreError) -> napi::Error {
    napi::Error::from(napi::JsError::from(to_js(e)).into_unknown(*env))
}

/// [`spawn_future_promise`] of a future that already yields the JavaScript value.
pub fn future_promise<'env, V, F>(env: &'env Env, fut: F) -> napi::Result<PromiseRaw<'env, V>>
where
    V: ToNapiValue + Send + 'static,
    F: Future<Output = CoreResult<V>> + Send + 'static,
{
    spawn_future_promise(env, fut, |v| v)
}

/// Runs blocking core work (a thread entering a netns, ioctls, an nf_tables batch) on tokio's blocking pool,
/// which never enters a namespace itself. A failed task (a panic) is an `ERR_IO` error.
pub async fn blocking<T, F>(work: F) -> CoreResult<T>
where
    T: Send + 'static,
    F: FnOnce() -> CoreResult<T> + Send + 'static,
{
    match tokio::task::spawn_blocking(work).await {
        Ok(r) => r,
        Err(e) => Err(CoreError::new(ErrorCode::Io, format!("blocking task failed: {e}"))),
    }
}

/// [`spawn_future_promise`] of blocking core work run with [`blocking`].
pub fn spawn_blocking_promise<'env, T, V, W, C>(env: &'env Env, work: W, done: C) -> napi::Result<PromiseRaw<'env, V>>
where
    T: Send + 'static,
    V: ToNapiValue,
    W: FnOnce() -> CoreResult<T> + Send + 'static,
    C: FnOnce(T) -> V + 'static,
{
    spawn_future_promise(env, blocking(work), done)
}

/// Short blocking core work (a few syscalls: a file write and its fsyncs) as a napi `AsyncTask` on libuv's thread
/// pool, where Node's own `fs` calls run: one hand-off to a pool thread and one completion on the JavaScript
/// thread, two thread wake-ups in all (the tokio path, [`spawn_blocking_promise`], also wakes a runtime worker on
/// either side of the blocking thread: a state record write took 10-20% longer there at p50). A core error
/// rejects the Promise with an `Error` whose `code` is the core's stable code; a panic is an `ERR_IO` error.
/// Work that waits long (netns threads, netlink) belongs on tokio's blocking pool instead: libuv's has 4 threads.
pub struct UvTask<T> {
    work: Option<Box<dyn FnOnce() -> CoreResult<T> + Send>>,
}

impl<T> UvTask<T> {
    /// The task that runs `work` on a pool thread.
    pub fn new(work: impl FnOnce() -> CoreResult<T> + Send + 'static) -> UvTask<T> {
        UvTask { work: Some(Box::new(work)) }
    }
}

impl<T: ToNapiValue + TypeName + Send + 'static> Task for UvTask<T> {
    type Output = CoreResult<T>;
    type JsValue = T;

    fn compute(&mut self) -> napi::Result<CoreResult<T>> {
        let Some(work) = self.work.take() else {
            return Ok(Err(CoreError::new(ErrorCode::Io, "blocking task run twice")));
        };
        // A panic must not unwind into libuv's C frames (that aborts the process).
        Ok(catch_unwind(AssertUnwindSafe(work))
            .unwrap_or_else(|_| Err(CoreError::new(ErrorCode::Io, "blocking task failed: it panicked"))))
    }

    fn resolve(&mut self, env: Env, output: CoreResult<T>) -> napi::Result<T> {
        output.map_err(|e| rejection(&env, e))
    }
}
