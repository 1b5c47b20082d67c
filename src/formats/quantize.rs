//! `qmtot quantize`: any checkpoint qmtot loads → an INT4 checkpoint that reloads without
//! conversion work.
//!
//! * `--format safetensors`: a Hugging Face folder in the canonical INT4 layout (per linear
//!   layer `packed` u8 `[out, in/2]`, `scales` f16 and `mins` f32 `[out, in/g]`;
//!   `quantization_config.quant_method` = `qmtot_int4`), norms in f32, the embedding and
//!   lm_head in f16 where that is exact and f32 where not (unless `--quantize-lm-head`).
//!   Reloading it gives back the very matrices that were written.
//! * `--format gguf` (from a GGUF source, whose tokenizer is already in GGUF form): Q4_1 linear
//!   layers (group 32: each canonical group becomes one block; its min is rounded to f16,
//!   exact when it came from Q4_1), Q8_0 / F16 / F32 kept as they are, metadata copied.
//!
//! INT4 weights already at the asked group size (or any INT4 weight when no group size is
//! asked) are kept as they are; everything else is quantized round-to-nearest.

use std::path::Path;

use half::f16;
use safetensors::Dtype;
use serde_json::json;

use super::checkpoint::Checkpoint;
use super::gguf::{GgmlType, GgufWriter};
use super::hf_write::{config_json, rope_unpermute_order, unpermute_rope_rows, write_folder, OutTensor};
use super::safetensors::{hf_tensor_name, QMTOT_QUANT_METHOD};
use crate::config::{ModelConfig, RopeStyle};
use crate::error::{Error, Result};
use crate::model::{tensor_names, WeightSource};
use crate::quant::{Int4Matrix, WeightMatrix, INT4_GROUP_SIZES, INT8_GROUP};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OutFormat {
    Safetensors,
    Gguf,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct QuantizeOptions {
    /// INT4 group size; `None` keeps INT4 weights as they are and quantizes the rest at 128
    /// (32 for GGUF, whose Q4_1 blocks are 32 wide).
    pub group: Option<usize>,
    pub format: OutFormat,
    pub quantize_lm_head: bool,
}

/// What was written.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct QuantizeSummary {
    pub int4_tensors: usize,
    /// INT4 tensors that were quantized here (not kept from the source).
    pub requantized: usize,
    pub other_tensors: usize,
    pub bytes: u64,
}

fn is_embed_or_head(name: &str) -> bool {
    name == "token_embd.weight" || name == "output.weight"
}

/// `m` as canonical INT4 with group `group`: an INT4 `m` of that group is kept as it is
/// (unless it has an input order the output format cannot hold); anything else is quantized
/// round-to-nearest. The flag says whether it was quantized here.
fn to_int4(m: &WeightMatrix, group: usize, keeps_order: bool) -> Result<(Int4Matrix, bool)> {
    match m {
        WeightMatrix::Int4(q) if q.group == group && (keeps_order || q.input_order.is_none()) => Ok((q.clone(), false)),
        other => Ok((
            Int4Matrix::quantize_rtn(other.rows(), other.cols(), group, &other.dequant())?,
            true,
        )),
    }
}

/// Whether every value is exactly an f16.
fn exact_in_f16(v: &[f32]) -> bool {
    v.iter().all(|&x| f16::from_f32(x).to_f32() == x)
}

