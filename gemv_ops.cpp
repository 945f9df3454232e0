// gemv.c's kernels as torch operators, flatlm::gemv, attend_one, rope_attend, rms_norm and decode_block: what gemv.py
// loads (one library with gemv.c, compiled on first use) and what decoding on a CPU calls. An operator written in C++
// costs about 6 us a call from Python, allocation included; the same operator with a Python body cost 16, and ctypes
// with its Python wrapper 9-12: a decode step makes about 200 calls. torch.compile calls them as they are.
#include <ATen/core/Tensor.h>
#include <ATen/ops/add.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/gelu.h>
#include <ATen/ops/layer_norm.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

extern "C" {
void gemv(const void *x, const void *w, int kind, const void *scale, int64_t group, const float *bias, void *y,
          int64_t M, int64_t N, int64_t K, int glu, int bf16);
void attend_one(const void *q, const void *k, const void *v, const float *mask, int mask_rows, void *y, int64_t B,
                int64_t H, int64_t K, int64_t S, int64_t D, float scale, float softcap, int bf16);
void rms_norm(const void *x, const void *w, void *y, int64_t M, int64_t C, float eps, int offset, int bf16);
void rope_attend(const void *q, const int64_t *qs, const void *k, const int64_t *ks, const void *v, const int64_t *vs,
                 const void *cos, const void *sin, int cs_rows, int64_t R, void *cache_k, void *cache_v,
                 const int64_t *pos, int pos_rows, const float *mask, int mask_rows, void *y, int64_t B, int64_t H,
                 int64_t K, int64_t S, int64_t D, float scale, float softcap, int bf16);
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

// An additive attention mask for B sequences over S positions, as the kernels read it: fp32 (1, S), one row for all
// (zeros where there is none), or (B, S), one each
static at::Tensor mask_rows(const std::optional<at::Tensor> &mask_in, int64_t B, int64_t S, const char *op) {
    const at::Tensor mask = mask_in ? mask_in->to(at::kFloat).reshape({-1, S}).contiguous()
                                    : at::zeros({1, S}, at::TensorOptions().dtype(at::kFloat));
    TORCH_CHECK(mask.size(0) == 1 || mask.size(0) == B, "flatlm::", op, ": mask ", mask.sizes(),
                " is not one row per sequence");
    return mask;
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
    const at::Tensor mask = mask_rows(mask_in, B, S, "attend_one");
    at::Tensor y = at::empty_like(q);
    attend_one(q.const_data_ptr(), k.const_data_ptr(), v.const_data_ptr(), mask.const_data_ptr<float>(),
               mask.size(0) > 1, y.data_ptr(), B, H, K, S, D, static_cast<float>(scale),
               static_cast<float>(softcap.value_or(0.0)), q.scalar_type() == at::kBFloat16);
    return y;
}

// A model file's Attention for one query per sequence from q (B, H, 1, D), k, v (B, K, 1, D) before RoPE (views of
// the qkv projection: each head's D values contiguous): RoPE with cos, sin (R <= D columns, one row or one per
// sequence), k and v written into cache_k, cache_v (the cache's buffers, (rows, K, S, D)) at cache row row0 + b and
// position pos (one for all or one per sequence), attention over those cache rows with mask as attend_one's ->
// (B, H, 1, D). All in one dtype, fp32 or bf16 (the int64 positions aside). See gemv.c's rope_attend.
static at::Tensor rope_attend_op(const at::Tensor &q, const at::Tensor &k, const at::Tensor &v,
                                 const at::Tensor &cos_in, const at::Tensor &sin_in, at::Tensor &cache_k,
                                 at::Tensor &cache_v, int64_t row0, const at::Tensor &pos_in,
                                 const std::optional<at::Tensor> &mask_in, double scale,
                                 std::optional<double> softcap) {
    TORCH_CHECK(q.dim() == 4 && q.size(2) == 1 && k.dim() == 4 && k.size(2) == 1 && v.sizes() == k.sizes() &&
                    cache_k.dim() == 4 && cache_v.sizes() == cache_k.sizes(),
                "flatlm::rope_attend: q must be (B, H, 1, D), k, v (B, K, 1, D) and the caches (rows, K, S, D), got ",
                q.sizes(), ", ", k.sizes(), ", ", v.sizes(), ", ", cache_k.sizes());
    const int64_t B = q.size(0), H = q.size(1), D = q.size(3), K = k.size(1), S = cache_k.size(2);
    const auto dtype = q.scalar_type();
    TORCH_CHECK(fp32_or_bf16(q) && k.scalar_type() == dtype && v.scalar_type() == dtype &&
                    cos_in.scalar_type() == dtype && sin_in.scalar_type() == dtype &&
                    cache_k.scalar_type() == dtype && cache_v.scalar_type() == dtype,
                "flatlm::rope_attend: q, k, v, cos, sin and the caches must all be fp32 or all bf16");
    TORCH_CHECK(k.size(0) == B && k.size(3) == D && H % K == 0 && cache_k.size(1) == K && cache_k.size(3) == D &&
                    row0 >= 0 && row0 + B <= cache_k.size(0) && cache_k.is_contiguous() && cache_v.is_contiguous(),
                "flatlm::rope_attend: q ", q.sizes(), " and k ", k.sizes(), " do not match the caches' rows ", row0,
                " to ", row0 + B, " of ", cache_k.sizes(), " (contiguous)");
    TORCH_CHECK(q.stride(3) == 1 && k.stride(3) == 1 && v.stride(3) == 1,
                "flatlm::rope_attend: each head's D values of q, k and v must be contiguous");
    const int64_t R = cos_in.size(-1);
    const at::Tensor cos = cos_in.reshape({-1, R}).contiguous(), sin = sin_in.reshape({-1, R}).contiguous();
    TORCH_CHECK(R % 2 == 0 && R <= D && sin.sizes() == cos.sizes() && (cos.size(0) == 1 || cos.size(0) == B),
                "flatlm::rope_attend: cos and sin must be (1 or B, R) with R even and at most ", D, ", got ",
                cos_in.sizes(), ", ", sin_in.sizes());
    const at::Tensor pos = pos_in.to(at::kLong).reshape({-1}).contiguous();
    TORCH_CHECK(pos.size(0) == 1 || pos.size(0) == B, "flatlm::rope_attend: input_pos ", pos_in.sizes(),
                " is not one position for all or one per sequence");
    const int64_t *p = pos.const_data_ptr<int64_t>();
    for (int64_t i = 0; i < pos.size(0); i++)
        TORCH_CHECK(p[i] >= 0 && p[i] < S, "flatlm::rope_attend: position ", p[i], " is outside the cache's ", S);
    const at::Tensor mask = mask_rows(mask_in, B, S, "rope_attend");
    at::Tensor y = at::empty({B, H, 1, D}, q.options());
    const int64_t qs[2] = {q.stride(0), q.stride(1)}, ks[2] = {k.stride(0), k.stride(1)}, vs[2] = {v.stride(0),
                                                                                                  v.stride(1)};
    const int64_t row = K * S * D * row0;                  // the first of these sequences' cache rows
    const size_t e = dtype == at::kBFloat16 ? 2 : 4;
    rope_attend(q.const_data_ptr(), qs, k.const_data_ptr(), ks, v.const_data_ptr(), vs, cos.const_data_ptr(),
                sin.const_data_ptr(), cos.size(0) > 1, R, static_cast<char *>(cache_k.data_ptr()) + row * e,
                static_cast<char *>(cache_v.data_ptr()) + row * e, p, pos.size(0) > 1, mask.const_data_ptr<float>(),
                mask.size(0) > 1, y.data_ptr(), B, H, K, S, D, static_cast<float>(scale),
                static_cast<float>(softcap.value_or(0.0)), dtype == at::kBFloat16);
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

// Norm i of a block's norms: an RMSNorm (offset 0 or 1, as rms_norm's) or a LayerNorm (offset -1, with its bias:
// torch's own layer_norm, as nn.LayerNorm calls it), or x as it is where the block has none there
static at::Tensor norm_or_same(const at::Tensor &x, const std::vector<std::optional<at::Tensor>> &norms,
                               const std::vector<std::optional<at::Tensor>> &norm_biases, at::ArrayRef<double> eps,
                               at::ArrayRef<int64_t> offsets, size_t i) {
    if (!norms[i]) return x;
    if (offsets[i] < 0) return at::layer_norm(x, {x.size(-1)}, norms[i], norm_biases[i], eps[i]);
    return rms_norm_op(x, *norms[i], eps[i], offsets[i]);
}

// A pre-norm decoder block for one token per sequence, every step of it called from here:
//   a = post_attn_norm(o(attention(RoPE(q_norm(q), k_norm(k)), v)))   with q, k, v = qkv(attn_norm(x))
//   h = x + a;  y = h + post_mlp_norm(mlp(mlp_norm(h)))   or, parallel (Phi-2): y = x + a + mlp(attn_norm(x))
// mlp: down(glu(gate_up(.))) as gemv's glu, or glu 0: down(gelu_tanh(up(.))) (Phi-2's ungated MLP).
// x (B, 1, C); norms: attn_norm, mlp_norm, q_norm, k_norm, post_attn_norm, post_mlp_norm (none where the block has
// none: Llama has the first two, Qwen 3 the q and k norms over each head too, Gemma 2 the post norms, Gemma 3 all,
// Phi-2 the first only), each with its bias (LayerNorm), eps and offset (norm_or_same); the four linears qkv, o,
// gate_up (or up), down, each's weight, scale and bias as gemv's; cos, sin, the caches, row0, pos, mask, scale and
// softcap as rope_attend's; H, K, D the heads. The same operators in the same order as the block's forward through
// gemv.py's modules: the same numbers, without the ~40 calls from Python a block that forward makes.
static at::Tensor decode_block_op(const at::Tensor &x, const std::vector<std::optional<at::Tensor>> &norms,
                                  const std::vector<std::optional<at::Tensor>> &norm_biases, at::ArrayRef<double> eps,
                                  at::ArrayRef<int64_t> offsets, const std::vector<at::Tensor> &weights,
                                  const std::vector<std::optional<at::Tensor>> &scales,
                                  const std::vector<std::optional<at::Tensor>> &biases, int64_t glu, bool parallel,
                                  const at::Tensor &cos, const at::Tensor &sin, at::Tensor &cache_k,
                                  at::Tensor &cache_v, int64_t row0, const at::Tensor &pos,
                                  const std::optional<at::Tensor> &mask, double scale, std::optional<double> softcap,
                                  int64_t H, int64_t K, int64_t D) {
    TORCH_CHECK(x.dim() == 3 && x.size(1) == 1, "flatlm::decode_block: x must be (B, 1, C), got ", x.sizes());
    TORCH_CHECK(norms.size() == 6 && norm_biases.size() == 6 && eps.size() == 6 && offsets.size() == 6 && norms[0] &&
                    (parallel || norms[1]) && weights.size() == 4 && scales.size() == 4 && biases.size() == 4,
                "flatlm::decode_block: 6 norms (the first, and the second unless parallel, given) with their biases, "
                "eps and offsets, and 4 linears");
    enum { ATTN, MLP, Q, K_, POST_ATTN, POST_MLP };
    auto norm = [&](const at::Tensor &t, size_t i) { return norm_or_same(t, norms, norm_biases, eps, offsets, i); };
    auto mlp = [&](const at::Tensor &t) {
        const at::Tensor hidden = glu ? gemv_op(t, weights[2], scales[2], biases[2], glu)
                                      : at::gelu(gemv_op(t, weights[2], scales[2], biases[2], 0), "tanh");
        return gemv_op(hidden, weights[3], scales[3], biases[3], 0);
    };
    const int64_t B = x.size(0);
    const at::Tensor normed = norm(x, ATTN);
    const at::Tensor heads = gemv_op(normed, weights[0], scales[0], biases[0], 0)
                                 .view({B, 1, H + 2 * K, D}).transpose(1, 2);                 // (B, H + 2K, 1, D)
    const at::Tensor y = rope_attend_op(norm(heads.narrow(1, 0, H), Q), norm(heads.narrow(1, H, K), K_),
                                        heads.narrow(1, H + K, K), cos, sin, cache_k, cache_v, row0, pos, mask, scale,
                                        softcap);
    const at::Tensor h = at::add(x, norm(gemv_op(y.view({B, 1, H * D}), weights[1], scales[1], biases[1], 0),
                                         POST_ATTN));
    if (parallel) return at::add(h, mlp(normed));
    return at::add(h, norm(mlp(norm(h, MLP)), POST_MLP));
}

TORCH_LIBRARY(flatlm, m) {
    m.def("gemv(Tensor x, Tensor weight, Tensor? scale, Tensor? bias, int glu=0) -> Tensor");
    m.def("attend_one(Tensor q, Tensor k, Tensor v, Tensor? mask, float scale, float? softcap) -> Tensor");
    m.def("rms_norm(Tensor x, Tensor weight, float eps, int offset) -> Tensor");
    m.def("rope_attend(Tensor q, Tensor k, Tensor v, Tensor cos, Tensor sin, Tensor(a!) cache_k, Tensor(b!) cache_v, "
          "int row0, Tensor pos, Tensor? mask, float scale, float? softcap) -> Tensor");
    m.def("decode_block(Tensor x, Tensor?[] norms, Tensor?[] norm_biases, float[] eps, int[] offsets, "
          "Tensor[] weights, Tensor?[] scales, Tensor?[] biases, int glu, bool parallel, Tensor cos, Tensor sin, "
          "Tensor(a!) cache_k, Tensor(b!) cache_v, int row0, Tensor pos, Tensor? mask, float scale, float? softcap, "
          "int H, int K, int D) -> Tensor");
}

TORCH_LIBRARY_IMPL(flatlm, CPU, m) {
    m.impl("gemv", &gemv_op);
    m.impl("attend_one", &attend_one_op);
    m.impl("rms_norm", &rms_norm_op);
    m.impl("rope_attend", &rope_attend_op);
    m.impl("decode_block", &decode_block_op);
}
