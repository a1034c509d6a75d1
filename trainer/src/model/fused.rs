//! The fused ops behind [`super::ops`]: each one pass over large matrices that the composed
//! forms crossed several times (attention's masked softmax and its gradient, the loss over the
//! vocabulary and its gradient, RMSNorm's gradient, the MLP's gate and the rotary embedding with
//! theirs). Each is a candle custom op with a CPU
//! implementation here (rayon; sums in f32, f64 for f64) and a kernel of kernels/ops.cu on the
//! GPU (kernels/emulated runs those on the host for the tests). The gradients are ops of their
//! own, which ops.rs's backward functions apply.

use candle_core::backend::BackendStorage;
use candle_core::{
    CpuStorage, CustomOp1, CustomOp2, CustomOp3, DType, InplaceOp2, Layout, Result, Shape, Storage,
    Tensor, WithDType,
};
use num_traits::{Float, One, Zero};
use rayon::prelude::*;

use super::ops::accumulation_dtype;

/// Calls `$f::<T>` for the float dtype `$dtype`.
macro_rules! for_float_dtype {
    ($dtype:expr, $f:ident($($arg:expr),*)) => {
        match $dtype {
            DType::F32 => $f::<f32>($($arg),*),
            DType::F64 => $f::<f64>($($arg),*),
            DType::BF16 => $f::<half::bf16>($($arg),*),
            DType::F16 => $f::<half::f16>($($arg),*),
            other => candle_core::bail!("{other:?} is not a float dtype"),
        }
    };
}

/// A tensor an op holds beside its inputs (a weight, the teacher's ids), as
/// `Tensor::storage_and_layout` locks it: its contiguous elements in host memory, or an error
/// saying `what` is not there.
fn on_host<'a, T: WithDType>(
    (storage, layout): &'a (impl std::ops::Deref<Target = Storage>, &'a Layout),
    what: &str,
) -> Result<&'a [T]> {
    match &**storage {
        Storage::Cpu(storage) => contiguous(storage, layout),
        _ => candle_core::bail!("{what} is not in host memory"),
    }
}

/// [`on_host`]'s GPU side: the held tensor as a kernel's input.
#[cfg(feature = "cuda")]
fn on_gpu<'a>(
    (storage, layout): &'a (impl std::ops::Deref<Target = Storage>, &'a Layout),
    what: &str,
) -> Result<(&'a candle_core::CudaStorage, &'a Layout)> {
    match &**storage {
        Storage::Cuda(storage) => Ok((storage, layout)),
        _ => candle_core::bail!("{what} is not on the GPU"),
    }
}

/// RMSNorm, `w·x·(mean(x²) + eps)^-½` over the last axis, each row in one pass (kernels/ops.cu
/// on the GPU, where candle's own kernel took about twice the time its traffic needs), sums of
/// squares in f32 (f64 for f64).
pub(super) struct RmsNorm {
    pub(super) weight: Tensor,
    pub(super) eps: f32,
}

impl CustomOp1 for RmsNorm {
    fn name(&self) -> &'static str {
        "rms-norm"
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout) -> Result<(CpuStorage, Shape)> {
        fn run<T: Element>(this: &RmsNorm, s1: &CpuStorage, l1: &Layout) -> Result<CpuStorage> {
            let (_, columns) = elementwise("rms-norm", &[l1])?;
            check_weight("rms-norm", &this.weight, columns)?;
            let held = this.weight.storage_and_layout();
            let weight = on_host::<T>(&held, "rms-norm: the weight")?;
            let x = contiguous::<T>(s1, l1)?;
            let n = <T::Wide as WithDType>::from_f64(columns as f64);
            let eps = <T::Wide as WithDType>::from_f64(f64::from(this.eps));
            let mut out = vec![T::zero(); x.len()];
            out.par_chunks_mut(columns)
                .zip(x.par_chunks(columns))
                .for_each(|(y, x)| {
                    let squares = x
                        .iter()
                        .fold(T::Wide::zero(), |sum, x| sum + x.widen() * x.widen());
                    let r = (squares / n + eps).sqrt().recip();
                    for ((y, x), w) in y.iter_mut().zip(x).zip(weight) {
                        *y = T::narrow(x.widen() * r * w.widen());
                    }
                });
            Ok(T::to_cpu_storage_owned(out))
        }
        Ok((
            for_float_dtype!(s1.dtype(), run(self, s1, l1))?,
            l1.shape().clone(),
        ))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        let (rows, columns) = elementwise("rms-norm", &[l1])?;
        check_weight("rms-norm", &self.weight, columns)?;
        let held = self.weight.storage_and_layout();
        let (weight, weight_layout) = on_gpu(&held, "rms-norm: the weight")?;
        let dtype = s1.dtype();
        let storage = cuda::launch(
            "rms_norm",
            cuda::warp_row_blocks(rows),
            &[(s1, l1, dtype), (weight, weight_layout, dtype)],
            (dtype, rows * columns),
            &[columns, rows],
            &[self.eps],
        )?;
        Ok((storage, l1.shape().clone()))
    }
}

/// `sum += x` in place, for tensors of one shape: a residual connection's add, into the buffer
/// of the branch's fresh output, so that the sum needs no buffer of its own (a kernel of
/// kernels/ops.cu on the GPU).
pub(super) struct AddInPlace;

/// `sum[i] += x[i]` in `T::Wide`, rounded.
fn add_into<T: Element>(sum: &mut [T], x: &[T]) {
    sum.par_iter_mut()
        .zip(x)
        .for_each(|(s, x)| *s = T::narrow(s.widen() + x.widen()));
}

impl InplaceOp2 for AddInPlace {
    fn name(&self) -> &'static str {
        "add-in-place"
    }

    fn cpu_fwd(
        &self,
        s1: &mut CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<()> {
        elementwise("add-in-place", &[l1, l2])?;
        let (start, end) = l1
            .contiguous_offsets()
            .ok_or_else(|| candle_core::Error::Msg("add-in-place: a strided sum".into()))?;
        match s1 {
            CpuStorage::BF16(sum) => add_into(&mut sum[start..end], contiguous(s2, l2)?),
            CpuStorage::F16(sum) => add_into(&mut sum[start..end], contiguous(s2, l2)?),
            CpuStorage::F32(sum) => add_into(&mut sum[start..end], contiguous(s2, l2)?),
            CpuStorage::F64(sum) => add_into(&mut sum[start..end], contiguous(s2, l2)?),
            other => candle_core::bail!("add-in-place: {:?} is not a float dtype", other.dtype()),
        }
        Ok(())
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &mut candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
    ) -> Result<()> {
        let (rows, columns) = elementwise("add-in-place", &[l1, l2])?;
        let dtype = s1.dtype();
        cuda::launch_into(
            "add_in_place",
            cuda::warp_row_blocks(rows),
            &[(s2, l2, dtype)],
            (s1, l1),
            &[columns, rows],
        )
    }
}

/// A norm's weight must be `[columns]`.
fn check_weight(name: &str, weight: &Tensor, columns: usize) -> Result<()> {
    if weight.dims() != [columns] {
        candle_core::bail!(
            "{name}: a weight of {:?} for rows of {columns}",
            weight.shape()
        );
    }
    Ok(())
}

/// RMSNorm's input gradient for `y = w·x·r`, `r = (mean(x²) + eps)^-½`, given the output's
/// gradient `g`: `dx = r·g·w - x·r³·mean(g·w·x)`, plus `residual` where there is one (the
/// gradient reaching x around the norm), each row in one pass (kernels/ops.cu on the GPU),
/// sums in f32.
pub(super) struct RmsNormGradient {
    pub(super) weight: Tensor,
    pub(super) residual: Option<Tensor>,
    pub(super) eps: f32,
}

impl RmsNormGradient {
    fn columns(&self, x: &Layout, grad: &Layout) -> Result<usize> {
        let columns = x.shape().dims().last().copied().unwrap_or(1);
        let residual = self.residual.as_ref().map(Tensor::shape);
        if x.shape() != grad.shape()
            || self.weight.dims() != [columns]
            || residual.is_some_and(|shape| shape != x.shape())
        {
            candle_core::bail!(
                "rms-norm gradient: x {:?}, its gradient {:?}, the weight {:?} and the residual \
                 gradient {residual:?} disagree",
                x.shape(),
                grad.shape(),
                self.weight.shape()
            );
        }
        Ok(columns)
    }
}

