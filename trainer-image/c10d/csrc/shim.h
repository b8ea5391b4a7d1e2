// The C interface of the c10d shim (src/ffi.rs declares the same functions). Every function that
// can fail catches the C++ exception and writes its message, NUL-terminated and truncated to
// `err_len`, into `err`; it returns null or a non-zero status.
#pragma once
#include <cstddef>
#include <cstdint>

#ifdef __cplusplus
#include <torch/csrc/distributed/c10d/Backend.hpp>
#include <torch/csrc/distributed/c10d/Store.hpp>

struct c10d_store {
  c10::intrusive_ptr<c10d::Store> ptr;
};
struct c10d_group {
  c10::intrusive_ptr<c10d::Backend> ptr;
};

// Runs `f`, turning a C++ exception into `err` and status 1.
template <class F>
int c10d_guarded(char* err, size_t err_len, F&& f) {
  auto write = [&](const char* what) {
    if (err == nullptr || err_len == 0) return;
    size_t n = 0;
    while (what[n] != '\0' && n + 1 < err_len) {
      err[n] = what[n];
      ++n;
    }
    err[n] = '\0';
  };
  try {
    f();
    return 0;
  } catch (const std::exception& e) {
    write(e.what());
  } catch (...) {
    write("unknown C++ exception");
  }
  return 1;
}

extern "C" {
#else
typedef struct c10d_store c10d_store;
typedef struct c10d_group c10d_group;
#endif

// Device selection for Gloo's TCP transport.
enum c10d_gloo_device { C10D_GLOO_HOSTNAME = 0, C10D_GLOO_INTERFACE = 1, C10D_GLOO_DEFAULT = 2 };

c10d_store* c10d_tcp_store(const char* host, uint16_t port, int world, int is_server,
                           int64_t timeout_ms, char* err, size_t err_len);
void c10d_store_free(c10d_store* store);

int c10d_gloo_built_in(void);
c10d_group* c10d_gloo_new(c10d_store* store, int rank, int world, int device_kind,
                          const char* device_name, int64_t timeout_ms, char* err, size_t err_len);
int c10d_nccl_built_in(void);
c10d_group* c10d_nccl_new(c10d_store* store, int rank, int world, int64_t timeout_ms, char* err,
                          size_t err_len);
void c10d_group_free(c10d_group* group);

// In place, on each tensor; all are launched before the first is waited for.
int c10d_all_reduce_sum(c10d_group* group, void* const* tensors, size_t n, int64_t timeout_ms,
                        char* err, size_t err_len);
int c10d_broadcast(c10d_group* group, void* const* tensors, size_t n, int root, int64_t timeout_ms,
                   char* err, size_t err_len);
int c10d_barrier(c10d_group* group, int64_t timeout_ms, char* err, size_t err_len);

#ifdef __cplusplus
}
#endif
