//! Operations the model needs beyond candle's own, each a forward and, for training, a backward
//! written out (`*_backward`: the gradient of its inputs given its output's), which
//! [`super::Llama::prefix_gradients`] chains layer by layer.
//!
//! candle's own backward pass does not serve here: its fused kernels (RMSNorm, RoPE) have none
//! and silently cut the graph, it computes (and keeps) a gradient for every matmul's frozen
//! weight, and it adds every gradient into a fresh zero tensor. Where the composed forms crossed
//! large matrices several times (attention's masked softmax, its gradient, the loss over the
//! vocabulary, RMSNorm's gradient) the ops are our own, one pass each ([`super::fused`]).
//! Attention keeps only its inputs and output between the passes and recomputes the
//! probabilities in its backward, as FlashAttention does: the `[L, T]` matrices of every layer
//! are never held at once.

use candle_core::{D, DType, Result, Tensor};

use super::Mask;
use super::fused::{
    AddInPlace, Angles, MaskedSoftmax, PlaceRows, RmsNorm, RmsNormGradient, RopeQkv,
    RopeQkvGradient, SoftmaxGradient, SwiGlu, SwiGluGradient, TopKCrossEntropy,
    TopKCrossEntropyGradient,
};

/// RMSNorm of `x` `[..., hidden]` with `weight` `[hidden]`.
pub fn rms_norm(x: &Tensor, weight: &Tensor, eps: f32) -> Result<Tensor> {
    let norm = RmsNorm {
        weight: weight.contiguous()?,
        eps,
    };
    x.contiguous()?.apply_op1_no_bwd(&norm)
}

/// `sum += x` in place, for tensors of one shape, `sum` contiguous: a residual connection's
/// add, into the buffer of the branch's output (which nothing else may hold), so that the sum
/// takes no buffer of its own.
pub fn add_in_place(sum: &Tensor, x: &Tensor) -> Result<()> {
    sum.inplace_op2(&x.contiguous()?, &AddInPlace)
}

/// [`rms_norm`]'s input gradient given its output's, `grad`, plus `residual` where x also
/// reaches the output another way (a residual connection): added in the same pass.
pub fn rms_norm_backward(
    x: &Tensor,
    weight: &Tensor,
    eps: f32,
    grad: &Tensor,
    residual: Option<&Tensor>,
) -> Result<Tensor> {
    let gradient = RmsNormGradient {
        weight: weight.contiguous()?,
        residual: residual.map(Tensor::contiguous).transpose()?,
        eps,
    };
    x.contiguous()?
        .apply_op2_no_bwd(&grad.contiguous()?, &gradient)
}

/// The MLP's gate `silu(gate)·up` of `gate_up` `[.., 2·I]`, each row's gate then its up (one
/// projection makes both): `[.., I]`.
pub fn swiglu(gate_up: &Tensor) -> Result<Tensor> {
    gate_up.contiguous()?.apply_op1_no_bwd(&SwiGlu)
}

/// [`swiglu`]'s gradient given its output's, `grad` `[.., I]`: `[.., 2·I]`, laid out as
/// `gate_up` (so that one product takes it back through the projection that made both).
pub fn swiglu_backward(gate_up: &Tensor, grad: &Tensor) -> Result<Tensor> {
    gate_up
        .contiguous()?
        .apply_op2_no_bwd(&grad.contiguous()?, &SwiGluGradient)
}

/// The queries `[B, L, heads, head_dim]`, keys and values `[B, L, kv_heads, head_dim]` of one
/// projection's output `qkv` `[B, L, (heads + 2·kv_heads)·head_dim]` (its rows stacked the same
/// way), the queries and keys rotated by per-token angles given as `cos` and `sin` `[B, L,
/// head_dim/2]` (half-split pairs): each contiguous, in one pass.
pub fn rope_qkv(
    qkv: &Tensor,
    (heads, kv_heads): (usize, usize),
    cos: &Tensor,
    sin: &Tensor,
) -> Result<(Tensor, Tensor, Tensor)> {
    let (batch, length, _) = qkv.dims3()?;
    let dim = 2 * cos.dim(D::Minus1)?;
    let rope = RopeQkv {
        heads,
        kv_heads,
        angles: Angles::new(cos, sin)?,
    };
    // One buffer, the queries then the keys then the values.
    let all = qkv.contiguous()?.apply_op1_no_bwd(&rope)?;
    let part = |first: usize, count: usize| {
        let head = batch * length * dim;
        all.narrow(0, first * head, count * head)?
            .reshape((batch, length, count, dim))
    };
    Ok((
        part(0, heads)?,
        part(heads, kv_heads)?,
        part(heads + kv_heads, kv_heads)?,
    ))
}

