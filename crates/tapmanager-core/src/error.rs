//! The error type shared by every module of the core, with a stable string code per condition.
//!
//! The code travels to JavaScript as `err.code` (see the binding crate), so callers branch on codes,
//! never on messages. Add a variant with context rather than reusing a vague one.

use std::io;

/// Stable, documented error codes. Their string forms are part of the public API.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorCode {
    /// The thing asked for does not exist (netns, link, key, file).
    NotFound,
    /// The thing to create exists already.
    Exists,
    /// The resource is held by someone else (a tap attached to a VM).
    Busy,
    /// The caller is not allowed to do this (EPERM/EACCES, or a refused peer).
    Permission,
    /// The input is malformed or out of bounds.
    Invalid,
    /// An operation did not finish in time.
    Timeout,
    /// The peer closed the connection, or the object was closed.
    Closed,
    /// Input larger than the configured limit.
    TooLarge,
    /// Netlink answered an error not covered by a more precise code.
    Netlink,
    /// Any other operating-system error.
    Io,
    /// An SR-IOV VF has no IOMMU group (the IOMMU is off), so vfio-pci cannot take it.
    SriovNoIommuGroup,
    /// The vfio-pci driver is not loaded.
    SriovNoVfio,
    /// An SR-IOV VF is taken already (bound to vfio-pci, or overridden to another driver).
    SriovVfInUse,
    /// The PF of an SR-IOV VF (its device or its netdev) is not found.
    SriovPfNotFound,
    /// Container-side setup found a Calico link with a default route via 169.254.1.1 but was given no dummy
    /// network gateway. Nothing was changed: the caller gets the gateway (CNI's dummy network) and calls again.
    NeedsDummyGateway,
}

impl ErrorCode {
    /// The stable string form, e.g. `ERR_NOT_FOUND`.
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCode::NotFound => "ERR_NOT_FOUND",
            ErrorCode::Exists => "ERR_EXISTS",
            ErrorCode::Busy => "ERR_BUSY",
            ErrorCode::Permission => "ERR_PERMISSION",
            ErrorCode::Invalid => "ERR_INVALID",
            ErrorCode::Timeout => "ERR_TIMEOUT",
            ErrorCode::Closed => "ERR_CLOSED",
            ErrorCode::TooLarge => "ERR_TOO_LARGE",
            ErrorCode::Netlink => "ERR_NETLINK",
            ErrorCode::Io => "ERR_IO",
            ErrorCode::SriovNoIommuGroup => "ERR_SRIOV_NO_IOMMU_GROUP",
            ErrorCode::SriovNoVfio => "ERR_SRIOV_NO_VFIO",
            ErrorCode::SriovVfInUse => "ERR_SRIOV_VF_IN_USE",
            ErrorCode::SriovPfNotFound => "ERR_SRIOV_PF_NOT_FOUND",
            ErrorCode::NeedsDummyGateway => "ERR_NEEDS_DUMMY_GATEWAY",
        }
    }

    /// The code an errno maps to.
    pub fn from_errno(errno: i32) -> ErrorCode {
        match errno {
            libc::ENOENT | libc::ENODEV | libc::ESRCH | libc::ENXIO | libc::EADDRNOTAVAIL => ErrorCode::NotFound,
            libc::EEXIST | libc::EADDRINUSE => ErrorCode::Exists,
            libc::EBUSY => ErrorCode::Busy,
            libc::EPERM | libc::EACCES => ErrorCode::Permission,
            libc::EINVAL | libc::E2BIG | libc::ERANGE => ErrorCode::Invalid,
            libc::ETIMEDOUT => ErrorCode::Timeout,
            libc::EPIPE | libc::ECONNRESET | libc::ENOTCONN | libc::EBADF => ErrorCode::Closed,
            _ => ErrorCode::Io,
        }
    }
}

impl std::fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The core's error: a code plus a message that says what was being done.
#[derive(Debug, thiserror::Error)]
#[error("{message}")]
pub struct Error {
    /// The stable code.
    pub code: ErrorCode,
    /// What was being done and what went wrong, e.g. `create tap "tap0": Device or resource busy (os error 16)`.
    pub message: String,
}

impl Error {
    /// An error with an explicit code.
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Error {
        Error { code, message: message.into() }
    }

    /// An `ERR_INVALID` error.
    pub fn invalid(message: impl Into<String>) -> Error {
        Error::new(ErrorCode::Invalid, message)
    }

    /// Wraps an OS error with what was being done; the code follows the errno.
    pub fn io(context: impl std::fmt::Display, err: io::Error) -> Error {
        let code = match err.kind() {
            io::ErrorKind::TimedOut => ErrorCode::Timeout,
            io::ErrorKind::UnexpectedEof => ErrorCode::Closed,
            _ => err.raw_os_error().map(ErrorCode::from_errno).unwrap_or(ErrorCode::Io),
        };
        Error::new(code, format!("{context}: {err}"))
    }

    /// Wraps a nix errno with what was being done.
    pub fn errno(context: impl std::fmt::Display, err: nix::errno::Errno) -> Error {
        Error::new(ErrorCode::from_errno(err as i32), format!("{context}: {}", err.desc()))
    }

    /// Prefixes the message with more context, keeping the code.
    pub fn context(self, context: impl std::fmt::Display) -> Error {
        Error { code: self.code, message: format!("{context}: {}", self.message) }
    }
}

/// The core's result type.
pub type Result<T> = std::result::Result<T, Error>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errno_codes_are_stable() {
        assert_eq!(ErrorCode::from_errno(libc::EBUSY).as_str(), "ERR_BUSY");
        assert_eq!(ErrorCode::from_errno(libc::ENODEV).as_str(), "ERR_NOT_FOUND");
        assert_eq!(ErrorCode::from_errno(libc::EEXIST).as_str(), "ERR_EXISTS");
        let e = Error::io("open tap", io::Error::from_raw_os_error(libc::EBUSY));
        assert_eq!(e.code, ErrorCode::Busy);
        assert!(e.message.starts_with("open tap: "));
        assert_eq!(e.context("pod p1").message.split(':').next(), Some("pod p1"));
    }
}
