//! GPTQ INT4 checkpoints (the AutoGPTQ / GPTQModel tensor layout) converted without loss into
//! canonical INT4 ([`crate::quant::Int4Matrix`]).
//!
//! # Tensors of one linear layer
//!
//! A layer `W[out, in]` quantized with group size `g` is stored as four tensors (`in` must be a
//! multiple of 8 and of `g`, `out` a multiple of 8):
//!
//! ```text
//! qweight  i32 [in / 8, out]      nibble k of qweight[i, o]  = q of input 8i + k, output o
//! qzeros   i32 [in / g, out / 8]  nibble k of qzeros[G, i]   = stored zero of group G, output 8i + k
//! scales   f16 [in / g, out]      scales[G, o]               = scale of group G, output o
//! g_idx    i32 [in]   (optional)  g_idx[c]                   = group of input c (c / g when absent)
//! ```
//!
//! "Nibble k" is bits `4k..4k+3` of the word read as a u32 (the sign bit of the i32 is simply
//! the top bit of nibble 7). So `qweight` packs eight consecutive *inputs* of one output into a
//! word, while `qzeros` packs eight consecutive *outputs* of one group. The weights are
//!
//! ```text
//!     w[o, c] = scales[G, o] · (q[c, o] − z[G, o]),      G = g_idx[c]
//! ```
//!
//! where the zero `z` is the stored nibble plus one in the classic "v1" checkpoints
//! (`checkpoint_format` "gptq", or absent: AutoGPTQ subtracts one before packing, so v1 zeros
//! run 1..=16 and a stored 15 means 16) and the stored nibble itself in "v2" (`gptq_v2`).
//! Symmetric checkpoints (`sym`) are the special case z = 8 (a stored 7 in v1); nothing else
//! changes.
//!
//! # Into canonical INT4
//!
//! Per (output row o, group G): `s = scales[G, o]` (the same f16 bits), `m = −(s·z)` in f32,
//! and the same nibbles re-packed two per byte along the row. `s·q + m` then equals
//! `s·(q − z)` exactly; see [`gptq_to_int4`] for why.
//!
//! # Act-order (`desc_act`)
//!
//! With act-order the quantizer visited the input columns in a data-dependent order, so a
//! group is a scattered set of columns, named by `g_idx`. Canonical INT4 needs contiguous
//! groups, so the conversion sorts the columns stably by `g_idx` and returns that permutation:
//! canonical column `j` is original column `perm[j]`, and every group must then hold exactly
//! `g` columns. The model permutes each activation row the same way
//! ([`permute_input`]: `x_perm[j] = x[perm[j]]`) before the matmul, since
//! `Σ_c W[o, c]·x[c] = Σ_j W[o, perm[j]]·x[perm[j]]`.
//!
//! [`pack_gptq`] writes the same layout from unpacked values (for tests and for writing tiny
//! checkpoints); it shares no code with the unpacking path, so a round trip checks the layout.

use half::f16;
use rayon::prelude::*;

use crate::error::{Error, Result};
use crate::quant::{Int4Matrix, INT4_GROUP_SIZES};

/// One tensor of a checkpoint read into host memory: row-major `data` of shape `shape`.
/// Also used by [`super::awq`].
#[derive(Clone, Copy, Debug)]
pub struct HostTensor<'a, T> {
    pub shape: &'a [usize],
    pub data: &'a [T],
}

impl<'a, T> HostTensor<'a, T> {
    pub fn new(shape: &'a [usize], data: &'a [T]) -> Self {
        Self { shape, data }
    }
}

/// Checks that `t` has exactly the shape `expected` and holds as many values as that shape.
pub(super) fn check_tensor<T>(name: &str, t: &HostTensor<'_, T>, expected: &[usize]) -> Result<()> {
    if t.shape != expected {
        return Err(Error::ShapeMismatch {
            tensor: name.to_string(),
            expected: expected.to_vec(),
            found: t.shape.to_vec(),
        });
    }
    let n = expected.iter().try_fold(1usize, |a, &d| a.checked_mul(d));
    if n != Some(t.data.len()) {
        return Err(Error::BadTensor {
            tensor: name.to_string(),
            reason: format!(
                "holds {} values, but its shape {expected:?} needs {}",
                t.data.len(),
                n.map_or_else(|| "more than usize::MAX".to_string(), |n| n.to_string())
            ),
        });
    }
    Ok(())
}

/// The quantization settings object: `v` itself (a `quantize_config.json` /
/// `quant_config.json`, or `config.json`'s `quantization_config`), or, when `v` is a whole
/// `config.json`, its `quantization_config`.
pub(super) fn quant_object<'v>(
    v: &'v serde_json::Value,
    what: &str,
) -> Result<&'v serde_json::Map<String, serde_json::Value>> {
    let obj = v
        .as_object()
        .ok_or_else(|| Error::InvalidConfig(format!("{what} quantization config is not a JSON object")))?;
    match obj.get("quantization_config") {
        Some(serde_json::Value::Object(inner)) => Ok(inner),
        _ => Ok(obj),
    }
}

/// A non-negative integer key; `None` when absent or null.
pub(super) fn json_uint(
    obj: &serde_json::Map<String, serde_json::Value>,
    key: &str,
    what: &str,
) -> Result<Option<u64>> {
    match obj.get(key) {
        None | Some(serde_json::Value::Null) => Ok(None),
        Some(v) => v.as_u64().map(Some).ok_or_else(|| {
            Error::InvalidConfig(format!(
                "{what} quantization config: {key} = {v} is not a non-negative integer"
            ))
        }),
    }
}

/// A boolean key; `default` when absent or null.
pub(super) fn json_bool(
    obj: &serde_json::Map<String, serde_json::Value>,
    key: &str,
    default: bool,
    what: &str,
) -> Result<bool> {
    match obj.get(key) {
        None | Some(serde_json::Value::Null) => Ok(default),
        Some(v) => v
            .as_bool()
            .ok_or_else(|| Error::InvalidConfig(format!("{what} quantization config: {key} = {v} is not a boolean"))),
    }
}

