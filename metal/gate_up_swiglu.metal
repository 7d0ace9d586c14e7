// Layout: one SIMD group per output column n, 32 lanes split K for both the gate and up rows n.
// y (M, N) = silu(x @ dequant(w_gate)^T) * (x @ dequant(w_up)^T), with silu(g) = g / (1 + exp(-g)).
// Both weights are (N, K * BITS / 32) uint32 and share BITS and GROUP_SIZE. Template
// parameters: T, M, BITS, GROUP_SIZE. The grid is (32, N rounded up to R, 1), threadgroups (32, R, 1).
const int K = x_shape[1];
const int N = w_gate_shape[0];
const uint lane = thread_index_in_simdgroup;
const int row = int(threadgroup_position_in_grid.y * threads_per_threadgroup.y +
                    simdgroup_index_in_threadgroup);
if (row >= N) {
  return;
}

const int words_per_row = K * BITS / 32;
const int groups_per_row = K / GROUP_SIZE;

float acc_gate[M];
float acc_up[M];
for (int m = 0; m < M; ++m) {
  acc_gate[m] = 0.0f;
  acc_up[m] = 0.0f;
}
lowbit_accumulate_row<T, M, BITS, GROUP_SIZE>(
    x, K,
    w_gate + row * words_per_row,
    scales_gate + row * groups_per_row,
    biases_gate + row * groups_per_row,
    lane, acc_gate);
lowbit_accumulate_row<T, M, BITS, GROUP_SIZE>(
    x, K,
    w_up + row * words_per_row,
    scales_up + row * groups_per_row,
    biases_up + row * groups_per_row,
    lane, acc_up);

for (int m = 0; m < M; ++m) {
  const float gate = metal::simd_sum(acc_gate[m]);
  const float up = metal::simd_sum(acc_up[m]);
  if (lane == 0) {
    const float silu_gate = gate / (1.0f + metal::exp(-gate));
    y[m * N + row] = static_cast<T>(silu_gate * up);
  }
}