impl CustomOp2 for RmsNormGradient {
    fn name(&self) -> &'static str {
        "rms-norm-gradient"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        fn run<T: Element>(
            this: &RmsNormGradient,
            s1: &CpuStorage,
            l1: &Layout,
            s2: &CpuStorage,
            l2: &Layout,
        ) -> Result<CpuStorage> {
            let columns = this.columns(l1, l2)?;
            let held = this.weight.storage_and_layout();
            let weight = on_host::<T>(&held, "rms-norm gradient: the weight")?;
            let residual = this.residual.as_ref().map(Tensor::storage_and_layout);
            let residual = residual
                .as_ref()
                .map(|held| on_host::<T>(held, "rms-norm gradient: the residual"))
                .transpose()?;
            let (x, grad) = (contiguous::<T>(s1, l1)?, contiguous::<T>(s2, l2)?);
            Ok(T::to_cpu_storage_owned(rms_norm_gradient_rows(
                x, grad, weight, residual, columns, this.eps,
            )))
        }
        Ok((
            for_float_dtype!(s1.dtype(), run(self, s1, l1, s2, l2))?,
            l1.shape().clone(),
        ))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        let columns = self.columns(l1, l2)?;
        let held = self.weight.storage_and_layout();
        let (weight, weight_layout) = on_gpu(&held, "rms-norm gradient: the weight")?;
        let residual = self.residual.as_ref().map(Tensor::storage_and_layout);
        let dtype = s1.dtype();
        let mut inputs = vec![
            (s1, l1, dtype),
            (s2, l2, dtype),
            (weight, weight_layout, dtype),
        ];
        if let Some(held) = &residual {
            let (storage, layout) = on_gpu(held, "rms-norm gradient: the residual")?;
            inputs.push((storage, layout, dtype));
        }
        let elements = l1.shape().elem_count();
        let rows = elements / columns.max(1);
        let storage = cuda::launch(
            if residual.is_some() {
                "rms_norm_gradient_add"
            } else {
                "rms_norm_gradient"
            },
            cuda::warp_row_blocks(rows),
            &inputs,
            (dtype, elements),
            &[columns, rows],
            &[self.eps],
        )?;
        Ok((storage, l1.shape().clone()))
    }
}

/// The MLP's gate, `silu(gate)·up`, of `[.., 2·columns]` rows holding a gate then an up (one
/// projection makes both): `[.., columns]`, in one pass (kernels/ops.cu on the GPU); in
/// `T::Wide`.
pub(super) struct SwiGlu;

/// [`SwiGlu`]'s gradients given the output's, laid out as its input (each row's `d gate` then
/// its `d up`), in one pass over the inputs (the composed form took about ten elementwise ops
/// over the MLP's width).
pub(super) struct SwiGluGradient;

/// The rows and columns (the output's width) of a [`SwiGlu`] input, and of its output's gradient
/// where there is one.
fn gate_up_shape(name: &str, gate_up: &Layout, grad: Option<&Layout>) -> Result<(usize, usize)> {
    let width = gate_up.dims().last().copied().unwrap_or(0);
    if width == 0 || width % 2 != 0 || grad.is_some_and(|grad| *grad.shape() != halved(gate_up)) {
        candle_core::bail!(
            "{name}: gates and ups {:?} (each row a gate then an up) and a gradient {:?}",
            gate_up.shape(),
            grad.map(Layout::shape)
        );
    }
    Ok((gate_up.shape().elem_count() / width, width / 2))
}

/// `[.., columns]` for a [`SwiGlu`] input of `[.., 2·columns]`.
fn halved(gate_up: &Layout) -> Shape {
    let mut dims = gate_up.dims().to_vec();
    if let Some(last) = dims.last_mut() {
        *last /= 2;
    }
    Shape::from(dims)
}

/// The rows and columns of `[.., columns]` inputs of one shape, as kernels take them.
fn elementwise(name: &str, layouts: &[&Layout]) -> Result<(usize, usize)> {
    let shape = layouts[0].shape();
    if let Some(other) = layouts.iter().find(|l| l.shape() != shape) {
        candle_core::bail!("{name}: inputs {shape:?} and {:?} differ", other.shape());
    }
    let columns = shape.dims().last().copied().unwrap_or(1);
    Ok((shape.elem_count() / columns.max(1), columns))
}

/// silu(g)·u, and the sigmoid of g it used.
fn swiglu_parts<A: Float>(g: A, u: A) -> (A, A) {
    let sigmoid = (A::one() + (-g).exp()).recip();
    (g * sigmoid * u, sigmoid)
}

impl CustomOp1 for SwiGlu {
    fn name(&self) -> &'static str {
        "swiglu"
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout) -> Result<(CpuStorage, Shape)> {
        fn run<T: Element>(s1: &CpuStorage, l1: &Layout) -> Result<CpuStorage> {
            let (_, columns) = gate_up_shape("swiglu", l1, None)?;
            let out: Vec<T> = contiguous::<T>(s1, l1)?
                .par_chunks(2 * columns)
                .flat_map_iter(|row| {
                    let (gate, up) = row.split_at(columns);
                    gate.iter()
                        .zip(up)
                        .map(|(&g, &u)| T::narrow(swiglu_parts(g.widen(), u.widen()).0))
                })
                .collect();
            Ok(T::to_cpu_storage_owned(out))
        }
        Ok((for_float_dtype!(s1.dtype(), run(s1, l1))?, halved(l1)))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        let (rows, columns) = gate_up_shape("swiglu", l1, None)?;
        let dtype = s1.dtype();
        let storage = cuda::launch(
            "swiglu",
            rows,
            &[(s1, l1, dtype)],
            (dtype, rows * columns),
            &[columns],
            &[],
        )?;
        Ok((storage, halved(l1)))
    }
}

impl CustomOp2 for SwiGluGradient {
    fn name(&self) -> &'static str {
        "swiglu-gradient"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        fn run<T: Element>(
            s1: &CpuStorage,
            l1: &Layout,
            s2: &CpuStorage,
            l2: &Layout,
        ) -> Result<CpuStorage> {
            let (_, columns) = gate_up_shape("swiglu gradient", l1, Some(l2))?;
            let (gate_up, grad) = (contiguous::<T>(s1, l1)?, contiguous::<T>(s2, l2)?);
            let mut out = vec![T::zero(); gate_up.len()];
            out.par_chunks_mut(2 * columns)
                .zip(
                    gate_up
                        .par_chunks(2 * columns)
                        .zip(grad.par_chunks(columns)),
                )
                .for_each(|(out, (gate_up, grad))| {
                    let (d_gate, d_up) = out.split_at_mut(columns);
                    let (gate, up) = gate_up.split_at(columns);
                    for ((dg, du), ((&g, &u), &d)) in d_gate
                        .iter_mut()
                        .zip(d_up)
                        .zip(gate.iter().zip(up).zip(grad))
                    {
                        let (g, u, d) = (g.widen(), u.widen(), d.widen());
                        let (_, sigmoid) = swiglu_parts(g, u);
                        let one = T::Wide::one();
                        *dg = T::narrow(d * u * sigmoid * (one + g * (one - sigmoid)));
                        *du = T::narrow(d * g * sigmoid);
                    }
                });
            Ok(T::to_cpu_storage_owned(out))
        }
        Ok((
            for_float_dtype!(s1.dtype(), run(s1, l1, s2, l2))?,
            l1.shape().clone(),
        ))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        let (rows, columns) = gate_up_shape("swiglu gradient", l1, Some(l2))?;
        let dtype = s1.dtype();
        let storage = cuda::launch(
            "swiglu_gradient",
            rows,
            &[(s1, l1, dtype), (s2, l2, dtype)],
            (dtype, 2 * rows * columns),
            &[columns],
            &[],
        )?;
        Ok((storage, l1.shape().clone()))
    }
}

/// The rotary embedding of the queries and keys of one projection's stacked output `[..,
/// (heads + 2·kv_heads)·dim]`, and a copy of its values, to the queries `[.., heads, dim]`, the
/// keys and the values `[.., kv_heads, dim]`, one after another in one buffer (flat): each pair
/// `(x[i], x[i + dim/2])` of a head rotated by its position's angles, given as `cos` and `sin`
/// `[.., dim/2]`, in one pass (kernels/ops.cu on the GPU).
pub(super) struct RopeQkv {
    pub(super) heads: usize,
    pub(super) kv_heads: usize,
    pub(super) angles: Angles,
}

