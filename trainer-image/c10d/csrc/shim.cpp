// The store and the collectives, on c10d's Backend interface only: nothing here depends on Gloo
// or NCCL headers (those are confined to gloo.cpp and nccl.cpp).
#include "shim.h"

#include <chrono>
#include <string>
#include <vector>

#include <torch/csrc/distributed/c10d/PrefixStore.hpp>
#include <torch/csrc/distributed/c10d/TCPStore.hpp>

namespace {

// tch hands tensors over as `at::Tensor*` (torch-sys's C_tensor); the handles are copied (a
// reference count), the storage is shared, so collectives write into the caller's tensors.
std::vector<at::Tensor> handles(void* const* tensors, size_t n) {
  std::vector<at::Tensor> out;
  out.reserve(n);
  for (size_t i = 0; i < n; ++i) out.push_back(*static_cast<const at::Tensor*>(tensors[i]));
  return out;
}

void wait_all(std::vector<c10::intrusive_ptr<c10d::Work>>& works, int64_t timeout_ms) {
  for (auto& w : works) w->wait(std::chrono::milliseconds(timeout_ms));
}

}  // namespace

extern "C" {

c10d_store* c10d_tcp_store(const char* host, uint16_t port, int world, int is_server,
                           int64_t timeout_ms, char* err, size_t err_len) {
  c10d_store* out = nullptr;
  c10d_guarded(err, err_len, [&] {
    c10d::TCPStoreOptions o;
    o.port = port;
    o.isServer = is_server != 0;
    o.numWorkers = world;
    // Every rank waits for all the others in the first collective; the store need not.
    o.waitWorkers = false;
    o.timeout = std::chrono::milliseconds(timeout_ms);
    auto tcp = c10::make_intrusive<c10d::TCPStore>(std::string(host), o);
    // One prefix per group, as torch.distributed does, so a later group never reads stale keys.
    auto prefixed = c10::make_intrusive<c10d::PrefixStore>("finetune/0", tcp);
    out = new c10d_store{prefixed};
  });
  return out;
}

void c10d_store_free(c10d_store* store) { delete store; }

void c10d_group_free(c10d_group* group) { delete group; }

int c10d_all_reduce_sum(c10d_group* group, void* const* tensors, size_t n, int64_t timeout_ms,
                        char* err, size_t err_len) {
  return c10d_guarded(err, err_len, [&] {
    auto all = handles(tensors, n);
    std::vector<std::vector<at::Tensor>> one(n);
    std::vector<c10::intrusive_ptr<c10d::Work>> works;
    c10d::AllreduceOptions opts;
    opts.reduceOp = c10d::ReduceOp::SUM;
    for (size_t i = 0; i < n; ++i) {
      one[i] = {all[i]};
      works.push_back(group->ptr->allreduce(one[i], opts));
    }
    wait_all(works, timeout_ms);
  });
}

int c10d_broadcast(c10d_group* group, void* const* tensors, size_t n, int root, int64_t timeout_ms,
                   char* err, size_t err_len) {
  return c10d_guarded(err, err_len, [&] {
    auto all = handles(tensors, n);
    std::vector<std::vector<at::Tensor>> one(n);
    std::vector<c10::intrusive_ptr<c10d::Work>> works;
    c10d::BroadcastOptions opts;
    opts.rootRank = root;
    for (size_t i = 0; i < n; ++i) {
      one[i] = {all[i]};
      works.push_back(group->ptr->broadcast(one[i], opts));
    }
    wait_all(works, timeout_ms);
  });
}

int c10d_barrier(c10d_group* group, int64_t timeout_ms, char* err, size_t err_len) {
  return c10d_guarded(err, err_len, [&] {
    c10d::BarrierOptions opts;
    opts.timeout = std::chrono::milliseconds(timeout_ms);
    auto w = group->ptr->barrier(opts);
    w->wait(std::chrono::milliseconds(timeout_ms));
  });
}

}  // extern "C"
