//! Attention in tiles on the GPU's tensor cores (kernels/attention.cuh): the forward and the
//! backward never write a layer's `[rows, T]` score matrices to memory, which the composed form
//! (ops.rs) moves several times a layer. It takes attention in bf16 or f16 with heads of 64,
//! split keys (a cartridge's, then the input's own, each where it lies) and a mask of spans:
//! training's, and a prompt's without a cache. Everything else, and every CPU, takes the
//! composed form. The kernels' arithmetic is checked without a GPU by
//! kernels/emulated, and on a GPU against the composed form by this module's test.

use candle_core::cuda_backend::cudarc::driver::sys::CUfunction_attribute;
use candle_core::cuda_backend::cudarc::driver::{
    CudaSlice, CudaView, DeviceRepr, LaunchConfig, PushKernelArg,
};
use candle_core::cuda_backend::{CudaDType, CudaDevice, WrapErr};
use candle_core::op::BackpropOp;
use std::sync::OnceLock;

use candle_core::{CudaStorage, DType, Device, Result, Storage, Tensor};
use half::{bf16, f16};

use super::fused::cuda::{MODULE, OPS};
use super::ops::KeyGradients;

/// Threads per block, the rows a tile holds (the backward's unit of rows, and of the reach), and
/// the rows a forward block takes: the kernels' own.
const THREADS: u32 = 128;
const TILE: usize = 64;
const FORWARD_ROWS: usize = 128;
/// The backward's threads per block, and the keys a block takes.
const BACKWARD_THREADS: u32 = 256;
const KEYS: usize = 128;
/// The backward's shared memory (`sizeof(BackwardTiles)`), more than a block's static 48 KB:
/// given as dynamic shared memory, which a kernel takes beyond 48 KB only once allowed to.
const BACKWARD_SHARED_BYTES: u32 = 76_320;
const HEAD_DIM: usize = 64;
/// The most tiles of rows a head may have: the backward marks those that see its keys in
/// `SEEN_WORDS` (128) words of bits.
const MAX_ROW_TILES: usize = 128 * 32;
/// What the forward writes of each row tile's spans for the backward (the kernels' `Reach`).
const REACH: usize = 4;
/// The scores' scale, 1/√HEAD_DIM.
const SCALE: f32 = 0.125;

/// The keys and the values of an attention in tiles: each the batch's shared ones `[kv_heads, P,
/// 64]` (or none) and each sequence's own `[B, L, kv_heads, 64]` (ops.rs's `Keys::Split`).
pub struct KeyParts<'a> {
    pub keys: (Option<&'a Tensor>, &'a Tensor),
    pub values: (Option<&'a Tensor>, &'a Tensor),
}

impl KeyParts<'_> {
    fn all(&self) -> impl Iterator<Item = &Tensor> {
        [self.keys, self.values]
            .into_iter()
            .flat_map(|(shared, own)| shared.into_iter().chain([own]))
    }

    fn shared(&self) -> usize {
        self.keys.0.map_or(0, |shared| shared.dim(1).unwrap_or(0))
    }
}

/// Whether the tiled kernels take attention over these `[B, L, heads, head_dim]` queries (as
/// the projection makes them) and `parts`, `group` query heads to a key head, every position
/// seeing the first `prefix` keys and its span in `spans` `[B, L, 2]`: on a GPU with bf16 or f16
/// tensor cores (compute capability 8 or later), heads of 64, inputs laid out as the kernels
/// read them. `CARTRIDGE_ATTENTION=composed` sends all attention to the composed form: to
/// compare the two, or to go on should a kernel fail on some GPU.
pub fn applies(q: &Tensor, parts: &KeyParts, prefix: usize, spans: &Tensor, group: usize) -> bool {
    static COMPOSED: OnceLock<bool> = OnceLock::new();
    if *COMPOSED
        .get_or_init(|| std::env::var_os("CARTRIDGE_ATTENTION").is_some_and(|v| v == "composed"))
    {
        return false;
    }
    let Device::Cuda(device) = q.device() else {
        return false;
    };
    matches!(q.dtype(), DType::BF16 | DType::F16)
        && parts.all().all(|x| x.dtype() == q.dtype() && is_aligned(x))
        && is_aligned(q)
        && Sizes::of(q, parts, prefix, spans, group).is_ok()
        && built_for_tensor_cores()
        && device
            .cuda_stream()
            .context()
            .compute_capability()
            .is_ok_and(|(major, _)| major >= 8)
}

