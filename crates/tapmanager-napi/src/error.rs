//! Maps core errors to JavaScript errors whose `code` is the core's stable code.

use std::future::Future;

use napi::bindgen_prelude::{PromiseRaw, ToNapiValue};
use napi::Env;
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
        Err(e) => Err(napi::Error::from(napi::JsError::from(to_js(e)).into_unknown(*env))),
    })
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
