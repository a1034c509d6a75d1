//! GPU memory through the CUDA driver API.
//!
//! The driver is loaded when a GPU is first asked for (cudarc's dynamic loading), so the loader
//! builds without a CUDA toolkit and starts on machines without a driver. Device buffers come
//! from `cuMemAlloc`, not the stream-ordered pool, because only such allocations can be exported
//! by CUDA IPC handle to another process on the node. Copies run on one stream of their own, in
//! the order they are enqueued, from page-locked host buffers.
//!
//! A finished buffer's allocation is kept when the buffer is dropped (evicted), for the next
//! allocation of the same size (cartridges of one shape are one size), which takes it instead of
//! a `cuMemFree` and a `cuMemAlloc` (about a millisecond for 256 MiB, beside 5 ms of copying).
//! An allocation of any other size frees every kept one first, under the lock any allocation
//! takes first: the GPU never holds more than the budget, since a kept allocation was evicted by
//! the device store and stays only until the next allocation takes it in place of new memory or
//! frees it before asking for any. A buffer given up before it was finished (a failed or retried
//! load) is freed at once: whoever saw its IPC handle while it loaded may still hold it, and the
//! next load must get a new one.

#![allow(unsafe_code)]

use std::ffi::c_void;
use std::ops::Range;
use std::sync::{Arc, Mutex};

use cudarc::driver::{
    CudaContext, CudaFunction, CudaStream, DriverError, LaunchConfig, PushKernelArg, result, sys,
};
use cudarc::nvrtc::Ptx;

use crate::device::CudaLocation;
use crate::error::LoaderError;

fn failed(what: &'static str) -> impl Fn(DriverError) -> LoaderError {
    move |error| LoaderError::Internal(format!("CUDA {what}: {error}"))
}

/// The composition kernels (`loader/kernels/compose.cu`), compiled by `loader/kernels/build`.
const COMPOSE_PTX: &str = include_str!("../kernels/compose.ptx");

pub struct Gpu {
    context: Arc<CudaContext>,
    stream: Arc<CudaStream>,
    name: String,
    uuid: String,
    kept: Arc<Kept>,
    /// Strided row copies in 16-byte words and in bytes.
    copy_rows_16: CudaFunction,
    copy_rows_1: CudaFunction,
}

/// Allocations of dropped buffers, for the next allocation of the same size.
struct Kept {
    context: Arc<CudaContext>,
    allocations: Mutex<Vec<Allocation>>,
}

/// One `cuMemAlloc` allocation and its IPC handle.
#[derive(Debug)]
struct Allocation {
    ptr: sys::CUdeviceptr,
    len: usize,
    location: CudaLocation,
}

