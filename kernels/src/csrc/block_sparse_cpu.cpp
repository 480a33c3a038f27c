// Block-sparse flash attention for the CPU: the `torch` backend's compiled inner loop.
//
// Every task is one (batch, head, query block): it walks the query block's key runs in tiles of up to
// `max_tile` keys, computes the scores with one batch-reduce GEMM per key block (oneDNN brgemm through ATen's
// cpublas; AMX in bf16), keeps an online softmax in float32 and accumulates P V with a second brgemm. Unlike a
// stack of SDPA calls, nothing is paid per key run: K and V are packed once per call (by the Python side) and
// every tile reads them in place.
//
// Layouts (prepared in kernels/cpu_block_sparse.py, keys padded to a multiple of the key block size Bk):
//   bf16: kp (B, H, S_pad/Bk, D/2, Bk, 2)  K^T per key block in VNNI-2 pairs;  vp (B, H, S_pad/2, D, 2)  V in pairs
//   fp32: kp (B, H, S_pad/Bk, D, Bk)       K^T per key block;                  vp (B, H, S_pad, D)       V
// K^T is packed per key block so that a GEMM's rows of B lie Bk apart (a K^T over all keys puts them S_pad apart:
// on the same cache sets). Keys at or beyond `num_kv` are padding and get probability 0.

#include <torch/extension.h>

#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <ATen/native/CPUBlas.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <limits>
#include <thread>
#include <vector>

namespace {

using fVec = at::vec::Vectorized<float>;

float scaled_row_max(const float* s, int64_t n, float scale) {
  constexpr int64_t W = fVec::size();
  float best = -std::numeric_limits<float>::infinity();
  int64_t j = 0;
  if (n >= W) {
    fVec acc = fVec::loadu(s);
    for (j = W; j + W <= n; j += W) acc = at::vec::maximum(acc, fVec::loadu(s + j));
    best = at::vec::vec_reduce_all<float>([](fVec& a, fVec& b) { return at::vec::maximum(a, b); }, acc);
  }
  for (; j < n; ++j) best = std::max(best, s[j]);
  return best * scale;
}

// p[j] <- exp(s[j] * scale - m) for j < n (p may be s itself in float32); returns the sum. bfloat16 is written
// straight from registers (round to nearest even, one AVX512-BF16 instruction per 16 values): the target attribute
// allows that instruction, which only the bf16 instantiation contains, and the bf16 path runs only where cpublas
// reports bf16 brgemm (AMX or AVX512-BF16 CPUs).
template <typename out_t>
__attribute__((target("avx512bf16"))) float exp_into(const float* s, out_t* p, int64_t n, float scale, float m) {
  constexpr int64_t W = fVec::size();
  const fVec vscale(scale), vm(m);
  fVec acc(0.0f);
  int64_t j = 0;
  for (; j + W <= n; j += W) {
    const fVec x = (fVec::loadu(s + j) * vscale - vm).exp_u20();
    if constexpr (std::is_same_v<out_t, float>) {
      x.store(p + j);
    } else {
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(p + j), reinterpret_cast<__m256i>(_mm512_cvtneps_pbh(x)));
    }
    acc = acc + x;
  }
  float sum = at::vec::vec_reduce_all<float>([](fVec& a, fVec& b) { return a + b; }, acc);
  for (; j < n; ++j) {
    const float e = std::exp(s[j] * scale - m);
    p[j] = static_cast<out_t>(e);
    sum += e;
  }
  return sum;
}

template <typename scalar_t>
constexpr bool kVnni = std::is_same_v<scalar_t, at::BFloat16>;