/// [`RopeQkv`]'s input gradient given its outputs' (the queries', the keys', the values'),
/// stacked as its input: the rotation back, in one pass.
pub(super) struct RopeQkvGradient {
    pub(super) angles: Angles,
}

/// The rotations' angles, as [`RopeQkv`] and its gradient take them: cosines and sines of one
/// shape, `[.., dim/2]`, contiguous.
pub(super) struct Angles {
    cos: Tensor,
    sin: Tensor,
}

impl Angles {
    pub(super) fn new(cos: &Tensor, sin: &Tensor) -> Result<Self> {
        if sin.shape() != cos.shape() {
            candle_core::bail!(
                "rotary embedding: cosines {:?}, sines {:?}",
                cos.shape(),
                sin.shape()
            );
        }
        Ok(Self {
            cos: cos.contiguous()?,
            sin: sin.contiguous()?,
        })
    }
    /// The cosines and the sines, locked for reading.
    fn held(&self) -> [(impl std::ops::Deref<Target = Storage> + '_, &Layout); 2] {
        [&self.cos, &self.sin].map(Tensor::storage_and_layout)
    }
}

/// A [`RopeQkv`]'s rows (positions), heads and pairs a head.
#[derive(Clone, Copy, Debug)]
struct RopeSizes {
    rows: usize,
    heads: usize,
    kv_heads: usize,
    half: usize,
}

impl RopeSizes {
    /// Of stacked projections `[.., (heads + 2·kv_heads)·dim]` and angles `[.., dim/2]`.
    fn stacked(qkv: &Layout, (heads, kv_heads): (usize, usize), angles: &Tensor) -> Result<Self> {
        let half = angles.dims().last().copied().unwrap_or(0);
        let width = (heads + 2 * kv_heads) * 2 * half;
        let rows = qkv.shape().elem_count() / width.max(1);
        let sizes = Self {
            rows,
            heads,
            kv_heads,
            half,
        };
        if width == 0 || qkv.dims().last() != Some(&width) || angles.elem_count() != rows * half {
            candle_core::bail!(
                "rotary embedding: {heads} query and {kv_heads} key heads of {:?} at angles {:?}",
                qkv.shape(),
                angles.shape()
            );
        }
        Ok(sizes)
    }

    /// Of queries `[.., heads, dim]`, keys and values `[.., kv_heads, dim]` and angles `[..,
    /// dim/2]`.
    fn split(parts: [&Layout; 3], angles: &Tensor) -> Result<Self> {
        let [q, k, v] = parts.map(|l| l.dims());
        let heads_of = |dims: &[usize]| match dims {
            [leading @ .., heads, dim] => Some((leading.iter().product::<usize>(), *heads, *dim)),
            _ => None,
        };
        let half = angles.dims().last().copied().unwrap_or(0);
        match (heads_of(q), heads_of(k)) {
            (Some((rows, heads, dim)), Some((key_rows, kv_heads, key_dim)))
                if half > 0
                    && dim == 2 * half
                    && key_dim == dim
                    && key_rows == rows
                    && v == k
                    && angles.elem_count() == rows * half =>
            {
                Ok(Self {
                    rows,
                    heads,
                    kv_heads,
                    half,
                })
            }
            _ => candle_core::bail!(
                "rotary embedding's gradient: queries' {q:?}, keys' {k:?} and values' {v:?} at \
                 angles {:?}",
                angles.shape()
            ),
        }
    }

    fn dim(&self) -> usize {
        2 * self.half
    }

    /// Elements a row of the stacked projections.
    fn stacked_width(&self) -> usize {
        (self.heads + 2 * self.kv_heads) * self.dim()
    }
}

/// One row's rotation (the kernel's arithmetic, in `T::Wide`): the queries and keys of `from`,
/// each head's pairs by the angles `cos` and `sign`·`sin`, into `to`, and the values copied.
fn rope_row<T: Element>(
    from: [&[T]; 3],
    to: [&mut [T]; 3],
    (cos, sin): (&[T], &[T]),
    dim: usize,
    sign: T::Wide,
) {
    let half = dim / 2;
    let [q, k, v] = from;
    let [q_out, k_out, v_out] = to;
    let heads = q.chunks(dim).zip(q_out.chunks_mut(dim));
    for (x, y) in heads.chain(k.chunks(dim).zip(k_out.chunks_mut(dim))) {
        for i in 0..half {
            let (c, s) = (cos[i].widen(), sign * sin[i].widen());
            let (a, b) = (x[i].widen(), x[i + half].widen());
            y[i] = T::narrow(a * c - b * s);
            y[i + half] = T::narrow(a * s + b * c);
        }
    }
    v_out.copy_from_slice(v);
}

impl CustomOp1 for RopeQkv {
    fn name(&self) -> &'static str {
        "rope-qkv"
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout) -> Result<(CpuStorage, Shape)> {
        fn run<T: Element>(this: &RopeQkv, s1: &CpuStorage, l1: &Layout) -> Result<CpuStorage> {
            let sizes = RopeSizes::stacked(l1, (this.heads, this.kv_heads), &this.angles.cos)?;
            let qkv = contiguous::<T>(s1, l1)?;
            let (dim, rows) = (sizes.dim(), sizes.rows);
            let (query_width, key_width) = (sizes.heads * dim, sizes.kv_heads * dim);
            let held = this.angles.held();
            let cos = on_host::<T>(&held[0], "rotary embedding: the cosines")?;
            let sin = on_host::<T>(&held[1], "rotary embedding: the sines")?;
            let mut out = vec![T::zero(); qkv.len()];
            let (q_out, rest) = out.split_at_mut(rows * query_width);
            let (k_out, v_out) = rest.split_at_mut(rows * key_width);
            q_out
                .par_chunks_mut(query_width)
                .zip(k_out.par_chunks_mut(key_width))
                .zip(v_out.par_chunks_mut(key_width))
                .zip(qkv.par_chunks(sizes.stacked_width()))
                .zip(cos.par_chunks(sizes.half).zip(sin.par_chunks(sizes.half)))
                .for_each(|((((q, k), v), row), angles)| {
                    let (rq, rest) = row.split_at(query_width);
                    let (rk, rv) = rest.split_at(key_width);
                    rope_row([rq, rk, rv], [q, k, v], angles, dim, T::Wide::one());
                });
            Ok(T::to_cpu_storage_owned(out))
        }
        Ok((
            for_float_dtype!(s1.dtype(), run(self, s1, l1))?,
            Shape::from(l1.shape().elem_count()),
        ))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        let sizes = RopeSizes::stacked(l1, (self.heads, self.kv_heads), &self.angles.cos)?;
        let dtype = s1.dtype();
        let held = self.angles.held();
        let (c, cl) = on_gpu(&held[0], "rotary embedding: the cosines")?;
        let (s, sl) = on_gpu(&held[1], "rotary embedding: the sines")?;
        let storage = cuda::launch(
            "rope_qkv",
            sizes.rows,
            &[(s1, l1, dtype), (c, cl, dtype), (s, sl, dtype)],
            (dtype, l1.shape().elem_count()),
            &[sizes.heads, sizes.kv_heads, sizes.half, sizes.rows],
            &[],
        )?;
        Ok((storage, Shape::from(l1.shape().elem_count())))
    }
}

/// `[.., (heads + 2·kv_heads)·dim]` for queries of `[.., heads, dim]`.
fn stacked_shape_of(q: &Layout, sizes: RopeSizes) -> Shape {
    let dims = q.dims();
    let mut stacked = dims[..dims.len() - 2].to_vec();
    stacked.push(sizes.stacked_width());
    Shape::from(stacked)
}

