//! Maps core errors to JavaScript errors whose `code` is the core's stable code.

use tapmanager_core::Error as CoreError;

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
