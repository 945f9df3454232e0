// gemv.c's kernels as torch operators, flatlm::gemv, flatlm::attend_one and flatlm::rms_norm: what gemv.py loads (one
// library with gemv.c, compiled on first use) and what decoding on a CPU calls. An operator written in C++ costs about
// 6 us a call from Python, allocation included; the same operator with a Python body cost 16, and ctypes with its
// Python wrapper 9-12: a decode step makes about 200 calls. torch.compile calls them as they are.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

extern "C" {
void gemv(const void *x, const void *w, int kind, const void *scale, int64_t group, const float *bias, void *y,
          int64_t M, int64_t N, int64_t K, int glu, int bf16);
void attend_one(const void *q, const void *k, const void *v, const float *mask, int mask_rows, void *y, int64_t B,
                int64_t H, int64_t K, int64_t S, int64_t D, float scale, float softcap, int bf16);
void rms_norm(const void *x, const void *w, void *y, int64_t M, int64_t C, float eps, int offset, int bf16);
}

static bool fp32_or_bf16(const at::Tensor &t) {
    return t.scalar_type() == at::kFloat || t.scalar_type() == at::kBFloat16;
}

// x (..., K) @ weight.T + bias -> (..., N) in x's dtype (fp32 or bf16). weight (N, K): fp32, bf16 (K even), int8
// with a bf16 scale (N,) per row, or int4 as uint8 (N, K / 2) (gemv.c's layout) with fp32 (scale, zero - 8 * scale)
// pairs (N, K / G, 2) for groups of G (a power of two, 32 or more); bias (N,) fp32 or none. Computed in fp32,
// rounded once.
// glu 1 (silu) or 2 (GELU's tanh form): weight is a gated MLP's gate_up and the result its hidden layer
// act(gate) * up, (..., N / 2).
static at::Tensor gemv_op(const at::Tensor &x_in, const at::Tensor &weight, const std::optional<at::Tensor> &scale,
                          const std::optional<at::Tensor> &bias, int64_t glu) {
    TORCH_CHECK(weight.dim() == 2 && weight.is_contiguous(), "flatlm::gemv: weight must be a contiguous (N, K) matrix");
    const bool int4 = weight.scalar_type() == at::kByte;
    const int64_t N = weight.size(0), K = weight.size(1) * (int4 ? 2 : 1);
    TORCH_CHECK(x_in.size(-1) == K && fp32_or_bf16(x_in), "flatlm::gemv: x must be fp32 or bf16 (..., ", K, "), got ",
                x_in.sizes(), " ", x_in.scalar_type());
    TORCH_CHECK(!bias || (bias->scalar_type() == at::kFloat && bias->numel() == N && bias->is_contiguous()),
                "flatlm::gemv: bias must be fp32 (", N, ",)");
    TORCH_CHECK(glu >= 0 && glu <= 2 && (!glu || N % 2 == 0), "flatlm::gemv: glu must be 0, 1 or 2 (with N even)");
    const at::Tensor x = x_in.contiguous();
    std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end());
    shape.back() = glu ? N / 2 : N;
    at::Tensor y = at::empty(shape, x.options());
    const int64_t M = x.numel() / K;
    const int bf16 = x.scalar_type() == at::kBFloat16;
    const float *b = bias ? bias->const_data_ptr<float>() : nullptr;
    const void *scale_data = nullptr;
    int64_t group = 0;
    int kind = 0;                                          // gemv.c's W_F32, W_INT8, W_BF16, W_INT4
    switch (weight.scalar_type()) {
    case at::kFloat:
        break;
    case at::kChar:
        TORCH_CHECK(scale && scale->scalar_type() == at::kBFloat16 && scale->numel() == N && scale->is_contiguous(),
                    "flatlm::gemv: an int8 weight needs a bf16 scale (", N, ",)");
        kind = 1;
        scale_data = scale->const_data_ptr();
        break;
    case at::kBFloat16:
        TORCH_CHECK(K % 2 == 0, "flatlm::gemv: a bf16 weight needs an even K, got ", K);
        kind = 2;
        break;
    case at::kByte:
        TORCH_CHECK(scale && scale->scalar_type() == at::kFloat && scale->dim() == 3 && scale->size(0) == N &&
                    scale->size(2) == 2 && scale->is_contiguous(), "flatlm::gemv: an int4 weight needs fp32 (scale, "
                    "zero - 8 * scale) pairs (", N, ", groups, 2)");
        group = K / scale->size(1);
        TORCH_CHECK(group * scale->size(1) == K && group >= 32 && (group & (group - 1)) == 0,
                    "flatlm::gemv: int4 groups must be a power of two from 32 on, dividing ", K);
        kind = 3;
        scale_data = scale->const_data_ptr();
        break;
    default:
        TORCH_CHECK(false, "flatlm::gemv: weight must be fp32, bf16, int8 or int4 (uint8), got ", weight.scalar_type());
    }
    gemv(x.const_data_ptr(), weight.const_data_ptr(), kind, scale_data, group, b, y.data_ptr(), M, N, K, glu, bf16);
    return y;
}