impl CustomOp3 for RopeQkvGradient {
    fn name(&self) -> &'static str {
        "rope-qkv-gradient"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        #[allow(clippy::too_many_arguments)]
        fn run<T: Element>(
            this: &RopeQkvGradient,
            s1: &CpuStorage,
            l1: &Layout,
            s2: &CpuStorage,
            l2: &Layout,
            s3: &CpuStorage,
            l3: &Layout,
        ) -> Result<CpuStorage> {
            let sizes = RopeSizes::split([l1, l2, l3], &this.angles.cos)?;
            let (dq, dk, dv) = (
                contiguous::<T>(s1, l1)?,
                contiguous::<T>(s2, l2)?,
                contiguous::<T>(s3, l3)?,
            );
            let dim = sizes.dim();
            let (query_width, key_width) = (sizes.heads * dim, sizes.kv_heads * dim);
            let held = this.angles.held();
            let cos = on_host::<T>(&held[0], "rotary embedding: the cosines")?;
            let sin = on_host::<T>(&held[1], "rotary embedding: the sines")?;
            let mut out = vec![T::zero(); sizes.rows * sizes.stacked_width()];
            out.par_chunks_mut(sizes.stacked_width())
                .zip(dq.par_chunks(query_width))
                .zip(dk.par_chunks(key_width).zip(dv.par_chunks(key_width)))
                .zip(cos.par_chunks(sizes.half).zip(sin.par_chunks(sizes.half)))
                .for_each(|(((row, q), (k, v)), angles)| {
                    let (rq, rest) = row.split_at_mut(query_width);
                    let (rk, rv) = rest.split_at_mut(key_width);
                    rope_row([q, k, v], [rq, rk, rv], angles, dim, -T::Wide::one());
                });
            Ok(T::to_cpu_storage_owned(out))
        }
        let sizes = RopeSizes::split([l1, l2, l3], &self.angles.cos)?;
        Ok((
            for_float_dtype!(s1.dtype(), run(self, s1, l1, s2, l2, s3, l3))?,
            stacked_shape_of(l1, sizes),
        ))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
        s3: &candle_core::CudaStorage,
        l3: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        let sizes = RopeSizes::split([l1, l2, l3], &self.angles.cos)?;
        let dtype = s1.dtype();
        let held = self.angles.held();
        let (c, cl) = on_gpu(&held[0], "rotary embedding: the cosines")?;
        let (s, sl) = on_gpu(&held[1], "rotary embedding: the sines")?;
        let storage = cuda::launch(
            "rope_qkv_gradient",
            sizes.rows,
            &[
                (s1, l1, dtype),
                (s2, l2, dtype),
                (s3, l3, dtype),
                (c, cl, dtype),
                (s, sl, dtype),
            ],
            (dtype, sizes.rows * sizes.stacked_width()),
            &[sizes.heads, sizes.kv_heads, sizes.half],
            &[],
        )?;
        Ok((storage, stacked_shape_of(l1, sizes)))
    }
}

/// `[n, ..]` for inputs of `layout`'s shape.
fn stacked_shape(n: usize, layout: &Layout) -> Shape {
    let mut dims = vec![n];
    dims.extend_from_slice(layout.dims());
    Shape::from(dims)
}

/// One Adam step for a parameter given its gradient and its moments stacked `[2, ..]` (first,
/// second): `[3, ..]`, the new parameter then the new moments, in one pass (kernels/ops.cu on
/// the GPU; the composed form took a dozen small ops a tensor, and a cartridge has two a layer).
#[derive(Clone, Copy)]
pub struct AdamStep {
    pub learning_rate: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub epsilon: f64,
    /// The bias corrections `1 - beta^t` of this step.
    pub correction1: f64,
    pub correction2: f64,
}

impl AdamStep {
    /// The kernel's float arguments, in its order.
    fn floats(&self) -> [f32; 8] {
        [
            self.learning_rate,
            self.beta1,
            1.0 - self.beta1,
            self.beta2,
            1.0 - self.beta2,
            self.epsilon,
            self.correction1,
            self.correction2,
        ]
        .map(|x| x as f32)
    }

    fn check(param: &Layout, grad: &Layout, moments: &Layout) -> Result<(usize, usize)> {
        let (rows, columns) = elementwise("adam", &[param, grad])?;
        if moments.shape() != &stacked_shape(2, param) {
            candle_core::bail!(
                "adam: moments {:?} for a parameter {:?}",
                moments.shape(),
                param.shape()
            );
        }
        Ok((rows, columns))
    }
}

impl CustomOp3 for AdamStep {
    fn name(&self) -> &'static str {
        "adam"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        #[allow(clippy::too_many_arguments)]
        fn run<T: Element>(
            this: &AdamStep,
            s1: &CpuStorage,
            l1: &Layout,
            s2: &CpuStorage,
            l2: &Layout,
            s3: &CpuStorage,
            l3: &Layout,
        ) -> Result<CpuStorage> {
            AdamStep::check(l1, l2, l3)?;
            let (param, grad, moments) = (
                contiguous::<T>(s1, l1)?,
                contiguous::<T>(s2, l2)?,
                contiguous::<T>(s3, l3)?,
            );
            let n = param.len();
            let [
                lr,
                beta1,
                keep1,
                beta2,
                keep2,
                epsilon,
                correction1,
                correction2,
            ] = this.floats().map(|x| T::Wide::from_f64(f64::from(x)));
            let mut out = vec![T::zero(); 3 * n];
            let (new_param, rest) = out.split_at_mut(n);
            let (first, second) = rest.split_at_mut(n);
            new_param
                .par_iter_mut()
                .zip(first.par_iter_mut().zip(second.par_iter_mut()))
                .enumerate()
                .for_each(|(i, (p, (m, v)))| {
                    let g = grad[i].widen();
                    let first = moments[i].widen() * beta1 + g * keep1;
                    let second = moments[n + i].widen() * beta2 + g * g * keep2;
                    let step = (first / correction1) / ((second / correction2).sqrt() + epsilon);
                    *p = T::narrow(param[i].widen() - step * lr);
                    *m = T::narrow(first);
                    *v = T::narrow(second);
                });
            Ok(T::to_cpu_storage_owned(out))
        }
        Ok((
            for_float_dtype!(s1.dtype(), run(self, s1, l1, s2, l2, s3, l3))?,
            stacked_shape(3, l1),
        ))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
        s3: &candle_core::CudaStorage,
        l3: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        let (rows, columns) = AdamStep::check(l1, l2, l3)?;
        let dtype = s1.dtype();
        let storage = cuda::launch(
            "adam_step",
            rows,
            &[(s1, l1, dtype), (s2, l2, dtype), (s3, l3, dtype)],
            (dtype, 3 * rows * columns),
            &[columns, rows],
            &self.floats(),
        )?;
        Ok((storage, stacked_shape(3, l1)))
    }
}

/// The gradient of selecting rows of an `[N, H]` tensor, each at most once, from the selected
/// rows' gradient `[M, H]`: row `n` is row `source[n]` of it, or zeros where `source[n]` is
/// `u32::MAX` (kernels/ops.cu on the GPU). candle's own (`index_add`) adds the rows one id at a
/// time in each of only H threads: 4.2 ms for 8,188 rows of 576 on an H200.
pub(super) struct PlaceRows {
    /// `[N]` u32.
    pub(super) source: Tensor,
    /// M, the rows selected.
    pub(super) selected: usize,
}

impl PlaceRows {
    fn shape(&self, selected: &Layout) -> Result<(usize, usize)> {
        let (rows, columns) = selected.shape().dims2()?;
        if rows != self.selected {
            candle_core::bail!(
                "place rows: a gradient of {rows} rows for {} selected",
                self.selected
            );
        }
        Ok((self.source.dim(0)?, columns))
    }
}

impl candle_core::CustomOp1 for PlaceRows {
    fn name(&self) -> &'static str {
        "place-rows"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        fn run<T: Element>(
            this: &PlaceRows,
            storage: &CpuStorage,
            layout: &Layout,
        ) -> Result<CpuStorage> {
            let (rows, columns) = this.shape(layout)?;
            let held = this.source.storage_and_layout();
            let (selected, source) = (
                contiguous::<T>(storage, layout)?,
                on_host::<u32>(&held, "place rows: the sources")?,
            );
            let mut out = vec![T::zero(); rows * columns];
            for (y, &from) in out.chunks_mut(columns.max(1)).zip(source) {
                if from != u32::MAX {
                    let from = from as usize * columns;
                    y.copy_from_slice(&selected[from..from + columns]);
                }
            }
            Ok(T::to_cpu_storage_owned(out))
        }
        let (rows, columns) = self.shape(layout)?;
        Ok((
            for_float_dtype!(storage.dtype(), run(self, storage, layout))?,
            Shape::from((rows, columns)),
        ))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        storage: &candle_core::CudaStorage,
        layout: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        let (rows, columns) = self.shape(layout)?;
        let held = self.source.storage_and_layout();
        let (source, source_layout) = on_gpu(&held, "place rows: the sources")?;
        let dtype = storage.dtype();
        let out = cuda::launch(
            "place_rows",
            rows,
            &[
                (storage, layout, dtype),
                (source, source_layout, DType::U32),
            ],
            (dtype, rows * columns),
            &[columns],
            &[],
        )?;
        Ok((out, Shape::from((rows, columns))))
    }
}

