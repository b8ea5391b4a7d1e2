//! Makes the binary find libtorch on its own: an rpath to the libtorch directory that torch-sys linked
//! against (the pip wheel's `torch/lib`), and `--no-as-needed` so `libtorch_cuda.so` stays a
//! dependency even though no symbol of it is referenced directly — without it the linker drops the
//! library and `tch::Cuda::is_available()` reports false on a GPU machine.

fn main() {
    println!("cargo:rerun-if-env-changed=DEP_TCH_LIBTORCH_LIB");
    println!("cargo:rerun-if-env-changed=LIBTORCH");
    let lib_dir = std::env::var("DEP_TCH_LIBTORCH_LIB")
        .ok()
        .or_else(|| std::env::var("LIBTORCH").ok().map(|p| format!("{p}/lib")));
    if let Some(dir) = lib_dir {
        println!("cargo:rustc-link-arg=-Wl,-rpath,{dir}");
    }
    let target_os = std::env::var("CARGO_CFG_TARGET_OS").unwrap_or_default();
    if target_os == "linux" {
        println!("cargo:rustc-link-arg=-Wl,--no-as-needed");
        // Link the CUDA part of libtorch explicitly where it exists (CPU-only builds have none).
        if let Ok(dir) = std::env::var("DEP_TCH_LIBTORCH_LIB")
            && std::path::Path::new(&dir).join("libtorch_cuda.so").exists()
        {
            println!("cargo:rustc-link-arg=-ltorch_cuda");
        }
    }
}
