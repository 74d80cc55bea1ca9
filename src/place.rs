//! Where a call's arrays live, and how they are borrowed: the shared machinery of every op's
//! pointer-level entry point ([`crate::raw`], and each op's own `*_at` function in `ops/<op>`).
//!
//! An [`In`] or [`Out`] is a caller's array as an address and a length in the memory of a
//! [`Place`]; the crate-internal `run` turns them into host slices or CUDA views of exactly that
//! length (so every length is then checked by the op itself, before any launch), wraps device
//! buffers without owning them (never freed here), refuses an output that overlaps another array
//! of the same call and a misaligned address, and, at [`Place::CudaStaged`], copies host arrays to
//! the device and the writable ones back.

use crate::cuda::Gpu;
use crate::error::{Error, Result};
use crate::layout::{Array, Mask};
use cudarc::driver::{CudaSlice, CudaStream, CudaView, CudaViewMut, DeviceRepr};
use std::cell::RefCell;
use std::collections::HashMap;
use std::marker::PhantomData;
use std::mem::{align_of, size_of};
use std::sync::{Arc, Mutex, OnceLock};

/// Where a call's arrays live and where it runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Place {
    /// Host memory: the CPU reference backend computes.
    Host,
    /// Memory of CUDA device `device` (its primary context); the work is enqueued on `stream`, a
    /// `CUstream` of that context (0: the context's default stream).
    Cuda {
        /// Device ordinal.
        device: usize,
        /// The `CUstream` handle as an integer (0: the default stream).
        stream: usize,
    },
    /// Host memory, computed on CUDA device `device` (its primary context, default stream): the
    /// call copies each array to the device, runs there and copies the writable arrays back before
    /// it returns. [`crate::Backend`]'s CUDA methods are this place.
    CudaStaged {
        /// Device ordinal.
        device: usize,
    },
}

/// A caller's read-only array: `len` elements of `T` at address `addr` in the memory of the
/// call's [`Place`].
#[derive(Debug)]
pub struct In<T> {
    pub(crate) addr: usize,
    pub(crate) len: usize,
    _t: PhantomData<fn() -> T>,
}

impl<T> Clone for In<T> {
    fn clone(&self) -> Self {
        *self
    }
}
impl<T> Copy for In<T> {}

/// A caller's writable array: `len` elements of `T` at address `addr`.
#[derive(Debug)]
pub struct Out<T> {
    pub(crate) addr: usize,
    pub(crate) len: usize,
    _t: PhantomData<fn() -> T>,
}

impl<T> Clone for Out<T> {
    fn clone(&self) -> Self {
        *self
    }
}
impl<T> Copy for Out<T> {}

impl<T> In<T> {
    /// `len` elements at `addr` (0 is allowed when `len == 0`).
    ///
    /// # Safety
    /// `addr` must hold `len` initialized values of `T` in the memory of the place the array is
    /// used with, alive and not written by anyone else until the call that uses it returns.
    pub unsafe fn new(addr: usize, len: usize) -> Self {
        In {
            addr,
            len,
            _t: PhantomData,
        }
    }

    /// Number of elements.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether it has no elements.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

impl<T> Out<T> {
    /// `len` writable elements at `addr` (0 is allowed when `len == 0`).
    ///
    /// # Safety
    /// `addr` must hold `len` values of `T` in the memory of the place the array is used with,
    /// alive, and neither read nor written by anyone else until the call that uses it returns.
    pub unsafe fn new(addr: usize, len: usize) -> Self {
        Out {
            addr,
            len,
            _t: PhantomData,
        }
    }