template <typename scalar_t>
void forward(const at::Tensor& q, const at::Tensor& kp, const at::Tensor& vp, at::Tensor& out, at::Tensor& lse,
             const at::Tensor& q_starts, const at::Tensor& run_offsets, const at::Tensor& runs, int64_t q_rows,
             int64_t num_kv, double scale_d, int64_t max_tile) {
  const int64_t batch = q.size(0), heads = q.size(1), dim = q.size(3);
  const int64_t kv_block = kp.size(4);
  const int64_t k_block_stride = kp.stride(2);
  const int64_t kv_tile = std::max(kv_block, (max_tile / kv_block) * kv_block);  // whole key blocks per tile
  const int64_t members = q_starts.size(0);
  const float scale = static_cast<float>(scale_d);
  const scalar_t* q_data = q.data_ptr<scalar_t>();
  const scalar_t* k_data = kp.data_ptr<scalar_t>();
  const scalar_t* v_data = vp.data_ptr<scalar_t>();
  scalar_t* out_data = out.data_ptr<scalar_t>();
  float* lse_data = lse.data_ptr<float>();
  const int64_t* starts = q_starts.data_ptr<int64_t>();
  const int64_t* offsets = run_offsets.data_ptr<int64_t>();
  const int64_t* bounds = runs.data_ptr<int64_t>();
  const int64_t qsb = q.stride(0), qsh = q.stride(1), qss = q.stride(2);
  const int64_t osb = out.stride(0), osh = out.stride(1), oss = out.stride(2);
  const int64_t lsb = lse.stride(0), lsh = lse.stride(1), lss = lse.stride(2);
  const int64_t khead = kp.stride(1), kbatch = kp.stride(0), vhead = vp.stride(1), vbatch = vp.stride(0);

  // Threads of our own (as many as torch uses): ATen's parallel_for is OpenMP-inline and an extension built
  // without -fopenmp would run it serially, while linking a second OpenMP runtime beside torch's invites trouble.
  // Tasks differ in cost (key counts vary per query block), so threads take the next task from a shared counter.
  const int64_t total = batch * heads * members;
  std::atomic<int64_t> next_task{0};
  auto worker = [&]() {
    std::vector<float> scores(q_rows * kv_tile);
    std::vector<scalar_t> probs(kVnni<scalar_t> ? q_rows * kv_tile : 0);
    std::vector<float> acc(q_rows * dim), row_max(q_rows), row_sum(q_rows), new_max(q_rows), alpha(q_rows);
    for (int64_t task = next_task.fetch_add(1); task < total; task = next_task.fetch_add(1)) {
      const int64_t member = task % members, bh = task / members;
      const int64_t b = bh / heads, h = bh % heads;
      const int64_t q0 = starts[member];
      const int64_t rows = std::min(q_rows, q.size(2) - q0);
      const scalar_t* qp = q_data + b * qsb + h * qsh + q0 * qss;
      const scalar_t* kb = k_data + b * kbatch + h * khead;
      const scalar_t* vb = v_data + b * vbatch + h * vhead;
      std::fill(acc.begin(), acc.begin() + rows * dim, 0.0f);
      std::fill(row_max.begin(), row_max.begin() + rows, -std::numeric_limits<float>::infinity());
      std::fill(row_sum.begin(), row_sum.begin() + rows, 0.0f);
      for (int64_t r = offsets[member]; r < offsets[member + 1]; ++r) {
        for (int64_t k0 = bounds[2 * r]; k0 < bounds[2 * r + 1]; k0 += kv_tile) {
          const int64_t n = std::min(kv_tile, bounds[2 * r + 1] - k0);  // whole (padded) key blocks
          const int64_t valid = std::max<int64_t>(0, std::min(n, num_kv - k0));
          if (valid == 0) continue;
          for (int64_t c = 0; c < n; c += kv_block) {  // scores of each key block of the tile
            const scalar_t* kt = kb + ((k0 + c) / kv_block) * k_block_stride;
            at::native::cpublas::brgemm(rows, kv_block, dim, qss, kv_block, n, false, qp, kt, scores.data() + c,
                                        kVnni<scalar_t>);
          }
          for (int64_t i = 0; i < rows; ++i) {
            new_max[i] = std::max(row_max[i], scaled_row_max(scores.data() + i * n, valid, scale));
          }
          // alpha = exp(old max - new max), 16 rows at a time (exp(-inf) = 0 for rows that saw no key yet)
          at::vec::map2([](fVec old_m, fVec new_m) { return (old_m - new_m).exp_u20(); }, alpha.data(),
                        row_max.data(), new_max.data(), rows);
          for (int64_t i = 0; i < rows; ++i) {
            float* s = scores.data() + i * n;
            scalar_t* p = kVnni<scalar_t> ? probs.data() + i * n : reinterpret_cast<scalar_t*>(s);
            const float sum = exp_into(s, p, valid, scale, new_max[i]);
            std::fill(p + valid, p + n, static_cast<scalar_t>(0.0f));
            row_sum[i] = row_sum[i] * alpha[i] + sum;
            row_max[i] = new_max[i];
            if (alpha[i] != 1.0f) {
              float* a = acc.data() + i * dim;
              const fVec va(alpha[i]);
              at::vec::map([va](fVec x) { return x * va; }, a, a, dim);
            }
          }
          // (Splitting the rows so that a chunk's scores stay in L1 was slower: the GEMMs lose more than the
          // softmax passes gain; measured with chunks of 16-64 rows.)
          if constexpr (kVnni<scalar_t>) {
            at::native::cpublas::brgemm(rows, dim, n, n, dim, dim, true, probs.data(), vb + (k0 / 2) * dim * 2,
                                        acc.data(), true);
          } else {
            at::native::cpublas::brgemm(rows, dim, n, n, dim, dim, true, scores.data(), vb + k0 * dim,
                                        acc.data(), false);
          }
        }
      }
      for (int64_t i = 0; i < rows; ++i) {
        scalar_t* o = out_data + b * osb + h * osh + (q0 + i) * oss;
        const float* a = acc.data() + i * dim;
        const bool any = row_sum[i] > 0.0f;
        const float inv = any ? 1.0f / row_sum[i] : 0.0f;
        for (int64_t d = 0; d < dim; ++d) o[d] = static_cast<scalar_t>(a[d] * inv);
        lse_data[b * lsb + h * lsh + (q0 + i) * lss] =
            any ? row_max[i] + std::log(row_sum[i]) : -std::numeric_limits<float>::infinity();
      }
    }
    at::native::cpublas::brgemm_release(kVnni<scalar_t>);
  };
  const int64_t threads = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), total));
  std::vector<std::thread> pool;
  for (int64_t t = 1; t < threads; ++t) pool.emplace_back(worker);
  worker();
  for (auto& thread : pool) thread.join();
}