/// [`RmsNormGradient`] on the CPU, with sums in `T::Wide`.
fn rms_norm_gradient_rows<T: Element>(
    x: &[T],
    grad: &[T],
    weight: &[T],
    residual: Option<&[T]>,
    columns: usize,
    eps: f32,
) -> Vec<T> {
    let n = <T::Wide as WithDType>::from_f64(columns as f64);
    let eps = <T::Wide as WithDType>::from_f64(f64::from(eps));
    let mut out = residual.map_or_else(|| vec![T::zero(); x.len()], <[T]>::to_vec);
    out.par_chunks_mut(columns)
        .zip(x.par_chunks(columns).zip(grad.par_chunks(columns)))
        .for_each(|(y, (x, g))| {
            let (mut squares, mut dot) = (T::Wide::zero(), T::Wide::zero());
            for ((x, g), w) in x.iter().zip(g).zip(weight) {
                let v = T::widen(*x);
                squares += v * v;
                dot += T::widen(*g) * T::widen(*w) * v;
            }
            let r = (squares / n + eps).sqrt().recip();
            let c = dot / n * r * r * r;
            for (((y, x), g), w) in y.iter_mut().zip(x).zip(g).zip(weight) {
                // y holds the residual gradient, or zero.
                let value = r * T::widen(*g) * T::widen(*w) - T::widen(*x) * c + T::widen(*y);
                *y = T::narrow(value);
            }
        });
    out
}

/// Row `r` of scores `[B, heads, L, T]` (contiguous) is sequence `r / (heads·L)`, position
/// `r % L`; its mask row is `[sequence, position]` of a `[B, .., L, T]` mask.
#[derive(Debug, Clone, Copy)]
pub(super) struct Rows {
    columns: usize,
    length: usize,
    heads: usize,
}

impl Rows {
    fn of(scores: &Layout, mask: &Layout) -> Result<Self> {
        let (batch, heads, length, columns) = scores.shape().dims4()?;
        let mask_dims = mask.shape().dims();
        let fits = mask_dims.len() >= 3
            && mask_dims[0] == batch
            && mask_dims[mask_dims.len() - 2..] == [length, columns]
            && mask.shape().elem_count() == batch * length * columns;
        if !fits {
            candle_core::bail!(
                "masked softmax: a mask of shape {:?} does not fit scores of shape {:?}",
                mask.shape(),
                scores.shape()
            );
        }
        Ok(Self {
            columns,
            length,
            heads,
        })
    }

    fn mask_row(&self, row: usize) -> usize {
        row / (self.heads * self.length) * self.length + row % self.length
    }
}

/// The contiguous elements of a storage under `layout`.
fn contiguous<'a, T: WithDType>(storage: &'a CpuStorage, layout: &Layout) -> Result<&'a [T]> {
    let (start, end) = layout
        .contiguous_offsets()
        .ok_or_else(|| candle_core::Error::Msg("expected a contiguous tensor".into()))?;
    Ok(&storage.as_slice::<T>()?[start..end])
}

/// `softmax(scores + mask)` over the last axis in one pass (kernels/ops.cu on the GPU),
/// for scores `[B, heads, L, T]` and an additive mask `[B, 1, 1, L, T]`: the broadcast add
/// alone cost more than the rest of attention. A row with nothing visible is all zeros. Sums
/// are taken in f32 (f64 for f64). No backward: attention's own recomputes it.
pub(super) struct MaskedSoftmax;

impl CustomOp2 for MaskedSoftmax {
    fn name(&self) -> &'static str {
        "masked-softmax"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        fn run<T: Element>(
            s1: &CpuStorage,
            l1: &Layout,
            s2: &CpuStorage,
            l2: &Layout,
        ) -> Result<CpuStorage> {
            let rows = Rows::of(l1, l2)?;
            let (scores, mask) = (contiguous::<T>(s1, l1)?, contiguous::<T>(s2, l2)?);
            Ok(T::to_cpu_storage_owned(masked_softmax_rows(
                scores, mask, rows,
            )))
        }
        Ok((
            for_float_dtype!(s1.dtype(), run(s1, l1, s2, l2))?,
            l1.shape().clone(),
        ))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        let rows = Rows::of(l1, l2)?;
        let storage = cuda::launch(
            "masked_softmax",
            l1.shape().elem_count() / rows.columns.max(1),
            &[(s1, l1, s1.dtype()), (s2, l2, s1.dtype())],
            (s1.dtype(), l1.shape().elem_count()),
            &[rows.columns, rows.length, rows.heads],
            &[],
        )?;
        Ok((storage, l1.shape().clone()))
    }
}

/// The softmax's input gradient `P·(dP - sums)` for probabilities `P` and their gradient `dP`
/// `[.., T]` and each row's `sum(P·dP)` `[.., 1]` in the accumulation dtype, in one pass
/// (kernels/ops.cu on the GPU).
pub(super) struct SoftmaxGradient;

impl CustomOp3 for SoftmaxGradient {
    fn name(&self) -> &'static str {
        "softmax-gradient"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        fn run<T: Element>(
            s1: &CpuStorage,
            l1: &Layout,
            s2: &CpuStorage,
            l2: &Layout,
            s3: &CpuStorage,
            l3: &Layout,
        ) -> Result<CpuStorage> {
            let columns = SoftmaxGradient::columns(l1, l2, l3)?;
            let (p, dp) = (contiguous::<T>(s1, l1)?, contiguous::<T>(s2, l2)?);
            let out = softmax_gradient_rows(p, dp, contiguous::<T::Wide>(s3, l3)?, columns);
            Ok(T::to_cpu_storage_owned(out))
        }
        Ok((
            for_float_dtype!(s1.dtype(), run(s1, l1, s2, l2, s3, l3))?,
            l1.shape().clone(),
        ))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
        s3: &candle_core::CudaStorage,
        l3: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        let columns = Self::columns(l1, l2, l3)?;
        let rows = l1.shape().elem_count() / columns.max(1);
        let storage = cuda::launch(
            "softmax_gradient",
            rows,
            &[
                (s1, l1, s1.dtype()),
                (s2, l2, s1.dtype()),
                (s3, l3, accumulation_dtype(s1.dtype())),
            ],
            (s1.dtype(), l1.shape().elem_count()),
            &[columns],
            &[],
        )?;
        Ok((storage, l1.shape().clone()))
    }
}

impl SoftmaxGradient {
    /// The row length, after checking that the three shapes agree (dtypes are checked where
    /// the elements are read).
    fn columns(p: &Layout, dp: &Layout, sums: &Layout) -> Result<usize> {
        let columns = p.shape().dims().last().copied().unwrap_or(1);
        if p.shape() != dp.shape() || sums.shape().elem_count() * columns != p.shape().elem_count()
        {
            candle_core::bail!(
                "softmax gradient: shapes {:?}, {:?} and sums {:?} disagree",
                p.shape(),
                dp.shape(),
                sums.shape()
            );
        }
        Ok(columns)
    }
}

/// Rows, vocabulary and k of logits `[N, V]` and a teacher's `[N, k]` ids (u32) and
/// probabilities (in the accumulation dtype).
fn top_k_shape(
    logits: &Layout,
    ids: (DType, &Layout),
    probabilities: (DType, &Layout),
    dtype: DType,
) -> Result<(usize, usize, usize)> {
    let (rows, columns) = logits.shape().dims2()?;
    let (id_rows, k) = ids.1.shape().dims2()?;
    if id_rows != rows || k == 0 || probabilities.1.shape().dims2()? != (rows, k) {
        candle_core::bail!(
            "top-k cross-entropy: logits {:?}, ids {:?} and probabilities {:?} disagree",
            logits.shape(),
            ids.1.shape(),
            probabilities.1.shape()
        );
    }
    if ids.0 != DType::U32 || probabilities.0 != accumulation_dtype(dtype) {
        candle_core::bail!(
            "top-k cross-entropy: ids are {:?} (u32 expected), probabilities {:?} ({:?} expected)",
            ids.0,
            probabilities.0,
            accumulation_dtype(dtype)
        );
    }
    Ok((rows, columns, k))
}

/// [`top_k_cross_entropy`]'s value (kernels/ops.cu on the GPU).
pub(super) struct TopKCrossEntropy;

