// The NCCL process group (GPU), compiled where the wheel has libtorch_cuda and the nvidia wheels'
// headers (nccl.h, the CUDA runtime, crt/ and cccl's nv/) are installed; elsewhere a stub that
// says so. Every rank's tensors must be on its own GPU (the caller sets the device).
#include "shim.h"

#ifdef FINETUNE_C10D_NCCL
#include <torch/csrc/distributed/c10d/ProcessGroupNCCL.hpp>
#endif

extern "C" {

int c10d_nccl_built_in(void) {
#ifdef FINETUNE_C10D_NCCL
  return 1;
#else
  return 0;
#endif
}

c10d_group* c10d_nccl_new(c10d_store* store, int rank, int world, int64_t timeout_ms, char* err,
                          size_t err_len) {
  c10d_group* out = nullptr;
  c10d_guarded(err, err_len, [&] {
#ifdef FINETUNE_C10D_NCCL
    auto opts = c10d::ProcessGroupNCCL::Options::create();
    opts->timeout = std::chrono::milliseconds(timeout_ms);
    auto pg = c10::make_intrusive<c10d::ProcessGroupNCCL>(store->ptr, rank, world, opts);
    out = new c10d_group{pg};
#else
    (void)store, (void)rank, (void)world, (void)timeout_ms;
    throw std::runtime_error(
        "this trainer was built without NCCL (no libtorch_cuda or no nccl/CUDA headers at build "
        "time)");
#endif
  });
  return out;
}

}  // extern "C"
