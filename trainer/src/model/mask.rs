//! Which keys each query row of an attention sees.

use std::sync::OnceLock;

use candle_core::{DType, Device, Result, Tensor};

/// Which keys each query row of an attention sees. Nearly all attention here is spans: every
/// row sees the first `prefix` keys (a cartridge, a cache's context) and one span of keys of its
/// own, `[from, to]` (its causal span, or its packed conversation's up to itself). The GPU's
/// tiled kernels read that as two numbers a row, where a mask's row is as many as the keys, and
/// tell from it which tiles to skip. What is not spans (a decoding step, past its padding) is an
/// additive mask. The composed attention reads the additive form, made from the spans the first
/// time it is wanted.
pub struct Mask {
    spans: Option<Spans>,
    additive: OnceLock<Tensor>,
}

struct Spans {
    prefix: usize,
    keys: usize,
    /// `[B, L, 2]` (u32): each row's `from` and `to`.
    pairs: Tensor,
}

impl Mask {
    /// Rows `(batch, length)` over `keys` keys, each seeing keys `0..prefix` and its entry of
    /// `spans` (row-major), `[from, to]` (empty when `from > to`).
    pub fn spans(
        spans: &[(u32, u32)],
        (batch, length): (usize, usize),
        prefix: usize,
        keys: usize,
        device: &Device,
    ) -> Result<Self> {
        if spans.len() != batch * length || prefix > keys {
            candle_core::bail!(
                "attention mask: {} spans for {batch} x {length} rows, a prefix of {prefix} of \
                 {keys} keys",
                spans.len()
            );
        }
        if let Some((from, to)) = spans
            .iter()
            .find(|&&(from, to)| from <= to && to as usize >= keys)
        {
            candle_core::bail!("attention mask: a span [{from}, {to}] past {keys} keys");
        }
        let flat: Vec<u32> = spans.iter().flat_map(|&(from, to)| [from, to]).collect();
        Ok(Self {
            spans: Some(Spans {
                prefix,
                keys,
                pairs: Tensor::from_vec(flat, (batch, length, 2), device)?,
            }),
            additive: OnceLock::new(),
        })
    }

    /// Causal attention of `batch` sequences of `length` after `context` keys all of them see:
    /// row `i` sees the context and positions `0..=i`. Right padding needs nothing more: a real
    /// row sees no padding (it comes after), and no one reads a padding row's output.
    pub fn causal(batch: usize, context: usize, length: usize, device: &Device) -> Result<Self> {
        let spans: Vec<(u32, u32)> = (0..batch)
            .flat_map(|_| (0..length).map(|i| (context as u32, (context + i) as u32)))
            .collect();
        Self::spans(&spans, (batch, length), context, context + length, device)
    }

    /// An additive mask `[B, 1, 1, L, T]`: 0 where a row sees a key, -inf where it does not.
    pub fn additive(mask: Tensor) -> Self {
        Self {
            spans: None,
            additive: OnceLock::from(mask),
        }
    }

    /// The spans' prefix and `[B, L, 2]` pairs, where the mask is spans.
    #[cfg(feature = "cuda")]
    pub(crate) fn spans_form(&self) -> Option<(usize, &Tensor)> {
        self.spans.as_ref().map(|s| (s.prefix, &s.pairs))
    }

    /// The additive form `[B, 1, 1, L, T]` in `dtype`.
    pub fn to_additive(&self, dtype: DType) -> Result<Tensor> {
        let mask = match (self.additive.get(), &self.spans) {
            (Some(mask), _) => mask.clone(),
            (None, Some(spans)) => {
                let mask = spans.additive(dtype)?;
                self.additive.get_or_init(|| mask).clone()
            }
            (None, None) => unreachable!("a mask is spans or additive"),
        };
        mask.to_dtype(dtype)
    }
}

impl Spans {
    /// Made on the device: uploading it whole would move B·L·T elements, 134 MB at the
    /// benchmark's size.
    fn additive(&self, dtype: DType) -> Result<Tensor> {
        let device = self.pairs.device();
        let (batch, length, _) = self.pairs.dims3()?;
        let keys =
            Tensor::arange(0u32, self.keys as u32, device)?.reshape((1, 1, 1, 1, self.keys))?;
        let bound = |i: usize| -> Result<Tensor> {
            self.pairs
                .narrow(2, i, 1)?
                .contiguous()?
                .reshape((batch, 1, 1, length, 1))
        };
        let visible = (keys.broadcast_ge(&bound(0)?)? * keys.broadcast_le(&bound(1)?)?)?
            .broadcast_add(&keys.lt(self.prefix as u32)?)?;
        let shape = visible.shape().clone();
        let fill = |value: f32| -> Result<Tensor> {
            Tensor::new(value, device)?
                .to_dtype(dtype)?
                .broadcast_as(&shape)
        };
        visible.where_cond(&fill(0.0)?, &fill(f32::NEG_INFINITY)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The additive form's rows as strings: `x` seen, `.` not.
    fn seen(mask: &Mask, keys: usize) -> Vec<String> {
        let values = mask
            .to_additive(DType::F32)
            .and_then(|m| m.flatten_all()?.to_vec1::<f32>())
            .expect("an additive mask");
        values
            .chunks(keys)
            .map(|row| {
                row.iter()
                    .map(|&v| match v {
                        0.0 => 'x',
                        f32::NEG_INFINITY => '.',
                        other => panic!("{other} in an additive mask"),
                    })
                    .collect()
            })
            .collect()
    }

    #[test]
    fn packed_rows_see_the_cartridge_and_their_own_conversation_only() {
        // A cartridge of 2; a row of 5 holding conversations at columns 0..2 and 2..4, then
        // padding.
        let spans = [(2, 2), (2, 3), (4, 4), (4, 5), (7, 0)];
        let mask = Mask::spans(&spans, (1, 5), 2, 7, &Device::Cpu).unwrap();
        assert_eq!(
            mask.to_additive(DType::F32).unwrap().dims(),
            [1, 1, 1, 5, 7]
        );
        assert_eq!(
            seen(&mask, 7),
            ["xxx....", "xxxx...", "xx..x..", "xx..xx.", "xx....."]
        );
    }

    #[test]
    fn causal_rows_see_the_context_and_their_sequence_up_to_themselves() {
        let mask = Mask::causal(2, 2, 3, &Device::Cpu).unwrap();
        assert_eq!(
            mask.to_additive(DType::F32).unwrap().dims(),
            [2, 1, 1, 3, 5]
        );
        let rows = ["xxx..", "xxxx.", "xxxxx"];
        assert_eq!(seen(&mask, 5), [rows, rows].concat());
    }

    #[test]
    fn spans_that_do_not_fit_are_refused() {
        let device = Device::Cpu;
        for (spans, prefix, problem) in [
            (&[(0, 0)][..], 0, "1 spans for 1 x 2 rows"),
            (&[(0, 0), (1, 1)][..], 3, "a prefix of 3 of 2 keys"),
            (&[(0, 0), (1, 2)][..], 0, "a span [1, 2] past 2 keys"),
        ] {
            let error = Mask::spans(spans, (1, 2), prefix, 2, &device)
                .err()
                .expect("refused");
            assert!(error.to_string().contains(problem), "{error}");
        }
        // An empty span (from > to) may lie anywhere.
        assert!(Mask::spans(&[(9, 0), (1, 1)], (1, 2), 0, 2, &device).is_ok());
    }
}