/// A string key; `None` when absent or null.
pub(super) fn json_str<'v>(
    obj: &'v serde_json::Map<String, serde_json::Value>,
    key: &str,
    what: &str,
) -> Result<Option<&'v str>> {
    match obj.get(key) {
        None | Some(serde_json::Value::Null) => Ok(None),
        Some(v) => v
            .as_str()
            .map(Some)
            .ok_or_else(|| Error::InvalidConfig(format!("{what} quantization config: {key} = {v} is not a string"))),
    }
}

/// The group size under the first of `keys` present: a positive integer, with −1 ("one group
/// per row") rejected by name.
pub(super) fn json_group_size(
    obj: &serde_json::Map<String, serde_json::Value>,
    keys: &[&str],
    what: &str,
) -> Result<usize> {
    let Some((key, v)) = keys.iter().find_map(|k| match obj.get(*k) {
        None | Some(serde_json::Value::Null) => None,
        Some(v) => Some((*k, v)),
    }) else {
        return Err(Error::InvalidConfig(format!(
            "{what} quantization config: {} is missing",
            keys.join(" / ")
        )));
    };
    match v.as_i64() {
        Some(-1) => Err(Error::UnsupportedQuantization(format!(
            "{what} {key} -1 (one group per row) is not supported; qmtot loads group sizes {INT4_GROUP_SIZES:?}"
        ))),
        Some(g) if g > 0 => usize::try_from(g)
            .map_err(|_| Error::InvalidConfig(format!("{what} quantization config: {key} = {g} is too large"))),
        _ => Err(Error::InvalidConfig(format!(
            "{what} quantization config: {key} = {v} is not a positive integer"
        ))),
    }
}

/// GPTQ quantization settings of a checkpoint.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct GptqConfig {
    /// Bits per weight; only 4 is supported.
    pub bits: u32,
    /// Inputs per group `g`, one of [`INT4_GROUP_SIZES`].
    pub group_size: usize,
    /// Symmetric quantization (all zeros 8). Informational: the zeros are read either way.
    pub sym: bool,
    /// Act-order: groups follow `g_idx` rather than `c / g`; `g_idx` is then required. A
    /// `g_idx` that is present is followed either way (it is what defines the groups).
    pub desc_act: bool,
    /// Stored zeros are the true zero minus one (`checkpoint_format` "gptq", the default).
    pub v1_zeros: bool,
}

impl GptqConfig {
    /// Reads `quantize_config.json` or `config.json`'s `quantization_config` (a whole
    /// `config.json` is accepted too). Keys: `bits`, `group_size` (required), `sym` (default
    /// true), `desc_act` (default false), `checkpoint_format` ("gptq" = v1 zeros, the default,
    /// or "gptq_v2"), `quant_method` (must be "gptq" when present). GPTQModel's `pack_dtype`
    /// must be "int32", and per-module `dynamic` overrides are rejected.
    pub fn from_json(v: &serde_json::Value) -> Result<Self> {
        const WHAT: &str = "GPTQ";
        let bad = |m: String| Error::InvalidConfig(format!("GPTQ quantization config: {m}"));
        let unsupported = |m: String| Error::UnsupportedQuantization(format!("GPTQ quantization config: {m}"));
        let obj = quant_object(v, WHAT)?;
        if let Some(method) = json_str(obj, "quant_method", WHAT)? {
            if !method.eq_ignore_ascii_case("gptq") {
                return Err(unsupported(format!("quant_method is {method:?}, expected \"gptq\"")));
            }
        }
        let bits = json_uint(obj, "bits", WHAT)?.ok_or_else(|| bad("bits is missing".into()))?;
        let bits = u32::try_from(bits).map_err(|_| bad(format!("bits = {bits} is too large")))?;
        let group_size = json_group_size(obj, &["group_size"], WHAT)?;
        let v1_zeros = match json_str(obj, "checkpoint_format", WHAT)? {
            None => true,
            Some(f) if f.eq_ignore_ascii_case("gptq") => true,
            Some(f) if f.eq_ignore_ascii_case("gptq_v2") => false,
            Some(f) => {
                return Err(unsupported(format!(
                    "checkpoint_format {f:?} is not supported (qmtot loads \"gptq\" and \"gptq_v2\")"
                )))
            }
        };
        if json_bool(obj, "is_marlin_format", false, WHAT)? {
            return Err(unsupported(
                "Marlin-packed checkpoints (is_marlin_format) are not supported".into(),
            ));
        }
        if let Some(p) = json_str(obj, "pack_dtype", WHAT)? {
            if p != "int32" && p != "torch.int32" {
                return Err(unsupported(format!(
                    "pack_dtype {p:?} is not supported (qmtot reads int32 packing)"
                )));
            }
        }
        match obj.get("dynamic") {
            None | Some(serde_json::Value::Null) => {}
            Some(serde_json::Value::Object(m)) if m.is_empty() => {}
            Some(_) => return Err(unsupported("per-module overrides (dynamic) are not supported".into())),
        }
        let cfg = GptqConfig {
            bits,
            group_size,
            sym: json_bool(obj, "sym", true, WHAT)?,
            desc_act: json_bool(obj, "desc_act", false, WHAT)?,
            v1_zeros,
        };
        cfg.validate()?;
        Ok(cfg)
    }

    /// Only 4-bit GPTQ with a group size of [`INT4_GROUP_SIZES`] maps onto canonical INT4.
    pub fn validate(&self) -> Result<()> {
        if self.bits != 4 {
            return Err(Error::UnsupportedQuantization(format!(
                "GPTQ with {} bits is not supported; qmtot loads 4-bit GPTQ only",
                self.bits
            )));
        }
        if !INT4_GROUP_SIZES.contains(&self.group_size) {
            return Err(Error::UnsupportedQuantization(format!(
                "GPTQ group_size {} is not supported; qmtot loads group sizes {INT4_GROUP_SIZES:?}",
                self.group_size
            )));
        }
        Ok(())
    }
}

