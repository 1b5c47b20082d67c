//! `qmtot bench kernels`: the INT4 matmul against the device's measured copy bandwidth and a
//! dense baseline (cuBLAS f16 GEMM on CUDA, qmtot's f32 dense kernel on the CPU), at LLaMA
//! layer shapes and the batch sizes of decode and sibling groups.
//!
//! Method: the device's own clock (CUDA events; `Instant` on the CPU), warm-up calls first,
//! then the median of `reps` timed calls. Weights are random (never all zero) and several
//! copies are rotated so that the working set exceeds the last-level cache, so a call streams
//! its weights from memory as it would in a real decode step. GB/s counts the INT4 weight
//! bytes (nibbles, f16 scales, f32 mins) per call.

use crate::backend::Backend;
use half::f16;

use crate::error::{Error, Result};
use crate::quant::{F16Matrix, Int4Matrix, WeightMatrix};

/// What a device adds to the backend for this benchmark.
pub trait KernelBenchDevice: Backend {
    /// Seconds `f` takes on the device (its work completed), by the device's clock.
    fn time(&self, f: &mut dyn FnMut() -> Result<()>) -> Result<f64>;
    /// The median of `reps` timed calls of `f` after `warmup` untimed ones: how every figure of
    /// these benchmarks is taken.
    fn median_time(&self, warmup: usize, reps: usize, f: &mut dyn FnMut() -> Result<()>) -> Result<f64> {
        for _ in 0..warmup {
            f()?;
        }
        let mut times = Vec::with_capacity(reps);
        for _ in 0..reps {
            times.push(self.time(f)?);
        }
        Ok(median(times))
    }
    /// Seconds per call of `f` issued back to back, as the steps of a decode issue their
    /// kernels: the median over `rounds` of (time of `calls` consecutive calls) / `calls`, after
    /// `warmup` untimed calls. Launch latency overlaps the previous call's work, as it does in a
    /// real step; a single call between two events would add the event and launch overhead
    /// (several µs) to kernels that take a few.
    fn per_call_time(
        &self,
        warmup: usize,
        calls: usize,
        rounds: usize,
        f: &mut dyn FnMut() -> Result<()>,
    ) -> Result<f64> {
        for _ in 0..warmup {
            f()?;
        }
        let calls = calls.max(1);
        let mut times = Vec::with_capacity(rounds);
        for _ in 0..rounds.max(1) {
            times.push(
                self.time(&mut || {
                    for _ in 0..calls {
                        f()?;
                    }
                    Ok(())
                })? / calls as f64,
            );
        }
        Ok(median(times))
    }
    /// Copy bandwidth in GB/s (bytes read + bytes written), from a large device-to-device copy.
    fn copy_bandwidth(&self) -> Result<f64>;
    /// The dense baseline at `[m, k] · [k, n]`: its name and the median seconds of `reps` calls.
    fn baseline(&self, m: usize, n: usize, k: usize, reps: usize) -> Result<(String, f64)>;
    /// Bytes the weights must exceed not to stay cache-resident.
    fn cache_bytes(&self) -> usize;
    /// Bytes of one stored K or V element (f16 on CUDA, f32 on the CPU).
    fn kv_element_bytes(&self) -> usize;
    /// Activations `[rows, cols]` holding `values`.
    fn activations(&self, rows: usize, cols: usize, values: &[f32]) -> Result<Self::Activations>;
    /// Alternative INT4 (g128) matmul pipelines this device can time beside its default at `m`
    /// rows, by label (none by default).
    fn matmul_variants(&self, _m: usize) -> Vec<String> {
        Vec::new()
    }
    /// Runs INT4 matmuls through `label` (one of [`KernelBenchDevice::matmul_variants`]), or
    /// through the defaults again (`None`).
    fn use_matmul_variant(&self, _label: Option<&str>) -> Result<()> {
        Ok(())
    }
}

/// A layer shape: `W[n, k]`.
#[derive(Clone, Copy, Debug)]
pub struct Shape {
    pub name: &'static str,
    pub n: usize,
    pub k: usize,
    /// f16 weights (an lm_head) instead of INT4.
    pub f16: bool,
}

/// LLaMA-3.1-8B's layers (fused QKV and gate/up as qmtot runs them) and its f16 lm_head.
pub const LLAMA3_8B: [Shape; 5] = [
    Shape {
        name: "8B o_proj",
        n: 4096,
        k: 4096,
        f16: false,
    },
    Shape {
        name: "8B qkv",
        n: 6144,
        k: 4096,
        f16: false,
    },
    Shape {
        name: "8B gate_up",
        n: 28672,
        k: 4096,
        f16: false,
    },
    Shape {
        name: "8B down",
        n: 4096,
        k: 14336,
        f16: false,
    },
    Shape {
        name: "8B lm_head f16",
        n: 128256,
        k: 4096,
        f16: true,
    },
];