/// Whether the kernels were built for compute capability 8 or later (the PTX's `.target sm_NN`,
/// from `CUDA_COMPUTE_CAP` at build time): below it their tensor-core code is compiled to a trap,
/// which would poison the CUDA context on a GPU that has tensor cores.
fn built_for_tensor_cores() -> bool {
    static BUILT: OnceLock<bool> = OnceLock::new();
    *BUILT.get_or_init(|| {
        OPS.lines()
            .find_map(|line| line.trim().strip_prefix(".target sm_"))
            .and_then(|target| {
                let digits = target.trim_end_matches(|c: char| !c.is_ascii_digit());
                digits.parse::<u32>().ok()
            })
            .is_some_and(|capability| capability >= 80)
    })
}

/// Contiguous from a 16-byte boundary: the kernels read q, k, v and the output's gradient 16 bytes
/// at a time.
pub fn is_aligned(x: &Tensor) -> bool {
    x.is_contiguous() && (x.layout().start_offset() * x.dtype().size_in_bytes()).is_multiple_of(16)
}

/// The shape of one attention, from its queries and keys.
#[derive(Clone, Copy)]
struct Sizes {
    batch: usize,
    kv_heads: usize,
    rows: usize,
    length: usize,
    /// Keys the batch shares, before each sequence's own.
    shared: usize,
}

impl Sizes {
    /// The sizes of an attention the kernels can take, or why not.
    fn of(
        q: &Tensor,
        parts: &KeyParts,
        prefix: usize,
        spans: &Tensor,
        group: usize,
    ) -> Result<Self> {
        let (batch, length, heads, head_dim) = q.dims4()?;
        let shared = parts.shared();
        let columns = shared + length;
        let kv_heads = heads.checked_div(group).unwrap_or(0);
        let fits = |(shared_part, own): (Option<&Tensor>, &Tensor)| {
            own.dims() == [batch, length, kv_heads, HEAD_DIM]
                && shared_part.map_or(shared == 0, |x| x.dims() == [kv_heads, shared, HEAD_DIM])
        };
        if head_dim != HEAD_DIM
            || !fits(parts.keys)
            || !fits(parts.values)
            || group == 0
            || !heads.is_multiple_of(group)
            || q.elem_count() == 0
            || columns == 0
            || prefix > columns
            || (group * length).div_ceil(TILE) > MAX_ROW_TILES
            // The grids' y (row tiles forward, below MAX_ROW_TILES; key blocks backward) and
            // the kernels' u32 counts.
            || columns.div_ceil(KEYS) >= 65536
            || u32::try_from(columns.max(group * length)).is_err()
            || spans.dims() != [batch, length, 2]
            || spans.dtype() != DType::U32
            || !spans.is_contiguous()
        {
            candle_core::bail!(
                "attention in tiles: queries {:?}, keys and values {:?}, spans {:?} after a \
                 prefix of {prefix}, {group} query heads to a key head",
                q.shape(),
                parts.all().map(|x| x.shape()).collect::<Vec<_>>(),
                spans.shape()
            );
        }
        Ok(Self {
            batch,
            kv_heads,
            rows: group * length,
            shared,
            length,
        })
    }

    fn heads(&self) -> usize {
        self.batch * self.kv_heads
    }

    /// Keys in all: the shared ones, then each sequence's own.
    fn columns(&self) -> usize {
        self.shared + self.length
    }

    /// The kernels' trailing arguments: rows, length, kv_heads.
    fn arguments(&self) -> Result<[u32; 3]> {
        Ok([
            narrow(self.rows)?,
            narrow(self.length)?,
            narrow(self.kv_heads)?,
        ])
    }

