//! What `qmtot bench kernels` needs from a CUDA device: CUDA-event timing, the copy bandwidth
//! of a large device-to-device copy, and cuBLAS's f16 GEMM as the dense baseline.

use cudarc::cublas::{sys::cublasOperation_t, CudaBlas, Gemm, GemmConfig};
use cudarc::driver::sys::CUevent_flags;
use half::f16;

use super::kernels::cuda_err;
use super::matmul_variant::{batch_tiles, MatmulVariant, MATMUL_VARIANTS};
use super::{CudaBackend, CudaTensor};
use crate::bench::kernels::{random_values, KernelBenchDevice};
use crate::error::Result;

impl CudaBackend {
    /// Device seconds between two events around `f`'s launches.
    fn event_seconds(&self, f: &mut dyn FnMut() -> Result<()>) -> Result<f64> {
        let timed = Some(CUevent_flags::CU_EVENT_DEFAULT);
        let start = self.stream.record_event(timed).map_err(|e| cuda_err("event", e))?;
        f()?;
        let end = self.stream.record_event(timed).map_err(|e| cuda_err("event", e))?;
        let ms = start.elapsed_ms(&end).map_err(|e| cuda_err("event elapsed", e))?;
        Ok(ms as f64 / 1e3)
    }
}

impl KernelBenchDevice for CudaBackend {
    fn time(&self, f: &mut dyn FnMut() -> Result<()>) -> Result<f64> {
        self.event_seconds(f)
    }

    fn copy_bandwidth(&self) -> Result<f64> {
        // 1 GiB each way: far beyond L2, so this is HBM read + write.
        let bytes = 1usize << 30;
        let src = self.stream.alloc_zeros::<u8>(bytes).map_err(|e| cuda_err("alloc", e))?;
        let mut dst = self.stream.alloc_zeros::<u8>(bytes).map_err(|e| cuda_err("alloc", e))?;
        let seconds = self.median_time(2, 5, &mut || {
            self.stream
                .memcpy_dtod(&src, &mut dst)
                .map_err(|e| cuda_err("memcpy_dtod", e))
        })?;
        Ok(2.0 * bytes as f64 / seconds / 1e9)
    }

    fn baseline(&self, m: usize, n: usize, k: usize, reps: usize) -> Result<(String, f64)> {
        let blas = CudaBlas::new(self.stream.clone()).map_err(|e| cuda_err("cublas", e))?;
        let to_f16 = |v: Vec<f32>| v.into_iter().map(f16::from_f32).collect::<Vec<_>>();
        let w = self.upload(&to_f16(random_values(n * k, 7)))?;
        let x = self.upload(&to_f16(random_values(m * k, 8)))?;
        let mut y = self.zeros::<f16>(m * n)?;
        // Row-major W[n, k] and x[m, k] are column-major Wᵀ and xᵀ; y[m, n] row-major is
        // column-major yᵀ[n, m] = W · xᵀ: op(A) = Aᵀ with A the column-major [k, n].
        let cfg = GemmConfig {
            transa: cublasOperation_t::CUBLAS_OP_T,
            transb: cublasOperation_t::CUBLAS_OP_N,
            m: n as i32,
            n: m as i32,
            k: k as i32,
            alpha: f16::ONE,
            lda: k as i32,
            ldb: k as i32,
            beta: f16::ZERO,
            ldc: n as i32,
        };
        let seconds = self.per_call_time(3, reps, crate::bench::kernels::BENCH_ROUNDS, &mut || {
            // SAFETY: w [n, k], x [m, k], y [m, n] f16 as the config says.
            unsafe { blas.gemm(cfg, &w, &x, &mut y) }.map_err(|e| cuda_err("cublas gemm", e))
        })?;
        Ok(("cuBLAS f16".into(), seconds))
    }

    fn cache_bytes(&self) -> usize {
        // H100 / H200 L2 is 50 MiB; A100 40 MiB.
        64 << 20
    }

    fn kv_element_bytes(&self) -> usize {
        2
    }

    fn activations(&self, rows: usize, cols: usize, values: &[f32]) -> Result<CudaTensor> {
        self.upload_activations(rows, cols, values)
    }

    fn matmul_variants(&self, m: usize) -> Vec<String> {
        let nt = batch_tiles(m);
        MATMUL_VARIANTS
            .iter()
            .filter(|v| v.nt == nt)
            .map(|v| v.label())
            .collect()
    }

    fn use_matmul_variant(&self, label: Option<&str>) -> Result<()> {
        self.use_matmul_variants(&MatmulVariant::parse_list(label.unwrap_or(""))?)
    }
}