impl CustomOp3 for TopKCrossEntropy {
    fn name(&self) -> &'static str {
        "top-k-cross-entropy"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        fn run<T: Element>(
            s1: &CpuStorage,
            l1: &Layout,
            s2: &CpuStorage,
            l2: &Layout,
            s3: &CpuStorage,
            l3: &Layout,
        ) -> Result<CpuStorage> {
            let (_, columns, k) = top_k_shape(l1, (s2.dtype(), l2), (s3.dtype(), l3), T::DTYPE)?;
            let (logits, ids) = (contiguous::<T>(s1, l1)?, contiguous::<u32>(s2, l2)?);
            check_ids(ids, columns)?;
            let p = contiguous::<T::Wide>(s3, l3)?;
            Ok(T::Wide::to_cpu_storage_owned(cross_entropy_rows(
                logits, ids, p, columns, k,
            )))
        }
        let rows = l1.shape().dims2()?.0;
        Ok((
            for_float_dtype!(s1.dtype(), run(s1, l1, s2, l2, s3, l3))?,
            Shape::from((2, rows)),
        ))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
        s3: &candle_core::CudaStorage,
        l3: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        let dtype = s1.dtype();
        let (rows, columns, k) = top_k_shape(l1, (s2.dtype(), l2), (s3.dtype(), l3), dtype)?;
        let storage = cuda::launch(
            "top_k_cross_entropy",
            rows,
            &[
                (s1, l1, dtype),
                (s2, l2, DType::U32),
                (s3, l3, accumulation_dtype(dtype)),
            ],
            (accumulation_dtype(dtype), 2 * rows),
            &[columns, k, rows],
            &[],
        )?;
        Ok((storage, Shape::from((2, rows))))
    }
}

/// [`top_k_cross_entropy`]'s gradient for the logits, given each row's incoming gradient
/// (kernels/ops.cu on the GPU), from the rows' log-sum-exps that the loss gave.
pub(super) struct TopKCrossEntropyGradient {
    pub(super) ids: Tensor,
    pub(super) probabilities: Tensor,
    pub(super) log_sums: Tensor,
}

impl TopKCrossEntropyGradient {
    /// Rows, vocabulary and k of logits of `logits` and `dtype` with the incoming gradient
    /// `grad`, checked against the teacher and the log-sum-exps.
    fn shape(&self, logits: &Layout, grad: &Layout, dtype: DType) -> Result<(usize, usize, usize)> {
        fn of(t: &Tensor) -> (DType, &Layout) {
            (t.dtype(), t.layout())
        }
        let (rows, columns, k) =
            top_k_shape(logits, of(&self.ids), of(&self.probabilities), dtype)?;
        check_loss_gradient(grad, of(&self.log_sums), rows, dtype)?;
        Ok((rows, columns, k))
    }

    /// The teacher's ids and probabilities and the log-sum-exps, locked for reading.
    fn held(&self) -> [(impl std::ops::Deref<Target = Storage> + '_, &Layout); 3] {
        [&self.ids, &self.probabilities, &self.log_sums].map(Tensor::storage_and_layout)
    }
}

/// The incoming gradient of [`top_k_cross_entropy`]'s `[rows]` losses, and their log-sum-exps,
/// must be `[rows]` in the accumulation dtype.
fn check_loss_gradient(
    grad: &Layout,
    log_sums: (DType, &Layout),
    rows: usize,
    dtype: DType,
) -> Result<()> {
    if grad.shape().dims() != [rows] || log_sums.1.shape().dims() != [rows] {
        candle_core::bail!(
            "top-k cross-entropy: a gradient of shape {:?} and log-sum-exps of shape {:?} for \
             {rows} losses",
            grad.shape(),
            log_sums.1.shape()
        );
    }
    if log_sums.0 != accumulation_dtype(dtype) {
        candle_core::bail!(
            "top-k cross-entropy: log-sum-exps in {:?} ({:?} expected)",
            log_sums.0,
            accumulation_dtype(dtype)
        );
    }
    Ok(())
}

impl CustomOp2 for TopKCrossEntropyGradient {
    fn name(&self) -> &'static str {
        "top-k-cross-entropy-gradient"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        fn run<T: Element>(
            this: &TopKCrossEntropyGradient,
            s1: &CpuStorage,
            l1: &Layout,
            s2: &CpuStorage,
            l2: &Layout,
        ) -> Result<CpuStorage> {
            let (_, columns, k) = this.shape(l1, l2, T::DTYPE)?;
            let held = this.held();
            let teacher = "top-k cross-entropy: the teacher";
            let (logits, ids) = (contiguous::<T>(s1, l1)?, on_host::<u32>(&held[0], teacher)?);
            check_ids(ids, columns)?;
            let (p, log_sums, grad) = (
                on_host::<T::Wide>(&held[1], teacher)?,
                on_host::<T::Wide>(&held[2], teacher)?,
                contiguous::<T::Wide>(s2, l2)?,
            );
            Ok(T::to_cpu_storage_owned(cross_entropy_gradient_rows(
                logits, ids, p, log_sums, grad, columns, k,
            )))
        }
        Ok((
            for_float_dtype!(s1.dtype(), run(self, s1, l1, s2, l2))?,
            l1.shape().clone(),
        ))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        let dtype = s1.dtype();
        let (rows, columns, k) = self.shape(l1, l2, dtype)?;
        let held = self.held();
        let teacher = "top-k cross-entropy: the teacher";
        let (ids, id_layout) = on_gpu(&held[0], teacher)?;
        let (p, p_layout) = on_gpu(&held[1], teacher)?;
        let (sums, sums_layout) = on_gpu(&held[2], teacher)?;
        let storage = cuda::launch(
            "top_k_cross_entropy_gradient",
            rows,
            &[
                (s1, l1, dtype),
                (ids, id_layout, DType::U32),
                (p, p_layout, accumulation_dtype(dtype)),
                (sums, sums_layout, accumulation_dtype(dtype)),
                (s2, l2, accumulation_dtype(dtype)),
            ],
            (dtype, rows * columns),
            &[columns, k],
            &[],
        )?;
        Ok((storage, l1.shape().clone()))
    }
}

fn check_ids(ids: &[u32], columns: usize) -> Result<()> {
    match ids.iter().find(|&&id| id as usize >= columns) {
        Some(id) => {
            candle_core::bail!("top-k cross-entropy: token {id} is outside the {columns} logits")
        }
        None => Ok(()),
    }
}

/// `max + ln Σ exp(x - max)` of a row, in `T::Wide`.
fn log_sum_exp<T: Element>(row: &[T]) -> T::Wide {
    let max = row
        .iter()
        .map(|&t| T::widen(t))
        .fold(T::Wide::neg_infinity(), Float::max);
    let sum = row
        .iter()
        .fold(T::Wide::zero(), |sum, t| sum + (T::widen(*t) - max).exp());
    max + sum.ln()
}

/// [`TopKCrossEntropy`] on the CPU: the rows' losses, then their log-sum-exps.
fn cross_entropy_rows<T: Element>(
    logits: &[T],
    ids: &[u32],
    p: &[T::Wide],
    columns: usize,
    k: usize,
) -> Vec<T::Wide> {
    let (losses, log_sums): (Vec<_>, Vec<_>) = logits
        .par_chunks(columns)
        .zip(ids.par_chunks(k).zip(p.par_chunks(k)))
        .map(|(x, (ids, p))| {
            let log_sum = log_sum_exp(x);
            let loss = ids.iter().zip(p).fold(T::Wide::zero(), |loss, (&id, &p)| {
                let picked = T::widen(x[id as usize]);
                loss - p * (picked - log_sum)
            });
            (loss, log_sum)
        })
        .unzip();
    [losses, log_sums].concat()
}

/// [`TopKCrossEntropyGradient`] on the CPU: `grad·(mass·softmax(x) - p at the ids)`, each
/// teacher column rounded once with all the probability its id has.
fn cross_entropy_gradient_rows<T: Element>(
    logits: &[T],
    ids: &[u32],
    p: &[T::Wide],
    log_sums: &[T::Wide],
    grad: &[T::Wide],
    columns: usize,
    k: usize,
) -> Vec<T> {
    let mut out = vec![T::zero(); logits.len()];
    out.par_chunks_mut(columns)
        .zip(logits.par_chunks(columns))
        .zip(ids.par_chunks(k).zip(p.par_chunks(k)))
        .zip(log_sums.par_iter().zip(grad))
        .for_each(|(((y, x), (ids, p)), (&log_sum, &g))| {
            let mass = p.iter().fold(T::Wide::zero(), |sum, &p| sum + p);
            for (y, x) in y.iter_mut().zip(x) {
                *y = T::narrow(g * mass * (T::widen(*x) - log_sum).exp());
            }
            for &id in ids {
                let target = ids
                    .iter()
                    .zip(p)
                    .filter(|(other, _)| **other == id)
                    .fold(T::Wide::zero(), |sum, (_, &p)| sum + p);
                let id = id as usize;
                y[id] = T::narrow(g * (mass * (T::widen(x[id]) - log_sum).exp() - target));
            }
        });
    out
}