    /// The forward's grid: for each head (x), a block per 128 query rows (y), the kernel
    /// taking the latest rows first.
    fn rows_grid(&self) -> Result<LaunchConfig> {
        self.grid(self.heads(), self.rows.div_ceil(FORWARD_ROWS), THREADS, 0)
    }

    /// The backward's grid: for each head (x), a block per 128 keys (y); heads first, so that
    /// the first keys' blocks (the prefix's, the longest) start first.
    fn keys_grid(&self) -> Result<LaunchConfig> {
        self.grid(
            self.heads(),
            self.columns().div_ceil(KEYS),
            BACKWARD_THREADS,
            BACKWARD_SHARED_BYTES,
        )
    }

    fn grid(&self, x: usize, y: usize, threads: u32, shared: u32) -> Result<LaunchConfig> {
        match (
            u32::try_from(x),
            u32::try_from(y).ok().filter(|&y| y < 65536),
        ) {
            (Ok(x), Some(y)) => Ok(LaunchConfig {
                grid_dim: (x, y, 1),
                block_dim: (threads, 1, 1),
                shared_mem_bytes: shared,
            }),
            _ => candle_core::bail!(
                "attention: {} rows and {} keys of {} heads",
                self.rows,
                self.columns(),
                self.heads()
            ),
        }
    }
}

/// A count as the kernels take it.
fn narrow(x: usize) -> Result<u32> {
    u32::try_from(x).map_err(|_| candle_core::Error::Msg(format!("attention: {x} is too large")))
}

/// A contiguous tensor's elements in device memory.
fn view<'a, T: CudaDType + DeviceRepr>(
    storage: &'a CudaStorage,
    tensor: &Tensor,
) -> Result<CudaView<'a, T>> {
    let (start, end) = tensor
        .layout()
        .contiguous_offsets()
        .ok_or_else(|| candle_core::Error::Msg("attention: an input is not contiguous".into()))?;
    Ok(storage.as_cuda_slice::<T>()?.slice(start..end))
}

/// [`view`] of an input the kernels read 16 bytes at a time.
fn aligned_view<'a, T: CudaDType + DeviceRepr>(
    storage: &'a CudaStorage,
    tensor: &Tensor,
) -> Result<CudaView<'a, T>> {
    if !is_aligned(tensor) {
        candle_core::bail!("attention: an input is not contiguous from a 16-byte boundary");
    }
    view(storage, tensor)
}

fn cuda(tensor: &Tensor) -> Result<CudaDevice> {
    match tensor.device() {
        Device::Cuda(device) => Ok(device.clone()),
        other => candle_core::bail!("attention in tiles on {other:?}"),
    }
}

fn wrap<T: CudaDType>(slice: CudaSlice<T>, device: &CudaDevice, shape: &[usize]) -> Tensor {
    Tensor::from_storage(
        Storage::Cuda(CudaStorage::wrap_cuda_slice(slice, device.clone())),
        shape,
        BackpropOp::none(),
        false,
    )
}

fn on_gpu(storage: &Storage) -> Result<&CudaStorage> {
    match storage {
        Storage::Cuda(storage) => Ok(storage),
        _ => candle_core::bail!("attention: an input is not on the GPU"),
    }
}

/// The views of `parts` the kernels take: the shared keys, the own, the shared values, the own
/// (a missing shared part as the own one, which the kernels do not read then).
fn part_views<'a, T: CudaDType + DeviceRepr>(
    storages: &'a [impl std::ops::Deref<Target = Storage>],
    parts: &[&Tensor; 4],
) -> Result<Vec<CudaView<'a, T>>> {
    storages
        .iter()
        .zip(parts)
        .map(|(storage, tensor)| aligned_view::<T>(on_gpu(storage)?, tensor))
        .collect()
}

/// The four tensors of `parts` in the kernels' order, a missing shared part as the own one.
fn part_tensors<'a>(parts: &KeyParts<'a>) -> [&'a Tensor; 4] {
    let (k_shared, k_own) = parts.keys;
    let (v_shared, v_own) = parts.values;
    [
        k_shared.unwrap_or(k_own),
        k_own,
        v_shared.unwrap_or(v_own),
        v_own,
    ]
}