/// LLaMA-2-70B's layers and its f16 lm_head.
pub const LLAMA2_70B: [Shape; 5] = [
    Shape {
        name: "70B o_proj",
        n: 8192,
        k: 8192,
        f16: false,
    },
    Shape {
        name: "70B qkv",
        n: 10240,
        k: 8192,
        f16: false,
    },
    Shape {
        name: "70B gate_up",
        n: 57344,
        k: 8192,
        f16: false,
    },
    Shape {
        name: "70B down",
        n: 8192,
        k: 28672,
        f16: false,
    },
    Shape {
        name: "70B lm_head f16",
        n: 32000,
        k: 8192,
        f16: true,
    },
];

#[derive(Clone, Debug)]
pub struct Row {
    pub shape: Shape,
    /// The matmul pipeline variant timed (`None`: the default).
    pub variant: Option<String>,
    pub m: usize,
    pub seconds: f64,
    pub weight_gbps: f64,
    /// Of the measured copy bandwidth.
    pub fraction_of_copy: f64,
    pub baseline: String,
    pub baseline_seconds: f64,
}

pub struct Report {
    pub copy_gbps: f64,
    pub rows: Vec<Row>,
}

/// Timing rounds of back-to-back calls per measured point ([`KernelBenchDevice::per_call_time`]).
pub const BENCH_ROUNDS: usize = 5;

/// The middle value (the upper one of an even count).
pub fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// Deterministic values in [−1, 1) (xorshift), never all zero.
pub fn random_values(n: usize, seed: u64) -> Vec<f32> {
    let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0
        })
        .collect()
}

/// Runs every shape × m, and with `variants` every alternative matmul pipeline of the device
/// beside the default at the INT4 shapes (against the same baseline measurement). `progress`
/// gets each row as it is measured.
pub fn run<B: KernelBenchDevice>(
    b: &B,
    shapes: &[Shape],
    ms: &[usize],
    reps: usize,
    variants: bool,
    mut progress: impl FnMut(&Row),
) -> Result<Report> {
    let copy_gbps = b.copy_bandwidth()?;
    if variants {
        // The default rows are the default kernels, whatever variants the device started with.
        b.use_matmul_variant(None)?;
    }
    let mut rows = Vec::new();
    for (si, shape) in shapes.iter().enumerate() {
        let (n, k) = (shape.n, shape.k);
        let values = random_values(n * k, 1 + si as u64);
        let one = if shape.f16 {
            WeightMatrix::F16(F16Matrix::new(
                n,
                k,
                values.iter().map(|&v| f16::from_f32(v)).collect(),
            )?)
        } else {
            WeightMatrix::Int4(Int4Matrix::quantize_rtn(n, k, 128, &values)?)
        };
        drop(values);
        let bytes = one.nbytes();
        // Enough copies to exceed the cache twice over (at least 2).
        let copies = (2 * b.cache_bytes()).div_ceil(bytes).clamp(2, 16);
        let mut weights = Vec::with_capacity(copies);
        for c in 0..copies {
            // Distinct data per copy (rotated scales, or rotated f16 values), the same shape
            // and cost.
            let w = match &one {
                WeightMatrix::Int4(m) => {
                    let mut w = m.clone();
                    let len = w.scales.len();
                    w.scales.rotate_left(c % len.max(1));
                    WeightMatrix::Int4(w)
                }
                WeightMatrix::F16(m) => {
                    let mut data = m.data.clone();
                    data.rotate_left(c);
                    WeightMatrix::F16(F16Matrix::new(n, k, data)?)
                }
                _ => {
                    return Err(Error::InvalidArgument(
                        "the matmul benchmark makes INT4 or f16 weights".into(),
                    ))
                }
            };
            weights.push(b.upload_linear(&[&w])?);
        }
        drop(one);
        for &m in ms {
            let xs = (0..2)
                .map(|r| b.activations(m, k, &random_values(m * k, 100 + r)))
                .collect::<Result<Vec<_>>>()?;
            let mut out = b.alloc_activations(m, n)?;
            let mut call = 0usize;
            let mut step = |out: &mut B::Activations| -> Result<()> {
                let w = &weights[call % copies];
                let x = &xs[call % xs.len()];
                call += 1;
                b.matmul(x, w, out)
            };
            let seconds = b.per_call_time(3, reps, BENCH_ROUNDS, &mut || step(&mut out))?;
            let (baseline, baseline_seconds) = b.baseline(m, n, k, reps)?;
            let labels = if variants && !shape.f16 {
                b.matmul_variants(m)
            } else {
                Vec::new()
            };
            let mut timed = vec![(None, seconds)];
            for label in labels {
                b.use_matmul_variant(Some(&label))?;
                let t = b.per_call_time(3, reps, BENCH_ROUNDS, &mut || step(&mut out));
                b.use_matmul_variant(None)?;
                timed.push((Some(label), t?));
            }
            for (variant, seconds) in timed {
                let weight_gbps = bytes as f64 / seconds / 1e9;
                let row = Row {
                    shape: *shape,
                    variant,
                    m,
                    seconds,
                    weight_gbps,
                    fraction_of_copy: weight_gbps / copy_gbps,
                    baseline: baseline.clone(),
                    baseline_seconds,
                };
                progress(&row);
                rows.push(row);
            }
        }
    }
    Ok(Report { copy_gbps, rows })
}

