//! Handing a received frame to JavaScript without making objects: the frame's bytes are copied into an
//! `Inbox`, memory that JavaScript sees as one long-lived Buffer, and the callback gets a few small numbers
//! (where the data ends, how many fds follow). Making an object with named properties and two Buffers from
//! native code per frame (property transitions, string lookups, an external backing store each) cost about as
//! much as the rest of a client's request on the JavaScript side.
//!
//! Layout written for one frame, at offset 0 of the inbox (or of a Buffer made for it when it does not fit):
//! the 77-byte header, the payload, then each fd as a little-endian i32.

use std::os::fd::IntoRawFd;
use std::ptr;
use std::sync::Arc;

use napi::bindgen_prelude::{BufferSlice, JsValuesTupleIntoVec, ToNapiValue};
use napi::{sys, Env};
use tapmanager_core::unix;

use crate::fd::UnixConnection;

/// Header bytes of a frame (the protocol's fixed size).
const HEADER: usize = 77;

/// What an inbox holds when JavaScript does not say (a get's response with its info is a few hundred bytes; a
/// bigger frame gets a Buffer of its own).
pub const INBOX_SIZE: usize = 64 * 1024;

/// Memory shared with JavaScript as a Buffer. Written only on the JavaScript thread, by the callbacks that then
/// hand JavaScript the offsets to read it at once, before anything else can run there.
pub struct Inbox {
    ptr: *mut u8,
    len: usize,
}

// SAFETY: the memory is only written and read on the JavaScript thread (see the type's doc); the Arc that owns
// it may be dropped on any thread, which only frees it.
unsafe impl Send for Inbox {}
// SAFETY: as above.
unsafe impl Sync for Inbox {}

impl Inbox {
    pub fn new(len: usize) -> Arc<Inbox> {
        let mem: Box<[u8]> = vec![0u8; len].into_boxed_slice();
        let ptr = Box::into_raw(mem).cast::<u8>();
        Arc::new(Inbox { ptr, len })
    }

    /// A Buffer over the inbox (it keeps the inbox alive until JavaScript collects it).
    pub fn to_js<'env>(self: &Arc<Self>, env: &'env Env) -> napi::Result<BufferSlice<'env>> {
        let keep = self.clone();
        // SAFETY: the memory stays valid while `keep` (moved into the finaliser) lives; JavaScript only reads it
        // in the callbacks' turn (see the type's doc).
        unsafe { BufferSlice::from_external(env, self.ptr, self.len, keep, |_, keep| drop(keep)) }
    }
}

impl Drop for Inbox {
    fn drop(&mut self) {
        // SAFETY: ptr/len came from Box::into_raw of a boxed slice of len bytes, freed once here.
        unsafe { drop(Box::from_raw(ptr::slice_from_raw_parts_mut(self.ptr, self.len))) };
    }
}

/// The callback arguments of a finished client request (see `FdRequestPort`):
/// - a frame: `(id, dataLen, nfds)` with the frame in the inbox, or `(id, dataLen, nfds, buffer)` with it in
///   `buffer` when it does not fit; `dataLen` is -2 for a frame without a payload (bad magic);
/// - an error: `(id, -1, 0, undefined, code, message, notSent)` (`notSent` only from a kept-open connection).
pub struct DoneArgs {
    pub id: u32,
    pub result: tapmanager_core::Result<unix::Frame>,
    pub not_sent: Option<bool>,
    pub inbox: Arc<Inbox>,
}

impl JsValuesTupleIntoVec for DoneArgs {
    fn into_vec(self, env: sys::napi_env) -> napi::Result<Vec<sys::napi_value>> {
        let id = self.id;
        let f = match self.result {
            Ok(f) => f,
            Err(e) => {
                // SAFETY: on the JavaScript thread of env (a callback's argument conversion).
                return unsafe {
                    Ok(vec![
                        u32::to_napi_value(env, id)?,
                        i32::to_napi_value(env, -1)?,
                        u32::to_napi_value(env, 0)?,
                        <()>::to_napi_value(env, ())?,
                        String::to_napi_value(env, e.code.as_str().to_string())?,
                        String::to_napi_value(env, e.message)?,
                        Option::<bool>::to_napi_value(env, self.not_sent)?,
                    ])
                };
            }
        };
        let nfds = f.fds.len();
        let fds: Vec<i32> = f.fds.into_iter().map(IntoRawFd::into_raw_fd).collect();
        // SAFETY: on the JavaScript thread of env (a callback's argument conversion).
        let (data_len, own) = match unsafe { hand_over(env, &self.inbox, &f.header, f.data.as_deref(), &fds) } {
            Ok(r) => r,
            Err(e) => {
                for fd in fds {
                    // SAFETY: the fds were ours (taken from the frame) and reach nobody now.
                    unsafe { libc::close(fd) };
                }
                return Err(e);
            }
        };
        // SAFETY: as above.
        unsafe {
            let mut args = vec![
                u32::to_napi_value(env, id)?,
                i32::to_napi_value(env, data_len)?,
                u32::to_napi_value(env, nfds as u32)?,
            ];
            if let Some(v) = own {
                args.push(v);
            }
            Ok(args)
        }
    }
}

