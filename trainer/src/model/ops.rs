//! Operations the forward needs beyond candle's own, so that one forward serves training and
//! inference.
//!
//! candle's fused kernels (RMSNorm, RoPE) are fast and have no backward: a graph through them is
//! silently cut. The ops here run those kernels forward and, when an input carries a gradient,
//! join the result to the graph with a backward written out by hand ([`Attached`]). Where the
//! composed forms crossed large matrices several times (attention's masked softmax, its
//! gradient, the loss over the vocabulary, RMSNorm's gradient) they are ops of our own: one pass
//! in Rust on the CPU and in a kernel of kernels/ops.cu on the GPU. Attention keeps only its
//! inputs and output between the passes and recomputes the probabilities in its backward, as
//! FlashAttention does: the `[L, T]` matrices of every layer are never held at once.
//!
//! candle's backward pass also computes a gradient for both operands of every matmul, frozen
//! weights included, and keeps them all: for SmolLM2 that is half a GiB of weight gradients per
//! step and two to four times the backward time, for gradients nobody reads. [`frozen_linear`] is
//! a matmul whose backward returns the input's gradient only.

use std::sync::Mutex;

use candle_core::backend::BackendStorage;
use candle_core::{
    CpuStorage, CustomOp1, CustomOp2, CustomOp3, D, DType, Layout, Result, Shape, Storage, Tensor,
    WithDType,
};
use num_traits::Float;
use rayon::prelude::*;

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

/// RMSNorm of `x` `[..., hidden]` with a frozen `weight` `[hidden]`; gradients flow to `x`.
pub fn rms_norm(x: &Tensor, weight: &Tensor, eps: f32) -> Result<Tensor> {
    if x.dtype() == DType::F64 {
        // The fused kernel has no f64 (the dtype of the finite-difference tests); the composed
        // form is exact and carries its own gradient.
        return candle_nn::ops::rms_norm_slow(x, weight, eps);
    }
    if weight.track_op() {
        candle_core::bail!("rms_norm: the weight is frozen here and would get no gradient");
    }
    let y = candle_nn::ops::rms_norm(x, weight, eps)?;
    if !x.track_op() {
        return Ok(y);
    }
    let gradient = RmsNormGradient {
        weight: weight.contiguous()?,
        eps,
    };
    x.apply_op1(Attached::new(
        "rms-norm",
        y,
        move |x: &Tensor, _: &Tensor, grad: &Tensor| {
            x.detach()
                .contiguous()?
                .apply_op2_no_bwd(&grad.contiguous()?, &gradient)
        },
    ))
}

/// RMSNorm's input gradient for `y = w·x·r`, `r = (mean(x²) + eps)^-½`, given the output's
/// gradient `g`: `dx = r·g·w - x·r³·mean(g·w·x)`, each row in one pass (kernels/ops.cu on the
/// GPU), sums in f32.
struct RmsNormGradient {
    weight: Tensor,
    eps: f32,
}

