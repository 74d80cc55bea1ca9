//! Stream capture and CUDA graphs: while a stream captures, its kernel launches, memsets,
//! device-to-device copies and cuBLAS GEMMs (on a handle bound to it) are recorded (a launch's parameter struct copied by value, as the
//! driver copies it) instead of run; an instantiated graph replays them in order on the stream it
//! is launched on. While a stream captures, the calls a graph cannot hold are refused on the thread
//! that began the capture, and the capture invalidated, as the driver does (its thread-local capture
//! mode; other threads, the suite's other tests, are left alone): synchronizations (stream,
//! context, event), allocations and frees, and copies from or to the host. That is how the suite
//! checks, without a GPU, that a call is capturable.

use crate::kernels::{self, Function};
use crate::{fail, stream_ok};
use cudarc::driver::sys::{CUgraph, CUgraphExec, CUresult, CUstream, CUstreamCaptureStatus};
use std::collections::HashMap;
use std::ffi::{c_uint, c_void};
use std::sync::Mutex;

/// One recorded operation.
#[derive(Clone)]
pub(crate) enum Node {
    Launch {
        f: usize,
        grid: [c_uint; 3],
        block: [c_uint; 3],
        params: Vec<u8>,
    },
    Memset {
        dst: u64,
        value: u32,
        width: usize,
        n: usize,
    },
    Copy {
        dst: u64,
        src: u64,
        n: usize,
    },
    /// A cuBLAS GEMM on the capturing stream.
    Gemm(crate::blas::Gemm),
}

struct Capture {
    thread: std::thread::ThreadId,
    nodes: Vec<Node>,
    /// The first refused call, if any: the capture is invalidated.
    invalidated: Option<String>,
}

static CAPTURES: Mutex<Option<HashMap<usize, Capture>>> = Mutex::new(None);

fn with_captures<R>(f: impl FnOnce(&mut HashMap<usize, Capture>) -> R) -> R {
    let mut g = CAPTURES.lock().unwrap_or_else(|e| e.into_inner());
    f(g.get_or_insert_with(HashMap::new))
}

/// Whether `s` is capturing.
pub(crate) fn capturing(s: CUstream) -> bool {
    with_captures(|c| c.contains_key(&(s as usize)))
}

/// Records `node` when `s` captures (true), else false (the caller runs it).
pub(crate) fn record(s: CUstream, node: impl FnOnce() -> Node) -> bool {
    with_captures(|c| match c.get_mut(&(s as usize)) {
        Some(cap) => {
            cap.nodes.push(node());
            true
        }
        None => false,
    })
}

/// Refuses `what` while a capture this thread began is active, invalidating it.
pub(crate) fn refuse_while_capturing(what: &str) -> Result<(), CUresult> {
    let me = std::thread::current().id();
    let refused = with_captures(|c| {
        let mut any = false;
        for cap in c.values_mut().filter(|cap| cap.thread == me) {
            cap.invalidated.get_or_insert_with(|| what.to_string());
            any = true;
        }
        any
    });
    if refused {
        Err(fail(
            CUresult::CUDA_ERROR_STREAM_CAPTURE_UNSUPPORTED,
            format!("{what} while a stream is capturing (not allowed in a CUDA graph)"),
        ))
    } else {
        Ok(())
    }
}

/// The launch's parameter struct, copied (its size from the kernel's table).
pub(crate) unsafe fn launch_node(
    f: *const Function,
    grid: [c_uint; 3],
    block: [c_uint; 3],
    params: *mut *mut c_void,
) -> Result<Node, CUresult> {
    let size = kernels::params_size(f)?;
    if params.is_null() || (*params).is_null() {
        return Err(fail(
            CUresult::CUDA_ERROR_INVALID_VALUE,
            "a captured launch without its parameter struct".into(),
        ));
    }
    let bytes = std::slice::from_raw_parts(*params as *const u8, size).to_vec();
    Ok(Node::Launch {
        f: f as usize,
        grid,
        block,
        params: bytes,
    })
}

unsafe fn run(node: &Node) -> CUresult {
    match node {
        Node::Launch {
            f,
            grid,
            block,
            params,
        } => {
            // the copy is aligned like any Vec<u8>, and the kernels' structs need 8 bytes: copy
            // into u64 words
            let mut words = vec![0u64; params.len().div_ceil(8)];
            std::ptr::copy_nonoverlapping(
                params.as_ptr(),
                words.as_mut_ptr() as *mut u8,
                params.len(),
            );
            let mut p = words.as_mut_ptr() as *mut c_void;
            kernels::launch(
                *f as *const Function,
                *grid,
                *block,
                0,
                &mut p,
                std::ptr::null_mut(),
            )
        }
        Node::Memset {
            dst,
            value,
            width,
            n,
        } => {
            if let Err(code) =
                crate::memory::check_range(*dst, n * width, "graph memset destination")
            {
                return code;
            }
            for i in 0..*n {
                if *width == 1 {
                    *(*dst as *mut u8).add(i) = *value as u8;
                } else {
                    *(*dst as *mut u32).add(i) = *value;
                }
            }
            CUresult::CUDA_SUCCESS
        }
        Node::Copy { dst, src, n } => {
            if let Err(code) = crate::memory::check_range(*dst, *n, "graph copy destination") {
                return code;
            }
            if let Err(code) = crate::memory::check_range(*src, *n, "graph copy source") {
                return code;
            }
            std::ptr::copy(*src as *const u8, *dst as *mut u8, *n);
            CUresult::CUDA_SUCCESS
        }
        Node::Gemm(g) => {
            if g.run() {
                CUresult::CUDA_SUCCESS
            } else {
                CUresult::CUDA_ERROR_ILLEGAL_ADDRESS
            }
        }
    }
}

