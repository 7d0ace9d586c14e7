// Layout: one SIMD group per output row of q, k or v (rows stacked q, k, v), 32 lanes split K.
// One dispatch computes q (M, NQ), k (M, NK) and v (M, NV) from the same x (M, K); the three
// weights share BITS and GROUP_SIZE. Template parameters: T, M, BITS, GROUP_SIZE. The grid is
// (32, NQ + NK + NV rounded up to R, 1) with threadgroups of (32, R, 1).
const int K = x_shape[1];
const int NQ = wq_shape[0];
const int NK = wk_shape[0];
const int NV = wv_shape[0];
const uint lane = thread_index_in_simdgroup;
const int stacked_row = int(threadgroup_position_in_grid.y * threads_per_threadgroup.y +
                            simdgroup_index_in_threadgroup);
if (stacked_row >= NQ + NK + NV) {
  return;
}

const int words_per_row = K * BITS / 32;
const int groups_per_row = K / GROUP_SIZE;

// Pick the projection this SIMD group works on. The choice is uniform across the SIMD
// group, so every lane reaches the same simd_sum calls.
const device uint32_t* w_base = wq;
const device T* scales_base = scales_q;
const device T* biases_base = biases_q;
device T* out = q;
int row = stacked_row;
int n_out = NQ;
if (stacked_row >= NQ + NK) {
  w_base = wv;
  scales_base = scales_v;
  biases_base = biases_v;
  out = v;
  row = stacked_row - NQ - NK;
  n_out = NV;
} else if (stacked_row >= NQ) {
  w_base = wk;
  scales_base = scales_k;
  biases_base = biases_k;
  out = k;
  row = stacked_row - NQ;
  n_out = NK;
}

float acc[M];
for (int m = 0; m < M; ++m) {
  acc[m] = 0.0f;
}
lowbit_accumulate_row<T, M, BITS, GROUP_SIZE>(
    x, K,
    w_base + row * words_per_row,
    scales_base + row * groups_per_row,
    biases_base + row * groups_per_row,
    lane, acc);

for (int m = 0; m < M; ++m) {
  const float total = metal::simd_sum(acc[m]);
  if (lane == 0) {
    out[m * n_out + row] = static_cast<T>(total);
  }
}