impl Kept {
    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<Allocation>> {
        // Plain bookkeeping: still consistent after a panic elsewhere.
        self.allocations
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// The kept allocation of `len` bytes, if any; otherwise frees every kept one, holding the
    /// lock until they are freed so that no allocation runs meanwhile.
    fn take(&self, len: usize) -> Option<Allocation> {
        let mut kept = self.lock();
        if let Some(index) = kept.iter().position(|a| a.len == len) {
            return Some(kept.swap_remove(index));
        }
        for allocation in std::mem::take(&mut *kept) {
            self.free(allocation);
        }
        None
    }

    fn free(&self, allocation: Allocation) {
        // SAFETY: the pointer came from cuMemAlloc and is freed once (taken out of the list, or
        // never put in); no copy into or out of it is in flight (its buffer's users waited).
        let freed = self
            .context
            .bind_to_thread()
            .and_then(|()| unsafe { result::free_sync(allocation.ptr) });
        if let Err(error) = freed {
            tracing::error!(%error, "freeing device memory");
        }
    }
}

impl Drop for Kept {
    fn drop(&mut self) {
        for allocation in std::mem::take(&mut *self.lock()) {
            self.free(allocation);
        }
    }
}

impl Gpu {
    /// The GPU with this ordinal, or why it cannot be used.
    pub fn open(ordinal: usize) -> Result<Self, String> {
        let unusable = |cause: String| {
            format!("cuda:{ordinal} cannot be used: {cause}; serve with --device host")
        };
        // SAFETY: only tries to load the driver library.
        if !unsafe { sys::is_culib_present() } {
            return Err(unusable(
                "no CUDA driver on this machine (libcuda.so.1 could not be loaded)".into(),
            ));
        }
        let count = CudaContext::device_count().map_err(|e| unusable(e.to_string()))?;
        if ordinal >= count.max(0) as usize {
            return Err(unusable(format!("this machine has {count} GPU(s)")));
        }
        let context = CudaContext::new(ordinal).map_err(|e| unusable(e.to_string()))?;
        let stream = context
            .new_stream()
            .map_err(|e| unusable(format!("creating a stream: {e}")))?;
        let name = context.name().unwrap_or_else(|_| "unknown GPU".into());
        let uuid = context
            .uuid()
            .map(|uuid| format_uuid(&uuid.bytes.map(|b| b as u8)))
            .map_err(|e| unusable(format!("reading its UUID: {e}")))?;
        let kernels = context
            .load_module(Ptx::from_src(COMPOSE_PTX))
            .map_err(|e| unusable(format!("loading the composition kernels: {e}")))?;
        let kernel = |name: &str| {
            kernels
                .load_function(name)
                .map_err(|e| unusable(format!("the composition kernel {name}: {e}")))
        };
        let (copy_rows_16, copy_rows_1) = (kernel("copy_rows_16")?, kernel("copy_rows_1")?);
        let kept = Arc::new(Kept {
            context: context.clone(),
            allocations: Mutex::new(Vec::new()),
        });
        Ok(Self {
            context,
            stream,
            name,
            uuid,
            kept,
            copy_rows_16,
            copy_rows_1,
        })
    }

