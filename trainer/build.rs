//! With the `cuda` feature, compiles the trainer's own kernels (kernels/*.cu) to PTX, which the
//! driver builds for the GPU it finds when they are first used.

fn main() {
    println!("cargo::rerun-if-changed=build.rs");
    println!("cargo::rerun-if-changed=kernels");
    #[cfg(feature = "cuda")]
    {
        let out = std::path::PathBuf::from(std::env::var("OUT_DIR").expect("OUT_DIR"));
        cudaforge::KernelBuilder::new()
            .source_files(["kernels/ops.cu"])
            .arg("-std=c++17")
            .arg("-O3")
            .build_ptx()
            .and_then(|ptx| ptx.write(out.join("kernels.rs")))
            .unwrap_or_else(|error| panic!("building the CUDA kernels: {error}"));
    }
}
