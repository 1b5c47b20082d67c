//! AWQ INT4 checkpoints (AutoAWQ's GEMM packing, `version` "gemm") converted without loss into
//! canonical INT4 ([`crate::quant::Int4Matrix`]).
//!
//! # Tensors of one linear layer
//!
//! A layer `W[out, in]` quantized with group size `g` (`in` a multiple of `g`, `out` a
//! multiple of 8) is stored as
//!
//! ```text
//! qweight  i32 [in, out / 8]      nibble k of qweight[c, i] = q of input c, output 8i + ORDER[k]
//! qzeros   i32 [in / g, out / 8]  nibble k of qzeros[G, i]  = zero of group G, output 8i + ORDER[k]
//! scales   f16 [in / g, out]      scales[G, o]              = scale of group G, output o
//!
//! ORDER = [0, 2, 4, 6, 1, 3, 5, 7]
//! ```
//!
//! "Nibble k" is bits `4k..4k+3` of the word read as a u32. Unlike GPTQ, both integer tensors
//! pack eight *outputs* per word, and in an interleaved order: the even outputs of the block
//! fill the low half of the word, the odd ones the high half. There is no `g_idx` (groups are
//! always contiguous) and the zeros are stored as they are (no offset). The weights are
//!
//! ```text
//!     w[o, c] = scales[c / g, o] · (q[c, o] − z[c / g, o])
//! ```
//!
//! # Into canonical INT4
//!
//! As for GPTQ: `s = scales[G, o]` (same f16 bits), `m = −(s·z)` in f32, nibbles re-packed two
//! per byte along the row; `s·q + m` equals `s·(q − z)` exactly (see
//! [`super::gptq::gptq_to_int4`] for the argument).
//!
//! [`pack_awq`] writes the same layout from unpacked values; it uses its own table (output
//! offset → nibble slot, the inverse of `ORDER`) and no code of the unpacking path.

use half::f16;
use rayon::prelude::*;

use super::gptq::{check_tensor, json_bool, json_group_size, json_str, json_uint, quant_object, HostTensor};
use crate::error::{Error, Result};
use crate::quant::{Int4Matrix, INT4_GROUP_SIZES};

/// AWQ's interleave: nibble slot `k` of a word holds output `8i + AWQ_ORDER[k]`.
pub const AWQ_ORDER: [usize; 8] = [0, 2, 4, 6, 1, 3, 5, 7];

/// AWQ quantization settings of a checkpoint.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AwqConfig {
    /// Bits per weight; only 4 is supported.
    pub bits: u32,
    /// Inputs per group `g`, one of [`INT4_GROUP_SIZES`].
    pub group_size: usize,
    /// Asymmetric zeros are stored; must be true (the only form in use).
    pub zero_point: bool,
    /// Kernel packing, lower-cased; only "gemm" is supported.
    pub version: String,
}

impl AwqConfig {
    /// Reads AutoAWQ's `quant_config.json` or `config.json`'s `quantization_config` (a whole
    /// `config.json` is accepted too). Keys: `w_bit` or `bits`, `q_group_size` or
    /// `group_size` (required), `zero_point` (default true), `version` (default "gemm",
    /// compared case-insensitively), `quant_method` (must be "awq" when present).
    pub fn from_json(v: &serde_json::Value) -> Result<Self> {
        const WHAT: &str = "AWQ";
        let bad = |m: String| Error::InvalidConfig(format!("AWQ quantization config: {m}"));
        let obj = quant_object(v, WHAT)?;
        if let Some(method) = json_str(obj, "quant_method", WHAT)? {
            if !method.eq_ignore_ascii_case("awq") {
                return Err(Error::UnsupportedQuantization(format!(
                    "AWQ quantization config: quant_method is {method:?}, expected \"awq\""
                )));
            }
        }
        let bits = match json_uint(obj, "w_bit", WHAT)? {
            Some(b) => b,
            None => json_uint(obj, "bits", WHAT)?.ok_or_else(|| bad("w_bit / bits is missing".into()))?,
        };
        let bits = u32::try_from(bits).map_err(|_| bad(format!("bits = {bits} is too large")))?;
        let cfg = AwqConfig {
            bits,
            group_size: json_group_size(obj, &["q_group_size", "group_size"], WHAT)?,
            zero_point: json_bool(obj, "zero_point", true, WHAT)?,
            version: json_str(obj, "version", WHAT)?.unwrap_or("gemm").to_ascii_lowercase(),
        };
        cfg.validate()?;
        Ok(cfg)
    }