    pub fn ordinal(&self) -> usize {
        self.context.ordinal()
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn uuid(&self) -> &str {
        &self.uuid
    }

    fn bind(&self) -> Result<(), LoaderError> {
        self.context
            .bind_to_thread()
            .map_err(failed("binding the context"))
    }

    /// The bytes of dropped buffers' allocations kept for reuse.
    pub fn kept_bytes(&self) -> u64 {
        self.kept.lock().iter().map(|a| a.len as u64).sum()
    }

    /// `len` (> 0) bytes of device memory, contents unset: a dropped buffer's allocation of that
    /// size, or a new one.
    pub fn alloc(&self, len: usize) -> Result<DeviceBuffer, LoaderError> {
        let allocation = match self.kept.take(len) {
            Some(allocation) => allocation,
            None => self.allocate(len)?,
        };
        Ok(DeviceBuffer {
            allocation: Some(allocation),
            kept: self.kept.clone(),
            finished: false,
        })
    }

    /// A new allocation of `len` bytes with its IPC handle.
    fn allocate(&self, len: usize) -> Result<Allocation, LoaderError> {
        self.bind()?;
        // SAFETY: the allocation is owned (and freed) by the returned value; every byte is
        // written by the load or composition that made it before it is handed out.
        let ptr = unsafe { result::malloc_sync(len) }.map_err(|e| {
            LoaderError::OutOfMemory(format!(
                "allocating {len} bytes on cuda:{}: {e}",
                self.ordinal()
            ))
        })?;
        let mut allocation = Allocation {
            ptr,
            len,
            location: CudaLocation {
                device: self.ordinal() as u32,
                uuid: self.uuid.clone(),
                ipc_handle: String::new(),
            },
        };
        let mut handle = std::mem::MaybeUninit::<sys::CUipcMemHandle>::uninit();
        // SAFETY: `ptr` is the base of a live cuMemAlloc allocation; the handle is plain bytes.
        let exported = unsafe { sys::cuIpcGetMemHandle(handle.as_mut_ptr(), ptr) }
            .result()
            .map_err(failed("exporting an IPC handle"));
        let handle = match exported {
            // SAFETY: written by the call that succeeded.
            Ok(()) => unsafe { handle.assume_init() },
            Err(error) => {
                self.kept.free(allocation);
                return Err(error);
            }
        };
        allocation.location.ipc_handle = handle
            .reserved
            .iter()
            .map(|b| format!("{:02x}", *b as u8))
            .collect();
        Ok(allocation)
    }

    /// `len` (> 0) bytes of page-locked host memory, contents unset.
    pub fn pinned(&self, len: usize) -> Result<PinnedBuffer, LoaderError> {
        self.bind()?;
        // SAFETY: owned (and freed) by the returned buffer; plain page-locked memory (not
        // write-combined: the decoder reads back what it writes).
        let ptr = unsafe { result::malloc_host(len, 0) }.map_err(|e| {
            LoaderError::OutOfMemory(format!("allocating {len} page-locked bytes: {e}"))
        })?;
        Ok(PinnedBuffer {
            ptr: ptr.cast(),
            len,
            context: self.context.clone(),
        })
    }

    /// Enqueues a copy of the `len` bytes at `source` into `target` at byte `offset`.
    ///
    /// # Safety
    /// `source` must point into page-locked memory that stays allocated and unwritten until a
    /// later [`Gpu::wait`] returns.
    pub unsafe fn copy_in(
        &self,
        target: &DeviceBuffer,
        offset: usize,
        source: *const u8,
        len: usize,
    ) -> Result<(), LoaderError> {
        assert!(offset + len <= target.bytes(), "copy past the buffer");
        self.bind()?;
        // SAFETY: the target range is inside the allocation (asserted); the source outlives the
        // copy (the caller's promise).
        unsafe {
            sys::cuMemcpyHtoDAsync_v2(
                target.ptr() + offset as u64,
                source.cast::<c_void>(),
                len,
                self.stream.cu_stream(),
            )
        }
        .result()
        .map_err(failed("copying to the GPU"))
    }

    /// Runs `fill` on `staging`'s bytes with a function that copies a range of them to the same
    /// offsets of `target`, and returns once every copy is done, whatever `fill` returned (or
    /// if it panicked). `fill` hands over only ranges whose bytes are final: a range written
    /// after it is handed over may reach the GPU either way.
    pub fn fill<R>(
        &self,
        staging: &mut PinnedBuffer,
        target: &DeviceBuffer,
        fill: impl FnOnce(&mut [u8], &(dyn Fn(Range<usize>) -> Result<(), LoaderError> + Sync)) -> R,
    ) -> Result<R, LoaderError> {
        assert_eq!(
            staging.len,
            target.bytes(),
            "staging and target differ in size"
        );
        let base = staging.ptr as usize;
        let copy = |range: Range<usize>| {
            // SAFETY: `staging` is page-locked and borrowed until the wait below; the range's
            // bytes are final (the caller hands over only finished ranges).
            unsafe {
                self.copy_in(
                    target,
                    range.start,
                    (base + range.start) as *const u8,
                    range.len(),
                )
            }
        };
        let drained = Drained(self);
        let filled = fill(staging.as_mut_slice(), &copy);
        drained.finish()?;
        Ok(filled)
    }

    /// Waits until every copy enqueued so far (by any load) has finished, sleeping rather than
    /// spinning: the decoding threads need the cores.
    pub fn wait(&self) -> Result<(), LoaderError> {
        let event = self
            .context
            .new_event(Some(sys::CUevent_flags::CU_EVENT_BLOCKING_SYNC))
            .map_err(failed("creating an event"))?;
        event.record(&self.stream).map_err(failed("recording"))?;
        event.synchronize().map_err(failed("copying"))
    }

    /// A new buffer of `rows` rows, each the rows of `parts` (a buffer and its row length in
    /// bytes) side by side: one strided copy per part, then waits for them.
    pub fn compose(
        &self,
        rows: usize,
        parts: &[(&DeviceBuffer, usize)],
    ) -> Result<DeviceBuffer, LoaderError> {
        let width: usize = parts.iter().map(|(_, row)| row).sum();
        let mut target = self.alloc(rows * width)?;
        // Waits for the copies also on an early return, before `target` is freed.
        let drained = Drained(self);
        self.enqueue_composition(&target, rows, parts)?;
        drained.finish()?;
        target.finish();
        Ok(target)
    }

    /// Enqueues the copies that fill `target` as [`Gpu::compose`] fills its new buffer: one
    /// launch of a row-copy kernel per part (the driver's 2D copy moves these rows at less
    /// than half the rate of a plain device-to-device copy). The caller waits for them (a
    /// [`Drained`]) before `target` or a part can be freed.
    fn enqueue_composition(
        &self,
        target: &DeviceBuffer,
        rows: usize,
        parts: &[(&DeviceBuffer, usize)],
    ) -> Result<(), LoaderError> {
        let width: usize = parts.iter().map(|(_, row)| row).sum();
        assert_eq!(target.bytes(), rows * width, "a target of the wrong size");
        let rows_arg = u32::try_from(rows).expect("fewer than 2^32 rows");
        let mut x = 0;
        for &(source, row) in parts {
            assert_eq!(source.bytes(), rows * row, "a part of the wrong size");
            // cuMemAlloc's addresses are 256-byte aligned: the offsets decide.
            let (kernel, word) = if [row, width, x].iter().all(|n| n % 16 == 0) {
                (&self.copy_rows_16, 16)
            } else {
                (&self.copy_rows_1, 1)
            };
            // A block of 256 threads per 256 words of a row, a row per grid row (the kernel
            // loops past the grid's limits).
            let config = LaunchConfig {
                grid_dim: (
                    (row / word).div_ceil(256).clamp(1, 65_535) as u32,
                    rows.clamp(1, 65_535) as u32,
                    1,
                ),
                block_dim: (256, 1, 1),
                shared_mem_bytes: 0,
            };
            let (from, to) = (source.ptr(), target.ptr() + x as u64);
            let mut launch = self.stream.launch_builder(kernel);
            launch
                .arg(&from)
                .arg(&row)
                .arg(&to)
                .arg(&width)
                .arg(&row)
                .arg(&rows_arg);
            // SAFETY: the arguments match the kernel's (pointers, byte counts as size_t, rows
            // as unsigned int); both regions lie inside their allocations (rows x pitch,
            // asserted above), which the caller keeps until its wait for the copies.
            unsafe { launch.launch(config) }
                .map(drop)
                .map_err(failed("composing"))?;
            x += row;
        }
        Ok(())
    }

    /// This machine's copy bandwidths for `len` bytes, and what a load and an eviction spend
    /// besides copying (each the median of five).
    pub fn bandwidth(&self, len: usize) -> Result<Ceilings, LoaderError> {
        let mut source = self.pinned(len)?;
        source.as_mut_slice().fill(1);
        let first = self.alloc(len)?;
        let second = self.alloc(len)?;
        // Copies are timed on the GPU, between events around four enqueued back to back: a
        // clock on the host would count each wake-up after a copy as copying, a third of a
        // 256 MiB device-to-device copy's time.
        const REPEATS: u32 = 4;
        let rate = |enqueue: &dyn Fn() -> Result<(), LoaderError>| {
            let drained = Drained(self);
            enqueue()?;
            let event = || {
                self.stream
                    .record_event(Some(sys::CUevent_flags::CU_EVENT_DEFAULT))
                    .map_err(failed("timing copies"))
            };
            let mut times = Vec::new();
            for _ in 0..5 {
                let start = event()?;
                for _ in 0..REPEATS {
                    enqueue()?;
                }
                let end = event()?;
                let ms = start.elapsed_ms(&end).map_err(failed("copying"))?;
                times.push(f64::from(ms) / 1e3 / f64::from(REPEATS));
            }
            drained.finish()?;
            Ok::<_, LoaderError>(len as f64 / median(times))
        };
        // SAFETY: `source` is page-locked and outlives every wait.
        let host = rate(&|| unsafe { self.copy_in(&first, 0, source.ptr, len) })?;
        let device = rate(&|| {
            self.bind()?;
            // SAFETY: both buffers hold `len` bytes and outlive the wait.
            unsafe {
                sys::cuMemcpyDtoDAsync_v2(second.ptr(), first.ptr(), len, self.stream.cu_stream())
            }
            .result()
            .map_err(failed("copying on the GPU"))
        })?;
        // The figures past the two rates are each left out (None) where this GPU lacks the
        // memory for them (`fits`), rather than losing the rates.
        drop((second, source));
        // A composition's copies alone: four parts of `len` bytes into a buffer allocated
        // beforehand, in 256 rows (1 MiB a part's row at 256 MiB, as a cartridge's rows of one
        // head's tokens). The four parts are one buffer read four times: at sizes well past
        // the GPU's L2 cache, as the benchmark's, that reads memory each time.
        let rows = 1 << len.trailing_zeros().min(8);
        let compose = fits(self.alloc(4 * len).and_then(|composed| {
            let parts = [(&first, len / rows); 4];
            Ok(4.0 * rate(&|| self.enqueue_composition(&composed, rows, &parts))?)
        }))?;
        drop(first);
        // What an allocation costs that finds no kept one of its size: a cartridge's, and a
        // composition's of four.
        let allocation_times = |len: usize| {
            let (mut allocate, mut free) = (Vec::new(), Vec::new());
            for _ in 0..5 {
                let started = std::time::Instant::now();
                let allocation = self.allocate(len)?;
                allocate.push(started.elapsed().as_secs_f64());
                let started = std::time::Instant::now();
                self.kept.free(allocation);
                free.push(started.elapsed().as_secs_f64());
            }
            Ok::<_, LoaderError>((median(allocate), median(free)))
        };
        let (allocate, free) = allocation_times(len)?;
        let (allocate_composed, free_composed) = fits(allocation_times(4 * len))?.unzip();
        // What a decode spends on its page-locked staging buffer before its first chunk.
        let allocate_pinned = fits((|| {
            let mut times = Vec::new();
            for _ in 0..3 {
                let started = std::time::Instant::now();
                let buffer = self.pinned(len)?;
                times.push(started.elapsed().as_secs_f64());
                drop(buffer);
            }
            Ok(median(times))
        })())?;
        Ok(Ceilings {
            host_to_device: host,
            device_to_device: device,
            compose,
            allocate,
            free,
            allocate_composed,
            free_composed,
            allocate_pinned,
        })
    }

    /// A new device buffer holding a copy of `source`.
    pub fn upload(&self, source: &PinnedBuffer) -> Result<DeviceBuffer, LoaderError> {
        let mut target = self.alloc(source.len)?;
        let drained = Drained(self);
        // SAFETY: `source` is page-locked and borrowed until the copy is drained.
        unsafe { self.copy_in(&target, 0, source.ptr, source.len) }?;
        drained.finish()?;
        target.finish();
        Ok(target)
    }
}

/// A measurement, or None where the GPU lacked the memory for it.
fn fits<T>(measured: Result<T, LoaderError>) -> Result<Option<T>, LoaderError> {
    match measured {
        Ok(value) => Ok(Some(value)),
        Err(LoaderError::OutOfMemory(_)) => Ok(None),
        Err(error) => Err(error),
    }
}

/// The middle of `times` (an odd count).
fn median(mut times: Vec<f64>) -> f64 {
    times.sort_by(f64::total_cmp);
    times[times.len() / 2]
}

/// A GPU's copy bandwidths in bytes per second (page-locked host to device, device to device,
/// and a composition's strided copies into a buffer allocated beforehand), and the seconds to
/// allocate a buffer with its IPC handle (as a load does that finds no kept allocation of its
/// size) and to free it, for a cartridge and for a composition of four, and to allocate a
/// cartridge's page-locked staging buffer (each of the last three None where memory ran out).
pub struct Ceilings {
    pub host_to_device: f64,
    pub device_to_device: f64,
    pub compose: Option<f64>,
    pub allocate: f64,
    pub free: f64,
    pub allocate_composed: Option<f64>,
    pub free_composed: Option<f64>,
    pub allocate_pinned: Option<f64>,
}

/// Waits for the copies enqueued while it lives before the memory they touch can be freed, also
/// when an error or a panic leaves early.
struct Drained<'a>(&'a Gpu);

impl Drained<'_> {
    fn finish(self) -> Result<(), LoaderError> {
        let waited = self.0.wait();
        std::mem::forget(self);
        waited
    }
}