// A model file's attention for one query per sequence: q (B, H, 1, D); k, v (B, K, S, D) in q's dtype (the KV cache's
// rows); mask additive, broadcasting to (B, 1, 1, S), or none (S == 1) -> (B, H, 1, D). Computed in fp32.
static at::Tensor attend_one_op(const at::Tensor &q_in, const at::Tensor &k_in, const at::Tensor &v_in,
                                const std::optional<at::Tensor> &mask_in, double scale,
                                std::optional<double> softcap) {
    TORCH_CHECK(q_in.dim() == 4 && q_in.size(2) == 1 && k_in.dim() == 4 && v_in.sizes() == k_in.sizes(),
                "flatlm::attend_one: q must be (B, H, 1, D) and k, v (B, K, S, D), got ", q_in.sizes(), ", ",
                k_in.sizes(), ", ", v_in.sizes());
    TORCH_CHECK(fp32_or_bf16(q_in) && k_in.scalar_type() == q_in.scalar_type() &&
                    v_in.scalar_type() == q_in.scalar_type(),
                "flatlm::attend_one: q, k and v must all be fp32 or all bf16");
    const int64_t B = q_in.size(0), H = q_in.size(1), D = q_in.size(3), K = k_in.size(1), S = k_in.size(2);
    TORCH_CHECK(k_in.size(0) == B && k_in.size(3) == D && H % K == 0, "flatlm::attend_one: q ", q_in.sizes(),
                " does not match k ", k_in.sizes());
    const at::Tensor q = q_in.contiguous(), k = k_in.contiguous(), v = v_in.contiguous();   // (cache rows are)
    const at::Tensor mask = mask_in ? mask_in->to(at::kFloat).reshape({-1, S}).contiguous()     // (1, S) or (B, S)
                                    : at::zeros({1, S}, q.options().dtype(at::kFloat));
    TORCH_CHECK(mask.size(0) == 1 || mask.size(0) == B, "flatlm::attend_one: mask ", mask_in->sizes(),
                " is not one row per sequence");
    at::Tensor y = at::empty_like(q);
    attend_one(q.const_data_ptr(), k.const_data_ptr(), v.const_data_ptr(), mask.const_data_ptr<float>(),
               mask.size(0) > 1, y.data_ptr(), B, H, K, S, D, static_cast<float>(scale),
               static_cast<float>(softcap.value_or(0.0)), q.scalar_type() == at::kBFloat16);
    return y;
}

// A model file's RMSNorm: x (..., C) and weight (C,), both fp32 or both bf16 -> (..., C) in x's dtype. offset 0:
// weight * normalised x (Llama, Qwen, Phi-3); 1: (1 + weight) * normalised x (Gemma). See gemv.c's rms_norm.
static at::Tensor rms_norm_op(const at::Tensor &x_in, const at::Tensor &weight_in, double eps, int64_t offset) {
    const int64_t C = weight_in.numel();
    TORCH_CHECK(x_in.dim() >= 1 && x_in.size(-1) == C && weight_in.dim() == 1 && fp32_or_bf16(x_in) &&
                    weight_in.scalar_type() == x_in.scalar_type() && (offset == 0 || offset == 1),
                "flatlm::rms_norm: x (..., C) and weight (C,) must be both fp32 or both bf16 and offset 0 or 1, got ",
                x_in.sizes(), " ", x_in.scalar_type(), ", ", weight_in.sizes(), " ", weight_in.scalar_type(), ", ",
                offset);
    const at::Tensor x = x_in.contiguous(), weight = weight_in.contiguous();
    at::Tensor y = at::empty_like(x);
    rms_norm(x.const_data_ptr(), weight.const_data_ptr(), y.data_ptr(), x.numel() / C, C, static_cast<float>(eps),
             static_cast<int>(offset), x.scalar_type() == at::kBFloat16);
    return y;
}

TORCH_LIBRARY(flatlm, m) {
    m.def("gemv(Tensor x, Tensor weight, Tensor? scale, Tensor? bias, int glu=0) -> Tensor");
    m.def("attend_one(Tensor q, Tensor k, Tensor v, Tensor? mask, float scale, float? softcap) -> Tensor");
    m.def("rms_norm(Tensor x, Tensor weight, float eps, int offset) -> Tensor");
}

TORCH_LIBRARY_IMPL(flatlm, CPU, m) {
    m.impl("gemv", &gemv_op);
    m.impl("attend_one", &attend_one_op);
    m.impl("rms_norm", &rms_norm_op);
}