    /// Only 4-bit GEMM-packed AWQ with zero points and a group size of [`INT4_GROUP_SIZES`]
    /// maps onto canonical INT4.
    pub fn validate(&self) -> Result<()> {
        let bad = |m: String| Err(Error::UnsupportedQuantization(m));
        if self.bits != 4 {
            return bad(format!(
                "AWQ with {} bits is not supported; qmtot loads 4-bit AWQ only",
                self.bits
            ));
        }
        if !self.version.eq_ignore_ascii_case("gemm") {
            return bad(format!(
                "AWQ version {:?} is not supported; qmtot loads the GEMM packing (version \"gemm\") only",
                self.version
            ));
        }
        if !self.zero_point {
            return bad("AWQ without zero points (zero_point = false) is not supported".into());
        }
        if !INT4_GROUP_SIZES.contains(&self.group_size) {
            return bad(format!(
                "AWQ group size {} is not supported; qmtot loads group sizes {INT4_GROUP_SIZES:?}",
                self.group_size
            ));
        }
        Ok(())
    }
}

/// The raw tensors of one AWQ linear layer `W[out, in]` with group size `g`.
#[derive(Clone, Copy, Debug)]
pub struct AwqTensors<'a> {
    /// i32 `[in, out / 8]`.
    pub qweight: HostTensor<'a, i32>,
    /// i32 `[in / g, out / 8]`.
    pub qzeros: HostTensor<'a, i32>,
    /// f16 `[in / g, out]`.
    pub scales: HostTensor<'a, f16>,
}

/// Converts one AWQ layer `W[out_features, in_features]` into canonical INT4.
///
/// `layer` is the tensor-name prefix (e.g. `model.layers.0.mlp.down_proj`); errors name
/// `{layer}.qweight` etc. Shapes are checked against `in_features` / `out_features` /
/// `cfg.group_size` (see the module doc); nothing here panics on bad input.
pub fn awq_to_int4(
    layer: &str,
    in_features: usize,
    out_features: usize,
    cfg: &AwqConfig,
    t: &AwqTensors<'_>,
) -> Result<Int4Matrix> {
    cfg.validate()?;
    let (cols, rows, g) = (in_features, out_features, cfg.group_size);
    let dims_err = |reason: String| Error::BadTensor {
        tensor: layer.to_string(),
        reason,
    };
    if cols == 0 || rows == 0 {
        return Err(dims_err(format!("AWQ layer of shape [{rows}, {cols}] is empty")));
    }
    if rows % 8 != 0 {
        return Err(dims_err(format!(
            "AWQ packs 8 outputs per int32, but the layer has {rows} outputs (not a multiple of 8)"
        )));
    }
    if cols % g != 0 {
        return Err(dims_err(format!(
            "{cols} inputs are not a multiple of the group size {g}"
        )));
    }
    let (groups, words) = (cols / g, rows / 8);
    check_tensor(&format!("{layer}.qweight"), &t.qweight, &[cols, words])?;
    check_tensor(&format!("{layer}.qzeros"), &t.qzeros, &[groups, words])?;
    check_tensor(&format!("{layer}.scales"), &t.scales, &[groups, rows])?;

    // One job per block of 8 output rows: word qweight[c, i] fills input c of rows 8i..8i+8.
    let qweight = t.qweight.data;
    let mut packed = vec![0u8; rows * cols / 2];
    packed.par_chunks_mut(8 * cols / 2).enumerate().for_each(|(i, block)| {
        for c in 0..cols {
            let word = qweight[c * words + i] as u32;
            for (k, &off) in AWQ_ORDER.iter().enumerate() {
                let nib = ((word >> (4 * k)) & 0x0f) as u8;
                let byte = &mut block[off * (cols / 2) + c / 2];
                if c % 2 == 0 {
                    *byte = nib;
                } else {
                    *byte |= nib << 4;
                }
            }
        }
    });

    let (qzeros, src_scales) = (t.qzeros.data, t.scales.data);
    let mut zeros = vec![0u8; groups * rows]; // [groups, out]
    for grp in 0..groups {
        for i in 0..words {
            let word = qzeros[grp * words + i] as u32;
            for (k, &off) in AWQ_ORDER.iter().enumerate() {
                zeros[grp * rows + 8 * i + off] = ((word >> (4 * k)) & 0x0f) as u8;
            }
        }
    }
    let mut scales = Vec::with_capacity(rows * groups);
    let mut mins = Vec::with_capacity(rows * groups);
    for o in 0..rows {
        for grp in 0..groups {
            let s = src_scales[grp * rows + o];
            scales.push(s);
            mins.push(-(s.to_f32() * zeros[grp * rows + o] as f32));
        }
    }
    Int4Matrix::new(rows, cols, g, packed, scales, mins)
}

