// The Gloo process group (CPU). The only file that includes ProcessGroupGloo.hpp: the wheel ships
// no gloo headers, so they come from Debian's libgloo-dev (build.rs). Only the constructor, the
// Options and the device factories are used here, all compiled into libtorch_cpu; the collectives
// go through c10d::Backend (shim.cpp), so no gloo type's layout is relied on.
#include "shim.h"

#ifdef FINETUNE_C10D_GLOO
#include <torch/csrc/distributed/c10d/ProcessGroupGloo.hpp>
#endif

extern "C" {

int c10d_gloo_built_in(void) {
#ifdef FINETUNE_C10D_GLOO
  return 1;
#else
  return 0;
#endif
}

c10d_group* c10d_gloo_new(c10d_store* store, int rank, int world, int device_kind,
                          const char* device_name, int64_t timeout_ms, char* err, size_t err_len) {
  c10d_group* out = nullptr;
  c10d_guarded(err, err_len, [&] {
#ifdef FINETUNE_C10D_GLOO
    auto opts = c10d::ProcessGroupGloo::Options::create(std::chrono::milliseconds(timeout_ms));
    switch (device_kind) {
      case C10D_GLOO_HOSTNAME:
        opts->devices.push_back(c10d::ProcessGroupGloo::createDeviceForHostname(device_name));
        break;
      case C10D_GLOO_INTERFACE:
        opts->devices.push_back(c10d::ProcessGroupGloo::createDeviceForInterface(device_name));
        break;
      default:
        opts->devices.push_back(c10d::ProcessGroupGloo::createDefaultDevice());
    }
    auto pg = c10::make_intrusive<c10d::ProcessGroupGloo>(store->ptr, rank, world, opts);
    out = new c10d_group{pg};
#else
    (void)store, (void)rank, (void)world, (void)device_kind, (void)device_name, (void)timeout_ms;
    throw std::runtime_error(
        "this trainer was built without Gloo (no gloo headers at build time: install libgloo-dev "
        "or run scripts/setup-venv.sh)");
#endif
  });
  return out;
}

}  // extern "C"
