//! The Llama family, with a KV prefix: the one model implementation, shared by training, scoring
//! and generation.
//!
//! A cartridge occupies positions `0..P` of every layer's attention: its keys (already rotated
//! for those positions) and values are put in front of the keys and values the input computes,
//! and the input continues at position `P`. Training runs the same layers, keeping what its
//! backward pass needs ([`Llama::prefix_gradients`]). Generation runs them with a per-layer KV
//! cache.
//!
//! Keys use the half-split rotary layout (channel `i` pairs with `i + head_dim/2`), as Hugging
//! Face transformers computes them; GGUF files store q/k weights permuted for the interleaved
//! layout, so loading un-permutes them.

use std::path::Path;

use candle_core::quantized::gguf_file;
use candle_core::{DType, Device, IndexOp, Tensor};
use candle_nn::kv_cache::KvCache;

use super::config::{Config, read_gguf};
use super::mask::Mask;
use super::ops::{
    AttentionSaved, Keys, add_in_place, attention_backward, attention_forward, linear,
    linear_backward, rms_norm, rms_norm_backward, rope_qkv, rope_qkv_backward, swiglu,
    swiglu_backward,
};
use crate::error::{Error, Result};

struct Layer {
    attn_norm: Tensor,
    /// The query, key and value projections stacked, `[(heads + 2·kv_heads)·head_dim,
    /// hidden]`: one product makes all three, and one takes their gradients back.
    qkv: Tensor,
    o: Tensor,
    ffn_norm: Tensor,
    /// The MLP's gate and up projections stacked, `[2·intermediate, hidden]`: one product makes
    /// both, and one takes their gradients back.
    gate_up: Tensor,
    down: Tensor,
}

/// What the training forward keeps of a layer for the backward.
struct Saved {
    /// The layer's input, and the residual stream after attention.
    x: Tensor,
    mid: Tensor,
    /// Attention's inputs (the keys and values of the input, without the prefix's, all in the
    /// projections' layout), output and saved state.
    q: Tensor,
    k: Tensor,
    v: Tensor,
    out: Tensor,
    attention: AttentionSaved,
    /// The MLP's projections before the gate, each row's gate then its up.
    gate_up: Tensor,
}

/// Per layer, keys and values `[kv_heads, P, head_dim]` placed before the input.
#[derive(Debug, Clone)]
pub struct Prefix {
    pub keys: Vec<Tensor>,
    pub values: Vec<Tensor>,
}

impl Prefix {
    pub fn tokens(&self) -> usize {
        self.keys.first().map_or(0, |k| k.dim(1).unwrap_or(0))
    }
}

/// Per layer, the keys and values of everything generated so far (batch-major).
pub struct Cache {
    layers: Vec<KvCache>,
    capacity: usize,
}

impl Cache {
    /// Puts a cartridge at the front of the cache (for a batch of one).
    pub fn append_prefix(&mut self, prefix: &Prefix) -> Result<()> {
        for ((layer, keys), values) in self.layers.iter_mut().zip(&prefix.keys).zip(&prefix.values)
        {
            layer.append(&keys.unsqueeze(0)?, &values.unsqueeze(0)?)?;
        }
        Ok(())
    }

    /// A cache for `batch` sequences that each start with this (batch-of-one) cache's contents.
    pub fn expand(self, batch: usize) -> Result<Self> {
        if batch == 1 {
            return Ok(self);
        }
        let mut expanded = Self {
            layers: (0..self.layers.len())
                .map(|_| KvCache::new(2, self.capacity))
                .collect(),
            capacity: self.capacity,
        };
        for (from, to) in self.layers.iter().zip(&mut expanded.layers) {
            if let (Some(k), Some(v)) = (from.k()?, from.v()?) {
                let grow = |t: &Tensor| -> Result<Tensor> {
                    let (_, heads, len, dim) = t.dims4()?;
                    Ok(t.broadcast_as((batch, heads, len, dim))?.contiguous()?)
                };
                to.append(&grow(&k)?, &grow(&v)?)?;
            }
        }
        Ok(expanded)
    }