/// AWQ tensors written by [`pack_awq`], with their shapes.
#[derive(Clone, Debug, PartialEq)]
pub struct AwqPacked {
    /// i32 `[in, out / 8]`.
    pub qweight: Vec<i32>,
    pub qweight_shape: [usize; 2],
    /// i32 `[in / g, out / 8]`.
    pub qzeros: Vec<i32>,
    pub qzeros_shape: [usize; 2],
    /// f16 `[in / g, out]`.
    pub scales: Vec<f16>,
    pub scales_shape: [usize; 2],
}

impl AwqPacked {
    /// Borrowed views for [`awq_to_int4`].
    pub fn tensors(&self) -> AwqTensors<'_> {
        AwqTensors {
            qweight: HostTensor::new(&self.qweight_shape, &self.qweight),
            qzeros: HostTensor::new(&self.qzeros_shape, &self.qzeros),
            scales: HostTensor::new(&self.scales_shape, &self.scales),
        }
    }
}

/// Packs an AWQ (GEMM) layer `W[out_features, in_features]` with group size `group_size`:
///
/// * `q`: u8 `[out, in]`, values `0..=15`;
/// * `zeros`: u8 `[in / g, out]`, values `0..=15`;
/// * `scales`: f16 `[in / g, out]`;
///
/// so that `w[o, c] = scales[c / g, o]·(q[o, c] − zeros[c / g, o])`. Errors on inconsistent
/// lengths or out-of-range values.
pub fn pack_awq(
    in_features: usize,
    out_features: usize,
    group_size: usize,
    q: &[u8],
    zeros: &[u8],
    scales: &[f16],
) -> Result<AwqPacked> {
    // Output offset within a block of 8 → nibble slot: the inverse of the published order.
    const SLOT_OF_OUTPUT: [u32; 8] = [0, 4, 1, 5, 2, 6, 3, 7];
    let (n_in, n_out, g) = (in_features, out_features, group_size);
    let bad = |m: String| Error::InvalidArgument(format!("pack_awq: {m}"));
    if n_out % 8 != 0 || g == 0 || n_in % g != 0 {
        return Err(bad(format!(
            "[{n_out}, {n_in}] with group {g}: outputs must be a multiple of 8, inputs of the group"
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
    if let Some(v) = q.iter().chain(zeros).find(|&&v| v > 15) {
        return Err(bad(format!("value {v} does not fit 4 bits")));
    }
    let shift = |o: usize| 4 * SLOT_OF_OUTPUT[o % 8];
    let mut qweight = vec![0u32; n_in * (n_out / 8)];
    for o in 0..n_out {
        for c in 0..n_in {
            qweight[c * (n_out / 8) + o / 8] |= u32::from(q[o * n_in + c]) << shift(o);
        }
    }
    let mut qzeros = vec![0u32; n_groups * (n_out / 8)];
    for grp in 0..n_groups {
        for o in 0..n_out {
            qzeros[grp * (n_out / 8) + o / 8] |= u32::from(zeros[grp * n_out + o]) << shift(o);
        }
    }
    Ok(AwqPacked {
        qweight: qweight.into_iter().map(|w| w as i32).collect(),
        qweight_shape: [n_in, n_out / 8],
        qzeros: qzeros.into_iter().map(|w| w as i32).collect(),
        qzeros_shape: [n_groups, n_out / 8],
        scales: scales.to_vec(),
        scales_shape: [n_groups, n_out],
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::formats::gptq::tests::{same_f32, Rng};

    fn config(g: usize) -> AwqConfig {
        AwqConfig {
            bits: 4,
            group_size: g,
            zero_point: true,
            version: "gemm".into(),
        }
    }

    #[test]
    fn random_layers_dequantize_bit_exactly() {
        for (seed, (n_in, n_out, g)) in [
            (128, 16, 32),
            (256, 24, 64),
            (256, 8, 128),
            (384, 40, 128),
            (64, 64, 64),
        ]
        .into_iter()
        .enumerate()
        {
            let mut rng = Rng::new(seed as u64 + 1);
            let groups = n_in / g;
            let q: Vec<u8> = (0..n_out * n_in).map(|_| rng.below(16) as u8).collect();
            let zeros: Vec<u8> = (0..groups * n_out).map(|_| rng.below(16) as u8).collect();
            let scales: Vec<f16> = (0..groups * n_out).map(|_| rng.scale()).collect();
            let p = pack_awq(n_in, n_out, g, &q, &zeros, &scales).unwrap();
            let m = awq_to_int4("layer", n_in, n_out, &config(g), &p.tensors()).unwrap();
            assert_eq!((m.rows, m.cols, m.group), (n_out, n_in, g));
            let mut row = vec![0f32; n_in];
            for o in 0..n_out {
                m.dequant_row(o, &mut row);
                for (c, &got) in row.iter().enumerate() {
                    let grp = c / g;
                    let s = scales[grp * n_out + o].to_f32();
                    let want = s * (q[o * n_in + c] as f32 - zeros[grp * n_out + o] as f32);
                    assert!(
                        same_f32(got, want),
                        "[{n_out}, {n_in}] g{g}: w[{o}, {c}] {got:e} vs {want:e}"
                    );
                }
            }
        }
    }

    #[test]
    fn hand_packed_words_land_on_the_right_elements() {
        // in 32, out 8, g 32: qweight [32, 1], qzeros [1, 1], scales [1, 8].
        let (n_in, n_out) = (32, 8);
        let mut qweight = vec![0i32; 32];
        qweight[5] = 0x7654_3210; // input 5: slot k holds value k for output ORDER[k]
        qweight[6] = 0xfedc_ba98u32 as i32; // input 6: slot k holds 8 + k
        let qzeros = [0x7654_3210];
        let scales: Vec<f16> = (0..8).map(|o| f16::from_f32(0.5 * (o + 1) as f32)).collect();
        let t = AwqTensors {
            qweight: HostTensor::new(&[32, 1], &qweight),
            qzeros: HostTensor::new(&[1, 1], &qzeros),
            scales: HostTensor::new(&[1, 8], &scales),
        };
        let m = awq_to_int4("l", n_in, n_out, &config(32), &t).unwrap();
        // Slots 0..8 hold outputs 0, 2, 4, 6, 1, 3, 5, 7: output o got value SLOT(o).
        let slot_of_output = [0u8, 4, 1, 5, 2, 6, 3, 7];
        for o in 0..n_out {
            for c in 0..n_in {
                let want = match c {
                    5 => slot_of_output[o],
                    6 => 8 + slot_of_output[o],
                    _ => 0,
                };
                assert_eq!(m.q(o, c), want, "q[{o}, {c}]");
            }
            let z = slot_of_output[o] as f32;
            assert_eq!(m.scales[o], scales[o]);
            assert_eq!(m.mins[o], -(scales[o].to_f32() * z), "row {o}");
        }
        // Spot value: output 1 has zero 4 and scale 1.0, q[1, 6] = 12.
        let mut row = vec![0f32; n_in];
        m.dequant_row(1, &mut row);
        assert_eq!(row[6], 1.0 * (12.0 - 4.0));
        assert_eq!(row[0], -4.0);
    }

    #[test]
    fn packer_writes_the_published_layout() {
        // Input 5 of output o holds ORDER⁻¹(o), so the word reads 0x76543210.
        let (n_in, n_out) = (32, 8);
        let slot_of_output = [0u8, 4, 1, 5, 2, 6, 3, 7];
        let mut q = vec![0u8; n_out * n_in];
        for o in 0..n_out {
            q[o * n_in + 5] = slot_of_output[o];
        }
        let p = pack_awq(n_in, n_out, 32, &q, &slot_of_output, &[f16::ONE; 8]).unwrap();
        assert_eq!(p.qweight_shape, [32, 1]);
        assert_eq!(p.qweight[5], 0x7654_3210);
        assert_eq!(p.qweight.iter().filter(|&&w| w != 0).count(), 1);
        assert_eq!(p.qzeros, vec![0x7654_3210]);
        // The table used by the unpacker is the published order, and the packer's is its inverse.
        assert_eq!(AWQ_ORDER, [0, 2, 4, 6, 1, 3, 5, 7]);
        for (k, &o) in AWQ_ORDER.iter().enumerate() {
            assert_eq!(slot_of_output[o] as usize, k);
        }
        let mut q16 = q.clone();
        q16[3] = 16;
        assert!(pack_awq(n_in, n_out, 32, &q16, &slot_of_output, &[f16::ONE; 8]).is_err());
        assert!(pack_awq(n_in, n_out, 32, &q, &[16; 8], &[f16::ONE; 8]).is_err());
        assert!(pack_awq(n_in, n_out, 32, &q[1..], &slot_of_output, &[f16::ONE; 8]).is_err());
    }

    fn err_string<T: std::fmt::Debug>(r: Result<T>) -> String {
        r.expect_err("expected an error").to_string()
    }

    #[test]
    fn bad_tensors_are_typed_errors() {
        let (n_in, n_out, g) = (64, 16, 32);
        let q = vec![3u8; n_out * n_in];
        let zeros = vec![8u8; 2 * n_out];
        let scales = vec![f16::ONE; 2 * n_out];
        let p = pack_awq(n_in, n_out, g, &q, &zeros, &scales).unwrap();
        let cfg = config(g);
        assert!(awq_to_int4("l", n_in, n_out, &cfg, &p.tensors()).is_ok());

        let mut t = p.tensors();
        t.qweight.data = &p.qweight[..p.qweight.len() - 1];
        let e = awq_to_int4("l", n_in, n_out, &cfg, &t).unwrap_err();
        assert!(
            matches!(&e, Error::BadTensor { tensor, .. } if tensor == "l.qweight"),
            "{e}"
        );
        // A GPTQ-shaped qweight ([in / 8, out]) is caught by shape.
        let mut t = p.tensors();
        t.qweight.shape = &[8, 16];
        let e = awq_to_int4("l", n_in, n_out, &cfg, &t).unwrap_err();
        assert!(
            matches!(&e, Error::ShapeMismatch { tensor, expected, found }
                if tensor == "l.qweight" && expected == &[64, 2] && found == &[8, 16]),
            "{e}"
        );
        let mut t = p.tensors();
        t.qzeros.shape = &[2, 1];
        assert!(matches!(
            awq_to_int4("l", n_in, n_out, &cfg, &t),
            Err(Error::ShapeMismatch { .. })
        ));
        let mut t = p.tensors();
        t.scales.data = &p.scales[1..];
        assert!(matches!(
            awq_to_int4("l", n_in, n_out, &cfg, &t),
            Err(Error::BadTensor { .. })
        ));

        let t = p.tensors();
        assert!(err_string(awq_to_int4("l", 40, n_out, &cfg, &t)).contains("group size 32"));
        assert!(err_string(awq_to_int4("l", n_in, 12, &cfg, &t)).contains("12 outputs"));
        assert!(awq_to_int4("l", n_in, 0, &cfg, &t).is_err());
        for bits in [3, 8] {
            let c = AwqConfig { bits, ..cfg.clone() };
            assert!(err_string(awq_to_int4("l", n_in, n_out, &c, &t)).contains(&format!("AWQ with {bits} bits")));
        }
        let c = AwqConfig {
            version: "gemv".into(),
            ..cfg.clone()
        };
        assert!(err_string(awq_to_int4("l", n_in, n_out, &c, &t)).contains("\"gemv\" is not supported"));
    }

    #[test]
    fn config_parsing() {
        use serde_json::json;
        // AutoAWQ's quant_config.json.
        let c = AwqConfig::from_json(&json!({"zero_point": true, "q_group_size": 128, "w_bit": 4, "version": "GEMM"}))
            .unwrap();
        assert_eq!(c, config(128));
        // transformers' quantization_config, alone or inside config.json.
        let qc = json!({"quant_method": "awq", "bits": 4, "group_size": 64, "zero_point": true, "version": "gemm",
                        "modules_to_not_convert": null});
        assert_eq!(AwqConfig::from_json(&qc).unwrap(), config(64));
        assert_eq!(
            AwqConfig::from_json(&json!({"model_type": "llama", "quantization_config": qc})).unwrap(),
            config(64)
        );
        // version defaults to gemm.
        assert_eq!(
            AwqConfig::from_json(&json!({"bits": 4, "group_size": 32})).unwrap(),
            config(32)
        );

        let e = |v: serde_json::Value| err_string(AwqConfig::from_json(&v));
        for version in ["gemv", "GEMV", "gemv_fast", "marlin", "exllama"] {
            let m = e(json!({"w_bit": 4, "q_group_size": 128, "version": version}));
            assert!(m.contains("is not supported") && m.contains("GEMM"), "{m}");
        }
        for bits in [3, 8] {
            let m = e(json!({"w_bit": bits, "q_group_size": 128, "version": "gemm"}));
            assert!(m.contains(&format!("AWQ with {bits} bits is not supported")), "{m}");
        }
        assert!(e(json!({"w_bit": 4, "q_group_size": 128, "zero_point": false})).contains("zero_point = false"));
        assert!(e(json!({"w_bit": 4, "q_group_size": -1})).contains("-1 (one group per row)"));
        assert!(e(json!({"w_bit": 4, "q_group_size": 100})).contains("group size 100"));
        assert!(e(json!({"quant_method": "gptq", "bits": 4, "group_size": 128})).contains("expected \"awq\""));
        assert!(e(json!({"quant_method": "fp8", "bits": 4, "group_size": 128})).contains("fp8"));
        assert!(e(json!({"q_group_size": 128})).contains("missing"));
        assert!(e(json!({"w_bit": 4})).contains("missing"));
    }
}