/// Writes a frame for JavaScript (see the module's doc): `header` (77 bytes), the payload and `fds` into the
/// inbox, or into a new Buffer when they do not fit. Returns the payload's length (-2: none) and the Buffer made.
///
/// # Safety
/// On the JavaScript thread of `env`, in the turn of the callback that hands the result to JavaScript.
unsafe fn hand_over(
    env: sys::napi_env,
    inbox: &Inbox,
    header: &[u8],
    data: Option<&[u8]>,
    fds: &[i32],
) -> napi::Result<(i32, Option<sys::napi_value>)> {
    let payload = data.unwrap_or(&[]);
    let data_len: i32 = if data.is_some() { payload.len() as i32 } else { -2 };
    let need = HEADER + payload.len() + 4 * fds.len();
    // SAFETY: the caller's contract; the target has `need` bytes.
    unsafe {
        let (target, own) = if need <= inbox.len {
            (inbox.ptr, None)
        } else {
            let mut data_ptr = ptr::null_mut();
            let mut value = ptr::null_mut();
            let status = sys::napi_create_buffer(env, need, &mut data_ptr, &mut value);
            if status != sys::Status::napi_ok {
                return Err(napi::Error::new(napi::Status::from(status), "cannot make a Buffer for a frame"));
            }
            (data_ptr.cast::<u8>(), Some(value))
        };
        let mut head = [0u8; HEADER];
        let n = header.len().min(HEADER);
        head[..n].copy_from_slice(&header[..n]);
        ptr::copy_nonoverlapping(head.as_ptr(), target, HEADER);
        ptr::copy_nonoverlapping(payload.as_ptr(), target.add(HEADER), payload.len());
        for (i, fd) in fds.iter().enumerate() {
            let b = fd.to_le_bytes();
            ptr::copy_nonoverlapping(b.as_ptr(), target.add(HEADER + payload.len() + 4 * i), 4);
        }
        Ok((data_len, own))
    }
}

/// The callback arguments of a server connection's next request frame (see `FrameSink`): `(token, dataLen)` or
/// `(token, dataLen, buffer)` with the frame (no fds) as for a client's response, or `(token, -1, undefined,
/// message)` when there is none (EOF, deadline, error).
pub struct NextArgs {
    pub token: u32,
    pub result: tapmanager_core::Result<unix::Frame>,
    pub inbox: Arc<Inbox>,
}

impl JsValuesTupleIntoVec for NextArgs {
    fn into_vec(self, env: sys::napi_env) -> napi::Result<Vec<sys::napi_value>> {
        // SAFETY: on the JavaScript thread of env (a callback's argument conversion).
        unsafe {
            let token = u32::to_napi_value(env, self.token)?;
            match self.result {
                Ok(f) => {
                    let (data_len, own) = hand_over(env, &self.inbox, &f.header, f.data.as_deref(), &[])?;
                    let mut args = vec![token, i32::to_napi_value(env, data_len)?];
                    if let Some(v) = own {
                        args.push(v);
                    }
                    Ok(args)
                }
                Err(e) => Ok(vec![
                    token,
                    i32::to_napi_value(env, -1)?,
                    <()>::to_napi_value(env, ())?,
                    String::to_napi_value(env, e.message)?,
                ]),
            }
        }
    }
}

/// The callback arguments of a connection with its first request frame (see `UnixListener.startIncomingOnLoop`):
/// `(conn, dataLen)` or `(conn, dataLen, buffer)`, the frame as for `NextArgs`.
pub struct IncomingArgs {
    pub conn: UnixConnection,
    pub frame: unix::Frame,
    pub inbox: Arc<Inbox>,
}

impl JsValuesTupleIntoVec for IncomingArgs {
    fn into_vec(self, env: sys::napi_env) -> napi::Result<Vec<sys::napi_value>> {
        // SAFETY: on the JavaScript thread of env (a callback's argument conversion).
        unsafe {
            let conn = UnixConnection::to_napi_value(env, self.conn)?;
            let f = self.frame;
            let (data_len, own) = hand_over(env, &self.inbox, &f.header, f.data.as_deref(), &[])?;
            let mut args = vec![conn, i32::to_napi_value(env, data_len)?];
            if let Some(v) = own {
                args.push(v);
            }
            Ok(args)
        }
    }
}