/// `softmax(scale·q·kᵀ over the keys each row sees)·v` `[B, L, heads, 64]` (as `q`), each
/// row's log-sum-exp in base 2 `[B, kv_heads, group·L]` (f32, the kernels' rows: a key head's
/// query heads stacked) and each tile of 64 of those rows' reach (`REACH` u32s), for positions
/// seeing the first `prefix` keys and their span in `spans` `[B, L, 2]`.
pub fn forward(
    q: &Tensor,
    parts: &KeyParts,
    prefix: usize,
    spans: &Tensor,
    group: usize,
) -> Result<(Tensor, Tensor, Tensor)> {
    match q.dtype() {
        DType::BF16 => forward_as::<bf16>(q, parts, prefix, spans, group),
        DType::F16 => forward_as::<f16>(q, parts, prefix, spans, group),
        other => candle_core::bail!("attention in tiles in {other:?}"),
    }
}

fn forward_as<T: CudaDType + DeviceRepr + candle_core::WithDType>(
    q: &Tensor,
    parts: &KeyParts,
    prefix: usize,
    spans: &Tensor,
    group: usize,
) -> Result<(Tensor, Tensor, Tensor)> {
    let sizes = Sizes::of(q, parts, prefix, spans, group)?;
    let device = cuda(q)?;
    let rows = sizes.heads() * sizes.rows;
    let tiles = sizes.heads() * sizes.rows.div_ceil(TILE);
    // SAFETY (all three): the kernel writes every element, each row's output and log-sum-exp and
    // each row tile's reach.
    let out = unsafe { device.alloc::<T>(rows * HEAD_DIM) }?;
    let lse = unsafe { device.alloc::<f32>(rows) }?;
    let reach = unsafe { device.alloc::<u32>(tiles * REACH) }?;
    // The storages are held (read-locked) until the kernel is enqueued.
    let tensors = part_tensors(parts);
    let storages: Vec<_> = tensors.iter().map(|x| x.storage_and_layout().0).collect();
    let key_views = part_views::<T>(&storages, &tensors)?;
    let (qs, ss) = (q.storage_and_layout().0, spans.storage_and_layout().0);
    let (qv, sv) = (
        aligned_view::<T>(on_gpu(&qs)?, q)?,
        view::<u32>(on_gpu(&ss)?, spans)?,
    );
    let func = device.get_or_load_custom_func(
        &format!("flash_forward_{}", T::DTYPE.as_str()),
        MODULE,
        OPS,
    )?;
    let (shared, prefix) = (sizes.shared as u32, prefix as u32);
    let arguments = sizes.arguments()?;
    let mut builder = func.builder();
    builder.arg(&qv);
    for part in &key_views {
        builder.arg(part);
    }
    builder
        .arg(&shared)
        .arg(&sv)
        .arg(&prefix)
        .arg(&out)
        .arg(&lse)
        .arg(&reach);
    for argument in &arguments {
        builder.arg(argument);
    }
    builder.arg(&SCALE);
    // SAFETY: the parameters are the kernel's in number, order and type; the grid covers the
    // rows the outputs hold and reads within the inputs' shapes (checked by `Sizes::of`).
    unsafe { builder.launch(sizes.rows_grid()?) }.w()?;
    Ok((
        wrap(out, &device, q.dims()),
        wrap(lse, &device, &[sizes.batch, sizes.kv_heads, sizes.rows]),
        wrap(reach, &device, &[tiles, REACH]),
    ))
}

/// The gradients of [`forward`]'s inputs given `grad` of its output (as `q`, contiguous from a
/// 16-byte boundary), for the same `(prefix, spans)` and the forward's `reach` and
/// log-sum-exp, and `sums` = [`row_sums`]: dq in f32, and the keys' and the values'.
pub fn backward(
    q: &Tensor,
    parts: &KeyParts,
    seen: (usize, &Tensor, &Tensor),
    grad: &Tensor,
    lse: &Tensor,
    sums: &Tensor,
    group: usize,
) -> Result<(Tensor, KeyGradients, KeyGradients)> {
    match q.dtype() {
        DType::BF16 => backward_as::<bf16>(q, parts, seen, grad, lse, sums, group),
        DType::F16 => backward_as::<f16>(q, parts, seen, grad, lse, sums, group),
        other => candle_core::bail!("attention in tiles in {other:?}"),
    }
}