    pub fn len(&self) -> usize {
        self.layers.first().map_or(0, KvCache::current_seq_len)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// What the input attends to besides itself.
pub enum Context<'a> {
    None,
    Prefix(&'a Prefix),
    Cache(&'a mut Cache),
}

pub struct Llama {
    pub config: Config,
    embed: Tensor,
    layers: Vec<Layer>,
    norm: Tensor,
    lm_head: Option<Tensor>,
    cos: Tensor,
    sin: Tensor,
    device: Device,
    dtype: DType,
}

/// Undoes llama.cpp's q/k row permutation (interleaved rotary pairs back to half-split).
fn unpermute(weight: Tensor, heads: usize) -> Result<Tensor> {
    let (rows, columns) = weight.dims2()?;
    Ok(weight
        .reshape((heads, rows / heads / 2, 2, columns))?
        .transpose(1, 2)?
        .reshape((rows, columns))?)
}

impl Llama {
    /// Loads a GGUF file, dequantizing every tensor to `dtype` on `device`.
    pub fn from_gguf(
        path: &Path,
        device: &Device,
        dtype: DType,
    ) -> Result<(Self, gguf_file::Content)> {
        let (mut file, content, config) = read_gguf(path)?;
        let (hidden, q, kv) = (
            config.hidden,
            config.heads * config.head_dim,
            config.kv_heads * config.head_dim,
        );
        // Dequantized on the CPU and then moved: on CUDA this one-off step would load candle's
        // quantized-kernel module, a large PTX the driver compiles in every process.
        let mut tensor = |name: &str, shape: &[usize]| -> Result<Tensor> {
            let quantized = content
                .tensor(&mut file, name, &Device::Cpu)
                .map_err(|e| Error::Model(format!("{}: {name}: {e}", path.display())))?;
            if quantized.shape().dims() != shape {
                return Err(Error::Model(format!(
                    "{}: {name} is {:?}, the configuration makes it {shape:?}",
                    path.display(),
                    quantized.shape().dims()
                )));
            }
            Ok(quantized
                .dequantize(&Device::Cpu)?
                .to_dtype(dtype)?
                .to_device(device)?)
        };
        let mut layers = Vec::with_capacity(config.layers);
        for i in 0..config.layers {
            let name = |part: &str| format!("blk.{i}.{part}.weight");
            let inter = config.intermediate;
            layers.push(Layer {
                attn_norm: tensor(&name("attn_norm"), &[hidden])?,
                qkv: Tensor::cat(
                    &[
                        unpermute(tensor(&name("attn_q"), &[q, hidden])?, config.heads)?,
                        unpermute(tensor(&name("attn_k"), &[kv, hidden])?, config.kv_heads)?,
                        tensor(&name("attn_v"), &[kv, hidden])?,
                    ],
                    0,
                )?,
                o: tensor(&name("attn_output"), &[hidden, q])?,
                ffn_norm: tensor(&name("ffn_norm"), &[hidden])?,
                gate_up: Tensor::cat(
                    &[
                        tensor(&name("ffn_gate"), &[inter, hidden])?,
                        tensor(&name("ffn_up"), &[inter, hidden])?,
                    ],
                    0,
                )?,
                down: tensor(&name("ffn_down"), &[hidden, inter])?,
            });
        }
        let embed = tensor("token_embd.weight", &[config.vocab, hidden])?;
        let norm = tensor("output_norm.weight", &[hidden])?;
        let lm_head = if config.tie_embeddings {
            None
        } else {
            Some(tensor("output.weight", &[config.vocab, hidden])?)
        };
        let model = Self::assemble(config, embed, layers, norm, lm_head, device, dtype)?;
        Ok((model, content))
    }

    /// Loads a Hugging Face checkpoint directory: `config.json` and `*.safetensors`.
    pub fn from_hf_dir(dir: &Path, device: &Device, dtype: DType) -> Result<Self> {
        let config_path = dir.join("config.json");
        let config = Config::from_hf_json(
            &std::fs::read_to_string(&config_path).map_err(|e| Error::io(&config_path, e))?,
        )?;
        config.check()?;
        let files = super::source::safetensors_files(dir)?;
        // SAFETY: the weights are only read; a checkpoint rewritten while loaded is the user's
        // to avoid, as with every memory-mapped model loader.
        #[allow(unsafe_code)]
        let vb = unsafe { candle_nn::VarBuilder::from_mmaped_safetensors(&files, dtype, device)? };
        let (hidden, heads, kv, hd, inter) = (
            config.hidden,
            config.heads,
            config.kv_heads,
            config.head_dim,
            config.intermediate,
        );
        let mut layers = Vec::with_capacity(config.layers);
        for i in 0..config.layers {
            let vb = vb.pp(format!("model.layers.{i}"));
            layers.push(Layer {
                attn_norm: vb.get(hidden, "input_layernorm.weight")?,
                qkv: Tensor::cat(
                    &[
                        vb.get((heads * hd, hidden), "self_attn.q_proj.weight")?,
                        vb.get((kv * hd, hidden), "self_attn.k_proj.weight")?,
                        vb.get((kv * hd, hidden), "self_attn.v_proj.weight")?,
                    ],
                    0,
                )?,
                o: vb.get((hidden, heads * hd), "self_attn.o_proj.weight")?,
                ffn_norm: vb.get(hidden, "post_attention_layernorm.weight")?,
                gate_up: Tensor::cat(
                    &[
                        vb.get((inter, hidden), "mlp.gate_proj.weight")?,
                        vb.get((inter, hidden), "mlp.up_proj.weight")?,
                    ],
                    0,
                )?,
                down: vb.get((hidden, inter), "mlp.down_proj.weight")?,
            });
        }
        let embed = vb.get((config.vocab, hidden), "model.embed_tokens.weight")?;
        let norm = vb.get(hidden, "model.norm.weight")?;
        let lm_head = if config.tie_embeddings {
            None
        } else {
            Some(vb.get((config.vocab, hidden), "lm_head.weight")?)
        };
        Self::assemble(config, embed, layers, norm, lm_head, device, dtype)
    }

    /// A model of the given shape with random weights (tests, and speed measurements where the
    /// values do not matter).
    pub fn random(config: Config, seed: u64, device: &Device, dtype: DType) -> Result<Self> {
        use rand::SeedableRng;
        use rand_distr::Distribution;
        config.check()?;
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let mut normal = |shape: (usize, usize), scale: f32| -> Result<Tensor> {
            let values: Vec<f32> = (0..shape.0 * shape.1)
                .map(|_| rand_distr::StandardNormal.sample(&mut rng))
                .map(|v: f32| v * scale)
                .collect();
            Ok(Tensor::from_vec(values, shape, device)?.to_dtype(dtype)?)
        };
        let (hidden, hd) = (config.hidden, config.head_dim);
        let mut matrix =
            |rows: usize, columns: usize| normal((rows, columns), 1.0 / (columns as f32).sqrt());
        let mut layers = Vec::with_capacity(config.layers);
        for _ in 0..config.layers {
            layers.push(Layer {
                attn_norm: Tensor::ones(hidden, dtype, device)?,
                qkv: matrix((config.heads + 2 * config.kv_heads) * hd, hidden)?,
                o: matrix(hidden, config.heads * hd)?,
                ffn_norm: Tensor::ones(hidden, dtype, device)?,
                gate_up: matrix(2 * config.intermediate, hidden)?,
                down: matrix(hidden, config.intermediate)?,
            });
        }
        let embed = matrix(config.vocab, hidden)?;
        let norm = Tensor::ones(hidden, dtype, device)?;
        Self::assemble(config, embed, layers, norm, None, device, dtype)
    }

    fn assemble(
        config: Config,
        embed: Tensor,
        layers: Vec<Layer>,
        norm: Tensor,
        lm_head: Option<Tensor>,
        device: &Device,
        dtype: DType,
    ) -> Result<Self> {
        let half = config.head_dim / 2;
        let inverse: Vec<f32> = (0..half)
            .map(|i| {
                1.0 / config
                    .rope_theta
                    .powf(2.0 * i as f64 / config.head_dim as f64) as f32
            })
            .collect();
        let inverse = Tensor::from_vec(inverse, (1, half), device)?;
        let positions = Tensor::arange(0u32, config.max_positions as u32, device)?
            .to_dtype(DType::F32)?
            .unsqueeze(1)?;
        let angles = positions.broadcast_mul(&inverse)?;
        Ok(Self {
            cos: angles.cos()?.to_dtype(dtype)?,
            sin: angles.sin()?.to_dtype(dtype)?,
            config,
            embed,
            layers,
            norm,
            lm_head,
            device: device.clone(),
            dtype,
        })
    }

    /// The weights under Hugging Face transformers' names (q/k in the half-split layout), e.g.
    /// to check this implementation against another one.
    pub fn named_weights(&self) -> std::collections::HashMap<String, Tensor> {
        let mut named = std::collections::HashMap::new();
        named.insert("model.embed_tokens.weight".to_owned(), self.embed.clone());
        named.insert("model.norm.weight".to_owned(), self.norm.clone());
        named.insert("lm_head.weight".to_owned(), self.output_weight().clone());
        let config = &self.config;
        let (queries, keys) = (
            config.heads * config.head_dim,
            config.kv_heads * config.head_dim,
        );
        let inter = config.intermediate;
        for (i, layer) in self.layers.iter().enumerate() {
            // Views of the stacked projections (narrowing rows copies nothing); they were
            // stacked from matrices of these sizes.
            let rows = |stacked: &Tensor, first: usize, count: usize| {
                stacked
                    .narrow(0, first, count)
                    .expect("stacked projections of the configured sizes")
            };
            let (q, k, v) = (
                rows(&layer.qkv, 0, queries),
                rows(&layer.qkv, queries, keys),
                rows(&layer.qkv, queries + keys, keys),
            );
            let (gate, up) = (
                rows(&layer.gate_up, 0, inter),
                rows(&layer.gate_up, inter, inter),
            );
            for (name, tensor) in [
                ("input_layernorm", &layer.attn_norm),
                ("self_attn.q_proj", &q),
                ("self_attn.k_proj", &k),
                ("self_attn.v_proj", &v),
                ("self_attn.o_proj", &layer.o),
                ("post_attention_layernorm", &layer.ffn_norm),
                ("mlp.gate_proj", &gate),
                ("mlp.up_proj", &up),
                ("mlp.down_proj", &layer.down),
            ] {
                named.insert(format!("model.layers.{i}.{name}.weight"), tensor.clone());
            }
        }
        named
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    pub fn dtype(&self) -> DType {
        self.dtype
    }

    pub fn new_cache(&self, max_tokens: usize) -> Cache {
        Cache {
            layers: (0..self.config.layers)
                .map(|_| KvCache::new(2, max_tokens))
                .collect(),
            capacity: max_tokens,
        }
    }

    /// Hidden states after the final norm, `[B, L, hidden]`, for `ids` `[B, L]` at `positions`
    /// `[B, L]`. `mask` says which of the `T` attended keys (context + input) each row sees.
    pub fn forward(
        &self,
        ids: &Tensor,
        positions: &Tensor,
        mask: &Mask,
        mut context: Context<'_>,
    ) -> Result<Tensor> {
        let (mut x, cos, sin) = self.embed(ids, positions)?;
        for (index, layer) in self.layers.iter().enumerate() {
            x = self.layer(index, layer, x, &cos, &sin, mask, &mut context, None)?;
        }
        self.rms_norm(&x, &self.norm)
    }

    /// A loss of the hidden states and its gradients with respect to the keys and values of
    /// `prefix`: `loss` takes what [`Llama::forward`] returns and gives its value and its
    /// gradient with respect to them. The gradients are per layer `[kv_heads, P, head_dim]`,
    /// summed over the batch, in the accumulation dtype (f32 for half precision).
    ///
    /// The backward pass is written out layer by layer rather than left to candle's autograd:
    /// the weights are frozen and only the prefix is trained, so it computes no weight
    /// gradient and nothing below the first layer's attention; and autograd adds every gradient
    /// to a fresh zero tensor, a full-size add per op that took a quarter of a step on an H200.
    pub fn prefix_gradients(
        &self,
        ids: &Tensor,
        positions: &Tensor,
        mask: &Mask,
        prefix: &Prefix,
        loss: impl FnOnce(&Tensor) -> Result<(Tensor, Tensor)>,
    ) -> Result<(Tensor, Prefix)> {
        let config = &self.config;
        let (batch, length) = ids.dims2()?;
        let (heads, kv_heads, hd) = (config.heads, config.kv_heads, config.head_dim);
        let eps = config.rms_eps as f32;
        let (mut x, cos, sin) = self.embed(ids, positions)?;
        let mut saved = Vec::with_capacity(self.layers.len());
        let mut context = Context::Prefix(prefix);
        for (index, layer) in self.layers.iter().enumerate() {
            x = self.layer(
                index,
                layer,
                x,
                &cos,
                &sin,
                mask,
                &mut context,
                Some(&mut saved),
            )?;
        }
        let (value, grad) = loss(&self.rms_norm(&x, &self.norm)?)?;
        let mut dx = rms_norm_backward(&x, &self.norm, eps, &grad, None)?;
        let mut gradients = Prefix {
            keys: Vec::new(),
            values: Vec::new(),
        };
        for (index, (layer, saved)) in self.layers.iter().zip(saved).enumerate().rev() {
            let d_gated = linear_backward(&dx, &layer.down)?;
            let d_h = linear_backward(&swiglu_backward(&saved.gate_up, &d_gated)?, &layer.gate_up)?;
            let d_mid = rms_norm_backward(&saved.mid, &layer.ffn_norm, eps, &d_h, Some(&dx))?;
            // The output projection's input gradient, in attention's layout.
            let d_out = linear_backward(&d_mid, &layer.o)?.reshape((batch, length, heads, hd))?;
            // The first layer's queries come from the embeddings: nothing to carry below.
            let (keys, values) = (
                Keys::Split {
                    shared: Some(&prefix.keys[index]),
                    own: &saved.k,
                },
                Keys::Split {
                    shared: Some(&prefix.values[index]),
                    own: &saved.v,
                },
            );
            let (dq, dk, dv) = attention_backward(
                &saved.q,
                [&keys, &values],
                mask,
                heads / kv_heads,
                &saved.out,
                &saved.attention,
                &d_out,
                index > 0,
            )?;
            gradients.keys.push(dk.shared);
            gradients.values.push(dv.shared);
            let Some(dq) = dq else {
                break;
            };
            // Back through the rotations to the stacked projections' output, in its layout.
            let d_qkv = rope_qkv_backward([&dq, &dk.own, &dv.own], &cos, &sin)?;
            let d_h = linear_backward(&d_qkv, &layer.qkv)?;
            dx = rms_norm_backward(&saved.x, &layer.attn_norm, eps, &d_h, Some(&d_mid))?;
        }
        gradients.keys.reverse();
        gradients.values.reverse();
        Ok((value, gradients))
    }

    /// The embeddings of `ids` `[B, L]` and the rotary angles' cosines and sines `[B, L,
    /// head_dim / 2]` at `positions` `[B, L]`.
    fn embed(&self, ids: &Tensor, positions: &Tensor) -> Result<(Tensor, Tensor, Tensor)> {
        let (batch, length) = ids.dims2()?;
        let flat = positions.flatten_all()?;
        let shape = (batch, length, self.config.head_dim / 2);
        let cos = self.cos.index_select(&flat, 0)?.reshape(shape)?;
        let sin = self.sin.index_select(&flat, 0)?.reshape(shape)?;
        let x = self.embed.index_select(&ids.flatten_all()?, 0)?.reshape((
            batch,
            length,
            self.config.hidden,
        ))?;
        Ok((x, cos, sin))
    }

    /// One layer from its input `x`; with `saved`, keeps there what the backward needs.
    #[allow(clippy::too_many_arguments)]
    fn layer(
        &self,
        index: usize,
        layer: &Layer,
        x: Tensor,
        cos: &Tensor,
        sin: &Tensor,
        mask: &Mask,
        context: &mut Context<'_>,
        saved: Option<&mut Vec<Saved>>,
    ) -> Result<Tensor> {
        let config = &self.config;
        let (batch, length, _) = x.dims3()?;
        let (heads, kv_heads, hd) = (config.heads, config.kv_heads, config.head_dim);
        let h = self.rms_norm(&x, &layer.attn_norm)?;
        // Queries, keys and values keep the projection's layout, `[B, L, heads, head_dim]`, as
        // attention's output does: no copies to a heads-first layout and back.
        let (q, k, v) = rope_qkv(&linear(&h, &layer.qkv)?, (heads, kv_heads), cos, sin)?;
        // Grouped-query attention without copying keys per query head.
        let group = heads / kv_heads;
        let (out, attention) = match context {
            Context::None | Context::Prefix(_) => {
                let prefix = match context {
                    Context::Prefix(prefix) => Some(*prefix),
                    _ => None,
                };
                let keys = Keys::Split {
                    shared: prefix.map(|p| &p.keys[index]),
                    own: &k,
                };
                let values = Keys::Split {
                    shared: prefix.map(|p| &p.values[index]),
                    own: &v,
                };
                attention_forward(&q, &keys, &values, mask, group)?
            }
            // A cache's keys and values are views into its buffers, which matmuls on either
            // device read as they are.
            Context::Cache(cache) => {
                let heads_first = |x: &Tensor| x.transpose(1, 2)?.contiguous();
                let (k, v) = cache.layers[index].append(&heads_first(&k)?, &heads_first(&v)?)?;
                attention_forward(&q, &Keys::Whole(&k), &Keys::Whole(&v), mask, group)?
            }
        };
        let attended = out.reshape((batch, length, heads * hd))?;
        // The residual adds go into the branches' fresh outputs: no third buffer a sum.
        let mid = linear(&attended, &layer.o)?;
        add_in_place(&mid, &x)?;
        let h = self.rms_norm(&mid, &layer.ffn_norm)?;
        let gate_up = linear(&h, &layer.gate_up)?;
        let y = linear(&swiglu(&gate_up)?, &layer.down)?;
        add_in_place(&y, &mid)?;
        if let Some(saved) = saved {
            saved.push(Saved {
                x,
                q,
                k,
                v,
                out,
                attention,
                mid,
                gate_up,
            });
        }
        Ok(y)
    }

    /// Next-token logits for hidden states `[..., hidden]`.
    pub fn logits(&self, hidden: &Tensor) -> Result<Tensor> {
        Ok(linear(hidden, self.output_weight())?)
    }

    /// [`Llama::logits`]' gradient with respect to the hidden states, given the logits'.
    pub fn logits_backward(&self, grad: &Tensor) -> Result<Tensor> {
        Ok(linear_backward(grad, self.output_weight())?)
    }

    /// The vocabulary projection: its own, or the embeddings where the two are tied.
    fn output_weight(&self) -> &Tensor {
        self.lm_head.as_ref().unwrap_or(&self.embed)
    }

    fn rms_norm(&self, x: &Tensor, weight: &Tensor) -> Result<Tensor> {
        Ok(rms_norm(x, weight, self.config.rms_eps as f32)?)
    }

    /// Keys and values that `ids` (one sequence, positions `0..n`) leave in every layer: the
    /// prefix a model would hold after reading them. Used to initialize a cartridge from text.
    pub fn prefix_of(&self, ids: &[u32]) -> Result<Prefix> {
        let mut cache = self.new_cache(ids.len());
        let input = Tensor::new(ids, &self.device)?.unsqueeze(0)?;
        let positions = Tensor::arange(0u32, ids.len() as u32, &self.device)?.unsqueeze(0)?;
        let mask = Mask::causal(1, 0, ids.len(), &self.device)?;
        self.forward(&input, &positions, &mask, Context::Cache(&mut cache))?;
        let mut prefix = Prefix {
            keys: Vec::new(),
            values: Vec::new(),
        };
        for layer in &cache.layers {
            let (k, v) = (layer.k()?, layer.v()?);
            let (k, v) = (
                k.ok_or_else(|| Error::Model("empty cache".into()))?,
                v.ok_or_else(|| Error::Model("empty cache".into()))?,
            );
            prefix.keys.push(k.i(0)?.contiguous()?);
            prefix.values.push(v.i(0)?.contiguous()?);
        }
        Ok(prefix)
    }
}