impl Drop for Drained<'_> {
    fn drop(&mut self) {
        if let Err(error) = self.0.wait() {
            tracing::error!(%error, "waiting for copies before freeing their memory");
        }
    }
}

/// Formats a device UUID the way `nvidia-smi -L` prints it.
fn format_uuid(bytes: &[u8; 16]) -> String {
    let hex: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
    format!(
        "GPU-{}-{}-{}-{}-{}",
        &hex[..8],
        &hex[8..12],
        &hex[12..16],
        &hex[16..20],
        &hex[20..]
    )
}

/// Device memory, freed on drop, or kept for reuse once finished (see the module's notes).
/// Another process may have opened it by its IPC handle: it is only dropped once no handle of the
/// loader refers to it.
#[derive(Debug)]
pub struct DeviceBuffer {
    /// Always `Some` until dropped.
    allocation: Option<Allocation>,
    kept: Arc<Kept>,
    finished: bool,
}

impl std::fmt::Debug for Kept {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Kept").finish_non_exhaustive()
    }
}

impl DeviceBuffer {
    fn allocation(&self) -> &Allocation {
        self.allocation.as_ref().expect("a live buffer")
    }

    fn ptr(&self) -> sys::CUdeviceptr {
        self.allocation().ptr
    }

    pub fn bytes(&self) -> usize {
        self.allocation().len
    }

