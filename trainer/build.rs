//! With the `cuda` feature, compiles the trainer's own kernels (kernels/ops.cu) to PTX for the
//! compute capability in `CUDA_COMPUTE_CAP` (as candle's own kernels: 90 gives sm_90a, which
//! loads on an H100 or H200 only), which the driver builds when they are first used.

fn main() {
    println!("cargo::rerun-if-changed=build.rs");
    println!("cargo::rerun-if-changed=kernels/ops.cu");
    println!("cargo::rerun-if-changed=kernels/attention.cuh");
    println!("cargo::rerun-if-env-changed=CUDA_COMPUTE_CAP");
    #[cfg(feature = "cuda")]
    {
        let out = std::path::PathBuf::from(std::env::var("OUT_DIR").expect("OUT_DIR"));
        cudaforge::KernelBuilder::new()
            .source_files(["kernels/ops.cu"])
            // Included by ops.cu: without it here, a change to it alone reuses the stale PTX.
            .watch(["kernels/attention.cuh"])
            .arg("-std=c++17")
            .arg("-O3")
            .build_ptx()
            .and_then(|ptx| ptx.write(out.join("kernels.rs")))
            .unwrap_or_else(|error| panic!("building the CUDA kernels: {error}"));
    }
}
