//! cuBLAS on the host: the handle calls cudarc's `CudaBlas` makes and `cublasGemmEx` (the
//! fused-linear path's GEMMs) with cuBLAS's argument checks, column-major operands, transposes and
//! leading dimensions, fp32 accumulation and bf16 / f16 / f32 operands; every operand's extent
//! must lie inside one device allocation.

use crate::counters::{bump, bump_by, Counter};
use crate::{memory, stream_ok};
use cudarc::cublas::sys::{
    cublasComputeType_t, cublasHandle_t, cublasOperation_t, cublasStatus_t, cudaDataType_t,
};
use cudarc::driver::sys::CUstream;
use std::ffi::{c_int, c_void};

struct Handle {
    stream: CUstream,
}

#[no_mangle]
pub unsafe extern "C" fn cublasCreate_v2(h: *mut cublasHandle_t) -> cublasStatus_t {
    if h.is_null() {
        return cublasStatus_t::CUBLAS_STATUS_INVALID_VALUE;
    }
    *h = Box::into_raw(Box::new(Handle {
        stream: std::ptr::null_mut(),
    })) as cublasHandle_t;
    cublasStatus_t::CUBLAS_STATUS_SUCCESS
}

#[no_mangle]
pub unsafe extern "C" fn cublasDestroy_v2(h: cublasHandle_t) -> cublasStatus_t {
    if h.is_null() {
        return cublasStatus_t::CUBLAS_STATUS_NOT_INITIALIZED;
    }
    drop(Box::from_raw(h as *mut Handle));
    cublasStatus_t::CUBLAS_STATUS_SUCCESS
}

#[no_mangle]
pub unsafe extern "C" fn cublasSetStream_v2(h: cublasHandle_t, s: CUstream) -> cublasStatus_t {
    if h.is_null() {
        return cublasStatus_t::CUBLAS_STATUS_NOT_INITIALIZED;
    }
    if stream_ok(s).is_err() {
        return cublasStatus_t::CUBLAS_STATUS_INVALID_VALUE;
    }
    (*(h as *mut Handle)).stream = s;
    cublasStatus_t::CUBLAS_STATUS_SUCCESS
}

#[no_mangle]
pub unsafe extern "C" fn cublasSetMathMode(h: cublasHandle_t, _mode: c_int) -> cublasStatus_t {
    if h.is_null() {
        return cublasStatus_t::CUBLAS_STATUS_NOT_INITIALIZED;
    }
    cublasStatus_t::CUBLAS_STATUS_SUCCESS
}

#[derive(Clone, Copy, PartialEq)]
pub(crate) enum Ty {
    F32,
    F16,
    Bf16,
}

impl Ty {
    fn of(t: c_int) -> Option<Ty> {
        match t {
            x if x == cudaDataType_t::CUDA_R_32F as c_int => Some(Ty::F32),
            x if x == cudaDataType_t::CUDA_R_16F as c_int => Some(Ty::F16),
            x if x == cudaDataType_t::CUDA_R_16BF as c_int => Some(Ty::Bf16),
            _ => None,
        }
    }
    fn size(self) -> usize {
        if self == Ty::F32 {
            4
        } else {
            2
        }
    }
    unsafe fn read(self, p: *const u8, i: usize) -> f32 {
        match self {
            Ty::F32 => *(p as *const f32).add(i),
            Ty::F16 => half::f16::from_bits(*(p as *const u16).add(i)).to_f32(),
            Ty::Bf16 => half::bf16::from_bits(*(p as *const u16).add(i)).to_f32(),
        }
    }
    unsafe fn write(self, p: *mut u8, i: usize, v: f32) {
        match self {
            Ty::F32 => *(p as *mut f32).add(i) = v,
            Ty::F16 => *(p as *mut u16).add(i) = half::f16::from_f32(v).to_bits(),
            Ty::Bf16 => *(p as *mut u16).add(i) = half::bf16::from_f32(v).to_bits(),
        }
    }
}

fn op(t: c_int) -> Option<bool> {
    match t {
        x if x == cublasOperation_t::CUBLAS_OP_N as c_int => Some(false),
        x if x == cublasOperation_t::CUBLAS_OP_T as c_int
            || x == cublasOperation_t::CUBLAS_OP_C as c_int =>
        {
            Some(true)
        }
        _ => None,
    }
}

/// Elements an operand of `rows x cols` (as stored, column-major) spans with leading dimension `ld`.
fn extent(rows: usize, cols: usize, ld: usize) -> usize {
    if rows == 0 || cols == 0 {
        0
    } else {
        ld * (cols - 1) + rows
    }
}