    pub fn location(&self) -> &CudaLocation {
        &self.allocation().location
    }

    /// Every byte is written and the buffer is handed out whole: once dropped, its allocation
    /// may serve another buffer of its size.
    pub fn finish(&mut self) {
        self.finished = true;
    }
}

impl Drop for DeviceBuffer {
    fn drop(&mut self) {
        // Copies into or out of it were waited for by whoever enqueued them.
        if let Some(allocation) = self.allocation.take() {
            if self.finished {
                self.kept.lock().push(allocation);
            } else {
                self.kept.free(allocation);
            }
        }
    }
}

/// Page-locked host memory, freed on drop.
#[derive(Debug)]
pub struct PinnedBuffer {
    ptr: *mut u8,
    len: usize,
    context: Arc<CudaContext>,
}

// SAFETY: the buffer owns its allocation; access goes through `&self` / `&mut self`.
unsafe impl Send for PinnedBuffer {}
unsafe impl Sync for PinnedBuffer {}

impl PinnedBuffer {
    pub fn bytes(&self) -> usize {
        self.len
    }

    pub fn as_slice(&self) -> &[u8] {
        // SAFETY: `len` bytes allocated by cuMemHostAlloc, owned by `self`, borrowed shared.
        unsafe { std::slice::from_raw_parts(self.ptr, self.len) }
    }

    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        // SAFETY: `len` bytes allocated by cuMemHostAlloc, owned by `self`, borrowed mutably.
        unsafe { std::slice::from_raw_parts_mut(self.ptr, self.len) }
    }
}

