//! With the `cuda` feature: compile the fused kernels (`.cu` files beside
//! the ops they implement) to PTX, as candle-kernels compiles its own (the
//! same nvcc, `CUDA_COMPUTE_CAP`), into `$OUT_DIR/ptx.rs` as one constant
//! per file. Without it there is nothing to build.

fn main() {
    println!("cargo::rerun-if-changed=build.rs");
    #[cfg(feature = "cuda")]
    cuda_kernels();
}

#[cfg(feature = "cuda")]
fn cuda_kernels() {
    let out = std::path::PathBuf::from(std::env::var("OUT_DIR").expect("cargo sets OUT_DIR"));
    let ptx = cudaforge::KernelBuilder::new()
        .source_files([
            "src/model/autograd_ops/layer_norm.cu",
            "src/model/autograd_ops/attention_softmax.cu",
            "src/model/autograd_ops/gelu.cu",
            "src/model/autograd_ops/cross_entropy.cu",
            "src/optim/adamw.cu",
        ])
        .watch(["src/model/autograd_ops/kernels.cuh"])
        .arg("-std=c++17")
        .arg("-O3")
        .build_ptx()
        .unwrap_or_else(|e| panic!("compiling the CUDA kernels: {e}"));
    ptx.write(out.join("ptx.rs"))
        .unwrap_or_else(|e| panic!("writing ptx.rs: {e}"));
}