    /// Number of elements.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether it has no elements.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The same memory, read-only.
    pub fn as_in(&self) -> In<T> {
        In {
            addr: self.addr,
            len: self.len,
            _t: PhantomData,
        }
    }
}

impl<T> Array for In<T> {
    fn array_len(&self) -> usize {
        self.len
    }
}

/// The byte ranges a call has borrowed: a writable range may not overlap any other.
#[derive(Default)]
struct Ranges(RefCell<Vec<(&'static str, usize, usize, bool)>>);

impl Ranges {
    fn add<T>(&self, arg: &'static str, addr: usize, len: usize, writable: bool) -> Result<()> {
        if len == 0 {
            return Ok(());
        }
        if addr == 0 {
            return Err(Error::invalid_argument(arg, "null pointer"));
        }
        if addr % align_of::<T>() != 0 {
            return Err(Error::invalid_argument(
                arg,
                format!(
                    "address {addr:#x} is not aligned to {} bytes (its element size)",
                    align_of::<T>()
                ),
            ));
        }
        let end = len
            .checked_mul(size_of::<T>())
            .and_then(|b| b.checked_add(addr))
            .ok_or_else(|| Error::invalid_argument(arg, "address range overflows"))?;
        let mut r = self.0.borrow_mut();
        if let Some((other, ..)) = r
            .iter()
            .find(|(_, s, e, w)| (writable || *w) && addr < *e && *s < end)
        {
            return Err(Error::invalid_argument(
                arg,
                format!("overlaps `{other}`: an output may not share memory with another array"),
            ));
        }
        r.push((arg, addr, end, writable));
        Ok(())
    }
}

/// Views of a call's arrays in one kind of memory: host slices or CUDA views.
pub(crate) trait Memory {
    /// A read-only view.
    type Ro<'m, T: 'm>: Array
    where
        Self: 'm;
    /// A writable view.
    type Rw<'m, T: 'm>
    where
        Self: 'm;
    fn ro<'m, T: DeviceRepr + 'm>(&'m self, arg: &'static str, a: In<T>)
        -> Result<Self::Ro<'m, T>>;
    fn rw<'m, T: DeviceRepr + 'm>(
        &'m self,
        arg: &'static str,
        a: Out<T>,
    ) -> Result<Self::Rw<'m, T>>;
}

/// Host memory.
#[derive(Default)]
pub(crate) struct HostMemory {
    ranges: Ranges,
}

impl Memory for HostMemory {
    type Ro<'m, T: 'm> = &'m [T];
    type Rw<'m, T: 'm> = &'m mut [T];

    fn ro<'m, T: DeviceRepr + 'm>(&'m self, arg: &'static str, a: In<T>) -> Result<&'m [T]> {
        self.ranges.add::<T>(arg, a.addr, a.len, false)?;
        if a.len == 0 {
            return Ok(&[]);
        }
        // SAFETY: non-null and aligned (checked); `In::new`'s contract: `len` initialized values
        // alive and unwritten for the call; no output of this call overlaps it (checked).
        Ok(unsafe { std::slice::from_raw_parts(a.addr as *const T, a.len) })
    }

    fn rw<'m, T: DeviceRepr + 'm>(&'m self, arg: &'static str, a: Out<T>) -> Result<&'m mut [T]> {
        self.ranges.add::<T>(arg, a.addr, a.len, true)?;
        if a.len == 0 {
            return Ok(&mut []);
        }
        // SAFETY: non-null and aligned (checked); `Out::new`'s contract: `len` values alive and
        // used by nobody else for the call; no other array of this call overlaps it (checked).
        Ok(unsafe { std::slice::from_raw_parts_mut(a.addr as *mut T, a.len) })
    }
}

/// A device buffer held for one call: a caller's (released with `leak`, never freed) or a
/// placeholder this call allocated for an empty array (freed).
struct Lent {
    slice: Option<CudaSlice<u8>>,
    borrowed: bool,
}

impl Drop for Lent {
    fn drop(&mut self) {
        if let Some(s) = self.slice.take() {
            if self.borrowed {
                let _ = s.leak();
            }
        }
    }
}

/// Device memory of one call: the GPU, the caller's stream and the buffers borrowed so far; or,
/// staged ([`Place::CudaStaged`]), device copies of the caller's host arrays, the writable ones
/// copied back by [`DeviceMemory::finish`].
pub(crate) struct DeviceMemory {
    pub gpu: Arc<Gpu>,
    pub stream: Arc<CudaStream>,
    lent: typed_arena::Arena<Lent>,
    ranges: Ranges,
    /// Staged: the writable arrays as (host address, bytes, device address) to copy back.
    staged: Option<std::cell::RefCell<Vec<(usize, usize, u64)>>>,
}

/// The primary context of device `ordinal` (the one PyTorch uses), opened once per process.
pub fn shared_gpu(ordinal: usize) -> Result<Arc<Gpu>> {
    static GPUS: OnceLock<Mutex<HashMap<usize, Arc<Gpu>>>> = OnceLock::new();
    let mut map = GPUS
        .get_or_init(|| Mutex::new(HashMap::new()))
        .lock()
        .map_err(|_| Error::NoDevice("device table poisoned".into()))?;
    if let Some(g) = map.get(&ordinal) {
        return Ok(g.clone());
    }
    let g = Gpu::new(ordinal)?;
    // SAFETY: the bindings' buffers are the caller's (PyTorch's, a C caller's), whose stream
    // order the caller keeps, and the crate's own scratch is kept per stream; cudarc's per-buffer
    // events would only add two event creations per borrowed array and call.
    unsafe { g.context().disable_event_tracking() };
    map.insert(ordinal, g.clone());
    Ok(g)
}

impl DeviceMemory {
    fn new(device: usize, stream: usize) -> Result<Self> {
        let gpu = shared_gpu(device)?;
        let stream = if stream == 0 {
            gpu.stream().clone()
        } else {
            // SAFETY: the caller passes a live CUstream of this device's primary context and keeps
            // it alive for the call (`Place::Cuda`'s contract); the wrapper does not destroy it.
            unsafe {
                gpu.context()
                    .wrap_borrowed_stream(stream as cudarc::driver::sys::CUstream)
            }
        };
        Ok(DeviceMemory {
            gpu,
            stream,
            lent: typed_arena::Arena::new(),
            ranges: Ranges::default(),
            staged: None,
        })
    }