impl Drop for PinnedBuffer {
    fn drop(&mut self) {
        // SAFETY: allocated by cuMemHostAlloc, freed once, no copy from it is in flight.
        let freed = self
            .context
            .bind_to_thread()
            .and_then(|()| unsafe { result::free_host(self.ptr.cast()) });
        if let Err(error) = freed {
            tracing::error!(%error, "freeing page-locked memory");
        }
    }
}

#[cfg(test)]
mod tests {
    use sha2::{Digest, Sha256};

    /// The embedded PTX is the one `loader/kernels/build` makes of the source beside it: a
    /// change to compose.cu without rebuilding its PTX fails here, where no GPU is needed.
    #[test]
    fn the_composition_ptx_is_built_from_its_source() {
        let source = include_str!("../kernels/compose.cu");
        let digest: String = Sha256::digest(source.as_bytes())
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        let first = super::COMPOSE_PTX.lines().next().unwrap_or_default();
        assert!(
            first.starts_with(&format!("// compose.cu sha256 {digest},")),
            "compose.ptx is stale (its first line: {first:?}): run loader/kernels/build"
        );
        for kernel in ["copy_rows_16", "copy_rows_1"] {
            assert!(
                super::COMPOSE_PTX.contains(&format!(".entry {kernel}(")),
                "compose.ptx lacks {kernel}"
            );
        }
    }
}
