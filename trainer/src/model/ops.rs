//! Operations the forward needs beyond candle's own, so that one forward serves training and
//! inference.
//!
//! candle's fused kernels (RMSNorm, RoPE) are fast and have no backward: a graph through them is
//! silently cut. The ops here run those kernels forward and, when an input carries a gradient,
//! join the result to the graph with a backward written out by hand ([`Attached`]). Where the
//! composed forms crossed large matrices several times (attention's masked softmax, its
//! gradient, the loss over the vocabulary, RMSNorm's gradient) they are ops of our own, one pass
//! each ([`super::fused`]). Attention keeps only its
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
};

use super::fused::{
    MaskedSoftmax, PlaceRows, RmsNormGradient, SoftmaxGradient, SwiGlu, SwiGluGradient,
    TopKCrossEntropy, TopKCrossEntropyGradient,
};

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

/// The MLP's gate `silu(gate)·up` of two tensors of one shape; gradients flow to both.
pub fn swiglu(gate: &Tensor, up: &Tensor) -> Result<Tensor> {
    let (gate, up) = (gate.contiguous()?, up.contiguous()?);
    let y = gate.apply_op2_no_bwd(&up, &SwiGlu)?;
    if !(gate.track_op() || up.track_op()) {
        return Ok(y);
    }
    let backward = |gate: &Tensor, up: &Tensor, _: &Tensor, grad: &Tensor| {
        let wanted = (gate.track_op(), up.track_op());
        let both =
            gate.detach()
                .apply_op3_no_bwd(&up.detach(), &grad.contiguous()?, &SwiGluGradient)?;
        Ok((
            wanted.0.then(|| both.get(0)).transpose()?,
            wanted.1.then(|| both.get(1)).transpose()?,
        ))
    };
    gate.apply_op2(&up, Attached::new("swiglu", y, backward))
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
    #[cfg(feature = "cuda")]
    if super::flash::applies(q, k, v, mask, group) {
        return tiled_attention(q, k, v, mask, group);
    }
    composed_attention(q, k, v, mask, group)
}

/// [`attention`] by matmuls around the fused masked softmax, on any device and in any dtype.
pub(super) fn composed_attention(
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
        // Softmax backward, dS = P·(dP - rowsum(P·dP)). The score scale goes on dQ and dK, not on
        // all of dS.
        let sums = output_sums(&grad, out)?;
        let dp = grad.matmul(&v.t()?)?;
        let ds = p.apply_op3_no_bwd(&dp, &sums, &SoftmaxGradient)?;
        let scale = scale(&q)?;
        let dq = wanted.0.then(|| ds.matmul(&k)? * scale).transpose()?;
        let dk = wanted.1.then(|| ds.t()?.matmul(&q)? * scale).transpose()?;
        Ok((dq, dk, dv))
    };
    q.apply_op3(k, v, Attached::new("attention", out, backward))
}

/// [`attention`] by the GPU kernels that never write the score matrices (model/flash.rs).
#[cfg(feature = "cuda")]
fn tiled_attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    mask: &Tensor,
    group: usize,
) -> Result<Tensor> {
    use super::flash;
    let (batch, _, rows, _) = q.dims4()?;
    let mask = mask
        .reshape((batch, rows / group, k.dim(2)?))?
        .contiguous()?;
    let (out, lse) = flash::forward(q, k, v, &mask, group)?;
    if !(q.track_op() || k.track_op() || v.track_op()) {
        return Ok(out);
    }
    let backward = move |q: &Tensor, k: &Tensor, v: &Tensor, out: &Tensor, grad: &Tensor| {
        let wanted = (q.track_op(), k.track_op(), v.track_op());
        let grad = if super::flash::is_aligned(grad) {
            grad.clone()
        } else {
            grad.force_contiguous()?
        };
        let sums = output_sums(&grad, out)?.squeeze(D::Minus1)?;
        let (dq, dk, dv) = flash::backward(q, k, v, &mask, &grad, &lse, &sums, group)?;
        Ok((
            wanted.0.then(|| dq.to_dtype(q.dtype())).transpose()?,
            wanted.1.then_some(dk),
            wanted.2.then_some(dv),
        ))
    };
    q.apply_op3(k, v, Attached::new("attention", out, backward))
}