/// Quantizes `src` into `out` (a folder for safetensors, a file for GGUF). `progress(done,
/// total)` after each tensor.
pub fn quantize(
    src: &Checkpoint,
    out: &Path,
    opts: QuantizeOptions,
    mut progress: impl FnMut(usize, usize),
) -> Result<QuantizeSummary> {
    if let Some(g) = opts.group {
        if !INT4_GROUP_SIZES.contains(&g) {
            return Err(Error::InvalidArgument(format!(
                "group size {g} is not supported (32, 64 or 128)"
            )));
        }
    }
    let config = src.config()?;
    let names = tensor_names(&config);
    let mut summary = QuantizeSummary::default();
    match opts.format {
        OutFormat::Safetensors => {
            let tokenizer = src.tokenizer()?;
            let default = 128;
            // One group size for every INT4 tensor of the folder (its config says which).
            let group = opts.group.or(src.int4_group()).unwrap_or(default);
            let mut tensors = Vec::new();
            for (i, name) in names.iter().enumerate() {
                let hf = hf_tensor_name(name).expect("model tensor names map to Hugging Face names");
                let shape = src.shape(name).ok_or_else(|| Error::MissingTensor(name.clone()))?;
                if shape.len() == 1 {
                    tensors.push(OutTensor::f32(hf, shape, &src.vector(name)?));
                } else {
                    let m = hf_rope_order(&config, name, src.matrix(name)?)?;
                    let float = is_embed_or_head(name) && !opts.quantize_lm_head && !matches!(m, WeightMatrix::Int4(_));
                    if float {
                        let v = m.dequant();
                        tensors.push(if exact_in_f16(&v) {
                            OutTensor::f16(hf, shape, &v.iter().map(|&x| f16::from_f32(x)).collect::<Vec<_>>())
                        } else {
                            OutTensor::f32(hf, shape, &v)
                        });
                        summary.other_tensors += 1;
                    } else {
                        let (q, requantized) = to_int4(&m, group, true)?;
                        summary.int4_tensors += 1;
                        summary.requantized += usize::from(requantized);
                        let module = hf.strip_suffix(".weight").expect("weights end in .weight");
                        if let Some(order) = &q.input_order {
                            tensors.push(OutTensor {
                                name: format!("{module}.input_order"),
                                dtype: Dtype::U32,
                                shape: vec![order.len()],
                                data: order.iter().flat_map(|x| x.to_le_bytes()).collect(),
                            });
                        }
                        let gpr = q.cols / q.group;
                        tensors.push(OutTensor {
                            name: format!("{module}.packed"),
                            dtype: Dtype::U8,
                            shape: vec![q.rows, q.cols / 2],
                            data: q.packed.clone(),
                        });
                        tensors.push(OutTensor::f16(format!("{module}.scales"), vec![q.rows, gpr], &q.scales));
                        tensors.push(OutTensor::f32(format!("{module}.mins"), vec![q.rows, gpr], &q.mins));
                    }
                }
                progress(i + 1, names.len());
            }
            summary.bytes = tensors.iter().map(|t| t.data.len() as u64).sum();
            let cfg = config_json(
                &config,
                tokenizer.eos_ids(),
                Some(json!({"quant_method": QMTOT_QUANT_METHOD, "bits": 4, "group_size": group})),
            );
            write_folder(out, &cfg, &tokenizer, &tensors)?;
        }
        OutFormat::Gguf => {
            let Checkpoint::Gguf(g) = src else {
                return Err(Error::InvalidArgument(
                    "--format gguf needs a GGUF source (its tokenizer is written from the GGUF \
                     metadata); write a Hugging Face source as --format safetensors"
                        .into(),
                ));
            };
            if opts.group.is_some_and(|g| g != 32) {
                return Err(Error::InvalidArgument(
                    "GGUF Q4_1 blocks hold 32 weights: --format gguf takes --group-size 32 only".into(),
                ));
            }
            let mut w = GgufWriter::new();
            for (k, v) in &g.metadata {
                w.meta(k, v.clone());
            }
            for (i, name) in names.iter().enumerate() {
                let shape = src.shape(name).ok_or_else(|| Error::MissingTensor(name.clone()))?;
                if shape.len() == 1 {
                    w.tensor_f32(name, &shape, &src.vector(name)?)?;
                    summary.other_tensors += 1;
                } else {
                    let m = src.matrix(name)?;
                    let keep = is_embed_or_head(name) && !opts.quantize_lm_head && !matches!(m, WeightMatrix::Int4(_));
                    if keep {
                        match &m {
                            WeightMatrix::Int8(q) => {
                                let mut data = Vec::with_capacity(q.q.len() / INT8_GROUP * 34);
                                for (block, s) in q.q.chunks_exact(INT8_GROUP).zip(&q.scales) {
                                    data.extend_from_slice(&s.to_le_bytes());
                                    data.extend(block.iter().map(|&v| v as u8));
                                }
                                w.tensor(name, &shape, GgmlType::Q8_0, data)?;
                            }
                            WeightMatrix::F16(h) => {
                                w.tensor(
                                    name,
                                    &shape,
                                    GgmlType::F16,
                                    h.data.iter().flat_map(|x| x.to_le_bytes()).collect(),
                                )?;
                            }
                            other => {
                                w.tensor_f32(name, &shape, &other.dequant())?;
                            }
                        }
                        summary.other_tensors += 1;
                    } else {
                        let (q, requantized) = to_int4(&m, 32, false)?;
                        summary.int4_tensors += 1;
                        summary.requantized += usize::from(requantized);
                        w.tensor(name, &shape, GgmlType::Q4_1, int4_to_q4_1(&q))?;
                    }
                }
                progress(i + 1, names.len());
            }
            let bytes = w.to_bytes();
            summary.bytes = bytes.len() as u64;
            std::fs::write(out, bytes).map_err(|e| Error::io(out, e))?;
        }
    }
    Ok(summary)
}

/// Hugging Face folders rotate Q/K in the half-split convention; a GGUF source stores W_q and
/// W_k for adjacent pairs, so their rows are put back in Hugging Face order (exactly: whole
/// rows move).
fn hf_rope_order(c: &ModelConfig, name: &str, m: WeightMatrix) -> Result<WeightMatrix> {
    let heads = if name.ends_with(".attn_q.weight") {
        c.n_heads
    } else if name.ends_with(".attn_k.weight") {
        c.n_kv_heads
    } else {
        return Ok(m);
    };
    if c.rope_style == RopeStyle::HalfSplit {
        return Ok(m);
    }
    let order = rope_unpermute_order(heads, c.head_dim);
    Ok(match m {
        WeightMatrix::Int4(q) => WeightMatrix::Int4(q.select_rows(&order)?),
        other => {
            let (rows, cols) = (other.rows(), other.cols());
            let v = unpermute_rope_rows(&other.dequant(), heads, c.head_dim, cols);
            WeightMatrix::Dense(crate::quant::DenseMatrix::new(rows, cols, v)?)
        }
    })
}

/// Canonical INT4 with group 32 as GGUF Q4_1 blocks (`d` f16, `m` f16, 16 bytes: element `j`
/// in the low nibble of byte `j`, element `j + 16` in the high nibble). `m` is rounded to f16.
/// `q` has group 32 (so whole blocks: `Int4Matrix::new` checks that the group divides the
/// columns) and no input order (`to_int4` requantizes such layers for GGUF).
fn int4_to_q4_1(q: &Int4Matrix) -> Vec<u8> {
    debug_assert!(q.group == 32 && q.input_order.is_none());
    let gpr = q.cols / 32;
    let mut out = Vec::with_capacity(q.rows * gpr * 20);
    for r in 0..q.rows {
        for g in 0..gpr {
            let i = r * gpr + g;
            out.extend_from_slice(&q.scales[i].to_le_bytes());
            out.extend_from_slice(&f16::from_f32(q.mins[i]).to_le_bytes());
            for j in 0..16 {
                let c = g * 32 + j;
                out.push(q.q(r, c) | (q.q(r, c + 16) << 4));
            }
        }
    }
    out
}