/// The raw tensors of one GPTQ linear layer `W[out, in]` with group size `g`.
#[derive(Clone, Copy, Debug)]
pub struct GptqTensors<'a> {
    /// i32 `[in / 8, out]`.
    pub qweight: HostTensor<'a, i32>,
    /// i32 `[in / g, out / 8]`.
    pub qzeros: HostTensor<'a, i32>,
    /// f16 `[in / g, out]`.
    pub scales: HostTensor<'a, f16>,
    /// i32 `[in]`, optional (required with act-order).
    pub g_idx: Option<HostTensor<'a, i32>>,
}

/// A converted GPTQ layer.
#[derive(Clone, Debug, PartialEq)]
pub struct GptqInt4 {
    /// Canonical `[out, in]`; with act-order its columns are the permuted inputs.
    pub matrix: Int4Matrix,
    /// Act-order only: canonical column `j` is original input `perm[j]`; feed the matrix
    /// [`permute_input`]`(perm, x)`. `None` when the groups were already contiguous.
    pub perm: Option<Vec<u32>>,
}

/// Whether `g_idx` (i32 `[in]`) is the contiguous grouping `g_idx[c] = c / group_size`.
pub fn is_trivial_g_idx(g_idx: &[i32], group_size: usize) -> bool {
    group_size > 0
        && g_idx
            .iter()
            .enumerate()
            .all(|(c, &g)| usize::try_from(g).is_ok_and(|g| g == c / group_size))
}

/// The act-order permutation of `g_idx` (i32 `[in]`, `in` a multiple of `group_size`): the
/// input columns sorted stably by group, so that canonical column `j` is original column
/// `perm[j]` and group `G` is canonical columns `G·g .. (G+1)·g`. `None` when `g_idx` is
/// already trivial. Errors (naming `tensor`, the g_idx tensor) when a value is outside
/// `0..in / g` or a group does not hold exactly `g` columns.
pub fn act_order_perm(tensor: &str, g_idx: &[i32], group_size: usize) -> Result<Option<Vec<u32>>> {
    let cols = g_idx.len();
    if group_size == 0 || cols % group_size != 0 {
        return Err(Error::BadTensor {
            tensor: tensor.to_string(),
            reason: format!("{cols} inputs are not a multiple of the group size {group_size}"),
        });
    }
    if u32::try_from(cols).is_err() {
        return Err(Error::BadTensor {
            tensor: tensor.to_string(),
            reason: format!("{cols} inputs do not fit a u32 permutation"),
        });
    }
    let groups = cols / group_size;
    let mut count = vec![0usize; groups];
    for (c, &g) in g_idx.iter().enumerate() {
        match usize::try_from(g) {
            Ok(g) if g < groups => count[g] += 1,
            _ => {
                return Err(Error::BadTensor {
                    tensor: tensor.to_string(),
                    reason: format!("input {c} is in group {g}, outside 0..{groups}"),
                })
            }
        }
    }
    if let Some((g, &n)) = count.iter().enumerate().find(|(_, &n)| n != group_size) {
        return Err(Error::BadTensor {
            tensor: tensor.to_string(),
            reason: format!("group {g} holds {n} inputs, expected exactly {group_size} (the group size)"),
        });
    }
    if is_trivial_g_idx(g_idx, group_size) {
        return Ok(None);
    }
    // Stable counting sort: every group has exactly `group_size` slots.
    let mut next: Vec<usize> = (0..groups).map(|g| g * group_size).collect();
    let mut perm = vec![0u32; cols];
    for (c, &g) in g_idx.iter().enumerate() {
        let g = g as usize; // checked above
        perm[next[g]] = c as u32;
        next[g] += 1;
    }
    Ok(Some(perm))
}

/// Applies an act-order permutation to one activation row: `out[j] = x[perm[j]]`. `perm`,
/// `x` and `out` all have length `in`. Panics if the lengths differ or `perm` holds an index
/// `≥ in` (a programming error: [`gptq_to_int4`] only returns valid permutations).
pub fn permute_input(perm: &[u32], x: &[f32], out: &mut [f32]) {
    assert_eq!(
        perm.len(),
        x.len(),
        "permutation of {} inputs for a row of {}",
        perm.len(),
        x.len()
    );
    assert_eq!(out.len(), x.len(), "output row of {} for {} inputs", out.len(), x.len());
    for (o, &p) in out.iter_mut().zip(perm) {
        *o = x[p as usize];
    }
}