/// An element dtype of the CPU ops, with the type its sums are taken in: f32 for f32 and half
/// precision, f64 for f64 (as on the GPU).
trait Element: WithDType {
    type Wide: Float + WithDType;

    fn widen(self) -> Self::Wide {
        <Self::Wide as WithDType>::from_f64(WithDType::to_f64(self))
    }

    fn narrow(wide: Self::Wide) -> Self {
        Self::from_f64(WithDType::to_f64(wide))
    }
}

impl Element for f32 {
    type Wide = f32;
}

impl Element for f64 {
    type Wide = f64;
}

impl Element for half::bf16 {
    type Wide = f32;
}

impl Element for half::f16 {
    type Wide = f32;
}

/// [`MaskedSoftmax`] on the CPU, with sums in `T::Wide`.
fn masked_softmax_rows<T: Element>(scores: &[T], mask: &[T], rows: Rows) -> Vec<T> {
    let columns = rows.columns;
    let mut out = vec![T::zero(); scores.len()];
    out.par_chunks_mut(columns)
        .zip(scores.par_chunks(columns))
        .enumerate()
        .for_each_init(Vec::new, |shifted, (row, (y, x))| {
            let m = &mask[rows.mask_row(row) * columns..][..columns];
            shifted.clear();
            shifted.extend(x.iter().zip(m).map(|(a, b)| T::widen(*a) + T::widen(*b)));
            let max = shifted
                .iter()
                .copied()
                .fold(T::Wide::neg_infinity(), Float::max);
            // Nothing visible: the row stays zeros.
            if max == T::Wide::neg_infinity() {
                return;
            }
            let mut sum = T::Wide::zero();
            for v in shifted.iter_mut() {
                *v = (*v - max).exp();
                sum += *v;
            }
            let scale = sum.recip();
            for (y, &e) in y.iter_mut().zip(shifted.iter()) {
                *y = T::narrow(e * scale);
            }
        });
    out
}

/// [`SoftmaxGradient`] on the CPU, with sums in `T::Wide`.
fn softmax_gradient_rows<T: Element>(
    p: &[T],
    dp: &[T],
    sums: &[T::Wide],
    columns: usize,
) -> Vec<T> {
    let mut out = vec![T::zero(); p.len()];
    out.par_chunks_mut(columns)
        .zip(p.par_chunks(columns).zip(dp.par_chunks(columns)))
        .zip(sums.par_iter())
        .for_each(|((y, (p, dp)), &sum)| {
            for ((y, p), dp) in y.iter_mut().zip(p).zip(dp) {
                let value = T::widen(*p) * (T::widen(*dp) - sum);
                *y = T::narrow(value);
            }
        });
    out
}

/// Launches of kernels/ops.cu (foreign calls: unsafe).
#[cfg(feature = "cuda")]
#[allow(unsafe_code)]
pub(super) mod cuda {
    use candle_core::backend::BackendStorage;
    use candle_core::cuda_backend::cudarc::driver::{
        CudaView, LaunchArgs, LaunchConfig, PushKernelArg,
    };
    use candle_core::cuda_backend::{CudaStorageSlice, WrapErr};
    use candle_core::{CudaStorage, DType, Layout, Result};
    use half::{bf16, f16};

    include!(concat!(env!("OUT_DIR"), "/kernels.rs"));

    /// The name the kernels' module is loaded under.
    pub const MODULE: &str = "cartridge_trainer_ops";

    /// Threads per block (`THREADS` in the kernels).
    const THREADS: u32 = 256;

    /// The blocks of a kernel that takes a warp a row (the norms'), for `rows`.
    pub fn warp_row_blocks(rows: usize) -> usize {
        rows.div_ceil(THREADS as usize / 32)
    }

