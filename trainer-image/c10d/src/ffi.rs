//! The C functions of csrc/shim.h, and the one place they are called. Each call site states why
//! it is sound; the types above keep the pointers valid.

use std::ffi::{CStr, CString, c_char, c_int, c_void};

#[repr(C)]
pub struct RawStore {
    _private: [u8; 0],
}

#[repr(C)]
pub struct RawGroup {
    _private: [u8; 0],
}

unsafe extern "C" {
    fn c10d_tcp_store(
        host: *const c_char,
        port: u16,
        world: c_int,
        is_server: c_int,
        timeout_ms: i64,
        err: *mut c_char,
        err_len: usize,
    ) -> *mut RawStore;
    fn c10d_store_free(store: *mut RawStore);
    fn c10d_gloo_built_in() -> c_int;
    fn c10d_gloo_new(
        store: *mut RawStore,
        rank: c_int,
        world: c_int,
        device_kind: c_int,
        device_name: *const c_char,
        timeout_ms: i64,
        err: *mut c_char,
        err_len: usize,
    ) -> *mut RawGroup;
    fn c10d_nccl_built_in() -> c_int;
    fn c10d_nccl_new(
        store: *mut RawStore,
        rank: c_int,
        world: c_int,
        timeout_ms: i64,
        err: *mut c_char,
        err_len: usize,
    ) -> *mut RawGroup;
    fn c10d_group_free(group: *mut RawGroup);
    fn c10d_all_reduce_sum(
        group: *mut RawGroup,
        tensors: *const *mut c_void,
        n: usize,
        timeout_ms: i64,
        err: *mut c_char,
        err_len: usize,
    ) -> c_int;
    fn c10d_broadcast(
        group: *mut RawGroup,
        tensors: *const *mut c_void,
        n: usize,
        root: c_int,
        timeout_ms: i64,
        err: *mut c_char,
        err_len: usize,
    ) -> c_int;
    fn c10d_barrier(
        group: *mut RawGroup,
        timeout_ms: i64,
        err: *mut c_char,
        err_len: usize,
    ) -> c_int;
}

/// Room for a C++ exception message (longer ones are cut).
const ERR_LEN: usize = 4096;

/// A buffer for the shim's error message.
struct ErrBuf([c_char; ERR_LEN]);

impl ErrBuf {
    fn new() -> Self {
        ErrBuf([0; ERR_LEN])
    }
    fn ptr(&mut self) -> *mut c_char {
        self.0.as_mut_ptr()
    }
    fn message(&self) -> String {
        // SAFETY: the buffer starts zeroed and the shim always NUL-terminates within ERR_LEN.
        let s = unsafe { CStr::from_ptr(self.0.as_ptr()) };
        let s = s.to_string_lossy().into_owned();
        if s.is_empty() {
            "failed without a message".into()
        } else {
            s
        }
    }
}

pub fn gloo_built_in() -> bool {
    // SAFETY: no arguments, no state.
    unsafe { c10d_gloo_built_in() != 0 }
}

pub fn nccl_built_in() -> bool {
    // SAFETY: no arguments, no state.
    unsafe { c10d_nccl_built_in() != 0 }
}

pub fn tcp_store(
    host: &CString,
    port: u16,
    world: c_int,
    is_server: bool,
    timeout_ms: i64,
) -> Result<*mut RawStore, String> {
    let mut err = ErrBuf::new();
    // SAFETY: `host` is a valid C string for the call; `err` has ERR_LEN bytes.
    let p = unsafe {
        c10d_tcp_store(
            host.as_ptr(),
            port,
            world,
            c_int::from(is_server),
            timeout_ms,
            err.ptr(),
            ERR_LEN,
        )
    };
    if p.is_null() {
        Err(err.message())
    } else {
        Ok(p)
    }
}

/// # Safety
/// `store` came from [`tcp_store`] and is not used afterwards.
pub unsafe fn store_free(store: *mut RawStore) {
    // SAFETY: the caller's contract.
    unsafe { c10d_store_free(store) }
}

pub fn gloo_new(
    store: *mut RawStore,
    rank: c_int,
    world: c_int,
    device: (c_int, &CString),
    timeout_ms: i64,
) -> Result<*mut RawGroup, String> {
    let mut err = ErrBuf::new();
    // SAFETY: `store` is a live store (the caller holds a `Store`); the strings outlive the call.
    let p = unsafe {
        c10d_gloo_new(
            store,
            rank,
            world,
            device.0,
            device.1.as_ptr(),
            timeout_ms,
            err.ptr(),
            ERR_LEN,
        )
    };
    if p.is_null() {
        Err(err.message())
    } else {
        Ok(p)
    }
}

pub fn nccl_new(
    store: *mut RawStore,
    rank: c_int,
    world: c_int,
    timeout_ms: i64,
) -> Result<*mut RawGroup, String> {
    let mut err = ErrBuf::new();
    // SAFETY: `store` is a live store (the caller holds a `Store`).
    let p = unsafe { c10d_nccl_new(store, rank, world, timeout_ms, err.ptr(), ERR_LEN) };
    if p.is_null() {
        Err(err.message())
    } else {
        Ok(p)
    }
}

/// # Safety
/// `group` came from [`gloo_new`] or [`nccl_new`] and is not used afterwards.
pub unsafe fn group_free(group: *mut RawGroup) {
    // SAFETY: the caller's contract.
    unsafe { c10d_group_free(group) }
}

/// The `at::Tensor*` behind each tch tensor (torch-sys's `C_tensor` is that type).
fn tensor_ptrs(tensors: &mut [tch::Tensor]) -> Vec<*mut c_void> {
    tensors.iter_mut().map(|t| t.as_mut_ptr().cast()).collect()
}

pub fn all_reduce_sum(
    group: *mut RawGroup,
    tensors: &mut [tch::Tensor],
    timeout_ms: i64,
) -> Result<(), String> {
    let ptrs = tensor_ptrs(tensors);
    let mut err = ErrBuf::new();
    // SAFETY: `group` is live; `ptrs` point at the tensors borrowed mutably for the call, which the
    // shim only reads handles from (it writes through their shared storage).
    let rc = unsafe {
        c10d_all_reduce_sum(
            group,
            ptrs.as_ptr(),
            ptrs.len(),
            timeout_ms,
            err.ptr(),
            ERR_LEN,
        )
    };
    if rc == 0 { Ok(()) } else { Err(err.message()) }
}

pub fn broadcast(
    group: *mut RawGroup,
    tensors: &mut [tch::Tensor],
    root: c_int,
    timeout_ms: i64,
) -> Result<(), String> {
    let ptrs = tensor_ptrs(tensors);
    let mut err = ErrBuf::new();
    // SAFETY: as in `all_reduce_sum`.
    let rc = unsafe {
        c10d_broadcast(
            group,
            ptrs.as_ptr(),
            ptrs.len(),
            root,
            timeout_ms,
            err.ptr(),
            ERR_LEN,
        )
    };
    if rc == 0 { Ok(()) } else { Err(err.message()) }
}

pub fn barrier(group: *mut RawGroup, timeout_ms: i64) -> Result<(), String> {
    let mut err = ErrBuf::new();
    // SAFETY: `group` is live; `err` has ERR_LEN bytes.
    let rc = unsafe { c10d_barrier(group, timeout_ms, err.ptr(), ERR_LEN) };
    if rc == 0 { Ok(()) } else { Err(err.message()) }
}