/// Converts one GPTQ layer `W[out_features, in_features]` into canonical INT4.
///
/// `layer` is the tensor-name prefix (e.g. `model.layers.0.self_attn.q_proj`); errors name
/// `{layer}.qweight` etc. Shapes are checked against `in_features` / `out_features` /
/// `cfg.group_size` (see the module doc); nothing here panics on bad input.
///
/// Per (row o, group G) the canonical scale is `scales[G, o]` and the min `m = −(s·z)`.
/// Exactness: `s` is an f16, i.e. `s = M·2^e` with an integer `|M| < 2^11`, and `q`, `z` are
/// integers in `0..=16`. So `s·q`, `s·z` and `s·(q − z)` are `M·k·2^e` with `|M·k| < 2^15`,
/// all exactly representable in f32's 24-bit significand (f16 subnormals are normal f32
/// values), and `s·q + (−(s·z)) = M·(q − z)·2^e` is exact too: the canonical dequant
/// `s·q + m` is the reference `s·(q − z)` bit for bit, except that an exact zero result is
/// +0.0 here where the reference may give −0.0 (when `s ≤ 0`).
pub fn gptq_to_int4(
    layer: &str,
    in_features: usize,
    out_features: usize,
    cfg: &GptqConfig,
    t: &GptqTensors<'_>,
) -> Result<GptqInt4> {
    cfg.validate()?;
    let (cols, rows, g) = (in_features, out_features, cfg.group_size);
    let dims_err = |reason: String| Error::BadTensor {
        tensor: layer.to_string(),
        reason,
    };
    if cols == 0 || rows == 0 {
        return Err(dims_err(format!("GPTQ layer of shape [{rows}, {cols}] is empty")));
    }
    if cols % 8 != 0 {
        return Err(dims_err(format!(
            "GPTQ packs 8 inputs per int32, but the layer has {cols} inputs (not a multiple of 8)"
        )));
    }
    if rows % 8 != 0 {
        return Err(dims_err(format!(
            "GPTQ packs 8 outputs per int32 of qzeros, but the layer has {rows} outputs (not a multiple of 8)"
        )));
    }
    if cols % g != 0 {
        return Err(dims_err(format!(
            "{cols} inputs are not a multiple of the group size {g}"
        )));
    }
    let groups = cols / g;
    check_tensor(&format!("{layer}.qweight"), &t.qweight, &[cols / 8, rows])?;
    check_tensor(&format!("{layer}.qzeros"), &t.qzeros, &[groups, rows / 8])?;
    check_tensor(&format!("{layer}.scales"), &t.scales, &[groups, rows])?;
    let perm = match &t.g_idx {
        Some(gi) => {
            let name = format!("{layer}.g_idx");
            check_tensor(&name, gi, &[cols])?;
            act_order_perm(&name, gi.data, g)?
        }
        None if cfg.desc_act => {
            return Err(Error::MissingTensor(format!(
                "{layer}.g_idx (the checkpoint uses act-order, desc_act = true)"
            )))
        }
        None => None,
    };

    let qweight = t.qweight.data;
    let mut packed = vec![0u8; rows * cols / 2];
    match &perm {
        None => {
            // Word qweight[i, o] holds inputs 8i..8i+8 of row o, input 8i+k in bits 4k..4k+3:
            // its little-endian bytes are exactly canonical bytes 4i..4i+4 of row o (input 2b
            // in the low nibble of byte b, 2b+1 in the high one).
            packed.par_chunks_mut(cols / 2).enumerate().for_each(|(o, row)| {
                for (i, bytes) in row.chunks_exact_mut(4).enumerate() {
                    bytes.copy_from_slice(&(qweight[i * rows + o] as u32).to_le_bytes());
                }
            });
        }
        Some(perm) => {
            packed.par_chunks_mut(cols / 2).enumerate().for_each(|(o, row)| {
                let nibble = |c: usize| ((qweight[(c / 8) * rows + o] as u32) >> (4 * (c % 8))) as u8 & 0x0f;
                for (b, byte) in row.iter_mut().enumerate() {
                    *byte = nibble(perm[2 * b] as usize) | (nibble(perm[2 * b + 1] as usize) << 4);
                }
            });
        }
    }

    let (qzeros, src_scales) = (t.qzeros.data, t.scales.data);
    let zero_offset = u32::from(cfg.v1_zeros);
    let mut scales = Vec::with_capacity(rows * groups);
    let mut mins = Vec::with_capacity(rows * groups);
    for o in 0..rows {
        for grp in 0..groups {
            let stored = ((qzeros[grp * (rows / 8) + o / 8] as u32) >> (4 * (o % 8))) & 0x0f;
            let z = (stored + zero_offset) as f32;
            let s = src_scales[grp * rows + o];
            scales.push(s);
            mins.push(-(s.to_f32() * z));
        }
    }
    let matrix = Int4Matrix::new(rows, cols, g, packed, scales, mins)?;
    Ok(GptqInt4 { matrix, perm })
}

/// GPTQ tensors written by [`pack_gptq`], with their shapes.
#[derive(Clone, Debug, PartialEq)]
pub struct GptqPacked {
    /// i32 `[in / 8, out]`.
    pub qweight: Vec<i32>,
    pub qweight_shape: [usize; 2],
    /// i32 `[in / g, out / 8]`.
    pub qzeros: Vec<i32>,
    pub qzeros_shape: [usize; 2],
    /// f16 `[in / g, out]`.
    pub scales: Vec<f16>,
    pub scales_shape: [usize; 2],
    /// i32 `[in]` (written even for contiguous groups, as AutoGPTQ does).
    pub g_idx: Vec<i32>,
    pub g_idx_shape: [usize; 1],
}

impl GptqPacked {
    /// Borrowed views for [`gptq_to_int4`], `g_idx` included.
    pub fn tensors(&self) -> GptqTensors<'_> {
        GptqTensors {
            qweight: HostTensor::new(&self.qweight_shape, &self.qweight),
            qzeros: HostTensor::new(&self.qzeros_shape, &self.qzeros),
            scales: HostTensor::new(&self.scales_shape, &self.scales),
            g_idx: Some(HostTensor::new(&self.g_idx_shape, &self.g_idx)),
        }
    }
}