fn backward_as<T: CudaDType + DeviceRepr + candle_core::WithDType>(
    q: &Tensor,
    parts: &KeyParts,
    (prefix, spans, reach): (usize, &Tensor, &Tensor),
    grad: &Tensor,
    lse: &Tensor,
    sums: &Tensor,
    group: usize,
) -> Result<(Tensor, KeyGradients, KeyGradients)> {
    let sizes = Sizes::of(q, parts, prefix, spans, group)?;
    if grad.dims() != q.dims() || grad.dtype() != q.dtype() {
        candle_core::bail!(
            "attention: a gradient {:?} for an output {:?}",
            grad.shape(),
            q.shape()
        );
    }
    for (name, x) in [("log-sum-exp", lse), ("sums", sums)] {
        if x.dims() != [sizes.batch, sizes.kv_heads, sizes.rows] || x.dtype() != DType::F32 {
            candle_core::bail!("attention: {name} is {:?} {:?}", x.dtype(), x.shape());
        }
    }
    let tiles = sizes.heads() * sizes.rows.div_ceil(TILE);
    if reach.dims() != [tiles, REACH] || reach.dtype() != DType::U32 {
        candle_core::bail!(
            "attention: reach is {:?} {:?}",
            reach.dtype(),
            reach.shape()
        );
    }
    let device = cuda(q)?;
    // The blocks add to every query row's dQ: it starts at zero.
    let dq = device.alloc_zeros::<f32>(sizes.heads() * sizes.rows * HEAD_DIM)?;
    // The shared keys' gradients are summed over the batch by atomics: they start at zero (a
    // size of zero is one element, a pointer the kernel takes and writes nothing at).
    let shared_rows = (sizes.kv_heads * sizes.shared * HEAD_DIM).max(1);
    let dk_shared = device.alloc_zeros::<f32>(shared_rows)?;
    let dv_shared = device.alloc_zeros::<f32>(shared_rows)?;
    // SAFETY (both): the kernel writes every own key's row.
    let own_rows = sizes.heads() * sizes.length * HEAD_DIM;
    let dk_own = unsafe { device.alloc::<T>(own_rows) }?;
    let dv_own = unsafe { device.alloc::<T>(own_rows) }?;
    let tensors = part_tensors(parts);
    let storages: Vec<_> = tensors.iter().map(|x| x.storage_and_layout().0).collect();
    let key_views = part_views::<T>(&storages, &tensors)?;
    let (qs, ss, rs, gs) = (
        q.storage_and_layout().0,
        spans.storage_and_layout().0,
        reach.storage_and_layout().0,
        grad.storage_and_layout().0,
    );
    let (ls, us) = (lse.storage_and_layout().0, sums.storage_and_layout().0);
    let func = device.get_or_load_custom_func(
        &format!("flash_backward_{}", T::DTYPE.as_str()),
        MODULE,
        OPS,
    )?;
    let (qv, gv) = (
        aligned_view::<T>(on_gpu(&qs)?, q)?,
        aligned_view::<T>(on_gpu(&gs)?, grad)?,
    );
    let (sv, rv) = (
        view::<u32>(on_gpu(&ss)?, spans)?,
        view::<u32>(on_gpu(&rs)?, reach)?,
    );
    let (lv, uv) = (
        view::<f32>(on_gpu(&ls)?, lse)?,
        view::<f32>(on_gpu(&us)?, sums)?,
    );
    // Its tiles take more shared memory than a kernel may use unless allowed: allowed at each
    // launch, a driver call of microseconds beside a kernel of a millisecond.
    func.set_attribute(
        CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
        BACKWARD_SHARED_BYTES as i32,
    )
    .w()?;
    let (shared, prefix) = (sizes.shared as u32, prefix as u32);
    let arguments = sizes.arguments()?;
    let mut builder = func.builder();
    builder.arg(&qv);
    for part in &key_views {
        builder.arg(part);
    }
    builder
        .arg(&shared)
        .arg(&sv)
        .arg(&prefix)
        .arg(&rv)
        .arg(&gv)
        .arg(&lv)
        .arg(&uv)
        .arg(&dq)
        .arg(&dk_shared)
        .arg(&dk_own)
        .arg(&dv_shared)
        .arg(&dv_own);
    for argument in &arguments {
        builder.arg(argument);
    }
    builder.arg(&SCALE);
    // SAFETY: as in the forward; `dq` and the shared gradients are zeroed and cover every query
    // row and shared key, `reach` is the forward's for these sizes (checked above).
    unsafe { builder.launch(sizes.keys_grid()?) }.w()?;
    let (batch, kv_heads) = (sizes.batch, sizes.kv_heads);
    let gradients = |shared: CudaSlice<f32>, own: CudaSlice<T>| -> Result<KeyGradients> {
        let shared = wrap(shared, &device, &[shared_rows]);
        Ok(KeyGradients {
            shared: shared
                .narrow(0, 0, kv_heads * sizes.shared * HEAD_DIM)?
                .reshape((kv_heads, sizes.shared, HEAD_DIM))?,
            own: wrap(own, &device, &[batch, sizes.length, kv_heads, HEAD_DIM]),
        })
    };
    Ok((
        wrap(dq, &device, q.dims()),
        gradients(dk_shared, dk_own)?,
        gradients(dv_shared, dv_own)?,
    ))
}

