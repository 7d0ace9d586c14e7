// Layout: one SIMD group per output row, its 32 lanes split K; threadgroup (32, R, 1) holds R rows.
// y (M, N) = x (M, K) @ dequant(w)^T with w (N, K * BITS / 32) uint32, scales and biases
// (N, K / GROUP_SIZE). Template parameters: T (x, scales, biases, y), M (rows of x), BITS,
// GROUP_SIZE. The grid is (32, N rounded up to R, 1), so SIMD groups past row N - 1 exit.
const int K = x_shape[1];
const int N = w_shape[0];
const uint lane = thread_index_in_simdgroup;
const int row = int(threadgroup_position_in_grid.y * threads_per_threadgroup.y +
                    simdgroup_index_in_threadgroup);
if (row >= N) {
  return;
}

const int words_per_row = K * BITS / 32;
const int groups_per_row = K / GROUP_SIZE;

float acc[M];
for (int m = 0; m < M; ++m) {
  acc[m] = 0.0f;
}
lowbit_accumulate_row<T, M, BITS, GROUP_SIZE>(
    x, K,
    w + row * words_per_row,
    scales + row * groups_per_row,
    biases + row * groups_per_row,
    lane, acc);

for (int m = 0; m < M; ++m) {
  const float total = metal::simd_sum(acc[m]);
  if (lane == 0) {
    y[m * N + row] = static_cast<T>(total);
  }
}