/// Packs a GPTQ layer `W[out_features, in_features]` with group size `group_size`:
///
/// * `q`: u8 `[out, in]`, values `0..=15`, in the original (checkpoint) column order;
/// * `zeros`: u8 `[in / g, out]`, the true zeros: `0..=15` for v2, `1..=16` for v1
///   (`v1_zeros`, stored minus one);
/// * `scales`: f16 `[in / g, out]`;
/// * `g_idx`: optional `[in]` group of each input (each `< in / g`); `None` writes `c / g`.
///
/// so that `w[o, c] = scales[G, o]·(q[o, c] − zeros[G, o])` with `G = g_idx[c]`. Errors on
/// inconsistent lengths or out-of-range values.
#[allow(clippy::too_many_arguments)]
pub fn pack_gptq(
    in_features: usize,
    out_features: usize,
    group_size: usize,
    q: &[u8],
    zeros: &[u8],
    scales: &[f16],
    g_idx: Option<&[u32]>,
    v1_zeros: bool,
) -> Result<GptqPacked> {
    let (n_in, n_out, g) = (in_features, out_features, group_size);
    let bad = |m: String| Error::InvalidArgument(format!("pack_gptq: {m}"));
    if n_in % 8 != 0 || n_out % 8 != 0 || g == 0 || n_in % g != 0 {
        return Err(bad(format!(
            "[{n_out}, {n_in}] with group {g}: inputs and outputs must be multiples of 8, inputs of the group"
        )));
    }
    let n_groups = n_in / g;
    if q.len() != n_out * n_in || zeros.len() != n_groups * n_out || scales.len() != n_groups * n_out {
        return Err(bad(format!(
            "q {} (expected {}), zeros {} and scales {} (expected {})",
            q.len(),
            n_out * n_in,
            zeros.len(),
            scales.len(),
            n_groups * n_out
        )));
    }
    if let Some(v) = q.iter().find(|&&v| v > 15) {
        return Err(bad(format!("q value {v} does not fit 4 bits")));
    }
    let zero_range = if v1_zeros { 1..=16 } else { 0..=15 };
    if let Some(z) = zeros.iter().find(|z| !zero_range.contains(*z)) {
        return Err(bad(format!("zero {z} is outside {zero_range:?}")));
    }
    let g_idx: Vec<i32> = match g_idx {
        Some(gi) => {
            if gi.len() != n_in {
                return Err(bad(format!("g_idx has {} entries for {n_in} inputs", gi.len())));
            }
            if let Some(v) = gi.iter().find(|&&v| v as usize >= n_groups) {
                return Err(bad(format!("g_idx value {v} is outside 0..{n_groups}")));
            }
            gi.iter().map(|&v| v as i32).collect()
        }
        None => (0..n_in).map(|c| (c / g) as i32).collect(),
    };

    // qweight[c / 8, o] gets q[o, c] at bit 4·(c mod 8).
    let mut qweight = vec![0u32; n_in / 8 * n_out];
    for o in 0..n_out {
        for c in 0..n_in {
            qweight[(c / 8) * n_out + o] |= u32::from(q[o * n_in + c]) << (4 * (c % 8));
        }
    }
    // qzeros[G, o / 8] gets the stored zero of (G, o) at bit 4·(o mod 8).
    let mut qzeros = vec![0u32; n_groups * (n_out / 8)];
    for grp in 0..n_groups {
        for o in 0..n_out {
            let stored = u32::from(zeros[grp * n_out + o]) - u32::from(v1_zeros);
            qzeros[grp * (n_out / 8) + o / 8] |= stored << (4 * (o % 8));
        }
    }
    Ok(GptqPacked {
        qweight: qweight.into_iter().map(|w| w as i32).collect(),
        qweight_shape: [n_in / 8, n_out],
        qzeros: qzeros.into_iter().map(|w| w as i32).collect(),
        qzeros_shape: [n_groups, n_out / 8],
        scales: scales.to_vec(),
        scales_shape: [n_groups, n_out],
        g_idx,
        g_idx_shape: [n_in],
    })
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;

    /// xorshift64: deterministic test randomness without a dependency (also for the AWQ
    /// tests).
    pub(in crate::formats) struct Rng(u64);

    impl Rng {
        pub(in crate::formats) fn new(seed: u64) -> Self {
            Rng(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1)
        }
        pub(in crate::formats) fn next(&mut self) -> u64 {
            let mut x = self.0;
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            self.0 = x;
            x
        }
        pub(in crate::formats) fn below(&mut self, n: usize) -> usize {
            (self.next() % n as u64) as usize
        }
        /// A random f16 scale: either sign, magnitudes from subnormal to ~2, and exact zero.
        pub(in crate::formats) fn scale(&mut self) -> f16 {
            match self.below(20) {
                0 => f16::ZERO,
                1 => f16::from_bits(self.below(0x400) as u16 | ((self.below(2) as u16) << 15)),
                _ => {
                    let mag = (self.below(1 << 16) as f32 / 65536.0) * 2f32.powi(self.below(12) as i32 - 10);
                    f16::from_f32(if self.below(2) == 0 { mag } else { -mag })
                }
            }
        }
    }

    /// Equal bits, or both zeros of either sign (`s·q + m` gives +0 where `s·(q − z)` may
    /// give −0; see [`gptq_to_int4`]).
    pub(in crate::formats) fn same_f32(a: f32, b: f32) -> bool {
        a.to_bits() == b.to_bits() || (a == 0.0 && b == 0.0)
    }

    fn shuffle<T>(rng: &mut Rng, v: &mut [T]) {
        for i in (1..v.len()).rev() {
            v.swap(i, rng.below(i + 1));
        }
    }

    /// A random layer: q `[out, in]`, true zeros `[groups, out]`, scales `[groups, out]`,
    /// g_idx `[in]` (contiguous or a shuffled grouping with exactly g columns per group).
    struct Layer {
        n_in: usize,
        n_out: usize,
        q: Vec<u8>,
        zeros: Vec<u8>,
        scales: Vec<f16>,
        g_idx: Vec<u32>,
    }

    fn random_layer(rng: &mut Rng, n_in: usize, n_out: usize, g: usize, sym: bool, v1: bool, act: bool) -> Layer {
        let groups = n_in / g;
        let q = (0..n_out * n_in).map(|_| rng.below(16) as u8).collect();
        let zeros = (0..groups * n_out)
            .map(|i| {
                if sym {
                    8
                } else if v1 {
                    // Include the v1-only zero 16 (stored 15) explicitly.
                    if i % 7 == 0 {
                        16
                    } else {
                        1 + rng.below(16) as u8
                    }
                } else {
                    rng.below(16) as u8
                }
            })
            .collect();
        let scales = (0..groups * n_out).map(|_| rng.scale()).collect();
        let mut g_idx: Vec<u32> = (0..n_in).map(|c| (c / g) as u32).collect();
        if act {
            shuffle(rng, &mut g_idx);
        }
        Layer {
            n_in,
            n_out,
            q,
            zeros,
            scales,
            g_idx,
        }
    }

    /// The GPTQ reference `f32(s)·(q − z)` from the unpacked values, `[out, in]`.
    fn reference(l: &Layer) -> Vec<f32> {
        let mut w = vec![0f32; l.n_out * l.n_in];
        for o in 0..l.n_out {
            for c in 0..l.n_in {
                let grp = l.g_idx[c] as usize;
                let s = l.scales[grp * l.n_out + o].to_f32();
                let z = l.zeros[grp * l.n_out + o] as f32;
                w[o * l.n_in + c] = s * (l.q[o * l.n_in + c] as f32 - z);
            }
        }
        w
    }

    fn config(g: usize, sym: bool, act: bool, v1: bool) -> GptqConfig {
        GptqConfig {
            bits: 4,
            group_size: g,
            sym,
            desc_act: act,
            v1_zeros: v1,
        }
    }

    fn check_random(seed: u64, n_in: usize, n_out: usize, g: usize, sym: bool, v1: bool, act: bool) {
        let mut rng = Rng::new(seed);
        let l = random_layer(&mut rng, n_in, n_out, g, sym, v1, act);
        let gi = act.then_some(&l.g_idx[..]);
        let p = pack_gptq(n_in, n_out, g, &l.q, &l.zeros, &l.scales, gi, v1).unwrap();
        if sym {
            let stored = if v1 { 0x7777_7777u32 } else { 0x8888_8888 };
            assert!(p.qzeros.iter().all(|&w| w as u32 == stored));
        }
        let mut t = p.tensors();
        if !act && seed % 2 == 0 {
            t.g_idx = None; // contiguous groups work with and without g_idx
        }
        let out = gptq_to_int4("layer", n_in, n_out, &config(g, sym, act, v1), &t).unwrap();
        let m = &out.matrix;
        assert_eq!((m.rows, m.cols, m.group), (n_out, n_in, g));
        let perm: Vec<usize> = match &out.perm {
            Some(p) => {
                assert!(act);
                p.iter().map(|&c| c as usize).collect()
            }
            None => {
                assert!(!act, "a shuffled g_idx must give a permutation");
                (0..n_in).collect()
            }
        };
        let w = reference(&l);
        let mut row = vec![0f32; n_in];
        for o in 0..n_out {
            m.dequant_row(o, &mut row);
            for (j, &got) in row.iter().enumerate() {
                let c = perm[j];
                let want = w[o * n_in + c];
                assert!(
                    same_f32(got, want),
                    "seed {seed} sym {sym} v1 {v1} act {act}: row {o} canonical col {j} (input {c}): {got:e} vs {want:e}"
                );
            }
        }
    }

    #[test]
    fn random_layers_dequantize_bit_exactly() {
        let mut seed = 1;
        for (n_in, n_out, g) in [(128, 16, 32), (256, 24, 64), (256, 8, 128), (384, 40, 128)] {
            for sym in [false, true] {
                for v1 in [false, true] {
                    for act in [false, true] {
                        check_random(seed, n_in, n_out, g, sym, v1, act);
                        seed += 1;
                    }
                }
            }
        }
    }

    #[test]
    fn act_order_matmul_matches_reference() {
        let (n_in, n_out, g) = (512, 32, 64);
        let mut rng = Rng::new(99);
        let l = random_layer(&mut rng, n_in, n_out, g, false, true, true);
        let p = pack_gptq(n_in, n_out, g, &l.q, &l.zeros, &l.scales, Some(&l.g_idx), true).unwrap();
        let out = gptq_to_int4("layer", n_in, n_out, &config(g, false, true, true), &p.tensors()).unwrap();
        let perm = out.perm.as_ref().expect("act-order permutation");
        let x: Vec<f32> = (0..n_in).map(|_| rng.below(2001) as f32 / 1000.0 - 1.0).collect();
        let mut xp = vec![0f32; n_in];
        permute_input(perm, &x, &mut xp);
        let w = reference(&l);
        let mut row = vec![0f32; n_in];
        for o in 0..n_out {
            let want: f32 = (0..n_in).map(|c| w[o * n_in + c] * x[c]).sum();
            let scale: f32 = (0..n_in).map(|c| (w[o * n_in + c] * x[c]).abs()).sum();
            out.matrix.dequant_row(o, &mut row);
            let got: f32 = row.iter().zip(&xp).map(|(a, b)| a * b).sum();
            assert!(
                (got - want).abs() <= 1e-5 * scale.max(f32::MIN_POSITIVE),
                "row {o}: {got} vs {want} (|w|·|x| {scale})"
            );
        }
    }

    #[test]
    fn hand_packed_words_land_on_the_right_elements() {
        // in 32, out 8, g 32: qweight [4, 8], qzeros [1, 1], scales [1, 8].
        let (n_in, n_out) = (32, 8);
        let mut qweight = vec![0i32; 4 * 8];
        qweight[8 + 3] = 0x7654_3210; // qweight[1, 3]: inputs 8..16 of output 3 get 0..7
        qweight[2 * 8 + 5] = 0xfedc_ba98u32 as i32; // qweight[2, 5]: inputs 16..24 of output 5 get 8..15
        let qzeros = [0x7654_321fu32 as i32]; // group 0: output k has stored zero k, output 0 has 15
        let scales: Vec<f16> = (0..8).map(|o| f16::from_f32(0.25 * (o + 1) as f32)).collect();
        let t = GptqTensors {
            qweight: HostTensor::new(&[4, 8], &qweight),
            qzeros: HostTensor::new(&[1, 1], &qzeros),
            scales: HostTensor::new(&[1, 8], &scales),
            g_idx: None,
        };
        for v1 in [false, true] {
            let m = gptq_to_int4("l", n_in, n_out, &config(32, false, false, v1), &t)
                .unwrap()
                .matrix;
            for (o, &s) in scales.iter().enumerate() {
                for c in 0..n_in {
                    let want = match (o, c) {
                        (3, 8..=15) => (c - 8) as u8,
                        (5, 16..=23) => (c - 8) as u8,
                        _ => 0,
                    };
                    assert_eq!(m.q(o, c), want, "q[{o}, {c}]");
                }
                let stored = if o == 0 { 15 } else { o as u32 };
                let z = (stored + u32::from(v1)) as f32; // v1: a stored 15 is the zero 16
                assert_eq!(m.scales[o], s);
                assert_eq!(m.mins[o], -(s.to_f32() * z), "row {o} v1 {v1}");
            }
        }
        // Spot values: row 0 with v1 has zero 16, so q = 0 gives −16·s.
        let m = gptq_to_int4("l", n_in, n_out, &config(32, false, false, true), &t)
            .unwrap()
            .matrix;
        let mut row = vec![0f32; n_in];
        m.dequant_row(0, &mut row);
        assert_eq!(row[0], -16.0 * 0.25);
        m.dequant_row(5, &mut row);
        assert_eq!(row[23], 1.5 * (15.0 - 6.0));
    }

    #[test]
    fn packer_writes_the_published_layout() {
        // One output block and one group: q[3, 8 + k] = k, zeros[0, k] = k (v2).
        let (n_in, n_out) = (32, 8);
        let mut q = vec![0u8; n_out * n_in];
        for k in 0..8 {
            q[3 * n_in + 8 + k] = k as u8;
        }
        let zeros: Vec<u8> = (0..8).collect();
        let p = pack_gptq(n_in, n_out, 32, &q, &zeros, &[f16::ONE; 8], None, false).unwrap();
        assert_eq!(p.qweight_shape, [4, 8]);
        assert_eq!(p.qweight[8 + 3], 0x7654_3210);
        assert_eq!(p.qweight.iter().filter(|&&w| w != 0).count(), 1);
        assert_eq!(p.qzeros, vec![0x7654_3210]);
        assert_eq!(p.g_idx, vec![0; 32]);
        // v1 stores zero − 1.
        let zeros: Vec<u8> = (1..=8).collect();
        let p = pack_gptq(n_in, n_out, 32, &q, &zeros, &[f16::ONE; 8], None, true).unwrap();
        assert_eq!(p.qzeros, vec![0x7654_3210]);
        // Out-of-range values are errors, not wrapped nibbles.
        assert!(pack_gptq(n_in, n_out, 32, &q, &[0; 8], &[f16::ONE; 8], None, true).is_err());
        assert!(pack_gptq(n_in, n_out, 32, &q, &[16; 8], &[f16::ONE; 8], None, false).is_err());
        let mut q16 = q.clone();
        q16[0] = 16;
        assert!(pack_gptq(n_in, n_out, 32, &q16, &zeros, &[f16::ONE; 8], None, true).is_err());
    }

    #[test]
    fn trivial_g_idx_and_permutation() {
        let g_idx: Vec<i32> = (0..64).map(|c| c / 32).collect();
        assert!(is_trivial_g_idx(&g_idx, 32));
        assert!(!is_trivial_g_idx(&g_idx, 64));
        assert_eq!(act_order_perm("g", &g_idx, 32).unwrap(), None);
        // Columns alternate groups: group 0 = even columns, group 1 = odd ones.
        let g_idx: Vec<i32> = (0..64).map(|c| c % 2).collect();
        assert!(!is_trivial_g_idx(&g_idx, 32));
        let perm = act_order_perm("g", &g_idx, 32).unwrap().unwrap();
        let want: Vec<u32> = (0..32).map(|j| 2 * j).chain((0..32).map(|j| 2 * j + 1)).collect();
        assert_eq!(perm, want);
        let x: Vec<f32> = (0..64).map(|c| c as f32).collect();
        let mut xp = vec![0f32; 64];
        permute_input(&perm, &x, &mut xp);
        assert_eq!(xp, want.iter().map(|&c| c as f32).collect::<Vec<_>>());
    }

    fn err_string<T: std::fmt::Debug>(r: Result<T>) -> String {
        r.expect_err("expected an error").to_string()
    }

    #[test]
    fn bad_tensors_are_typed_errors() {
        let (n_in, n_out, g) = (64, 16, 32);
        let mut rng = Rng::new(5);
        let l = random_layer(&mut rng, n_in, n_out, g, false, true, false);
        let p = pack_gptq(n_in, n_out, g, &l.q, &l.zeros, &l.scales, None, true).unwrap();
        let cfg = config(g, false, false, true);
        assert!(gptq_to_int4("l", n_in, n_out, &cfg, &p.tensors()).is_ok());

        // qweight one value short for its (correct) shape.
        let mut t = p.tensors();
        t.qweight.data = &p.qweight[1..];
        let e = gptq_to_int4("l", n_in, n_out, &cfg, &t).unwrap_err();
        assert!(
            matches!(&e, Error::BadTensor { tensor, .. } if tensor == "l.qweight"),
            "{e}"
        );
        // qweight of the wrong shape.
        let mut t = p.tensors();
        t.qweight.shape = &[16, 8];
        let e = gptq_to_int4("l", n_in, n_out, &cfg, &t).unwrap_err();
        assert!(
            matches!(&e, Error::ShapeMismatch { tensor, expected, found }
                if tensor == "l.qweight" && expected == &[8, 16] && found == &[16, 8]),
            "{e}"
        );
        // Wrong qzeros / scales shapes.
        let mut t = p.tensors();
        t.qzeros.shape = &[2, 1];
        assert!(matches!(
            gptq_to_int4("l", n_in, n_out, &cfg, &t),
            Err(Error::ShapeMismatch { .. })
        ));
        let mut t = p.tensors();
        t.scales.shape = &[16, 2];
        assert!(matches!(
            gptq_to_int4("l", n_in, n_out, &cfg, &t),
            Err(Error::ShapeMismatch { .. })
        ));
        // The layer's own dimensions.
        let t = p.tensors();
        assert!(err_string(gptq_to_int4("l", 36, n_out, &cfg, &t)).contains("multiple of 8"));
        assert!(err_string(gptq_to_int4("l", 40, n_out, &cfg, &t)).contains("group size 32"));
        assert!(err_string(gptq_to_int4("l", n_in, 12, &cfg, &t)).contains("12 outputs"));
        assert!(gptq_to_int4("l", 0, n_out, &cfg, &t).is_err());
        // Unsupported bits and group sizes through a hand-made config.
        for bits in [3, 8] {
            let c = GptqConfig { bits, ..cfg };
            let e = err_string(gptq_to_int4("l", n_in, n_out, &c, &t));
            assert!(
                e.contains(&format!(
                    "GPTQ with {bits} bits is not supported; qmtot loads 4-bit GPTQ only"
                )),
                "{e}"
            );
        }
        let c = GptqConfig { group_size: 16, ..cfg };
        assert!(err_string(gptq_to_int4("l", n_in, n_out, &c, &t)).contains("group_size 16"));
        // Act-order without g_idx.
        let mut t = p.tensors();
        t.g_idx = None;
        let c = GptqConfig { desc_act: true, ..cfg };
        assert!(matches!(
            gptq_to_int4("l", n_in, n_out, &c, &t),
            Err(Error::MissingTensor(_))
        ));
    }

    #[test]
    fn bad_g_idx_is_a_typed_error() {
        let (n_in, n_out, g) = (64, 8, 32);
        let mut rng = Rng::new(6);
        let l = random_layer(&mut rng, n_in, n_out, g, true, false, false);
        let p = pack_gptq(n_in, n_out, g, &l.q, &l.zeros, &l.scales, None, false).unwrap();
        let cfg = config(g, true, true, false);
        let run = |gi: &[i32], shape: &[usize]| {
            let mut t = p.tensors();
            t.g_idx = Some(HostTensor::new(shape, gi));
            gptq_to_int4("l", n_in, n_out, &cfg, &t)
        };
        // A group of the wrong size: 33 columns in group 0, 31 in group 1.
        let mut gi: Vec<i32> = (0..64).map(|c| c % 2).collect();
        gi[1] = 0;
        let e = run(&gi, &[64]).unwrap_err();
        assert!(
            matches!(&e, Error::BadTensor { tensor, .. } if tensor == "l.g_idx"),
            "{e}"
        );
        assert!(e.to_string().contains("group 0 holds 33 inputs"), "{e}");
        // Values out of range, either side.
        for bad in [2, -1] {
            let mut gi: Vec<i32> = (0..64).map(|c| c / 32).collect();
            gi[10] = bad;
            let e = run(&gi, &[64]).unwrap_err();
            assert!(e.to_string().contains(&format!("input 10 is in group {bad}")), "{e}");
        }
        // Wrong length.
        let gi: Vec<i32> = (0..32).map(|c| c / 32).collect();
        assert!(matches!(run(&gi, &[32]), Err(Error::ShapeMismatch { .. })));
    }

    #[test]
    fn config_parsing() {
        use serde_json::json;
        let c = GptqConfig::from_json(&json!({
            "bits": 4, "group_size": 128, "desc_act": true, "sym": false,
            "quant_method": "gptq", "damp_percent": 0.01
        }))
        .unwrap();
        assert_eq!(c, config(128, false, true, true));
        let c = GptqConfig::from_json(&json!({"bits": 4, "group_size": 64, "checkpoint_format": "gptq_v2"})).unwrap();
        assert_eq!(c, config(64, true, false, false));
        let c = GptqConfig::from_json(&json!({"bits": 4, "group_size": 32, "checkpoint_format": "gptq"})).unwrap();
        assert!(c.v1_zeros);
        // A whole config.json: the nested quantization_config is read.
        let c = GptqConfig::from_json(&json!({
            "model_type": "llama",
            "quantization_config": {"bits": 4, "group_size": 128, "quant_method": "gptq", "desc_act": false}
        }))
        .unwrap();
        assert_eq!(c.group_size, 128);

        let e = |v: serde_json::Value| err_string(GptqConfig::from_json(&v));
        for bits in [3, 8] {
            let m = e(json!({"bits": bits, "group_size": 128}));
            assert!(
                m.contains(&format!(
                    "GPTQ with {bits} bits is not supported; qmtot loads 4-bit GPTQ only"
                )),
                "{m}"
            );
        }
        assert!(e(json!({"bits": 4, "group_size": -1})).contains("-1 (one group per row) is not supported"));
        assert!(e(json!({"bits": 4, "group_size": 256})).contains("group_size 256 is not supported"));
        assert!(e(json!({"bits": 4, "group_size": 128, "quant_method": "awq"})).contains("quant_method"));
        assert!(e(json!({"bits": 4, "group_size": 128, "quant_method": "bitsandbytes"})).contains("bitsandbytes"));
        assert!(e(json!({"bits": 4, "group_size": 128, "checkpoint_format": "marlin"})).contains("marlin"));
        assert!(e(json!({"group_size": 128})).contains("bits is missing"));
        assert!(e(json!({"bits": 4})).contains("group_size is missing"));
        assert!(e(json!({"bits": "4", "group_size": 128})).contains("bits"));
        assert!(e(json!({"bits": 4, "group_size": 128, "pack_dtype": "int8"})).contains("pack_dtype"));
        assert!(e(json!({"bits": 4, "group_size": 128, "dynamic": {"-:.*": {}}})).contains("dynamic"));
        assert!(e(json!([1, 2])).contains("not a JSON object"));
    }
}