/// [`rope_qkv`]'s input gradient given its outputs', `dq`, `dk` and `dv`: `[B, L, (heads +
/// 2·kv_heads)·head_dim]`, as `qkv` (so that one product takes it back through the projection).
/// A rotation's transpose is the rotation by the opposite angle.
pub fn rope_qkv_backward([dq, dk, dv]: [&Tensor; 3], cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    let gradient = RopeQkvGradient {
        angles: Angles::new(cos, sin)?,
    };
    dq.contiguous()?
        .apply_op3_no_bwd(&dk.contiguous()?, &dv.contiguous()?, &gradient)
}

/// Attention's keys, or its values: a cache's whole `[B, kv_heads, T, head_dim]`, or those the
/// batch shares (a cartridge's, `[kv_heads, P, head_dim]`, or none) followed by each sequence's
/// own in the projection's layout, `[B, L, kv_heads, head_dim]`, which the GPU kernels read
/// where they lie: neither is copied to make the whole.
pub enum Keys<'a> {
    Whole(&'a Tensor),
    Split {
        shared: Option<&'a Tensor>,
        own: &'a Tensor,
    },
}

impl Keys<'_> {
    /// All of them, `[B, kv_heads, T, head_dim]`, as the composed form takes them.
    fn whole(&self) -> Result<Tensor> {
        match *self {
            Keys::Whole(keys) => Ok(keys.clone()),
            Keys::Split { shared, own } => {
                let own = own.transpose(1, 2)?;
                let Some(shared) = shared else {
                    return own.contiguous();
                };
                let (batch, kv_heads, _, head_dim) = own.dims4()?;
                let shared = shared.unsqueeze(0)?.broadcast_as((
                    batch,
                    kv_heads,
                    shared.dim(1)?,
                    head_dim,
                ))?;
                Tensor::cat(&[&shared, &own], 2)?.contiguous()
            }
        }
    }

    fn shared_count(&self) -> usize {
        match self {
            Keys::Split {
                shared: Some(shared),
                ..
            } => shared.dim(1).unwrap_or(0),
            _ => 0,
        }
    }
}

/// The gradient of [`Keys::Split`] keys (or values): the shared ones' summed over the batch, in
/// the accumulation dtype (f32 for half precision), `[kv_heads, P, head_dim]`, and the own
/// ones' as they are, `[B, L, kv_heads, head_dim]`.
pub struct KeyGradients {
    pub shared: Tensor,
    pub own: Tensor,
}

/// What [`attention_backward`] needs besides the inputs and the output: nothing for the
/// composed form (it recomputes the probabilities, and its stacked queries and whole keys: copies
/// small beside the products, not kept for every layer), the log-sum-exps and the row tiles'
/// reach for the GPU kernels.
pub enum AttentionSaved {
    Composed,
    #[cfg(feature = "cuda")]
    Tiled {
        lse: Tensor,
        reach: Tensor,
    },
}

/// Attention of `q` `[B, L, heads, head_dim]` (the projection's layout; each `group` query heads
/// share a key head, whose keys are never copied per query head) over `keys` and `values`, each
/// position seeing the keys `mask` says: the output `[B, L, heads, head_dim]` (the output
/// projection's input) and what the backward needs. By the GPU kernels that never write the
/// score matrices (model/flash.rs) where they apply, by matmuls around the fused masked softmax
/// otherwise (any device, any dtype).
pub fn attention_forward(
    q: &Tensor,
    keys: &Keys,
    values: &Keys,
    mask: &Mask,
    group: usize,
) -> Result<(Tensor, AttentionSaved)> {
    #[cfg(feature = "cuda")]
    if let Some((prefix, spans, parts)) = tiled(mask, keys, values)
        && super::flash::applies(q, &parts, prefix, spans, group)
    {
        let (out, lse, reach) = super::flash::forward(q, &parts, prefix, spans, group)?;
        return Ok((out, AttentionSaved::Tiled { lse, reach }));
    }
    let v = values.whole()?;
    let out = probabilities(&stacked(q, group)?, &keys.whole()?, mask, group)?.matmul(&v)?;
    Ok((unstacked(&out, group)?, AttentionSaved::Composed))
}