#[no_mangle]
pub unsafe extern "C" fn cublasGemmEx(
    h: cublasHandle_t,
    transa: c_int,
    transb: c_int,
    m: c_int,
    n: c_int,
    k: c_int,
    alpha: *const c_void,
    a: *const c_void,
    a_type: c_int,
    lda: c_int,
    b: *const c_void,
    b_type: c_int,
    ldb: c_int,
    beta: *const c_void,
    c: *mut c_void,
    c_type: c_int,
    ldc: c_int,
    compute: c_int,
    _algo: c_int,
) -> cublasStatus_t {
    use cublasStatus_t::*;
    if h.is_null() {
        return CUBLAS_STATUS_NOT_INITIALIZED;
    }
    let (Some(ta), Some(tb)) = (op(transa), op(transb)) else {
        return CUBLAS_STATUS_INVALID_VALUE;
    };
    let (Some(at), Some(bt), Some(ct)) = (Ty::of(a_type), Ty::of(b_type), Ty::of(c_type)) else {
        return CUBLAS_STATUS_NOT_SUPPORTED;
    };
    if compute != cublasComputeType_t::CUBLAS_COMPUTE_32F as c_int {
        return CUBLAS_STATUS_NOT_SUPPORTED;
    }
    if m < 0 || n < 0 || k < 0 || alpha.is_null() || beta.is_null() {
        return CUBLAS_STATUS_INVALID_VALUE;
    }
    let (m, n, k) = (m as usize, n as usize, k as usize);
    // stored shapes: A is m x k (or k x m transposed), B k x n (or n x k)
    let ar = if ta { k } else { m };
    let br = if tb { n } else { k };
    if (lda as i64) < ar.max(1) as i64
        || (ldb as i64) < br.max(1) as i64
        || (ldc as i64) < m.max(1) as i64
    {
        crate::fail(
            cudarc::driver::sys::CUresult::CUDA_ERROR_INVALID_VALUE,
            format!("cublasGemmEx: lda {lda} / ldb {ldb} / ldc {ldc} below the operands' rows {ar} / {br} / {m}"),
        );
        return CUBLAS_STATUS_INVALID_VALUE;
    }
    let g = Gemm {
        ta,
        tb,
        m,
        n,
        k,
        alpha: *(alpha as *const f32),
        a: a as u64,
        at,
        lda: lda as usize,
        b: b as u64,
        bt,
        ldb: ldb as usize,
        beta: *(beta as *const f32),
        c: c as u64,
        ct,
        ldc: ldc as usize,
    };
    if crate::kernels::trace() {
        eprintln!("emulated CUDA device: cublasGemmEx {} {} m {m} n {n} k {k} A {a:p} lda {lda} B {b:p} ldb {ldb} C {c:p} ldc {ldc}", if ta { "T" } else { "N" }, if tb { "T" } else { "N" });
    }
    bump(Counter::Gemms);
    bump_by(Counter::GemmMacs, (g.m * g.n * g.k) as u64);
    if !g.in_bounds() {
        return CUBLAS_STATUS_EXECUTION_FAILED;
    }
    // on a capturing stream the GEMM becomes a node of the graph (alpha and beta by value, as
    // cuBLAS reads host scalars when it enqueues)
    let stream = (*(h as *const Handle)).stream;
    if crate::graphs::record(stream, || crate::graphs::Node::Gemm(g)) {
        return CUBLAS_STATUS_SUCCESS;
    }
    if g.run() {
        CUBLAS_STATUS_SUCCESS
    } else {
        CUBLAS_STATUS_EXECUTION_FAILED
    }
}

/// One GEMM's arguments, checked: `C = alpha op(A) op(B) + beta C`, column-major.
#[derive(Clone, Copy)]
pub(crate) struct Gemm {
    ta: bool,
    tb: bool,
    m: usize,
    n: usize,
    k: usize,
    alpha: f32,
    a: u64,
    at: Ty,
    lda: usize,
    b: u64,
    bt: Ty,
    ldb: usize,
    beta: f32,
    c: u64,
    ct: Ty,
    ldc: usize,
}

impl Gemm {
    /// Whether every operand lies inside one device allocation (reported when not).
    fn in_bounds(&self) -> bool {
        let (ar, ac) = if self.ta {
            (self.k, self.m)
        } else {
            (self.m, self.k)
        };
        let (br, bc) = if self.tb {
            (self.n, self.k)
        } else {
            (self.k, self.n)
        };
        if self.m == 0 || self.n == 0 {
            return true;
        }
        [
            (self.a, self.at, extent(ar, ac, self.lda), "cublasGemmEx A"),
            (self.b, self.bt, extent(br, bc, self.ldb), "cublasGemmEx B"),
            (
                self.c,
                self.ct,
                extent(self.m, self.n, self.ldc),
                "cublasGemmEx C",
            ),
        ]
        .into_iter()
        .all(|(p, ty, len, what)| len == 0 || memory::check_range(p, len * ty.size(), what).is_ok())
    }

    /// Runs it on the host; false when an operand leaves its allocation.
    pub(crate) unsafe fn run(&self) -> bool {
        if !self.in_bounds() {
            return false;
        }
        let Gemm {
            ta,
            tb,
            m,
            n,
            k,
            alpha,
            a,
            at,
            lda,
            b,
            bt,
            ldb,
            beta,
            c,
            ct,
            ldc,
        } = *self;
        if m == 0 || n == 0 {
            return true;
        }
        let (a, b, c) = (a as *const u8, b as *const u8, c as *mut u8);
        // op(A) row by row (m x k) and op(B) column by column (n x k), contiguous in the inner index
        let mut aop = vec![0f32; m * k];
        for i in 0..m {
            for l in 0..k {
                aop[i * k + l] = at.read(a, if ta { l + i * lda } else { i + l * lda });
            }
        }
        let mut bop = vec![0f32; n * k];
        for j in 0..n {
            for l in 0..k {
                bop[j * k + l] = bt.read(b, if tb { j + l * ldb } else { l + j * ldb });
            }
        }
        for j in 0..n {
            let bj = &bop[j * k..(j + 1) * k];
            for i in 0..m {
                let ai = &aop[i * k..(i + 1) * k];
                let dot: f32 = ai.iter().zip(bj).map(|(x, y)| x * y).sum();
                let idx = i + j * ldc;
                // beta = 0: C is not read (it may hold anything), as in cuBLAS
                let v = if beta == 0.0 {
                    alpha * dot
                } else {
                    alpha * dot + beta * ct.read(c, idx)
                };
                ct.write(c, idx, v);
            }
        }
        true
    }
}
