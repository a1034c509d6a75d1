//! Moving between a model's prefix tensors and cartridge files.

use std::path::Path;

use candle_core::{DType, Device, Tensor};
use cartridge_schemas::file::{self, Cartridge, Header, LayerData, NewCartridge};
use cartridge_schemas::{Dtype, ModelFingerprint};

use crate::error::{Error, Result};
use crate::model::{Llama, Prefix};

fn storage_dtype(dtype: Dtype) -> DType {
    match dtype {
        Dtype::Bf16 => DType::BF16,
        Dtype::F16 => DType::F16,
        Dtype::F32 => DType::F32,
    }
}

/// Little-endian bytes of a tensor converted to `dtype`.
fn tensor_bytes(tensor: &Tensor, dtype: Dtype) -> Result<Vec<u8>> {
    let flat = tensor
        .to_device(&Device::Cpu)?
        .to_dtype(storage_dtype(dtype))?
        .flatten_all()?;
    Ok(match dtype {
        Dtype::Bf16 => flat
            .to_vec1::<half::bf16>()?
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect(),
        Dtype::F16 => flat
            .to_vec1::<half::f16>()?
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect(),
        Dtype::F32 => flat
            .to_vec1::<f32>()?
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect(),
    })
}

/// Writes a prefix as a cartridge file.
pub fn write(
    path: &Path,
    prefix: &Prefix,
    model: ModelFingerprint,
    dtype: Dtype,
    frozen_tokens: usize,
    provenance: serde_json::Value,
) -> Result<Header> {
    let tensors: Vec<[Vec<u8>; 2]> = prefix
        .keys
        .iter()
        .zip(&prefix.values)
        .map(|(k, v)| Ok([tensor_bytes(k, dtype)?, tensor_bytes(v, dtype)?]))
        .collect::<Result<_>>()?;
    let layers: Vec<LayerData<'_>> = tensors
        .iter()
        .map(|[keys, values]| LayerData { keys, values })
        .collect();
    let new = NewCartridge {
        model,
        dtype,
        tokens: prefix.tokens() as u64,
        frozen_tokens: frozen_tokens as u64,
        provenance,
    };
    Ok(file::write(path, new, &layers)?)
}

/// A cartridge's keys and values as a prefix for `model`, refusing one made for another model.
pub fn prefix_of_cartridge(
    cartridge: &Cartridge,
    model: &Llama,
    fingerprint: &ModelFingerprint,
) -> Result<Prefix> {
    let header = cartridge.header();
    fingerprint
        .check_compatible(&header.model)
        .map_err(|e| Error::Model(format!("this cartridge is for another model: {e}")))?;
    prefix_of_layers(
        (0..cartridge.layer_count()).map(|l| (cartridge.keys(l), cartridge.values(l))),
        header.dtype,
        header.tensor_shape(),
        model,
    )
}

/// A prefix for `model` from each layer's keys and values as stored (`[kv_heads, tokens,
/// head_dim]` of `dtype`, little-endian), made for this model: a cartridge file's, or a
/// loader's buffer.
pub fn prefix_of_layers<'a>(
    layers: impl Iterator<Item = (&'a [u8], &'a [u8])>,
    dtype: Dtype,
    shape: [usize; 3],
    model: &Llama,
) -> Result<Prefix> {
    let dtype = storage_dtype(dtype);
    let load = |bytes: &[u8]| -> Result<Tensor> {
        Ok(
            Tensor::from_raw_buffer(bytes, dtype, &shape, model.device())?
                .to_dtype(model.dtype())?,
        )
    };
    let mut prefix = Prefix {
        keys: Vec::new(),
        values: Vec::new(),
    };
    for (keys, values) in layers {
        prefix.keys.push(load(keys)?);
        prefix.values.push(load(values)?);
    }
    Ok(prefix)
}

/// Several prefixes one after another along the token axis (composition).
pub fn concatenate(prefixes: &[Prefix]) -> Result<Prefix> {
    let layers = prefixes.first().map_or(0, |p| p.keys.len());
    let join = |pick: &dyn Fn(&Prefix) -> &Vec<Tensor>| -> Result<Vec<Tensor>> {
        (0..layers)
            .map(|l| {
                Ok(Tensor::cat(
                    &prefixes.iter().map(|p| &pick(p)[l]).collect::<Vec<_>>(),
                    1,
                )?)
            })
            .collect()
    };
    Ok(Prefix {
        keys: join(&|p| &p.keys)?,
        values: join(&|p| &p.values)?,
    })
}