void block_sparse_forward(const at::Tensor& q, const at::Tensor& kp, const at::Tensor& vp, at::Tensor& out,
                          at::Tensor& lse, const at::Tensor& q_starts, const at::Tensor& run_offsets,
                          const at::Tensor& runs, int64_t q_rows, int64_t num_kv, double scale, int64_t max_tile) {
  TORCH_CHECK(q.dim() == 4 && q.stride(3) == 1, "q must be (B, H, S, D) with a contiguous last dimension");
  TORCH_CHECK(kp.is_contiguous() && vp.is_contiguous(), "packed k and v must be contiguous");
  TORCH_CHECK(out.sizes() == q.sizes() && out.stride(3) == 1, "out must match q");
  TORCH_CHECK(lse.scalar_type() == at::kFloat, "lse must be float32");
  TORCH_CHECK(run_offsets.size(0) == q_starts.size(0) + 1, "run_offsets needs one entry per query block + 1");
  TORCH_CHECK(q.size(3) % 2 == 0, "head dim must be even");
  if (q.scalar_type() == at::kBFloat16) {
    forward<at::BFloat16>(q, kp, vp, out, lse, q_starts, run_offsets, runs, q_rows, num_kv, scale, max_tile);
  } else if (q.scalar_type() == at::kFloat) {
    forward<float>(q, kp, vp, out, lse, q_starts, run_offsets, runs, q_rows, num_kv, scale, max_tile);
  } else {
    TORCH_CHECK(false, "block_sparse_forward takes bfloat16 or float32, got ", q.scalar_type());
  }
}

bool bf16_brgemm_supported() { return at::native::cpublas::could_pack(at::kBFloat16); }

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("block_sparse_forward", &block_sparse_forward, "block-sparse flash attention forward (CPU)",
        py::call_guard<py::gil_scoped_release>());
  m.def("bf16_brgemm_supported", &bf16_brgemm_supported, "whether cpublas runs bfloat16 brgemm here (AMX)");
}