struct Graph {
    nodes: Vec<Node>,
}

#[no_mangle]
pub unsafe extern "C" fn cuStreamBeginCapture_v2(s: CUstream, _mode: c_uint) -> CUresult {
    if let Err(code) = stream_ok(s) {
        return code;
    }
    if s.is_null() {
        return fail(
            CUresult::CUDA_ERROR_STREAM_CAPTURE_UNSUPPORTED,
            "cuStreamBeginCapture on the legacy default stream".into(),
        );
    }
    let started = with_captures(|c| {
        if c.contains_key(&(s as usize)) {
            return false;
        }
        c.insert(
            s as usize,
            Capture {
                thread: std::thread::current().id(),
                nodes: Vec::new(),
                invalidated: None,
            },
        );
        true
    });
    if started {
        CUresult::CUDA_SUCCESS
    } else {
        fail(
            CUresult::CUDA_ERROR_ILLEGAL_STATE,
            format!("cuStreamBeginCapture: stream {s:p} is already capturing"),
        )
    }
}

#[no_mangle]
pub unsafe extern "C" fn cuStreamEndCapture(s: CUstream, graph: *mut CUgraph) -> CUresult {
    if graph.is_null() {
        return CUresult::CUDA_ERROR_INVALID_VALUE;
    }
    let Some(cap) = with_captures(|c| c.remove(&(s as usize))) else {
        return fail(
            CUresult::CUDA_ERROR_ILLEGAL_STATE,
            format!("cuStreamEndCapture: stream {s:p} is not capturing"),
        );
    };
    if let Some(why) = cap.invalidated {
        *graph = std::ptr::null_mut();
        return fail(
            CUresult::CUDA_ERROR_STREAM_CAPTURE_INVALIDATED,
            format!("cuStreamEndCapture: the capture was invalidated by {why}"),
        );
    }
    *graph = Box::into_raw(Box::new(Graph { nodes: cap.nodes })) as CUgraph;
    CUresult::CUDA_SUCCESS
}

#[no_mangle]
pub unsafe extern "C" fn cuStreamIsCapturing(
    s: CUstream,
    status: *mut CUstreamCaptureStatus,
) -> CUresult {
    if status.is_null() {
        return CUresult::CUDA_ERROR_INVALID_VALUE;
    }
    *status = if capturing(s) {
        CUstreamCaptureStatus::CU_STREAM_CAPTURE_STATUS_ACTIVE
    } else {
        CUstreamCaptureStatus::CU_STREAM_CAPTURE_STATUS_NONE
    };
    CUresult::CUDA_SUCCESS
}

#[no_mangle]
pub unsafe extern "C" fn cuGraphInstantiateWithFlags(
    exec: *mut CUgraphExec,
    graph: CUgraph,
    _flags: u64,
) -> CUresult {
    if exec.is_null() || graph.is_null() {
        return CUresult::CUDA_ERROR_INVALID_VALUE;
    }
    let g = &*(graph as *const Graph);
    *exec = Box::into_raw(Box::new(Graph {
        nodes: g.nodes.clone(),
    })) as CUgraphExec;
    CUresult::CUDA_SUCCESS
}

#[no_mangle]
pub unsafe extern "C" fn cuGraphLaunch(exec: CUgraphExec, s: CUstream) -> CUresult {
    if let Err(code) = stream_ok(s) {
        return code;
    }
    if exec.is_null() {
        return CUresult::CUDA_ERROR_INVALID_HANDLE;
    }
    if capturing(s) {
        return fail(
            CUresult::CUDA_ERROR_STREAM_CAPTURE_UNSUPPORTED,
            "cuGraphLaunch on a capturing stream (not emulated)".into(),
        );
    }
    crate::counters::bump(crate::counters::Counter::GraphLaunches);
    for node in &(*(exec as *const Graph)).nodes {
        let r = run(node);
        if r != CUresult::CUDA_SUCCESS {
            return r;
        }
    }
    CUresult::CUDA_SUCCESS
}

#[no_mangle]
pub unsafe extern "C" fn cuGraphUpload(exec: CUgraphExec, s: CUstream) -> CUresult {
    if let Err(code) = stream_ok(s) {
        return code;
    }
    if exec.is_null() {
        return CUresult::CUDA_ERROR_INVALID_HANDLE;
    }
    CUresult::CUDA_SUCCESS
}

#[no_mangle]
pub unsafe extern "C" fn cuGraphExecDestroy(exec: CUgraphExec) -> CUresult {
    if !exec.is_null() {
        drop(Box::from_raw(exec as *mut Graph));
    }
    CUresult::CUDA_SUCCESS
}

#[no_mangle]
pub unsafe extern "C" fn cuGraphDestroy(graph: CUgraph) -> CUresult {
    if !graph.is_null() {
        drop(Box::from_raw(graph as *mut Graph));
    }
    CUresult::CUDA_SUCCESS
}