impl RmsNormGradient {
    fn columns(&self, x: &Layout, grad: &Layout) -> Result<usize> {
        let columns = x.shape().dims().last().copied().unwrap_or(1);
        if x.shape() != grad.shape() || self.weight.dims() != [columns] {
            candle_core::bail!(
                "rms-norm gradient: x {:?}, its gradient {:?} and the weight {:?} disagree",
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
        fn run<T: WithDType>(
            this: &RmsNormGradient,
            s1: &CpuStorage,
            l1: &Layout,
            s2: &CpuStorage,
            l2: &Layout,
        ) -> Result<CpuStorage> {
            let columns = this.columns(l1, l2)?;
            let (weight, weight_layout) = this.weight.storage_and_layout();
            let Storage::Cpu(weight) = &*weight else {
                candle_core::bail!("rms-norm gradient: the weight is not in host memory");
            };
            let weight = contiguous::<T>(weight, weight_layout)?;
            let (x, grad) = (contiguous::<T>(s1, l1)?, contiguous::<T>(s2, l2)?);
            Ok(T::to_cpu_storage_owned(if T::DTYPE == DType::F64 {
                rms_norm_gradient_rows::<T, f64>(x, grad, weight, columns, this.eps)
            } else {
                rms_norm_gradient_rows::<T, f32>(x, grad, weight, columns, this.eps)
            }))
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
        let (weight, weight_layout) = self.weight.storage_and_layout();
        let Storage::Cuda(weight) = &*weight else {
            candle_core::bail!("rms-norm gradient: the weight is not on the GPU");
        };
        let elements = l1.shape().elem_count();
        let storage = cuda::launch(
            "rms_norm_gradient",
            elements / columns.max(1),
            &[
                (s1, l1, s1.dtype()),
                (s2, l2, s1.dtype()),
                (weight, weight_layout, s1.dtype()),
            ],
            (s1.dtype(), elements),
            &[columns],
            &[self.eps],
        )?;
        Ok((storage, l1.shape().clone()))
    }
}

/// [`RmsNormGradient`] on the CPU, with sums in `A`.
fn rms_norm_gradient_rows<T: WithDType, A: Float + Send + Sync>(
    x: &[T],
    grad: &[T],
    weight: &[T],
    columns: usize,
    eps: f32,
) -> Vec<T> {
    let n = A::from(columns).unwrap_or_else(A::nan);
    let eps = A::from(eps).unwrap_or_else(A::nan);
    let mut out = vec![T::zero(); x.len()];
    out.par_chunks_mut(columns)
        .zip(x.par_chunks(columns).zip(grad.par_chunks(columns)))
        .for_each(|(y, (x, g))| {
            let (mut squares, mut dot) = (A::zero(), A::zero());
            for ((x, g), w) in x.iter().zip(g).zip(weight) {
                let v = widen::<T, A>(x);
                squares = squares + v * v;
                dot = dot + widen::<T, A>(g) * widen::<T, A>(w) * v;
            }
            let r = (squares / n + eps).sqrt().recip();
            let c = dot / n * r * r * r;
            for (((y, x), g), w) in y.iter_mut().zip(x).zip(g).zip(weight) {
                let value = r * widen::<T, A>(g) * widen::<T, A>(w) - widen::<T, A>(x) * c;
                *y = T::from_f64(value.to_f64().unwrap_or(f64::NAN));
            }
        });
    out
}

/// Rotates `x` `[B, heads, L, head_dim]` (half-split pairs) by per-token angles given as `cos`
/// and `sin` `[B, L, head_dim/2]`; gradients flow to `x`.
pub fn rope(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    let x = x.contiguous()?;
    let y = candle_nn::rotary_emb::rope(&x, cos, sin)?;
    if !x.track_op() {
        return Ok(y);
    }
    // A rotation's transpose is the rotation by the opposite angle.
    let (cos, sin) = (cos.clone(), sin.neg()?);
    x.apply_op1(Attached::new(
        "rope",
        y,
        move |_: &Tensor, _: &Tensor, grad: &Tensor| {
            candle_nn::rotary_emb::rope(&grad.contiguous()?, &cos, &sin)
        },
    ))
}

/// Attention of `q` `[B, kv_heads, group·L, head_dim]` — the `group` query heads that share a
/// key head stacked along the sequence axis, so keys are never copied per query head — over
/// `k`, `v` `[B, kv_heads, T, head_dim]` with an additive `mask` `[B, 1, 1, L, T]`. Returns
/// `[B, kv_heads, group·L, head_dim]`; gradients flow to `q`, `k` and `v`.
pub fn attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    mask: &Tensor,
    group: usize,
) -> Result<Tensor> {
    let out = probabilities(q, k, mask, group)?.matmul(v)?;
    if !(q.track_op() || k.track_op() || v.track_op()) {
        return Ok(out);
    }
    let mask = mask.clone();
    let backward = move |q: &Tensor, k: &Tensor, v: &Tensor, out: &Tensor, grad: &Tensor| {
        // Only what carries a gradient is computed: in training the queries of the first layer
        // and every key and value of the input are constants; only the prefix is trained.
        let wanted = (q.track_op(), k.track_op(), v.track_op());
        let (q, k, v, grad) = (q.detach(), k.detach(), v.detach(), grad.contiguous()?);
        let p = probabilities(&q, &k, &mask, group)?;
        let dv = wanted.2.then(|| p.t()?.matmul(&grad)).transpose()?;
        if !(wanted.0 || wanted.1) {
            return Ok((None, None, dv));
        }
        // Softmax backward, dS = P·(dP - rowsum(P·dP)), with the sums in f32 for half precision.
        // rowsum(P·dP) = rowsum(dO·O) (dP = dO·Vᵀ and O = P·V), from `[.., head_dim]` tensors
        // rather than `[.., T]` ones. The score scale goes on dQ and dK, not on all of dS.
        let wide = accumulation_dtype(q.dtype());
        let sums = grad
            .to_dtype(wide)?
            .mul(&out.to_dtype(wide)?)?
            .sum_keepdim(D::Minus1)?;
        let dp = grad.matmul(&v.t()?)?;
        let ds = p.apply_op3_no_bwd(&dp, &sums, &SoftmaxGradient)?;
        let scale = scale(&q)?;
        let dq = wanted.0.then(|| ds.matmul(&k)? * scale).transpose()?;
        let dk = wanted.1.then(|| ds.t()?.matmul(&q)? * scale).transpose()?;
        Ok((dq, dk, dv))
    };
    q.apply_op3(k, v, Attached::new("attention", out, backward))
}

fn scale(q: &Tensor) -> Result<f64> {
    Ok(1.0 / (q.dim(D::Minus1)? as f64).sqrt())
}

/// Softmax of the scaled, masked scores: `[B, kv_heads, group·L, T]`.
fn probabilities(q: &Tensor, k: &Tensor, mask: &Tensor, group: usize) -> Result<Tensor> {
    let (batch, kv_heads, rows, _) = q.dims4()?;
    let total = k.dim(2)?;
    // The scale goes on the queries, `head_dim` wide, not on the `T`-wide scores (for a head
    // dimension that is a power of 4 it is a power of 2: exact in any precision).
    let scores = (q * scale(q)?)?.matmul(&k.t()?)?.reshape((
        batch,
        kv_heads * group,
        rows / group,
        total,
    ))?;
    scores
        .apply_op2_no_bwd(&mask.contiguous()?, &MaskedSoftmax)?
        .reshape((batch, kv_heads, rows, total))
}

/// Row `r` of scores `[B, heads, L, T]` (contiguous) is sequence `r / (heads·L)`, position
/// `r % L`; its mask row is `[sequence, position]` of a `[B, .., L, T]` mask.
#[derive(Debug, Clone, Copy)]
struct Rows {
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
struct MaskedSoftmax;

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
        fn run<T: WithDType>(
            s1: &CpuStorage,
            l1: &Layout,
            s2: &CpuStorage,
            l2: &Layout,
        ) -> Result<CpuStorage> {
            let rows = Rows::of(l1, l2)?;
            let (scores, mask) = (contiguous::<T>(s1, l1)?, contiguous::<T>(s2, l2)?);
            let out = if T::DTYPE == DType::F64 {
                masked_softmax_rows::<T, f64>(scores, mask, rows)
            } else {
                masked_softmax_rows::<T, f32>(scores, mask, rows)
            };
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
struct SoftmaxGradient;

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
        fn run<T: WithDType>(
            s1: &CpuStorage,
            l1: &Layout,
            s2: &CpuStorage,
            l2: &Layout,
            s3: &CpuStorage,
            l3: &Layout,
        ) -> Result<CpuStorage> {
            let columns = SoftmaxGradient::columns(l1, l2, l3)?;
            let (p, dp) = (contiguous::<T>(s1, l1)?, contiguous::<T>(s2, l2)?);
            let out = match s3.dtype() {
                DType::F64 => softmax_gradient_rows(p, dp, contiguous::<f64>(s3, l3)?, columns),
                _ => softmax_gradient_rows(p, dp, contiguous::<f32>(s3, l3)?, columns),
            };
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

/// The distillation loss of each row of `logits` `[N, V]` against a teacher's top k, `ids`
/// (u32) and `probabilities` `[N, k]`: `-Σ p·log softmax(logits)[id]`, `[N]` in the
/// accumulation dtype. One pass over the logits (two and a write for the gradient) where
/// log_softmax's composed form crossed them, widened to f32, about ten times; gradients flow to
/// `logits`. Every id must be below `V`: the CPU refuses one that is not, a GPU kernel counts it
/// for nothing (it cannot fail a launch; training checks the ids before).
pub fn top_k_cross_entropy(
    logits: &Tensor,
    ids: &Tensor,
    probabilities: &Tensor,
) -> Result<Tensor> {
    let wide = accumulation_dtype(logits.dtype());
    let (ids, probabilities) = (
        ids.contiguous()?,
        probabilities.to_dtype(wide)?.contiguous()?,
    );
    let loss =
        logits
            .detach()
            .contiguous()?
            .apply_op3_no_bwd(&ids, &probabilities, &TopKCrossEntropy)?;
    if !logits.track_op() {
        return Ok(loss);
    }
    let gradient = TopKCrossEntropyGradient { ids, probabilities };
    logits.apply_op1(Attached::new(
        "top-k-cross-entropy",
        loss,
        move |logits: &Tensor, _: &Tensor, grad: &Tensor| {
            logits
                .detach()
                .contiguous()?
                .apply_op2_no_bwd(&grad.contiguous()?, &gradient)
        },
    ))
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
struct TopKCrossEntropy;

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
        fn run<T: WithDType>(
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
            Ok(if T::DTYPE == DType::F64 {
                let p = contiguous::<f64>(s3, l3)?;
                f64::to_cpu_storage_owned(cross_entropy_rows(logits, ids, p, columns, k))
            } else {
                let p = contiguous::<f32>(s3, l3)?;
                f32::to_cpu_storage_owned(cross_entropy_rows(logits, ids, p, columns, k))
            })
        }
        let rows = l1.shape().dims2()?.0;
        Ok((
            for_float_dtype!(s1.dtype(), run(s1, l1, s2, l2, s3, l3))?,
            Shape::from(rows),
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
            (accumulation_dtype(dtype), rows),
            &[columns, k],
            &[],
        )?;
        Ok((storage, Shape::from(rows)))
    }
}

/// [`top_k_cross_entropy`]'s gradient for the logits, given each row's incoming gradient
/// (kernels/ops.cu on the GPU).
struct TopKCrossEntropyGradient {
    ids: Tensor,
    probabilities: Tensor,
}

/// The incoming gradient of [`top_k_cross_entropy`]'s `[rows]` losses must be `[rows]`.
fn check_loss_gradient(grad: &Layout, rows: usize) -> Result<()> {
    if grad.shape().dims() != [rows] {
        candle_core::bail!(
            "top-k cross-entropy: a gradient of shape {:?} for {rows} losses",
            grad.shape()
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
        fn run<T: WithDType>(
            this: &TopKCrossEntropyGradient,
            s1: &CpuStorage,
            l1: &Layout,
            s2: &CpuStorage,
            l2: &Layout,
        ) -> Result<CpuStorage> {
            let (ids, id_layout) = this.ids.storage_and_layout();
            let (p, p_layout) = this.probabilities.storage_and_layout();
            let (Storage::Cpu(ids), Storage::Cpu(p)) = (&*ids, &*p) else {
                candle_core::bail!("top-k cross-entropy: the teacher is not in host memory");
            };
            let (rows, columns, k) = top_k_shape(
                l1,
                (ids.dtype(), id_layout),
                (p.dtype(), p_layout),
                T::DTYPE,
            )?;
            check_loss_gradient(l2, rows)?;
            let (logits, ids) = (contiguous::<T>(s1, l1)?, contiguous::<u32>(ids, id_layout)?);
            check_ids(ids, columns)?;
            Ok(T::to_cpu_storage_owned(if T::DTYPE == DType::F64 {
                let (p, grad) = (contiguous::<f64>(p, p_layout)?, contiguous::<f64>(s2, l2)?);
                cross_entropy_gradient_rows(logits, ids, p, grad, columns, k)
            } else {
                let (p, grad) = (contiguous::<f32>(p, p_layout)?, contiguous::<f32>(s2, l2)?);
                cross_entropy_gradient_rows(logits, ids, p, grad, columns, k)
            }))
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
        let (ids, id_layout) = self.ids.storage_and_layout();
        let (p, p_layout) = self.probabilities.storage_and_layout();
        let (Storage::Cuda(ids), Storage::Cuda(p)) = (&*ids, &*p) else {
            candle_core::bail!("top-k cross-entropy: the teacher is not on the GPU");
        };
        let dtype = s1.dtype();
        let (rows, columns, k) =
            top_k_shape(l1, (ids.dtype(), id_layout), (p.dtype(), p_layout), dtype)?;
        check_loss_gradient(l2, rows)?;
        let storage = cuda::launch(
            "top_k_cross_entropy_gradient",
            rows,
            &[
                (s1, l1, dtype),
                (ids, id_layout, DType::U32),
                (p, p_layout, accumulation_dtype(dtype)),
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

/// `max + ln Σ exp(x - max)` of a row, in `A`.
fn log_sum_exp<T: WithDType, A: Float>(row: &[T]) -> A {
    let max = row.iter().map(widen).fold(A::neg_infinity(), A::max);
    let sum = row
        .iter()
        .fold(A::zero(), |sum, t| sum + (widen::<T, A>(t) - max).exp());
    max + sum.ln()
}

/// [`TopKCrossEntropy`] on the CPU.
fn cross_entropy_rows<T: WithDType, A: Float + Send + Sync>(
    logits: &[T],
    ids: &[u32],
    p: &[A],
    columns: usize,
    k: usize,
) -> Vec<A> {
    logits
        .par_chunks(columns)
        .zip(ids.par_chunks(k).zip(p.par_chunks(k)))
        .map(|(x, (ids, p))| {
            let log_sum = log_sum_exp::<T, A>(x);
            ids.iter().zip(p).fold(A::zero(), |loss, (&id, &p)| {
                let picked = A::from(x[id as usize].to_f64()).unwrap_or_else(A::nan);
                loss - p * (picked - log_sum)
            })
        })
        .collect()
}

/// [`TopKCrossEntropyGradient`] on the CPU: `grad·(mass·softmax(x) - p at the ids)`, each
/// teacher column rounded once with all the probability its id has.
fn cross_entropy_gradient_rows<T: WithDType, A: Float + Send + Sync>(
    logits: &[T],
    ids: &[u32],
    p: &[A],
    grad: &[A],
    columns: usize,
    k: usize,
) -> Vec<T> {
    let mut out = vec![T::zero(); logits.len()];
    out.par_chunks_mut(columns)
        .zip(logits.par_chunks(columns))
        .zip(ids.par_chunks(k).zip(p.par_chunks(k)))
        .zip(grad.par_iter())
        .for_each(|(((y, x), (ids, p)), &g)| {
            let log_sum = log_sum_exp::<T, A>(x);
            let mass = p.iter().fold(A::zero(), |sum, &p| sum + p);
            for (y, x) in y.iter_mut().zip(x) {
                *y = narrow::<T, A>(g * mass * (widen::<T, A>(x) - log_sum).exp());
            }
            for &id in ids {
                let target = ids
                    .iter()
                    .zip(p)
                    .filter(|(other, _)| **other == id)
                    .fold(A::zero(), |sum, (_, &p)| sum + p);
                let id = id as usize;
                y[id] =
                    narrow::<T, A>(g * (mass * (widen::<T, A>(&x[id]) - log_sum).exp() - target));
            }
        });
    out
}

/// A value of a CPU op's element dtype in its accumulation type.
fn widen<T: WithDType, A: Float>(t: &T) -> A {
    A::from(t.to_f64()).unwrap_or_else(A::nan)
}

/// An accumulated value back in the element dtype.
fn narrow<T: WithDType, A: Float>(a: A) -> T {
    T::from_f64(a.to_f64().unwrap_or(f64::NAN))
}

/// [`MaskedSoftmax`] on the CPU, with sums in `A`.
fn masked_softmax_rows<T: WithDType, A: Float + Send + Sync>(
    scores: &[T],
    mask: &[T],
    rows: Rows,
) -> Vec<T> {
    let columns = rows.columns;
    let mut out = vec![T::zero(); scores.len()];
    out.par_chunks_mut(columns)
        .zip(scores.par_chunks(columns))
        .enumerate()
        .for_each_init(Vec::new, |shifted, (row, (y, x))| {
            let m = &mask[rows.mask_row(row) * columns..][..columns];
            shifted.clear();
            shifted.extend(
                x.iter()
                    .zip(m)
                    .map(|(a, b)| widen::<T, A>(a) + widen::<T, A>(b)),
            );
            let max = shifted.iter().copied().fold(A::neg_infinity(), A::max);
            // Nothing visible: the row stays zeros.
            if max == A::neg_infinity() {
                return;
            }
            let mut sum = A::zero();
            for v in shifted.iter_mut() {
                *v = (*v - max).exp();
                sum = sum + *v;
            }
            let scale = sum.recip();
            for (y, &e) in y.iter_mut().zip(shifted.iter()) {
                *y = T::from_f64((e * scale).to_f64().unwrap_or(f64::NAN));
            }
        });
    out
}

/// [`SoftmaxGradient`] on the CPU, with sums in `A`.
fn softmax_gradient_rows<T: WithDType, A: Float + Send + Sync>(
    p: &[T],
    dp: &[T],
    sums: &[A],
    columns: usize,
) -> Vec<T> {
    let mut out = vec![T::zero(); p.len()];
    out.par_chunks_mut(columns)
        .zip(p.par_chunks(columns).zip(dp.par_chunks(columns)))
        .zip(sums.par_iter())
        .for_each(|((y, (p, dp)), &sum)| {
            for ((y, p), dp) in y.iter_mut().zip(p).zip(dp) {
                let value = widen::<T, A>(p) * (widen::<T, A>(dp) - sum);
                *y = T::from_f64(value.to_f64().unwrap_or(f64::NAN));
            }
        });
    out
}

/// Launches of kernels/ops.cu (foreign calls: unsafe).
#[cfg(feature = "cuda")]
#[allow(unsafe_code)]
mod cuda {
    use candle_core::backend::BackendStorage;
    use candle_core::cuda_backend::cudarc::driver::{
        CudaView, LaunchArgs, LaunchConfig, PushKernelArg,
    };
    use candle_core::cuda_backend::{CudaStorageSlice, WrapErr};
    use candle_core::{CudaStorage, DType, Layout, Result};
    use half::{bf16, f16};

    include!(concat!(env!("OUT_DIR"), "/kernels.rs"));

    /// Threads per block (`THREADS` in the kernels): one block per row.
    const THREADS: u32 = 256;

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

    /// Runs `{name}_{dtype of the first input}` with one block per row: the inputs (each of the
    /// dtype the kernel reads it as: a pointer carries none), then an output of `out` (dtype,
    /// elements), then `sizes` as 32-bit integers, then `floats`, as the kernel takes them.
    pub fn launch(
        name: &str,
        rows: usize,
        inputs: &[(&CudaStorage, &Layout, DType)],
        (dtype, elements): (DType, usize),
        sizes: &[usize],
        floats: &[f32],
    ) -> Result<CudaStorage> {
        let grid = u32::try_from(rows)
            .ok()
            .filter(|&r| r <= i32::MAX as u32)
            .ok_or_else(|| candle_core::Error::Msg(format!("{name}: {rows} rows are too many")))?;
        let sizes = sizes
            .iter()
            .map(|&s| u32::try_from(s))
            .collect::<std::result::Result<Vec<u32>, _>>()
            .map_err(|_| candle_core::Error::Msg(format!("{name}: a row is too long")))?;
        let device = inputs[0].0.device.clone();
        let kernel = format!("{name}_{}", inputs[0].2.as_str());
        let func = device.get_or_load_custom_func(&kernel, "cartridge_trainer_ops", OPS)?;
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
        let mut builder = func.builder();
        for view in &views {
            view.push(&mut builder);
        }
        match &out {
            CudaStorageSlice::BF16(s) => builder.arg(s),
            CudaStorageSlice::F16(s) => builder.arg(s),
            CudaStorageSlice::F32(s) => builder.arg(s),
            CudaStorageSlice::F64(s) => builder.arg(s),
            _ => unreachable!("allocated above"),
        };
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
        if rows > 0 {
            // SAFETY: the callers pass the kernel's parameters in number, order and type, with
            // every pointer covering the rows the grid reads.
            unsafe { builder.launch(config) }.w()?;
        }
        Ok(CudaStorage { slice: out, device })
    }
}

/// The dtype sums are taken in: f32 for half precision, the dtype itself otherwise.
fn accumulation_dtype(dtype: DType) -> DType {
    match dtype {
        DType::BF16 | DType::F16 => DType::F32,
        other => other,
    }
}

/// A value computed outside the graph (by fused kernels, which have no backward), joined to the
/// graph of the inputs it was computed from with a hand-written backward. As a custom op its
/// forward hands out the precomputed value: candle cannot move a tensor's storage into an op's
/// result, so that costs one copy of the output.
struct Attached<B> {
    name: &'static str,
    value: Mutex<Option<Tensor>>,
    backward: B,
}

impl<B> Attached<B> {
    fn new(name: &'static str, value: Tensor, backward: B) -> Self {
        Self {
            name,
            value: Mutex::new(Some(value)),
            backward,
        }
    }

    /// The value, taken: the graph then holds it once, as this op's result.
    fn take(&self) -> Result<Tensor> {
        let value = self
            .value
            .lock()
            .map_err(|_| candle_core::Error::Msg(format!("{}: poisoned", self.name)))?
            .take();
        let value = value
            .ok_or_else(|| candle_core::Error::Msg(format!("{}: forward ran twice", self.name)))?;
        let layout = value.layout();
        // A fresh kernel output: contiguous from the start of its own storage, which is what a
        // storage clone copies.
        if !layout.is_contiguous() || layout.start_offset() != 0 {
            candle_core::bail!("{}: value is a view, not a kernel output", self.name);
        }
        Ok(value)
    }

    fn cpu_output(&self) -> Result<(CpuStorage, Shape)> {
        let value = self.take()?;
        let (storage, layout) = value.storage_and_layout();
        match &*storage {
            Storage::Cpu(storage) => Ok((storage.try_clone(layout)?, layout.shape().clone())),
            _ => candle_core::bail!("{}: value is not in host memory", self.name),
        }
    }

    #[cfg(feature = "cuda")]
    fn cuda_output(&self) -> Result<(candle_core::CudaStorage, Shape)> {
        let value = self.take()?;
        let (storage, layout) = value.storage_and_layout();
        match &*storage {
            Storage::Cuda(storage) => Ok((storage.try_clone(layout)?, layout.shape().clone())),
            _ => candle_core::bail!("{}: value is not on the GPU", self.name),
        }
    }
}

impl<B> CustomOp1 for Attached<B>
where
    B: Fn(&Tensor, &Tensor, &Tensor) -> Result<Tensor> + Send + Sync,
{
    fn name(&self) -> &'static str {
        self.name
    }

    fn cpu_fwd(&self, _: &CpuStorage, _: &Layout) -> Result<(CpuStorage, Shape)> {
        self.cpu_output()
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        _: &candle_core::CudaStorage,
        _: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        self.cuda_output()
    }

    fn bwd(&self, arg: &Tensor, result: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some((self.backward)(arg, result, grad)?))
    }
}

impl<B> CustomOp3 for Attached<B>
where
    B: Fn(
            &Tensor,
            &Tensor,
            &Tensor,
            &Tensor,
            &Tensor,
        ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)>
        + Send
        + Sync,
{
    fn name(&self) -> &'static str {
        self.name
    }

    fn cpu_fwd(
        &self,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        self.cpu_output()
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        _: &candle_core::CudaStorage,
        _: &Layout,
        _: &candle_core::CudaStorage,
        _: &Layout,
        _: &candle_core::CudaStorage,
        _: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        self.cuda_output()
    }

    fn bwd(
        &self,
        a: &Tensor,
        b: &Tensor,
        c: &Tensor,
        result: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        (self.backward)(a, b, c, result, grad)
    }
}

/// `x @ weight^T` for a frozen `weight` of shape `[out, in]`; `x` is `[..., in]`. Gradients
/// flow to `x` only.
pub fn frozen_linear(x: &Tensor, weight: &Tensor) -> Result<Tensor> {
    let dims = x.dims();
    let (rows, inputs) = (
        dims[..dims.len() - 1].iter().product::<usize>(),
        dims[dims.len() - 1],
    );
    let (outputs, weight_inputs) = weight.dims2()?;
    if inputs != weight_inputs {
        candle_core::bail!(
            "frozen_linear: input has {inputs} features, the weight expects {weight_inputs}"
        );
    }
    let flat = x.reshape((rows, inputs))?;
    // Without a gradient to carry, the plain matmul is the same computation.
    let y = if flat.track_op() {
        flat.apply_op2(&weight.t()?, FrozenMatmul)?
    } else {
        flat.matmul(&weight.t()?)?
    };
    let mut shape = dims[..dims.len() - 1].to_vec();
    shape.push(outputs);
    y.reshape(shape)
}

/// `lhs [m, k] @ rhs [k, n]` where `rhs` (any strides) takes no gradient.
struct FrozenMatmul;

impl FrozenMatmul {
    fn shape(l1: &Layout, l2: &Layout) -> Result<((usize, usize, usize, usize), Shape)> {
        let (m, k) = l1.shape().dims2()?;
        let (k2, n) = l2.shape().dims2()?;
        if k != k2 {
            candle_core::bail!("frozen matmul: inner dimensions {k} and {k2} differ");
        }
        Ok(((1, m, n, k), Shape::from((m, n))))
    }
}

impl CustomOp2 for FrozenMatmul {
    fn name(&self) -> &'static str {
        "frozen-matmul"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (bmnk, shape) = Self::shape(l1, l2)?;
        Ok((s1.matmul(s2, bmnk, l1, l2)?, shape))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        let (bmnk, shape) = Self::shape(l1, l2)?;
        Ok((s1.matmul(s2, bmnk, l1, l2)?, shape))
    }

    fn bwd(
        &self,
        _lhs: &Tensor,
        rhs: &Tensor,
        _result: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        Ok((Some(grad.matmul(&rhs.t()?)?), None))
    }
}

#[cfg(test)]
mod tests {
    use candle_core::{Device, Var};

    use super::*;

    /// The GPU in a CUDA build (so the same checks run there on the CUDA kernels; such a build
    /// on a machine without one fails here), the CPU otherwise.
    fn device() -> Result<Device> {
        Device::cuda_if_available(0)
    }

    #[test]
    fn matches_matmul_and_its_input_gradient() -> Result<()> {
        let device = device()?;
        let x = Var::randn(0f32, 1.0, (2, 3, 5), &device)?;
        let weight = Tensor::randn(0f32, 1.0, (4, 5), &device)?;
        let frozen = frozen_linear(x.as_tensor(), &weight)?;
        let plain = x.as_tensor().broadcast_matmul(&weight.t()?)?;
        assert!(frozen.sub(&plain)?.abs()?.max_all()?.to_scalar::<f32>()? < 1e-5);

        let frozen_grad = frozen.sqr()?.sum_all()?.backward()?;
        let plain_grad = plain.sqr()?.sum_all()?.backward()?;
        let (a, b) = (frozen_grad.get(&x).unwrap(), plain_grad.get(&x).unwrap());
        assert!(a.sub(b)?.abs()?.max_all()?.to_scalar::<f32>()? < 1e-4);
        // A plain matmul computes and keeps a gradient for its right side even when that is a
        // frozen weight (candle's backward fills both sides); the frozen one keeps none.
        let flat = x.as_tensor().reshape((6, 5))?;
        let weight_t = weight.t()?;
        let plain = flat.matmul(&weight_t)?.sqr()?.sum_all()?.backward()?;
        let frozen = flat
            .apply_op2(&weight_t, FrozenMatmul)?
            .sqr()?
            .sum_all()?
            .backward()?;
        assert!(plain.get(&weight_t).is_some());
        assert!(
            frozen.get(&weight_t).is_none(),
            "no gradient is kept for the frozen weight"
        );
        Ok(())
    }

    fn max_difference(a: &Tensor, b: &Tensor) -> Result<f32> {
        a.sub(b)?
            .abs()?
            .max_all()?
            .to_dtype(DType::F32)?
            .to_scalar::<f32>()
    }

    /// The gradient of `sum(f(x) · w)` with respect to `x`, for a fixed random `w`.
    fn gradient(f: impl Fn(&Tensor) -> Result<Tensor>, x: &Var, w: &Tensor) -> Result<Tensor> {
        let grads = f(x.as_tensor())?.mul(w)?.sum_all()?.backward()?;
        Ok(grads.get(x).expect("a gradient").clone())
    }

    /// Checks an op against the composed (slow, differentiable) form of the same function:
    /// values and input gradients.
    fn check(
        fast: impl Fn(&Tensor) -> Result<Tensor>,
        slow: impl Fn(&Tensor) -> Result<Tensor>,
        x: &Var,
    ) -> Result<()> {
        let (a, b) = (fast(x.as_tensor())?, slow(x.as_tensor())?);
        assert!(
            max_difference(&a, &b)? < 1e-5,
            "values: {}",
            max_difference(&a, &b)?
        );
        let w = Tensor::randn(0f32, 1.0, a.shape(), x.device())?;
        let (ga, gb) = (gradient(&fast, x, &w)?, gradient(&slow, x, &w)?);
        assert!(
            max_difference(&ga, &gb)? < 1e-4,
            "gradients: {}",
            max_difference(&ga, &gb)?
        );
        Ok(())
    }

    #[test]
    fn rms_norm_matches_the_composed_form() -> Result<()> {
        let device = device()?;
        // Rows narrower than a GPU block and wider than one (SmolLM2's are 576).
        for hidden in [16, 600] {
            let x = Var::randn(0f32, 1.0, (2, 5, hidden), &device)?;
            let weight = Tensor::randn(0f32, 1.0, hidden, &device)?;
            check(
                |x| rms_norm(x, &weight, 1e-5),
                |x| candle_nn::ops::rms_norm_slow(x, &weight, 1e-5),
                &x,
            )?;
            // In bf16, against the composed form in f32 from the same rounded values.
            let (x, weight) = (x.to_dtype(DType::BF16)?, weight.to_dtype(DType::BF16)?);
            let (x, wide) = (
                Var::from_tensor(&x)?,
                Var::from_tensor(&x.to_dtype(DType::F32)?)?,
            );
            let w = Tensor::randn(0f32, 1.0, x.shape(), &device)?;
            let fused = gradient(|x| rms_norm(x, &weight, 1e-5)?.to_dtype(DType::F32), &x, &w)?;
            let composed = gradient(
                |x| candle_nn::ops::rms_norm_slow(x, &weight.to_dtype(DType::F32)?, 1e-5),
                &wide,
                &w,
            )?;
            // bf16 keeps 8 significant bits: the error is relative to the largest gradient.
            let largest = composed.abs()?.max_all()?.to_scalar::<f32>()?;
            let error = max_difference(&fused.to_dtype(DType::F32)?, &composed)? / largest;
            assert!(
                error < 1e-2,
                "bf16 gradients, {hidden} wide: {error} of the largest"
            );
        }
        Ok(())
    }

    #[test]
    fn rope_matches_the_composed_form() -> Result<()> {
        let device = device()?;
        let x = Var::randn(0f32, 1.0, (2, 3, 5, 8), &device)?;
        let angles = Tensor::randn(0f32, 3.0, (2, 5, 4), &device)?;
        let (cos, sin) = (angles.cos()?, angles.sin()?);
        let slow = |x: &Tensor| -> Result<Tensor> {
            let cos = Tensor::cat(&[&cos, &cos], D::Minus1)?.unsqueeze(1)?;
            let sin = Tensor::cat(&[&sin, &sin], D::Minus1)?.unsqueeze(1)?;
            let rotated = Tensor::cat(
                &[
                    &x.narrow(D::Minus1, 4, 4)?.neg()?,
                    &x.narrow(D::Minus1, 0, 4)?,
                ],
                D::Minus1,
            )?;
            x.broadcast_mul(&cos)? + rotated.broadcast_mul(&sin)?
        };
        check(|x| rope(x, &cos, &sin), slow, &x)
    }

    #[test]
    fn attention_matches_the_composed_form() -> Result<()> {
        // Two sequences of 4 tokens (one padded to 3) after a 3-token prefix, 2 key heads each
        // shared by 3 query heads.
        let device = device()?;
        let (batch, kv_heads, group, length, prefix, hd) = (2, 2, 3, 4, 3, 8);
        let total = prefix + length;
        let mask = crate::model::causal_mask(&[4, 3], prefix, length, DType::F32, &device)
            .expect("a mask");
        let q = Var::randn(0f32, 1.0, (batch, kv_heads, group * length, hd), &device)?;
        let k = Var::randn(0f32, 1.0, (batch, kv_heads, total, hd), &device)?;
        let v = Var::randn(0f32, 1.0, (batch, kv_heads, total, hd), &device)?;
        let slow = |q: &Tensor, k: &Tensor, v: &Tensor| -> Result<Tensor> {
            let scores = (q.matmul(&k.t()?)? / (hd as f64).sqrt())?
                .reshape((batch, kv_heads, group, length, total))?
                .broadcast_add(&mask)?;
            candle_nn::ops::softmax(&scores, D::Minus1)?
                .reshape((batch, kv_heads, group * length, total))?
                .matmul(v)
        };
        let fast = attention(&q, &k, &v, &mask, group)?;
        let reference = slow(&q, &k, &v)?;
        assert!(max_difference(&fast, &reference)? < 1e-5);
        let w = Tensor::randn(0f32, 1.0, fast.shape(), &device)?;
        let a = fast.mul(&w)?.sum_all()?.backward()?;
        let b = reference.mul(&w)?.sum_all()?.backward()?;
        for var in [&q, &k, &v] {
            let difference = max_difference(a.get(var).unwrap(), b.get(var).unwrap())?;
            assert!(difference < 1e-4, "gradient: {difference}");
        }
        Ok(())
    }

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
    fn the_top_k_cross_entropy_and_its_gradient_are_the_composed_ones() -> Result<()> {
        let device = device()?;
        let (rows, vocab) = (3, 701);
        // Row 1's last two slots are padding: id 0, probability 0, one of them repeating its
        // first id.
        let ids = Tensor::new(
            &[[5u32, 700, 17, 3], [0, 44, 0, 0], [640, 1, 2, 699]],
            &device,
        )?;
        let probabilities = Tensor::new(
            &[
                [0.5f32, 0.25, 0.125, 0.125],
                [0.75, 0.25, 0.0, 0.0],
                [0.25, 0.25, 0.25, 0.25],
            ],
            &device,
        )?;
        let weights = Tensor::new(&[1.0f32, -2.0, 0.5], &device)?;
        for dtype in [DType::F32, DType::BF16] {
            let logits = Var::from_tensor(
                &Tensor::randn(0f32, 4.0, (rows, vocab), &device)?.to_dtype(dtype)?,
            )?;
            let fused = top_k_cross_entropy(logits.as_tensor(), &ids, &probabilities)?;
            let composed =
                candle_nn::ops::log_softmax(&logits.as_tensor().to_dtype(DType::F32)?, D::Minus1)?
                    .gather(&ids, 1)?
                    .mul(&probabilities)?
                    .sum(1)?
                    .neg()?;
            let error = max_difference(&fused, &composed)?;
            assert!(error < 1e-4, "{dtype:?} values: {error}");
            let a = fused.mul(&weights)?.sum_all()?.backward()?;
            let b = composed.mul(&weights)?.sum_all()?.backward()?;
            let (a, b) = (
                a.get(&logits).expect("a gradient").to_dtype(DType::F32)?,
                b.get(&logits).expect("a gradient").to_dtype(DType::F32)?,
            );
            let tolerance = if dtype == DType::F32 { 2e-5 } else { 8e-3 };
            let error = max_difference(&a, &b)?;
            assert!(error < tolerance, "{dtype:?} gradients: {error}");
        }
        if matches!(device, Device::Cpu) {
            let logits = Tensor::zeros((1, 4), DType::F32, &device)?;
            let outside = Tensor::new(&[[4u32]], &device)?;
            let error = top_k_cross_entropy(&logits, &outside, &Tensor::new(&[[1f32]], &device)?)
                .unwrap_err();
            assert!(error.to_string().contains("token 4 is outside"), "{error}");
        }
        Ok(())
    }

    #[test]
    fn without_a_gradient_to_carry_the_ops_stay_off_the_graph() -> Result<()> {
        let device = device()?;
        let x = Tensor::randn(0f32, 1.0, (1, 2, 3, 8), &device)?;
        let angles = Tensor::randn(0f32, 1.0, (1, 3, 4), &device)?;
        let ones = Tensor::ones(8, DType::F32, &device)?;
        assert!(!rope(&x, &angles.cos()?, &angles.sin()?)?.track_op());
        assert!(!rms_norm(&x, &ones, 1e-5)?.track_op());
        // And on it when there is one.
        let var = Var::from_tensor(&x)?;
        assert!(rope(var.as_tensor(), &angles.cos()?, &angles.sin()?)?.track_op());
        assert!(rms_norm(var.as_tensor(), &ones, 1e-5)?.track_op());
        Ok(())
    }
}