/// rowsum(grad·out) of [`forward`]'s output `[B, L, heads, 64]` and its gradient, in f32 and in
/// the kernels' rows, `[B, heads / group, group·L]`: the backward's `sums`, in one pass (the
/// composed form casts both, multiplies and sums).
pub fn row_sums(grad: &Tensor, out: &Tensor, group: usize) -> Result<Tensor> {
    match out.dtype() {
        DType::BF16 => row_sums_as::<bf16>(grad, out, group),
        DType::F16 => row_sums_as::<f16>(grad, out, group),
        other => candle_core::bail!("attention's row sums in {other:?}"),
    }
}

fn row_sums_as<T: CudaDType + DeviceRepr + candle_core::WithDType>(
    grad: &Tensor,
    out: &Tensor,
    group: usize,
) -> Result<Tensor> {
    let (batch, length, heads, head_dim) = out.dims4()?;
    if head_dim != HEAD_DIM
        || grad.dims() != out.dims()
        || grad.dtype() != out.dtype()
        || group == 0
        || !heads.is_multiple_of(group)
    {
        candle_core::bail!(
            "attention's row sums of {:?} {:?} and {:?} {:?}, {group} query heads to a key head",
            grad.dtype(),
            grad.shape(),
            out.dtype(),
            out.shape()
        );
    }
    let count = batch * length * heads;
    let device = cuda(out)?;
    // SAFETY: the kernel writes every row's sum.
    let sums = unsafe { device.alloc::<f32>(count) }?;
    let (gs, os) = (grad.storage_and_layout().0, out.storage_and_layout().0);
    let (gv, ov) = (
        aligned_view::<T>(on_gpu(&gs)?, grad)?,
        aligned_view::<T>(on_gpu(&os)?, out)?,
    );
    let func = device.get_or_load_custom_func(
        &format!("flash_row_sums_{}", T::DTYPE.as_str()),
        MODULE,
        OPS,
    )?;
    let config = LaunchConfig {
        grid_dim: (narrow(count.div_ceil(THREADS as usize / 32))?, 1, 1),
        block_dim: (THREADS, 1, 1),
        shared_mem_bytes: 0,
    };
    let shape = [batch, heads / group, group * length];
    // count, length, kv_heads, group.
    let arguments = [count, length, heads / group, group]
        .map(narrow)
        .into_iter()
        .collect::<Result<Vec<u32>>>()?;
    let mut builder = func.builder();
    builder.arg(&gv).arg(&ov).arg(&sums);
    for argument in &arguments {
        builder.arg(argument);
    }
    // SAFETY: the parameters are the kernel's; a block reads 4 whole rows of 64 within both
    // inputs (same shape, checked) and writes each sum within the `count` of the output.
    unsafe { builder.launch(config) }.w()?;
    Ok(wrap(sums, &device, &shape))
}

