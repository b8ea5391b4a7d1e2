//! Compiles the C++ shim (csrc/) against the c10d headers of the libtorch that torch-sys linked
//! (the PyTorch wheel: `torch/lib`, headers in `torch/include`).
//!
//! - Gloo: the wheel has no gloo headers, so they come from `FINETUNE_GLOO_INCLUDE`, the venv's
//!   `finetune_gloo/include` (scripts/setup-venv.sh unpacks Debian's libgloo-dev there) or
//!   `/usr/include` (libgloo-dev installed). Without them the Gloo constructor is a stub that says so.
//! - NCCL: where the wheel has `libtorch_cuda.so` and the nvidia wheels' headers are installed
//!   (`nccl.h`, the CUDA runtime, `crt/` and cccl's `nv/`), else a stub.
//!
//! `cfg(c10d_gloo)` / `cfg(c10d_nccl)` tell the Rust side (and its tests) what was built.

use std::path::{Path, PathBuf};

fn main() {
    println!("cargo::rustc-check-cfg=cfg(c10d_gloo)");
    println!("cargo::rustc-check-cfg=cfg(c10d_nccl)");
    for var in [
        "DEP_TCH_LIBTORCH_LIB",
        "LIBTORCH",
        "FINETUNE_GLOO_INCLUDE",
        "LIBTORCH_CXX11_ABI",
    ] {
        println!("cargo:rerun-if-env-changed={var}");
    }
    for file in ["shim.h", "shim.cpp", "gloo.cpp", "nccl.cpp"] {
        println!("cargo:rerun-if-changed=csrc/{file}");
    }
    let lib = std::env::var("DEP_TCH_LIBTORCH_LIB")
        .map(PathBuf::from)
        .or_else(|_| std::env::var("LIBTORCH").map(|p| PathBuf::from(p).join("lib")))
        .expect("torch-sys names the libtorch it linked (DEP_TCH_LIBTORCH_LIB)");
    let torch = lib
        .parent()
        .expect("libtorch's lib has a parent")
        .to_path_buf();
    let site = torch.parent().map(Path::to_path_buf).unwrap_or_default();
    let abi = std::env::var("LIBTORCH_CXX11_ABI").unwrap_or_else(|_| "1".into());
    // The crate's own tests find libtorch as the trainer binary does (see trainer-image/build.rs).
    println!("cargo:rustc-link-arg=-Wl,-rpath,{}", lib.display());

    let mut build = cc::Build::new();
    build
        .cpp(true)
        .std("c++17")
        .warnings(false)
        .flag("-w")
        .define("_GLIBCXX_USE_CXX11_ABI", abi.as_str())
        .include(torch.join("include"))
        .include(torch.join("include/torch/csrc/api/include"))
        .file("csrc/shim.cpp")
        .file("csrc/gloo.cpp")
        .file("csrc/nccl.cpp");

    if let Some(gloo) = gloo_include(&site) {
        build
            .include(gloo)
            .define("USE_C10D_GLOO", None)
            .define("FINETUNE_C10D_GLOO", None);
        println!("cargo:rustc-cfg=c10d_gloo");
    } else {
        println!(
            "cargo:warning=c10d: no gloo headers (libgloo-dev): Gloo process groups will refuse"
        );
    }
    let cuda_libtorch = lib.join("libtorch_cuda.so").exists();
    // For the test that NCCL is built wherever libtorch has CUDA.
    println!(
        "cargo:rustc-env=FINETUNE_C10D_LIBTORCH_CUDA={}",
        u8::from(cuda_libtorch)
    );
    if cuda_libtorch {
        match cuda_includes(&site) {
            Ok(dirs) => {
                build
                    .includes(dirs)
                    .define("USE_C10D_NCCL", None)
                    .define("USE_CUDA", None)
                    .define("FINETUNE_C10D_NCCL", None);
                println!("cargo:rustc-cfg=c10d_nccl");
                println!("cargo:rustc-link-search=native={}", lib.display());
                println!("cargo:rustc-link-lib=dylib=torch_cuda");
                println!("cargo:rustc-link-lib=dylib=c10_cuda");
            }
            Err(missing) => println!(
                "cargo:warning=c10d: libtorch_cuda present but {missing} not found under \
                 {}/nvidia: NCCL process groups will refuse",
                site.display()
            ),
        }
    }
    build.compile("finetune_c10d_shim");
}

fn gloo_include(site: &Path) -> Option<PathBuf> {
    let candidates = [
        std::env::var("FINETUNE_GLOO_INCLUDE")
            .ok()
            .map(PathBuf::from),
        Some(site.join("finetune_gloo/include")),
        Some(PathBuf::from("/usr/include")),
    ];
    candidates
        .into_iter()
        .flatten()
        .find(|dir| dir.join("gloo/algorithm.h").exists())
}

/// Every `nvidia/*/include` of the venv, when together they hold what ProcessGroupNCCL.hpp needs;
/// otherwise the first header missing.
fn cuda_includes(site: &Path) -> Result<Vec<PathBuf>, &'static str> {
    let dirs: Vec<PathBuf> = std::fs::read_dir(site.join("nvidia"))
        .map(|rd| {
            rd.flatten()
                .map(|e| e.path().join("include"))
                .filter(|p| p.is_dir())
                .collect()
        })
        .unwrap_or_default();
    for header in [
        "nccl.h",
        "cuda_runtime_api.h",
        "crt/host_config.h",
        "nv/target",
    ] {
        if !dirs.iter().any(|d| d.join(header).exists()) {
            return Err(header);
        }
    }
    Ok(dirs)
}