    /// An argument in device memory: the contiguous elements of a storage under a layout.
    enum View<'a> {
        BF16(CudaView<'a, bf16>),
        F16(CudaView<'a, f16>),
        F32(CudaView<'a, f32>),
        F64(CudaView<'a, f64>),
        U32(CudaView<'a, u32>),
    }

    impl<'a> View<'a> {
        fn of(storage: &'a CudaStorage, layout: &Layout) -> Result<Self> {
            let (start, end) = layout
                .contiguous_offsets()
                .ok_or_else(|| candle_core::Error::Msg("expected a contiguous tensor".into()))?;
            Ok(match &storage.slice {
                CudaStorageSlice::BF16(s) => Self::BF16(s.slice(start..end)),
                CudaStorageSlice::F16(s) => Self::F16(s.slice(start..end)),
                CudaStorageSlice::F32(s) => Self::F32(s.slice(start..end)),
                CudaStorageSlice::F64(s) => Self::F64(s.slice(start..end)),
                CudaStorageSlice::U32(s) => Self::U32(s.slice(start..end)),
                _ => candle_core::bail!("a {:?} argument to a kernel", storage.dtype()),
            })
        }

        fn push<'b>(&'b self, builder: &mut LaunchArgs<'b>) {
            match self {
                Self::BF16(v) => builder.arg(v),
                Self::F16(v) => builder.arg(v),
                Self::F32(v) => builder.arg(v),
                Self::F64(v) => builder.arg(v),
                Self::U32(v) => builder.arg(v),
            };
        }
    }

    /// Runs `{name}_{dtype of the first input}` with `blocks` blocks (a row each, or
    /// [`warp_row_blocks`]): the inputs (each of the dtype the kernel reads it as: a pointer
    /// carries none), then an output of `out` (dtype, elements), then `sizes` as 32-bit
    /// integers, then `floats`, as the kernel takes them.
    pub fn launch(
        name: &str,
        blocks: usize,
        inputs: &[(&CudaStorage, &Layout, DType)],
        (dtype, elements): (DType, usize),
        sizes: &[usize],
        floats: &[f32],
    ) -> Result<CudaStorage> {
        let device = inputs[0].0.device.clone();
        // SAFETY (each allocation): the kernel writes every element. Never none: the driver
        // refuses an allocation of no bytes, and a storage may be larger than its shape.
        let elements = elements.max(1);
        let out = match dtype {
            DType::BF16 => CudaStorageSlice::BF16(unsafe { device.alloc::<bf16>(elements)? }),
            DType::F16 => CudaStorageSlice::F16(unsafe { device.alloc::<f16>(elements)? }),
            DType::F32 => CudaStorageSlice::F32(unsafe { device.alloc::<f32>(elements)? }),
            DType::F64 => CudaStorageSlice::F64(unsafe { device.alloc::<f64>(elements)? }),
            other => candle_core::bail!("{name}: a {other:?} output"),
        };
        run(name, blocks, inputs, Some(&out), sizes, floats)?;
        Ok(CudaStorage { slice: out, device })
    }

    /// [`launch`] of a kernel that writes its last input, `into`, in place (after the others,
    /// where an output would be), and takes no floats.
    pub fn launch_into(
        name: &str,
        blocks: usize,
        inputs: &[(&CudaStorage, &Layout, DType)],
        into: (&mut CudaStorage, &Layout),
        sizes: &[usize],
    ) -> Result<()> {
        let (storage, layout) = into;
        let mut all = inputs.to_vec();
        all.push((&*storage, layout, storage.dtype()));
        run(name, blocks, &all, None, sizes, &[])
    }

    /// [`launch`]'s launch: the inputs, `out` if any, `sizes`, `floats`.
    fn run(
        name: &str,
        blocks: usize,
        inputs: &[(&CudaStorage, &Layout, DType)],
        out: Option<&CudaStorageSlice>,
        sizes: &[usize],
        floats: &[f32],
    ) -> Result<()> {
        let grid = u32::try_from(blocks)
            .ok()
            .filter(|&r| r <= i32::MAX as u32)
            .ok_or_else(|| {
                candle_core::Error::Msg(format!("{name}: {blocks} blocks are too many"))
            })?;
        let sizes = sizes
            .iter()
            .map(|&s| u32::try_from(s))
            .collect::<std::result::Result<Vec<u32>, _>>()
            .map_err(|_| candle_core::Error::Msg(format!("{name}: a row is too long")))?;
        let device = inputs[0].0.device.clone();
        let kernel = format!("{name}_{}", inputs[0].2.as_str());
        let func = device.get_or_load_custom_func(&kernel, MODULE, OPS)?;
        let views = inputs
            .iter()
            .map(|&(storage, layout, expected)| {
                if storage.dtype() != expected {
                    candle_core::bail!(
                        "{name}: an input is {:?}, the kernel reads {expected:?}",
                        storage.dtype()
                    );
                }
                View::of(storage, layout)
            })
            .collect::<Result<Vec<_>>>()?;
        let mut builder = func.builder();
        for view in &views {
            view.push(&mut builder);
        }
        if let Some(out) = out {
            match out {
                CudaStorageSlice::BF16(s) => builder.arg(s),
                CudaStorageSlice::F16(s) => builder.arg(s),
                CudaStorageSlice::F32(s) => builder.arg(s),
                CudaStorageSlice::F64(s) => builder.arg(s),
                _ => candle_core::bail!("{name}: an output of an unexpected dtype"),
            };
        }
        for size in &sizes {
            builder.arg(size);
        }
        for float in floats {
            builder.arg(float);
        }
        let config = LaunchConfig {
            grid_dim: (grid, 1, 1),
            block_dim: (THREADS, 1, 1),
            shared_mem_bytes: 0,
        };
        // A grid of no blocks is an invalid launch; no rows is nothing to do.
        if blocks > 0 {
            // SAFETY: the callers pass the kernel's parameters in number, order and type, with
            // every pointer covering the rows the grid reads.
            unsafe { builder.launch(config) }.w()?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use candle_core::{DType, Device, Tensor};

    use super::*;
    use crate::model::ops::tests::{device, max_difference};

    /// A mask `[B, 1, 1, L, T]` hiding about a third of the keys at random, every key of row
    /// `(0, 1)`, and none of row `(1, 0)`.
    fn random_mask(batch: usize, length: usize, total: usize, device: &Device) -> Result<Tensor> {
        let hidden = Tensor::rand(0f32, 1.0, (batch, 1, 1, length, total), device)?.lt(0.35)?;
        let mut values = hidden
            .where_cond(
                &Tensor::new(f32::NEG_INFINITY, device)?.broadcast_as(hidden.shape())?,
                &Tensor::zeros(hidden.shape(), DType::F32, device)?,
            )?
            .flatten_all()?
            .to_vec1::<f32>()?;
        values[total..2 * total].fill(f32::NEG_INFINITY);
        values[length * total..(length + 1) * total].fill(0.0);
        Tensor::from_vec(values, (batch, 1, 1, length, total), device)
    }

    #[test]
    fn the_masked_softmax_is_softmax_after_the_mask() -> Result<()> {
        let device = device()?;
        // Rows shorter than a GPU block, and longer than one (its threads loop).
        for total in [7, 300, 701] {
            let (batch, heads, length) = (2, 3, 4);
            let scores = Tensor::randn(0f32, 3.0, (batch, heads, length, total), &device)?;
            let mask = random_mask(batch, length, total, &device)?;
            for dtype in [DType::F32, DType::BF16] {
                let (scores, mask) = (scores.to_dtype(dtype)?, mask.to_dtype(dtype)?);
                let fused = scores
                    .apply_op2_no_bwd(&mask, &MaskedSoftmax)?
                    .to_dtype(DType::F32)?;
                // The composed form, from the same (rounded) inputs in f32.
                let composed = candle_nn::ops::softmax_last_dim(
                    &scores.to_dtype(DType::F32)?.broadcast_add(
                        &mask
                            .to_dtype(DType::F32)?
                            .reshape((batch, 1, length, total))?,
                    )?,
                )?;
                // Where nothing is visible the composed form has NaN (NaN != NaN) and the fused
                // one zeros.
                let composed = composed
                    .eq(&composed)?
                    .where_cond(&composed, &composed.zeros_like()?)?;
                let hidden_row = fused.narrow(0, 0, 1)?.narrow(2, 1, 1)?;
                assert_eq!(hidden_row.abs()?.max_all()?.to_scalar::<f32>()?, 0.0);
                let tolerance = if dtype == DType::F32 { 1e-5 } else { 4e-3 };
                let error = max_difference(&fused, &composed)?;
                assert!(error < tolerance, "{dtype:?}, {total} keys: {error}");
            }
        }
        // A mask for other sequences or positions is refused, not read out of bounds.
        let scores = Tensor::zeros((2, 3, 4, 5), DType::F32, &device)?;
        let short = Tensor::zeros((2, 1, 1, 3, 5), DType::F32, &device)?;
        let error = scores.apply_op2_no_bwd(&short, &MaskedSoftmax).unwrap_err();
        assert!(error.to_string().contains("does not fit"), "{error}");
        // So is a mask of another dtype (a kernel would read its bytes as the scores' dtype).
        let other = Tensor::zeros((2, 1, 1, 4, 5), DType::BF16, &device)?;
        assert!(scores.apply_op2_no_bwd(&other, &MaskedSoftmax).is_err());
        Ok(())
    }

    #[test]
    fn the_softmax_gradient_is_the_composed_one() -> Result<()> {
        let device = device()?;
        for total in [7, 701] {
            let p = Tensor::rand(0f32, 1.0, (2, 3, 4, total), &device)?;
            let dp = Tensor::randn(0f32, 1.0, (2, 3, 4, total), &device)?;
            let sums = Tensor::randn(0f32, 1.0, (2, 3, 4, 1), &device)?;
            for dtype in [DType::F32, DType::BF16] {
                let (p, dp) = (p.to_dtype(dtype)?, dp.to_dtype(dtype)?);
                let fused = p.apply_op3_no_bwd(&dp, &sums, &SoftmaxGradient)?;
                let composed = p
                    .to_dtype(DType::F32)?
                    .mul(&dp.to_dtype(DType::F32)?.broadcast_sub(&sums)?)?;
                let tolerance = if dtype == DType::F32 { 1e-6 } else { 2e-2 };
                let error = max_difference(&fused.to_dtype(DType::F32)?, &composed)?;
                assert!(error < tolerance, "{dtype:?}, {total} keys: {error}");
            }
        }
        Ok(())
    }

    #[test]
    fn an_adam_step_is_the_composed_update() -> Result<()> {
        let device = device()?;
        let shape = (3, 5, 64);
        let param = Tensor::randn(0f32, 1.0, shape, &device)?;
        let grad = Tensor::randn(0f32, 1.0, shape, &device)?;
        let (first, second) = (
            Tensor::randn(0f32, 0.1, shape, &device)?,
            Tensor::rand(0f32, 0.01, shape, &device)?,
        );
        let step = AdamStep {
            learning_rate: 0.02,
            beta1: 0.9,
            beta2: 0.999,
            epsilon: 1e-8,
            correction1: 1.0 - 0.9f64.powi(3),
            correction2: 1.0 - 0.999f64.powi(3),
        };
        let moments = Tensor::stack(&[&first, &second], 0)?;
        let fused = param.apply_op3_no_bwd(&grad, &moments, &step)?;
        let first = ((&first * 0.9)? + (&grad * 0.1)?)?;
        let second = ((&second * 0.999)? + (grad.sqr()? * 0.001)?)?;
        let update = ((&first / step.correction1)?
            / ((&second / step.correction2)?.sqrt()? + step.epsilon)?)?;
        let param = (param - (update * step.learning_rate)?)?;
        for (i, want) in [param, first, second].iter().enumerate() {
            let error = max_difference(&fused.get(i)?, want)?;
            // Relative to the largest element: a GPU build contracts products and sums into
            // fused multiply-adds, which round once where the composed ops round twice.
            let largest = want.abs()?.max_all()?.to_scalar::<f32>()?;
            assert!(error < 1e-6 * (1.0 + largest), "part {i}: {error}");
        }
        // Moments of another shape are refused, naming both.
        let short = Tensor::zeros((2, 3, 5, 63), DType::F32, &device)?;
        let error = fused
            .get(0)?
            .apply_op3_no_bwd(&grad, &short, &step)
            .unwrap_err();
        assert!(error.to_string().contains("moments"), "{error}");
        Ok(())
    }
}
