//! On-device sampling: [`CudaBackend::sample_rows`] draws one token per row of f32 logits with
//! `kernels/sampling.cu` and copies back only the ids and the requested log-probabilities.
//!
//! Semantics: exactly [`draw_with_uniform`](crate::engine::sampler::draw_with_uniform) /
//! [`kept_weights`](crate::engine::sampler::kept_weights), the host oracle (kept tokens walked
//! in ascending id order, as the host `Sampler` walks them too). The randomness is the host's:
//! each row carries its `u` from the sequence's seeded stream (`Sampler::next_uniform`), so a
//! seed means the same stream on both backends and nothing random lives on the device.
//! Log-probabilities are those of the raw logits (temperature 1), as `Sampler` reports them.

use cudarc::driver::{DeviceRepr, LaunchConfig, PushKernelArg};

use super::kernels::cuda_err;
use super::{shape_err, CudaBackend, CudaTensor, DevBuf};
use crate::engine::sampler::SamplingParams;
use crate::error::{Error, Result};

/// What to do with one row of logits.
#[derive(Clone, Copy, Debug)]
pub struct RowSampling<'a> {
    /// `temperature`, `top_k`, `top_p` and `min_p` decide the draw, `top_logprobs` how many of
    /// the most likely tokens to report (≤ `MAX_TOP_LOGPROBS`); `seed` is not read (`uniform` is
    /// the randomness).
    pub params: &'a SamplingParams,
    /// `u ∈ [0, 1)`, from the sequence's `Sampler::next_uniform` (unused at temperature 0).
    pub uniform: f64,
    /// Token ids whose log-probabilities to report (each < vocab).
    pub candidates: &'a [u32],
}

/// One row's result.
#[derive(Clone, Debug, PartialEq)]
pub struct DeviceSample {
    pub token: u32,
    /// log p(token) under the raw logits.
    pub logprob: f32,
    /// log p(c) for each of the row's candidates, in their order.
    pub candidate_logprobs: Vec<f32>,
    /// The `top_logprobs` most likely tokens, most likely first (fewer if the row has fewer
    /// non-NaN logits).
    pub top: Vec<(u32, f32)>,
}

/// `RowParams` of kernels/sampling.cu (32 bytes, checked there by a static_assert).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
struct RowParams {
    uniform: f64,
    temperature: f32,
    top_p: f32,
    min_p: f32,
    top_k: i32,
    top_n: i32,
    pad: i32,
}
const _: () = assert!(std::mem::size_of::<RowParams>() == 32);

// SAFETY: plain data with the C layout of the kernel's `RowParams`; any bit pattern is valid.
unsafe impl DeviceRepr for RowParams {}

/// Threads per row (`SAMPLE_THREADS` in the kernel, which its reductions assume).
const SAMPLE_THREADS: u32 = 1024;

impl RowSampling<'_> {
    /// The kernel's parameters, after the checks a bad request fails with.
    fn device_params(&self, vocab: usize) -> Result<RowParams> {
        self.params.validate()?;
        if !(0.0..1.0).contains(&self.uniform) {
            return Err(Error::InvalidArgument(format!(
                "uniform {} must be in [0, 1)",
                self.uniform
            )));
        }
        if let Some(&id) = self.candidates.iter().find(|&&c| c as usize >= vocab) {
            return Err(Error::TokenOutOfRange { id, vocab });
        }
        Ok(RowParams {
            uniform: self.uniform,
            temperature: self.params.temperature,
            top_p: self.params.top_p,
            min_p: self.params.min_p,
            // k ≥ vocab keeps everything, as 0 does; clamping keeps it an i32.
            top_k: self.params.top_k.min(vocab) as i32,
            top_n: self.params.top_logprobs as i32,
            pad: 0,
        })
    }
}

impl CudaBackend {
    /// f32 logits `[rows, cols]` from host values (tests and benchmarks; the forward writes its
    /// own through `alloc_logits`).
    pub fn upload_logits(&self, rows: usize, cols: usize, values: &[f32]) -> Result<CudaTensor> {
        if values.len() != rows * cols {
            return Err(shape_err(
                "upload_logits",
                format!("{} values for [{rows}, {cols}]", values.len()),
            ));
        }
        // A device allocation cannot be empty.
        let buf = if values.is_empty() {
            self.zeros(1)?
        } else {
            self.upload(values)?
        };
        Ok(CudaTensor {
            rows,
            cols,
            buf: DevBuf::F32(buf),
        })
    }