/// What the tiled kernels take of an attention, if they can: the mask's spans (its prefix and
/// pairs) and split keys and values.
#[cfg(feature = "cuda")]
fn tiled<'a>(
    mask: &'a Mask,
    keys: &Keys<'a>,
    values: &Keys<'a>,
) -> Option<(usize, &'a Tensor, super::flash::KeyParts<'a>)> {
    match (mask.spans_form(), keys, values) {
        (
            Some((prefix, spans)),
            &Keys::Split {
                shared: k_shared,
                own: k,
            },
            &Keys::Split {
                shared: v_shared,
                own: v,
            },
        ) => Some((
            prefix,
            spans,
            super::flash::KeyParts {
                keys: (k_shared, k),
                values: (v_shared, v),
            },
        )),
        _ => None,
    }
}

/// The gradients of [`attention_forward`]'s inputs, [`Keys::Split`] keys and values, given its
/// output's, `grad`: the queries' where `want_dq` (None otherwise, which saves work), the keys'
/// and the values'.
#[allow(clippy::too_many_arguments)]
pub fn attention_backward(
    q: &Tensor,
    [keys, values]: [&Keys; 2],
    mask: &Mask,
    group: usize,
    out: &Tensor,
    saved: &AttentionSaved,
    grad: &Tensor,
    want_dq: bool,
) -> Result<(Option<Tensor>, KeyGradients, KeyGradients)> {
    if matches!(keys, Keys::Whole(_)) || matches!(values, Keys::Whole(_)) {
        candle_core::bail!("attention's backward over a cache's keys");
    }
    match saved {
        #[cfg(feature = "cuda")]
        AttentionSaved::Tiled { lse, reach } => {
            let Some((prefix, spans, parts)) = tiled(mask, keys, values) else {
                candle_core::bail!("attention in tiles without spans");
            };
            let grad = if super::flash::is_aligned(grad) {
                grad.clone()
            } else {
                grad.force_contiguous()?
            };
            let sums = super::flash::row_sums(&grad, out, group)?;
            let (dq, dk, dv) = super::flash::backward(
                q,
                &parts,
                (prefix, spans, reach),
                &grad,
                lse,
                &sums,
                group,
            )?;
            Ok((want_dq.then(|| dq.to_dtype(q.dtype())).transpose()?, dk, dv))
        }
        AttentionSaved::Composed => {
            let (q, out, grad) = (
                stacked(q, group)?,
                stacked(out, group)?,
                stacked(grad, group)?,
            );
            let (whole_keys, whole_values) = (keys.whole()?, values.whole()?);
            let p = probabilities(&q, &whole_keys, mask, group)?;
            let dv = p.t()?.matmul(&grad)?;
            // Softmax backward, dS = P·(dP - rowsum(P·dP)). The score scale goes on dQ and dK,
            // not on all of dS.
            let sums = output_sums(&grad, &out)?;
            let dp = grad.matmul(&whole_values.t()?)?;
            let ds = p.apply_op3_no_bwd(&dp, &sums, &SoftmaxGradient)?;
            let scale = scale(&q)?;
            let dq = want_dq
                .then(|| unstacked(&(ds.matmul(&whole_keys)? * scale)?, group))
                .transpose()?;
            let dk = (ds.t()?.matmul(&q)? * scale)?;
            let split = |d: &Tensor, keys: &Keys| -> Result<KeyGradients> {
                let shared = keys.shared_count();
                let own = d.dim(2)? - shared;
                Ok(KeyGradients {
                    shared: d
                        .narrow(2, 0, shared)?
                        .to_dtype(accumulation_dtype(d.dtype()))?
                        .sum(0)?,
                    own: d.narrow(2, shared, own)?.transpose(1, 2)?.contiguous()?,
                })
            };
            Ok((dq, split(&dk, keys)?, split(&dv, values)?))
        }
    }
}

/// `[B, L, heads, head_dim]` as the composed form takes it, `[B, kv_heads, group·L, head_dim]`:
/// the query heads that share a key head stacked.
fn stacked(x: &Tensor, group: usize) -> Result<Tensor> {
    let (batch, length, heads, head_dim) = x.dims4()?;
    x.transpose(1, 2)?
        .contiguous()?
        .reshape((batch, heads / group, group * length, head_dim))
}