    /// Device copies of host arrays on device `device`'s default stream.
    fn staged(device: usize) -> Result<Self> {
        Ok(DeviceMemory {
            staged: Some(Default::default()),
            ..Self::new(device, 0)?
        })
    }

    /// Copies the staged writable arrays back to the host (nothing for a caller's device memory).
    fn finish(&self) -> Result<()> {
        let Some(outs) = &self.staged else {
            return Ok(());
        };
        for &(host, bytes, dev) in outs.borrow().iter() {
            // SAFETY: `dev` is a live buffer of this call of `bytes` bytes (in `lent`, freed only
            // when `self` drops); the view is leaked, not freed, below.
            let d = unsafe { self.stream.upgrade_device_ptr::<u8>(dev, bytes) };
            // SAFETY: `Out::new`'s contract: `bytes` writable host bytes at `host` for the call.
            let h = unsafe { std::slice::from_raw_parts_mut(host as *mut u8, bytes) };
            let copied = self.stream.memcpy_dtoh(&d, h);
            d.leak();
            copied?;
        }
        self.stream.synchronize()?;
        Ok(())
    }

    /// The caller's `bytes` at `addr` (or, for an empty array, a placeholder of this call; staged,
    /// a device copy of the host bytes at `addr`, to copy back if `writable`). Each call hands out a
    /// distinct arena slot, so the `&mut` never aliases.
    #[allow(clippy::mut_from_ref)]
    fn lend(&self, addr: usize, bytes: usize, writable: bool) -> Result<&mut CudaSlice<u8>> {
        let lent = if let (Some(outs), true) = (&self.staged, bytes > 0) {
            // SAFETY: `In::new` / `Out::new`'s contract: `bytes` initialized host bytes at `addr`.
            let host = unsafe { std::slice::from_raw_parts(addr as *const u8, bytes) };
            let copy = self.stream.clone_htod(host)?;
            if writable {
                let (dev, _sync) = cudarc::driver::DevicePtr::device_ptr(&copy, &self.stream);
                outs.borrow_mut().push((addr, bytes, dev));
            }
            Lent {
                slice: Some(copy),
                borrowed: false,
            }
        } else if bytes == 0 {
            Lent {
                slice: Some(self.stream.alloc_zeros::<u8>(16)?),
                borrowed: false,
            }
        } else {
            Lent {
                // SAFETY: `In::new` / `Out::new`'s contract: `bytes` bytes of a device allocation of
                // this context at `addr`, alive for the call; `Lent` leaks (never frees) it.
                slice: Some(unsafe { self.stream.upgrade_device_ptr::<u8>(addr as u64, bytes) }),
                borrowed: true,
            }
        };
        self.lent
            .alloc(lent)
            .slice
            .as_mut()
            .ok_or_else(|| Error::NoDevice("internal: lost a borrowed buffer".into()))
    }
}

impl Memory for DeviceMemory {
    type Ro<'m, T: 'm> = CudaView<'m, T>;
    type Rw<'m, T: 'm> = CudaViewMut<'m, T>;