/// The CPU: wall-clock timing (its ops are synchronous), a parallel memory copy, and qmtot's
/// f32 dense kernel as the baseline.
impl KernelBenchDevice for crate::backend::cpu::CpuBackend {
    fn time(&self, f: &mut dyn FnMut() -> Result<()>) -> Result<f64> {
        let t = std::time::Instant::now();
        f()?;
        Ok(t.elapsed().as_secs_f64())
    }

    fn copy_bandwidth(&self) -> Result<f64> {
        use rayon::prelude::*;
        let bytes = 256usize << 20;
        let src: Vec<u8> = (0..bytes).map(|i| (i % 251) as u8).collect();
        let mut dst = vec![0u8; bytes];
        let seconds = self.median_time(2, 5, &mut || {
            self.run(|| {
                dst.par_chunks_mut(1 << 20)
                    .zip(src.par_chunks(1 << 20))
                    .for_each(|(d, s)| d.copy_from_slice(s));
            });
            Ok(())
        })?;
        std::hint::black_box(&dst);
        Ok(2.0 * bytes as f64 / seconds / 1e9)
    }

    fn baseline(&self, m: usize, n: usize, k: usize, reps: usize) -> Result<(String, f64)> {
        let w = crate::quant::DenseMatrix::new(n, k, random_values(n * k, 7))?;
        let lin = self.upload_linear(&[&WeightMatrix::Dense(w)])?;
        let x = self.activations(m, k, &random_values(m * k, 8))?;
        let mut out = self.alloc_activations(m, n)?;
        let seconds = self.median_time(1, reps, &mut || self.run(|| self.matmul(&x, &lin, &mut out)))?;
        Ok(("f32 dense".into(), seconds))
    }

    fn cache_bytes(&self) -> usize {
        64 << 20
    }

    fn kv_element_bytes(&self) -> usize {
        4
    }

    fn activations(&self, rows: usize, cols: usize, values: &[f32]) -> Result<crate::backend::cpu::CpuTensor> {
        Ok(crate::backend::cpu::CpuTensor {
            rows,
            cols,
            data: values.to_vec(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::cpu::CpuBackend;

    #[test]
    fn the_benchmark_runs_on_the_cpu_and_reports_every_point() {
        let b = CpuBackend::new(1).unwrap();
        let shapes = [
            Shape {
                name: "tiny",
                n: 96,
                k: 256,
                f16: false,
            },
            Shape {
                name: "tiny f16",
                n: 40,
                k: 64,
                f16: true,
            },
        ];
        let mut seen = 0;
        // The CPU has no matmul variants: asking for them adds no row.
        let r = run(&b, &shapes, &[1, 3], 2, true, |_| seen += 1).unwrap();
        assert_eq!((r.rows.len(), seen), (4, 4));
        assert!(r.rows.iter().all(|row| row.variant.is_none()));
        assert!(r.copy_gbps.is_finite() && r.copy_gbps > 0.0);
        for row in &r.rows {
            assert!(row.seconds > 0.0 && row.baseline_seconds > 0.0);
            assert!(row.weight_gbps.is_finite() && row.fraction_of_copy > 0.0);
            assert_eq!(row.baseline, "f32 dense");
        }
        assert!(random_values(64, 3).iter().any(|&v| v != 0.0));
    }
}