/// [`stacked`]'s inverse.
fn unstacked(x: &Tensor, group: usize) -> Result<Tensor> {
    let (batch, kv_heads, rows, head_dim) = x.dims4()?;
    x.reshape((batch, kv_heads * group, rows / group, head_dim))?
        .transpose(1, 2)?
        .contiguous()
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
fn probabilities(q: &Tensor, k: &Tensor, mask: &Mask, group: usize) -> Result<Tensor> {
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
        .apply_op2_no_bwd(&mask.to_additive(q.dtype())?.contiguous()?, &MaskedSoftmax)?
        .reshape((batch, kv_heads, rows, total))
}

/// Rows `rows` of `x` `[N, H]`, each at most once: `[rows.len(), H]`.
pub fn select_rows(x: &Tensor, rows: &[u32]) -> Result<Tensor> {
    row_sources(x.dim(0)?, rows)?;
    x.index_select(&Tensor::from_vec(rows.to_vec(), rows.len(), x.device())?, 0)
}

/// [`select_rows`]'s input gradient `[n, H]` given the selected rows' gradient, `grad`: placed
/// back in one pass, not added one id at a time as candle's `index_add` does (4.2 ms for 8,188
/// rows of 576 on an H200).
pub fn select_rows_backward(grad: &Tensor, rows: &[u32], n: usize) -> Result<Tensor> {
    let place = PlaceRows {
        source: Tensor::from_vec(row_sources(n, rows)?, n, grad.device())?,
        selected: rows.len(),
    };
    grad.contiguous()?.apply_op1_no_bwd(&place)
}

/// For each of `n` rows, which of `rows` it is (u32::MAX: none); refuses a row out of range or
/// selected twice.
fn row_sources(n: usize, rows: &[u32]) -> Result<Vec<u32>> {
    if rows.is_empty() || n >= u32::MAX as usize {
        candle_core::bail!("select_rows: {} rows of {n}", rows.len());
    }
    let mut source = vec![u32::MAX; n];
    for (index, &row) in rows.iter().enumerate() {
        match source.get_mut(row as usize) {
            Some(slot) if *slot == u32::MAX => *slot = index as u32,
            Some(_) => candle_core::bail!("select_rows: row {row} is selected twice"),
            None => candle_core::bail!("select_rows: row {row} of {n}"),
        }
    }
    Ok(source)
}

/// The distillation loss of each row of `logits` `[N, V]` against a teacher's top k, `ids`
/// (u32) and `probabilities` `[N, k]`: `-Σ p·log softmax(logits)[id]`, `[N]` in the
/// accumulation dtype, and each row's log-sum-exp, `[N]`, for the gradient. One pass over the
/// logits (one and a write for the gradient) where log_softmax's composed form crossed them,
/// widened to f32, about ten times. Every id must be below `V`: the CPU refuses one that is
/// not, a GPU kernel counts it for nothing (it cannot fail a launch; training checks the ids
/// before).
pub fn top_k_cross_entropy(
    logits: &Tensor,
    ids: &Tensor,
    probabilities: &Tensor,
) -> Result<(Tensor, Tensor)> {
    let wide = accumulation_dtype(logits.dtype());
    let both = logits.contiguous()?.apply_op3_no_bwd(
        &ids.contiguous()?,
        &probabilities.to_dtype(wide)?.contiguous()?,
        &TopKCrossEntropy,
    )?;
    Ok((both.get(0)?, both.get(1)?))
}

/// [`top_k_cross_entropy`]'s gradient with respect to `logits` given each row's loss's,
/// `grad` `[N]`, and the log-sum-exps it gave.
pub fn top_k_cross_entropy_backward(
    logits: &Tensor,
    ids: &Tensor,
    probabilities: &Tensor,
    log_sums: &Tensor,
    grad: &Tensor,
) -> Result<Tensor> {
    let wide = accumulation_dtype(logits.dtype());
    let gradient = TopKCrossEntropyGradient {
        ids: ids.contiguous()?,
        probabilities: probabilities.to_dtype(wide)?.contiguous()?,
        log_sums: log_sums.to_dtype(wide)?.contiguous()?,
    };
    logits
        .contiguous()?
        .apply_op2_no_bwd(&grad.contiguous()?, &gradient)
}

/// The dtype sums are taken in: f32 for half precision, the dtype itself otherwise.
pub(super) fn accumulation_dtype(dtype: DType) -> DType {
    match dtype {
        DType::BF16 | DType::F16 => DType::F32,
        other => other,
    }
}

/// `x @ weight^T` for `weight` `[out, in]` and `x` `[..., in]`, as one matrix product.
pub fn linear(x: &Tensor, weight: &Tensor) -> Result<Tensor> {
    matmul_last(x, &weight.t()?)
}

/// [`linear`]'s input gradient `[..., in]` given its output's, `grad` `[..., out]`.
pub fn linear_backward(grad: &Tensor, weight: &Tensor) -> Result<Tensor> {
    matmul_last(grad, weight)
}

/// `x` `[..., a]` times `matrix` `[a, b]`: `[..., b]`, the leading axes flattened into one
/// matrix product.
fn matmul_last(x: &Tensor, matrix: &Tensor) -> Result<Tensor> {
    let (inputs, outputs) = matrix.dims2()?;
    let dims = x.dims();
    if dims.last() != Some(&inputs) {
        candle_core::bail!("linear: input of shape {dims:?}, the weight expects {inputs} features");
    }
    let mut shape = dims[..dims.len() - 1].to_vec();
    shape.push(outputs);
    x.reshape((x.elem_count() / inputs, inputs))?
        .matmul(matrix)?
        .reshape(shape)
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

    pub(crate) fn max_difference(a: &Tensor, b: &Tensor) -> Result<f32> {
        a.sub(b)?
            .abs()?
            .max_all()?
            .to_dtype(DType::F32)?
            .to_scalar::<f32>()
    }

    /// The gradient of `sum(f(x) · w)` with respect to `x` by candle's autograd: the composed
    /// forms' reference.
    fn autograd(f: impl Fn(&Tensor) -> Result<Tensor>, x: &Tensor, w: &Tensor) -> Result<Tensor> {
        let x = Var::from_tensor(x)?;
        let grads = f(x.as_tensor())?.mul(w)?.sum_all()?.backward()?;
        Ok(grads.get(&x).expect("a gradient").clone())
    }

    /// Checks an op and its backward against the composed (slow, differentiable) form of the
    /// same function: values, and the input gradient for a random output gradient.
    fn check(
        fast: impl Fn(&Tensor) -> Result<Tensor>,
        backward: impl Fn(&Tensor, &Tensor) -> Result<Tensor>,
        slow: impl Fn(&Tensor) -> Result<Tensor>,
        x: &Tensor,
    ) -> Result<()> {
        let (a, b) = (fast(x)?, slow(x)?);
        assert!(
            max_difference(&a, &b)? < 1e-5,
            "values: {}",
            max_difference(&a, &b)?
        );
        let w = Tensor::randn(0f32, 1.0, a.shape(), x.device())?;
        let (ga, gb) = (backward(x, &w)?, autograd(&slow, x, &w)?);
        assert!(
            max_difference(&ga, &gb)? < 1e-4,
            "gradients: {}",
            max_difference(&ga, &gb)?
        );
        Ok(())
    }

    #[test]
    fn a_linear_layer_and_its_input_gradient_are_a_matmuls() -> Result<()> {
        let device = device()?;
        let x = Tensor::randn(0f32, 1.0, (2, 3, 5), &device)?;
        let weight = Tensor::randn(0f32, 1.0, (4, 5), &device)?;
        check(
            |x| linear(x, &weight),
            |_, grad| linear_backward(grad, &weight),
            |x| x.broadcast_matmul(&weight.t()?),
            &x,
        )?;
        let error = linear(&x, &weight.t()?).unwrap_err().to_string();
        assert!(error.contains("expects 4 features"), "{error}");
        Ok(())
    }

    #[test]
    fn swiglu_matches_the_composed_form() -> Result<()> {
        let device = device()?;
        // Gates from -40 to 40: silu's tails, where exp(-g) overflows or vanishes; each row's
        // gate, then its up.
        let gate = Tensor::arange(-40f32, 40.0, &device)?.reshape((4, 20))?;
        let up = Tensor::randn(0f32, 1.0, (4, 20), &device)?;
        let gate_up = Tensor::cat(&[&gate, &up], 1)?;
        check(
            swiglu,
            swiglu_backward,
            |x| candle_nn::ops::silu(&x.narrow(1, 0, 20)?)?.mul(&x.narrow(1, 20, 20)?),
            &gate_up,
        )?;
        let error = swiglu(&Tensor::zeros((2, 5), DType::F32, &device)?)
            .unwrap_err()
            .to_string();
        assert!(error.contains("a gate then an up"), "{error}");
        Ok(())
    }

    #[test]
    fn rms_norm_matches_the_composed_form() -> Result<()> {
        let device = device()?;
        // Rows narrower than a GPU block and wider than one (SmolLM2's are 576).
        for hidden in [16, 600] {
            let x = Tensor::randn(0f32, 1.0, (2, 5, hidden), &device)?;
            let weight = Tensor::randn(0f32, 1.0, hidden, &device)?;
            check(
                |x| rms_norm(x, &weight, 1e-5),
                |x, grad| rms_norm_backward(x, &weight, 1e-5, grad, None),
                |x| candle_nn::ops::rms_norm_slow(x, &weight, 1e-5),
                &x,
            )?;
            // A residual added in place.
            let (sum, residual) = (x.randn_like(0.0, 1.0)?, x.randn_like(0.0, 1.0)?);
            let composed = (&sum + &residual)?;
            add_in_place(&sum, &residual)?;
            assert!(max_difference(&sum, &composed)? < 1e-6);
            // A residual gradient is added in the same pass.
            let (grad, residual) = (x.randn_like(0.0, 1.0)?, x.randn_like(0.0, 1.0)?);
            let added = rms_norm_backward(&x, &weight, 1e-5, &grad, Some(&residual))?;
            let apart = (rms_norm_backward(&x, &weight, 1e-5, &grad, None)? + &residual)?;
            let error = max_difference(&added, &apart)?;
            assert!(error < 1e-6, "with a residual, {hidden} wide: {error}");
            // In bf16, against the composed form in f32 from the same rounded values.
            let (x, weight) = (x.to_dtype(DType::BF16)?, weight.to_dtype(DType::BF16)?);
            let w = Tensor::randn(0f32, 1.0, x.shape(), &device)?;
            let fused = rms_norm_backward(&x, &weight, 1e-5, &w.to_dtype(DType::BF16)?, None)?;
            let composed = autograd(
                |x| candle_nn::ops::rms_norm_slow(x, &weight.to_dtype(DType::F32)?, 1e-5),
                &x.to_dtype(DType::F32)?,
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
    fn rotating_stacked_queries_and_keys_matches_the_composed_form() -> Result<()> {
        let device = device()?;
        // Two query heads and one key head (and value head) of 8 dimensions, each position's
        // stacked.
        let (heads, kv_heads) = (2, 1);
        let qkv = Tensor::randn(0f32, 1.0, (2, 5, 4 * 8), &device)?;
        let angles = Tensor::randn(0f32, 3.0, (2, 5, 4), &device)?;
        let (cos, sin) = (angles.cos()?, angles.sin()?);
        let rotate = |x: &Tensor| -> Result<Tensor> {
            let cos = Tensor::cat(&[&cos, &cos], D::Minus1)?.unsqueeze(2)?;
            let sin = Tensor::cat(&[&sin, &sin], D::Minus1)?.unsqueeze(2)?;
            let rotated = Tensor::cat(
                &[
                    &x.narrow(D::Minus1, 4, 4)?.neg()?,
                    &x.narrow(D::Minus1, 0, 4)?,
                ],
                D::Minus1,
            )?;
            x.broadcast_mul(&cos)? + rotated.broadcast_mul(&sin)?
        };
        // The three parts flattened one after another.
        let flat = |[q, k, v]: [&Tensor; 3]| {
            Tensor::cat(&[q.flatten_all()?, k.flatten_all()?, v.flatten_all()?], 0)
        };
        let slow = |qkv: &Tensor| -> Result<Tensor> {
            let x = qkv.reshape((2, 5, 4, 8))?;
            let (q, k) = (rotate(&x.narrow(2, 0, 2)?)?, rotate(&x.narrow(2, 2, 1)?)?);
            flat([&q, &k, &x.narrow(2, 3, 1)?])
        };
        check(
            |qkv| {
                let (q, k, v) = rope_qkv(qkv, (heads, kv_heads), &cos, &sin)?;
                flat([&q, &k, &v])
            },
            |_, grad| {
                let part = |first: usize, count: usize| {
                    grad.narrow(0, first * 80, count * 80)?
                        .reshape((2, 5, count, 8))
                };
                let parts = [part(0, 2)?, part(2, 1)?, part(3, 1)?];
                rope_qkv_backward([&parts[0], &parts[1], &parts[2]], &cos, &sin)
            },
            slow,
            &qkv,
        )?;
        let error = rope_qkv(&qkv, (3, 1), &cos, &sin).unwrap_err().to_string();
        assert!(error.contains("3 query and 1 key heads"), "{error}");
        Ok(())
    }

    /// Attention's output and the gradients of `sum(out·w)` by `q` and the keys and values
    /// `[shared keys, own keys, shared values, own values]`, in f32, by [`attention_forward`]
    /// and [`attention_backward`].
    pub(crate) fn attention_and_gradients(
        q: &Tensor,
        [k_shared, k, v_shared, v]: [&Tensor; 4],
        mask: &Mask,
        group: usize,
        w: &Tensor,
    ) -> Result<[Tensor; 6]> {
        let keys = Keys::Split {
            shared: Some(k_shared),
            own: k,
        };
        let values = Keys::Split {
            shared: Some(v_shared),
            own: v,
        };
        let (out, saved) = attention_forward(q, &keys, &values, mask, group)?;
        let grad = w.to_dtype(out.dtype())?;
        let (dq, dk, dv) =
            attention_backward(q, [&keys, &values], mask, group, &out, &saved, &grad, true)?;
        let f32 = |t: &Tensor| t.to_dtype(DType::F32);
        Ok([
            f32(&out)?,
            f32(&dq.expect("a gradient"))?,
            f32(&dk.shared)?,
            f32(&dk.own)?,
            f32(&dv.shared)?,
            f32(&dv.own)?,
        ])
    }

    /// The same by candle's autograd through the composed form (softmax of the masked scores
    /// over the shared keys broadcast to the batch and each sequence's own), in f32.
    pub(crate) fn composed_attention_and_gradients(
        q: &Tensor,
        parts: [&Tensor; 4],
        mask: &Mask,
        group: usize,
        w: &Tensor,
    ) -> Result<[Tensor; 6]> {
        let (batch, length, heads, hd) = q.dims4()?;
        let kv_heads = heads / group;
        let vars = [q, parts[0], parts[1], parts[2], parts[3]]
            .map(|x| x.to_dtype(DType::F32).and_then(|x| Var::from_tensor(&x)));
        let [q, k_shared, k, v_shared, v] = vars;
        let (q, k_shared, k, v_shared, v) = (q?, k_shared?, k?, v_shared?, v?);
        let whole = |shared: &Tensor, own: &Tensor| -> Result<Tensor> {
            let shared =
                shared
                    .unsqueeze(0)?
                    .broadcast_as((batch, kv_heads, shared.dim(1)?, hd))?;
            Tensor::cat(&[&shared, &own.transpose(1, 2)?], 2)?.contiguous()
        };
        let (keys, values) = (whole(&k_shared, &k)?, whole(&v_shared, &v)?);
        let total = keys.dim(2)?;
        let scores = (q
            .transpose(1, 2)?
            .reshape((batch, kv_heads, group * length, hd))?
            .matmul(&keys.t()?)?
            / (hd as f64).sqrt())?
        .reshape((batch, kv_heads, group, length, total))?
        .broadcast_add(&mask.to_additive(DType::F32)?)?;
        let out = candle_nn::ops::softmax(&scores, D::Minus1)?
            .reshape((batch, kv_heads, group * length, total))?
            .matmul(&values)?
            .reshape((batch, heads, length, hd))?
            .transpose(1, 2)?;
        let grads = out.mul(w)?.sum_all()?.backward()?;
        let gradient = |x: &Var| grads.get(x).expect("a gradient").clone();
        Ok([
            out,
            gradient(&q),
            gradient(&k_shared),
            gradient(&k),
            gradient(&v_shared),
            gradient(&v),
        ])
    }

    #[test]
    fn attention_matches_the_composed_form() -> Result<()> {
        // Two sequences of 4 tokens after a 3-token prefix the batch shares, 2 key heads each
        // shared by 3 query heads.
        let device = device()?;
        let (batch, kv_heads, group, length, prefix, hd) = (2, 2, 3, 4, 3, 8);
        let mask = Mask::causal(batch, prefix, length, &device)?;
        let random = |shape: &[usize]| Tensor::randn(0f32, 1.0, shape, &device);
        let q = random(&[batch, length, kv_heads * group, hd])?;
        let shared = [
            random(&[kv_heads, prefix, hd])?,
            random(&[kv_heads, prefix, hd])?,
        ];
        let own = [
            random(&[batch, length, kv_heads, hd])?,
            random(&[batch, length, kv_heads, hd])?,
        ];
        let parts = [&shared[0], &own[0], &shared[1], &own[1]];
        let w = random(q.dims())?;
        let ours = attention_and_gradients(&q, parts, &mask, group, &w)?;
        let reference = composed_attention_and_gradients(&q, parts, &mask, group, &w)?;
        for (name, (a, b)) in ["output", "dq", "dk shared", "dk", "dv shared", "dv"]
            .iter()
            .zip(ours.iter().zip(&reference))
        {
            let difference = max_difference(a, b)?;
            assert!(difference < 1e-4, "{name}: {difference}");
        }
        // The queries' gradient only where wanted; a cache's keys have no backward here.
        let keys = Keys::Split {
            shared: Some(&shared[0]),
            own: &own[0],
        };
        let values = Keys::Split {
            shared: Some(&shared[1]),
            own: &own[1],
        };
        let (out, saved) = attention_forward(&q, &keys, &values, &mask, group)?;
        let (dq, ..) =
            attention_backward(&q, [&keys, &values], &mask, group, &out, &saved, &w, false)?;
        assert!(dq.is_none());
        // The whole keys (a cache's) give the same output as the split ones.
        let (whole_keys, whole_values) = (keys.whole()?, values.whole()?);
        let (whole, _) = attention_forward(
            &q,
            &Keys::Whole(&whole_keys),
            &Keys::Whole(&whole_values),
            &mask,
            group,
        )?;
        assert!(max_difference(&whole, &out)? < 1e-6);
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
            let logits = Tensor::randn(0f32, 4.0, (rows, vocab), &device)?.to_dtype(dtype)?;
            let composed = |logits: &Tensor| {
                candle_nn::ops::log_softmax(&logits.to_dtype(DType::F32)?, D::Minus1)?
                    .gather(&ids, 1)?
                    .mul(&probabilities)?
                    .sum(1)?
                    .neg()
            };
            let (fused, log_sums) = top_k_cross_entropy(&logits, &ids, &probabilities)?;
            let error = max_difference(&fused, &composed(&logits)?)?;
            assert!(error < 1e-4, "{dtype:?} values: {error}");
            let composed_sums = logits.to_dtype(DType::F32)?.exp()?.sum(1)?.log()?;
            let error = max_difference(&log_sums, &composed_sums)?;
            assert!(error < 1e-4, "{dtype:?} log-sum-exps: {error}");
            let a =
                top_k_cross_entropy_backward(&logits, &ids, &probabilities, &log_sums, &weights)?
                    .to_dtype(DType::F32)?;
            let b = autograd(composed, &logits, &weights)?.to_dtype(DType::F32)?;
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
        let ids = Tensor::new(&rows, &device)?;
        for dtype in [DType::F32, DType::BF16] {
            let x = Tensor::randn(0f32, 1.0, (7, 300), &device)?.to_dtype(dtype)?;
            let composed = |x: &Tensor| x.index_select(&ids, 0);
            assert_eq!(
                max_difference(&select_rows(&x, &rows)?, &composed(&x)?)?,
                0.0
            );
            let w = Tensor::randn(0f32, 1.0, (3, 300), &device)?.to_dtype(dtype)?;
            let (a, b) = (
                select_rows_backward(&w, &rows, 7)?,
                autograd(composed, &x, &w)?,
            );
            assert_eq!(max_difference(&a, &b)?, 0.0, "{dtype:?}");
        }
        let x = Tensor::zeros((4, 2), DType::F32, &device)?;
        for (rows, problem) in [(&[1u32, 1][..], "selected twice"), (&[4][..], "row 4 of 4")] {
            let error = select_rows(&x, rows).unwrap_err().to_string();
            assert!(error.contains(problem), "{error}");
        }
        Ok(())
    }
}
