//! The CUDA kernels' logic without a GPU: kernels/emulated/check.cpp runs every kernel of
//! kernels/ops.cu on the host (emulate.h stands in for the GPU's threads, barriers and warp
//! shuffles) against double-precision arithmetic. The tests of model/fused.rs and ops.rs check
//! the CPU implementations of the same ops, and the kernels themselves where a GPU is present.

use std::path::Path;
use std::process::Command;

#[test]
fn the_cuda_kernels_compute_what_their_ops_do() {
    let kernels = Path::new(env!("CARGO_MANIFEST_DIR")).join("kernels/emulated");
    // Under the target folder: a system temporary folder may not let programs run.
    let scratch = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).expect("a scratch folder");
    // ops.cu includes the CUDA half-precision headers; emulate.h defines what it uses of them.
    for header in ["cuda_bf16.h", "cuda_fp16.h"] {
        std::fs::write(scratch.path().join(header), "").expect("a stand-in header");
    }
    let binary = scratch.path().join("check");
    // The compiler scripts/bootstrap checked: CXX (a command and its words), or the system's.
    let cxx = std::env::var("CXX").unwrap_or_default();
    let mut words = cxx.split_whitespace();
    let compiled = Command::new(words.next().unwrap_or("c++"))
        .args(words)
        .args([
            "-std=c++20",
            "-O1",
            "-pthread",
            "-Wno-unknown-pragmas",
            "-I",
        ])
        .arg(scratch.path())
        .arg("-include")
        .arg(kernels.join("emulate.h"))
        .arg(kernels.join("check.cpp"))
        .arg("-o")
        .arg(&binary)
        .output()
        .expect("a C++ compiler (CXX, else `c++`: e.g. Debian's g++) to build the kernel checks");
    assert!(
        compiled.status.success(),
        "building the kernel checks:\n{}",
        String::from_utf8_lossy(&compiled.stderr)
    );
    let ran = Command::new(&binary)
        .output()
        .expect("running the kernel checks");
    let report = String::from_utf8_lossy(&ran.stdout);
    println!("{report}");
    assert!(ran.status.success(), "a kernel check failed:\n{report}");
}
