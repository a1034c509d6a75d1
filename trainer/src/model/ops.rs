//! Operations the training forward needs beyond candle's own.
//!
//! candle's backward pass computes a gradient for both operands of every matmul, frozen weights
//! included, and keeps them all: for SmolLM2 that is half a GiB of weight gradients per step and
//! two to four times the backward time, for gradients nobody reads. [`frozen_linear`] is a matmul
//! whose backward returns the input's gradient only.

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp2, Layout, Result, Shape, Tensor};

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

    #[test]
    fn matches_matmul_and_its_input_gradient() -> Result<()> {
        let device = Device::Cpu;
        let x = Var::randn(0f32, 1.0, (2, 3, 5), &device)?;
        let weight = Tensor::randn(0f32, 1.0, (4, 5), &device)?;
        let frozen = frozen_linear(x.as_tensor(), &weight)?;
        let plain = x.as_tensor().broadcast_matmul(&weight.t()?)?;
        assert!(frozen.sub(&plain)?.abs()?.max_all()?.to_scalar::<f32>()? < 1e-5);

        let frozen_grad = frozen.sqr()?.sum_all()?.backward()?;
        let plain_grad = plain.sqr()?.sum_all()?.backward()?;
        let (a, b) = (frozen_grad.get(&x).unwrap(), plain_grad.get(&x).unwrap());
        assert!(a.sub(b)?.abs()?.max_all()?.to_scalar::<f32>()? < 1e-4);
        assert!(
            frozen_grad.get(&weight).is_none(),
            "no gradient is kept for the frozen weight"
        );
        Ok(())
    }
}