/// rowsum(dO·O) `[.., 1]` of attention's output and its gradient, in the accumulation dtype (f32
/// for half precision): the softmax backward's rowsum(P·dP) (dP = dO·Vᵀ and O = P·V), from
/// `[.., head_dim]` tensors rather than `[.., T]` ones.
fn output_sums(grad: &Tensor, out: &Tensor) -> Result<Tensor> {
    let wide = accumulation_dtype(out.dtype());
    grad.to_dtype(wide)?
        .mul(&out.to_dtype(wide)?)?
        .sum_keepdim(D::Minus1)
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

/// Rows `rows` of `x` `[N, H]`, each at most once: `[rows.len(), H]`; gradients flow to `x`
/// (placed back in one pass, not added one id at a time as candle's `index_select` does).
pub fn select_rows(x: &Tensor, rows: &[u32]) -> Result<Tensor> {
    let (n, _) = x.dims2()?;
    if rows.is_empty() || n >= u32::MAX as usize {
        candle_core::bail!("select_rows: {} rows of {n}", rows.len());
    }
    // For each row of x, which selected row it is (u32::MAX: none).
    let mut source = vec![u32::MAX; n];
    for (index, &row) in rows.iter().enumerate() {
        match source.get_mut(row as usize) {
            Some(slot) if *slot == u32::MAX => *slot = index as u32,
            Some(_) => candle_core::bail!("select_rows: row {row} is selected twice"),
            None => candle_core::bail!("select_rows: row {row} of {n}"),
        }
    }
    let device = x.device();
    let ids = Tensor::from_vec(rows.to_vec(), rows.len(), device)?;
    let selected = x.detach().index_select(&ids, 0)?;
    if !x.track_op() {
        return Ok(selected);
    }
    let place = PlaceRows {
        source: Tensor::from_vec(source, n, device)?,
        selected: rows.len(),
    };
    x.apply_op1(Attached::new(
        "select-rows",
        selected,
        move |_: &Tensor, _: &Tensor, grad: &Tensor| grad.contiguous()?.apply_op1_no_bwd(&place),
    ))
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

/// The dtype sums are taken in: f32 for half precision, the dtype itself otherwise.
pub(super) fn accumulation_dtype(dtype: DType) -> DType {
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

impl<B> CustomOp2 for Attached<B>
where
    B: Fn(&Tensor, &Tensor, &Tensor, &Tensor) -> Result<(Option<Tensor>, Option<Tensor>)>
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
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        self.cuda_output()
    }

    fn bwd(
        &self,
        a: &Tensor,
        b: &Tensor,
        result: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        (self.backward)(a, b, result, grad)
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
pub(super) mod tests {
    use candle_core::{Device, Var};

    use super::*;

    /// The GPU in a CUDA build (so the same checks run there on the CUDA kernels; such a build
    /// on a machine without one fails here), the CPU otherwise.
    pub(crate) fn device() -> Result<Device> {
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

    pub(crate) fn max_difference(a: &Tensor, b: &Tensor) -> Result<f32> {
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
    fn swiglu_matches_the_composed_form() -> Result<()> {
        let device = device()?;
        // Gates from -40 to 40: silu's tails, where exp(-g) overflows or vanishes.
        let gate =
            Var::from_tensor(&(Tensor::arange(-40f32, 40.0, &device)?.reshape((4, 20))? * 1.0)?)?;
        let up = Var::randn(0f32, 1.0, (4, 20), &device)?;
        let composed = |g: &Tensor, u: &Tensor| candle_nn::ops::silu(g)?.mul(u);
        check(
            |g| swiglu(g, up.as_tensor()),
            |g| composed(g, up.as_tensor()),
            &gate,
        )?;
        check(
            |u| swiglu(gate.as_tensor(), u),
            |u| composed(gate.as_tensor(), u),
            &up,
        )
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
    fn selected_rows_and_their_gradient_are_index_selects() -> Result<()> {
        let device = device()?;
        // Rows wider than a GPU block; three of seven selected, out of order.
        let rows = [5u32, 0, 3];
        for dtype in [DType::F32, DType::BF16] {
            let x =
                Var::from_tensor(&Tensor::randn(0f32, 1.0, (7, 300), &device)?.to_dtype(dtype)?)?;
            let ids = Tensor::new(&rows, &device)?;
            let fused = select_rows(x.as_tensor(), &rows)?;
            let composed = x.as_tensor().index_select(&ids, 0)?;
            assert_eq!(max_difference(&fused, &composed)?, 0.0);
            let w = Tensor::randn(0f32, 1.0, (3, 300), &device)?.to_dtype(dtype)?;
            let a = fused.mul(&w)?.sum_all()?.backward()?;
            let b = composed.mul(&w)?.sum_all()?.backward()?;
            let (a, b) = (
                a.get(&x).expect("a gradient"),
                b.get(&x).expect("a gradient"),
            );
            assert_eq!(max_difference(a, b)?, 0.0, "{dtype:?}");
        }
        let x = Tensor::zeros((4, 2), DType::F32, &device)?;
        for (rows, problem) in [(&[1u32, 1][..], "selected twice"), (&[4][..], "row 4 of 4")] {
            let error = select_rows(&x, rows).unwrap_err().to_string();
            assert!(error.contains(problem), "{error}");
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