    /// Samples one token per row of `logits` (`[rows.len(), vocab]` f32) on the device, with
    /// its log-probability and the requested candidate and top log-probabilities. Only these
    /// small results are copied to the host.
    pub fn sample_rows(&self, logits: &CudaTensor, rows: &[RowSampling]) -> Result<Vec<DeviceSample>> {
        const OP: &str = "sample_rows";
        let DevBuf::F32(x) = &logits.buf else {
            return Err(shape_err(OP, "expected f32 logits, got f16".into()));
        };
        if rows.len() != logits.rows {
            return Err(shape_err(
                OP,
                format!("{} requests for {} rows of logits", rows.len(), logits.rows),
            ));
        }
        let vocab = logits.cols;
        // Ids are int32 on the device; 2³⁰ keeps every index computation far from overflow.
        if vocab == 0 || vocab > 1 << 30 {
            return Err(shape_err(OP, format!("vocabulary of {vocab} tokens")));
        }
        let params = rows
            .iter()
            .map(|r| r.device_params(vocab))
            .collect::<Result<Vec<_>>>()?;
        let n = rows.len();
        if n == 0 {
            return Ok(Vec::new());
        }
        let cfg = LaunchConfig {
            grid_dim: (n as u32, 1, 1),
            block_dim: (SAMPLE_THREADS, 1, 1),
            shared_mem_bytes: 0,
        };
        let vocab_i = vocab as i32;
        let params_d = self.upload(&params)?;
        let mut tokens = self.zeros::<i32>(n)?;
        let mut logprobs = self.zeros::<f32>(n)?;
        // SAFETY: logits [n, vocab] f32 (checked), params [n]; writes tokens [n], logprobs [n].
        unsafe {
            self.stream
                .launch_builder(self.kernels.get("sample_f32")?)
                .arg(x)
                .arg(&params_d)
                .arg(&vocab_i)
                .arg(&mut tokens)
                .arg(&mut logprobs)
                .launch(cfg)
        }
        .map_err(|e| cuda_err("sample_f32", e))?;

        // Candidates padded to the longest list with −1; top lists as long as the longest asked.
        let n_cand = rows.iter().map(|r| r.candidates.len()).max().unwrap_or(0);
        let max_top = rows.iter().map(|r| r.params.top_logprobs).max().unwrap_or(0);
        let (mut cand_lp, mut top_ids, mut top_lp) = (Vec::new(), Vec::new(), Vec::new());
        if n_cand > 0 || max_top > 0 {
            let mut ids = vec![-1i32; n * n_cand];
            for (r, row) in rows.iter().enumerate() {
                for (j, &c) in row.candidates.iter().enumerate() {
                    ids[r * n_cand + j] = c as i32;
                }
            }
            let ids = self.upload(&ids)?;
            let mut cand_d = self.zeros::<f32>(n * n_cand)?;
            let mut top_ids_d = self.zeros::<i32>(n * max_top)?;
            let mut top_lp_d = self.zeros::<f32>(n * max_top)?;
            let (n_cand_i, max_top_i) = (n_cand as i32, max_top as i32);
            // SAFETY: ids < vocab (checked) or −1; writes cand [n, n_cand], top [n, max_top].
            unsafe {
                self.stream
                    .launch_builder(self.kernels.get("logprobs_f32")?)
                    .arg(x)
                    .arg(&params_d)
                    .arg(&vocab_i)
                    .arg(&ids)
                    .arg(&n_cand_i)
                    .arg(&mut cand_d)
                    .arg(&max_top_i)
                    .arg(&mut top_ids_d)
                    .arg(&mut top_lp_d)
                    .launch(cfg)
            }
            .map_err(|e| cuda_err("logprobs_f32", e))?;
            cand_lp = self.download(&cand_d)?;
            top_ids = self.download(&top_ids_d)?;
            top_lp = self.download(&top_lp_d)?;
        }
        let tokens = self.download(&tokens)?;
        let logprobs = self.download(&logprobs)?;

        Ok(rows
            .iter()
            .enumerate()
            .map(|(r, row)| {
                let top = (0..row.params.top_logprobs)
                    .map(|j| r * max_top + j)
                    .take_while(|&i| top_ids[i] >= 0)
                    .map(|i| (top_ids[i] as u32, top_lp[i]))
                    .collect();
                DeviceSample {
                    token: tokens[r] as u32,
                    logprob: logprobs[r],
                    candidate_logprobs: cand_lp[r * n_cand..r * n_cand + row.candidates.len()].to_vec(),
                    top,
                }
            })
            .collect())
    }

    fn download<T: DeviceRepr>(&self, b: &cudarc::driver::CudaSlice<T>) -> Result<Vec<T>> {
        self.stream.clone_dtoh(b).map_err(|e| cuda_err("download", e))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_are_checked_before_any_launch() {
        let p = SamplingParams {
            temperature: 0.7,
            top_k: 1 << 40,
            top_p: 0.9,
            min_p: 0.05,
            top_logprobs: 3,
            ..Default::default()
        };
        fn row<'a>(params: &'a SamplingParams, uniform: f64, candidates: &'a [u32]) -> RowSampling<'a> {
            RowSampling {
                params,
                uniform,
                candidates,
            }
        }
        let d = row(&p, 0.25, &[0, 9]).device_params(10).unwrap();
        assert_eq!(
            (d.uniform, d.temperature, d.top_p, d.min_p, d.top_k, d.top_n),
            (0.25, 0.7, 0.9, 0.05, 10, 3),
            "top_k clamped to the vocabulary"
        );
        assert!(matches!(
            row(&p, 0.5, &[10]).device_params(10),
            Err(Error::TokenOutOfRange { id: 10, vocab: 10 })
        ));
        for u in [1.0, -1e-9, f64::NAN] {
            assert!(matches!(
                row(&p, u, &[]).device_params(10),
                Err(Error::InvalidArgument(_))
            ));
        }
        for bad in [
            SamplingParams {
                temperature: -1.0,
                ..p.clone()
            },
            SamplingParams {
                top_p: 0.0,
                ..p.clone()
            },
            SamplingParams {
                top_logprobs: 21,
                ..p.clone()
            },
        ] {
            assert!(matches!(
                row(&bad, 0.5, &[]).device_params(10),
                Err(Error::InvalidArgument(_))
            ));
        }
    }
}