#[cfg(test)]
mod tests {
    use candle_core::D;

    use super::*;
    use crate::model::Mask;
    use crate::model::ops::tests::{attention_and_gradients, composed_attention_and_gradients};

    /// The largest difference from `reference`, relative to its largest element.
    fn relative(x: &Tensor, reference: &Tensor) -> Result<f32> {
        let x = x.to_dtype(DType::F32)?;
        let largest = reference.abs()?.max_all()?.to_scalar::<f32>()?;
        Ok((x - reference)?.abs()?.max_all()?.to_scalar::<f32>()? / largest)
    }

    #[test]
    fn tiles_compute_the_composed_attention_and_its_gradients() -> Result<()> {
        // Two sequences of 100 positions after a prefix, 3 key heads each shared by 3 query
        // heads: partial tiles of rows. The first is causal; the second packs conversations of
        // 30 positions, then 10 of padding that see the prefix only. A 37-token prefix gives
        // partial tiles of keys too (137); 28 gives 128 keys, whole tiles.
        let device = Device::new_cuda(0)?;
        let (batch, kv_heads, group, length) = (2, 3, 3, 100);
        for (prefix, dtype) in [37, 28]
            .into_iter()
            .flat_map(|prefix| [(prefix, DType::BF16), (prefix, DType::F16)])
        {
            let total = prefix + length;
            let at = |i: usize| (prefix + i) as u32;
            let spans: Vec<(u32, u32)> = (0..length)
                .map(|i| (at(0), at(i)))
                .chain((0..length).map(|i| match i {
                    90.. => (total as u32, 0),
                    _ => (at(i / 30 * 30), at(i)),
                }))
                .collect();
            let mask = Mask::spans(&spans, (batch, length), prefix, total, &device)?;
            let random = |shape: &[usize]| Tensor::randn(0f32, 1.0, shape, &device);
            let queries = [batch, length, kv_heads * group, 64];
            let (shared, own) = ([kv_heads, prefix, 64], [batch, length, kv_heads, 64]);
            let (q, w) = (random(&queries)?, random(&queries)?);
            let kv = [
                random(&shared)?,
                random(&own)?,
                random(&shared)?,
                random(&own)?,
            ];
            let parts = [&kv[0], &kv[1], &kv[2], &kv[3]];
            let reference = composed_attention_and_gradients(&q, parts, &mask, group, &w)?;
            let q = q.to_dtype(dtype)?;
            let kv = kv.map(|x| x.to_dtype(dtype).expect("a cast"));
            let parts = [&kv[0], &kv[1], &kv[2], &kv[3]];
            let (p, pairs) = mask.spans_form().expect("spans");
            let split = KeyParts {
                keys: (Some(parts[0]), parts[1]),
                values: (Some(parts[2]), parts[3]),
            };
            assert!(applies(&q, &split, p, pairs, group));
            let tiled = attention_and_gradients(&q, parts, &mask, group, &w)?;
            for (name, (x, want)) in ["output", "dq", "dk shared", "dk", "dv shared", "dv"]
                .iter()
                .zip(tiled.iter().zip(&reference))
            {
                let error = relative(x, want)?;
                println!("{dtype:?} prefix {prefix} {name}: {error:.2e}");
                assert!(error < 2e-2, "{dtype:?} prefix {prefix} {name}: {error}");
            }
            // The padding (position 90 on) sees the prefix: not zeros.
            assert!(
                tiled[0]
                    .narrow(1, 95, 1)?
                    .abs()?
                    .sum(D::Minus1)?
                    .min_all()?
                    .to_scalar::<f32>()?
                    > 0.0
            );
        }
        Ok(())
    }
}