    fn ro<'m, T: DeviceRepr + 'm>(
        &'m self,
        arg: &'static str,
        a: In<T>,
    ) -> Result<CudaView<'m, T>> {
        self.ranges.add::<T>(arg, a.addr, a.len, false)?;
        let s = self.lend(a.addr, a.len * size_of::<T>(), false)?;
        // SAFETY: the buffer holds `len` values of T (`In::new`'s contract; aligned, checked).
        unsafe { s.transmute::<T>(a.len) }
            .ok_or_else(|| Error::invalid_argument(arg, "internal: view larger than its buffer"))
    }

    fn rw<'m, T: DeviceRepr + 'm>(
        &'m self,
        arg: &'static str,
        a: Out<T>,
    ) -> Result<CudaViewMut<'m, T>> {
        self.ranges.add::<T>(arg, a.addr, a.len, true)?;
        let s = self.lend(a.addr, a.len * size_of::<T>(), true)?;
        // SAFETY: the buffer holds `len` values of T (`Out::new`'s contract; aligned, checked).
        unsafe { s.transmute_mut::<T>(a.len) }
            .ok_or_else(|| Error::invalid_argument(arg, "internal: view larger than its buffer"))
    }
}

/// A mask's views in `m`.
pub(crate) fn mask<'m, M: Memory>(
    m: &'m M,
    arg: &'static str,
    x: &Mask<In<f32>, In<u8>>,
) -> Result<Mask<M::Ro<'m, f32>, M::Ro<'m, u8>>> {
    Ok(match x {
        Mask::F32(a) => Mask::F32(m.ro(arg, *a)?),
        Mask::U8(a) => Mask::U8(m.ro(arg, *a)?),
    })
}

/// An optional array's view in `m`.
pub(crate) fn opt<'m, M: Memory>(
    m: &'m M,
    arg: &'static str,
    a: Option<In<f32>>,
) -> Result<Option<M::Ro<'m, f32>>> {
    a.map(|a| m.ro(arg, a)).transpose()
}

/// Runs `host` on host views or `device` on device views of the call's arrays.
pub(crate) fn run<R>(
    place: Place,
    host: impl FnOnce(&HostMemory) -> Result<R>,
    device: impl FnOnce(&DeviceMemory) -> Result<R>,
) -> Result<R> {
    match place {
        Place::Host => host(&HostMemory::default()),
        Place::Cuda { device: d, stream } => device(&DeviceMemory::new(d, stream)?),
        Place::CudaStaged { device: d } => {
            let m = DeviceMemory::staged(d)?;
            let r = device(&m)?;
            m.finish()?;
            Ok(r)
        }
    }
}

/// The element types of the arrays [`read`] and [`write()`] copy.
pub trait Element: DeviceRepr + Copy + Default + Send + Sync + 'static {}
impl Element for f32 {}
impl Element for f64 {}
impl Element for i32 {}
impl Element for i64 {}
impl Element for u8 {}
impl Element for u32 {}

/// Copies an array to the host (on a device: enqueued on the stream, which this synchronizes).
pub fn read<T: Element>(place: Place, arg: &'static str, a: In<T>) -> Result<Vec<T>> {
    run(
        place,
        |m| Ok(m.ro(arg, a)?.to_vec()),
        |m| {
            let mut host = vec![T::default(); a.len];
            if a.len > 0 {
                m.stream.memcpy_dtoh(&m.ro(arg, a)?, &mut host)?;
                m.stream.synchronize()?;
            }
            Ok(host)
        },
    )
}

/// Copies `values` into an array (on a device: enqueued on the stream; the host values are staged
/// before this returns).
pub fn write<T: Element>(place: Place, arg: &'static str, out: Out<T>, values: &[T]) -> Result<()> {
    crate::layout::check_len(arg, out.len, values.len(), "the values' length")?;
    run(
        place,
        |m| {
            m.rw(arg, out)?.copy_from_slice(values);
            Ok(())
        },
        |m| {
            if !values.is_empty() {
                m.stream.memcpy_htod(values, &mut m.rw(arg, out)?)?;
            }
            Ok(())
        },
    )
}
