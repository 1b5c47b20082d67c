//! GGUF reader/writer against the real default model and against files written here.

mod common;

use half::f16;
use qmtot::config::{ModelConfig, RopeStyle};
use qmtot::error::Error;
use qmtot::formats::gguf::{
    dequant_block_q4_0, dequant_block_q4_1, quantize_q4_0, quantize_q4_1, quantize_q8_0, GgmlType, GgufFile,
    GgufWriter, MetaType, MetaValue,
};
use qmtot::quant::WeightMatrix;

use common::{rand_values, tiny_model_writer, TinySpec};

#[test]
fn the_real_model_parses_with_the_expected_tensors_and_config() {
    let g = GgufFile::open(common::model_path()).unwrap();
    assert_eq!(g.version, 3);
    assert_eq!(g.tensors.len(), 272);
    let count = |ty| g.tensors.iter().filter(|t| t.ty == ty).count();
    assert_eq!(count(GgmlType::Q4_1), 210, "every linear weight is Q4_1");
    assert_eq!(count(GgmlType::F32), 61, "norms are F32");
    assert_eq!(count(GgmlType::Q8_0), 1, "token_embd is Q8_0");
    assert_eq!(g.tensor("token_embd.weight").unwrap().ty, GgmlType::Q8_0);
    assert_eq!(g.tensor("token_embd.weight").unwrap().shape(), vec![49152, 576]);
    assert_eq!(g.tensor("blk.0.ffn_down.weight").unwrap().shape(), vec![576, 1536]);
    assert!(
        g.tensor("output.weight").is_none(),
        "the output layer is tied to the embedding"
    );

    let c = ModelConfig::from_gguf(&g).unwrap();
    assert_eq!(
        (c.n_layers, c.d_model, c.d_ff, c.n_heads, c.n_kv_heads, c.head_dim),
        (30, 576, 1536, 9, 3, 64)
    );
    assert_eq!((c.vocab_size, c.context_length), (49152, 8192));
    assert_eq!(c.rope_theta, 100000.0);
    assert_eq!(c.rope_style, RopeStyle::AdjacentPairs);
    assert!((c.rms_eps - 1e-5).abs() < 1e-9);
    assert!(c.tied_output);
}

/// Metadata of every value type, nested and empty arrays included.
fn every_meta_value() -> Vec<(String, MetaValue)> {
    use MetaValue::*;
    vec![
        ("u8".into(), U8(200)),
        ("i8".into(), I8(-100)),
        ("u16".into(), U16(60000)),
        ("i16".into(), I16(-30000)),
        ("u32".into(), U32(4_000_000_000)),
        ("i32".into(), I32(-2_000_000_000)),
        ("f32".into(), F32(-1.5e-7)),
        ("bool".into(), Bool(true)),
        ("string".into(), String("ünïcode ✓ and \"quotes\"".into())),
        ("u64".into(), U64(u64::MAX)),
        ("i64".into(), I64(i64::MIN)),
        ("f64".into(), F64(std::f64::consts::PI)),
        ("array.f32".into(), Array(MetaType::F32, vec![F32(1.0), F32(-2.0)])),
        ("array.empty".into(), Array(MetaType::U64, vec![])),
        (
            "array.nested".into(),
            Array(
                MetaType::Array,
                vec![
                    Array(MetaType::String, vec![String("a".into()), String("".into())]),
                    Array(MetaType::I16, vec![I16(7)]),
                ],
            ),
        ),
    ]
}

/// Raw encoded bytes of every supported tensor type.
fn every_tensor() -> Vec<(&'static str, Vec<usize>, GgmlType, Vec<u8>)> {
    let v = rand_values(2 * 64, 11, 3.0);
    let f16s: Vec<u8> = v.iter().flat_map(|x| f16::from_f32(*x).to_le_bytes()).collect();
    let bf16s: Vec<u8> = v.iter().flat_map(|x| half::bf16::from_f32(*x).to_le_bytes()).collect();
    vec![
        ("f32", vec![2, 64], GgmlType::F32, bytemuck::cast_slice(&v).to_vec()),
        ("f16", vec![2, 64], GgmlType::F16, f16s),
        ("bf16", vec![128], GgmlType::BF16, bf16s),
        ("q8_0", vec![2, 64], GgmlType::Q8_0, quantize_q8_0(&v)),
        ("q4_0", vec![2, 64], GgmlType::Q4_0, quantize_q4_0(&v)),
        ("q4_1", vec![4, 32], GgmlType::Q4_1, quantize_q4_1(&v)),
    ]
}

#[test]
fn written_files_round_trip_every_type_bit_exactly() {
    for version in [2, 3] {
        for alignment in [32, 64] {
            let mut w = GgufWriter::new().version(version).alignment(alignment);
            for (k, v) in every_meta_value() {
                w.meta(&k, v);
            }
            for (name, shape, ty, data) in every_tensor() {
                w.tensor(name, &shape, ty, data).unwrap();
            }
            let g = GgufFile::from_bytes(w.to_bytes()).unwrap();
            assert_eq!(g.version, version);
            assert_eq!(g.alignment, alignment);
            assert_eq!(g.data_offset % alignment, 0);
            for (k, v) in every_meta_value() {
                // NaN-free values, so PartialEq is bit equality here.
                assert_eq!(g.get(&k), Some(&v), "metadata {k}");
            }
            for (name, shape, ty, data) in every_tensor() {
                let t = g.tensor(name).unwrap();
                assert_eq!((t.shape(), t.ty), (shape, ty), "{name}");
                assert_eq!(t.offset % alignment, 0, "{name} is aligned");
                assert_eq!(g.tensor_data(t), &data[..], "{name} bytes");
            }
        }
    }
}

#[test]
fn q4_and_q8_convert_losslessly_into_the_canonical_forms() {
    // Quantized from random data, plus raw random nibbles and scales (any bit pattern a file
    // may hold, finite scales).
    let v = rand_values(8 * 96, 5, 2.0);
    let mut raw_q4_1 = Vec::new();
    let mut rng = qmtot::engine::sampler::Rng::new(9);
    for _ in 0..(8 * 96 / 32) {
        raw_q4_1.extend_from_slice(&f16::from_f32(rng.next_f64() as f32 * 0.1).to_le_bytes());
        raw_q4_1.extend_from_slice(&f16::from_f32(-(rng.next_f64() as f32)).to_le_bytes());
        raw_q4_1.extend((0..16).map(|_| rng.next_u64() as u8));
    }
    let cases = [
        ("q4_0", GgmlType::Q4_0, quantize_q4_0(&v)),
        ("q4_1", GgmlType::Q4_1, quantize_q4_1(&v)),
        ("q4_1_raw", GgmlType::Q4_1, raw_q4_1),
        ("q8_0", GgmlType::Q8_0, quantize_q8_0(&v)),
    ];
    let mut w = GgufWriter::new();
    for (name, ty, data) in &cases {
        w.tensor(name, &[8, 96], *ty, data.clone()).unwrap();
    }
    let g = GgufFile::from_bytes(w.to_bytes()).unwrap();
    for (name, ty, data) in &cases {
        let m = g.weight_matrix(name).unwrap();
        match (ty, &m) {
            (GgmlType::Q8_0, WeightMatrix::Int8(_)) => {}
            (GgmlType::Q4_0 | GgmlType::Q4_1, WeightMatrix::Int4(q)) => assert_eq!(q.group, 32),
            _ => panic!("{name}: unexpected form {}", m.kind()),
        }
        // GGUF's own formulas, block by block, written out here independently of the reader.
        let mut want = Vec::new();
        let mut block = [0f32; 32];
        for b in data.chunks_exact(ty.block_bytes()) {
            match ty {
                GgmlType::Q4_0 => dequant_block_q4_0(b, &mut block),
                GgmlType::Q4_1 => dequant_block_q4_1(b, &mut block),
                _ => {
                    let d = f16::from_le_bytes([b[0], b[1]]).to_f32();
                    for j in 0..32 {
                        block[j] = d * (b[2 + j] as i8) as f32;
                    }
                }
            }
            want.extend_from_slice(&block);
        }
        // Equal as numbers, element for element: Q4_0's `d·q + (−8d)` and GGUF's `d·(q − 8)` are
        // both exact in f32 (15 significant bits at most), differing only in the sign of zero.
        let got = m.dequant();
        for (i, (a, b)) in got.iter().zip(&want).enumerate() {
            assert!(a == b, "{name}: element {i}: canonical {a} vs GGUF formula {b}");
        }
        assert_eq!(g.tensor_f32(name).unwrap(), want, "{name}: reader's f32 path");
    }
}

#[test]
fn nibble_order_differs_between_gguf_and_canonical() {
    // One Q4_1 block with d = 1, m = 0 and nibble value = element index mod 16 placed the GGUF
    // way: element j < 16 in the low nibble of byte j, element j + 16 in its high nibble.
    let mut block = Vec::new();
    block.extend_from_slice(&f16::ONE.to_le_bytes());
    block.extend_from_slice(&f16::ZERO.to_le_bytes());
    for j in 0..16u8 {
        block.push(j | (((j + 16) % 16) << 4));
    }
    let mut w = GgufWriter::new();
    w.tensor("t", &[1, 32], GgmlType::Q4_1, block).unwrap();
    let g = GgufFile::from_bytes(w.to_bytes()).unwrap();
    let WeightMatrix::Int4(q) = g.weight_matrix("t").unwrap() else {
        panic!()
    };
    for c in 0..32 {
        assert_eq!(q.q(0, c) as usize, c % 16, "element {c}");
    }
    // Canonical: byte i holds elements 2i (low) and 2i + 1 (high).
    assert_eq!(q.packed[0], 0x10);
    assert_eq!(q.packed[1], 0x32);
}

// ---- bad input: each a typed error, never a panic ------------------------------------------

fn tiny_bytes() -> Vec<u8> {
    tiny_model_writer(TinySpec::default(), 1).to_bytes()
}

#[test]
fn missing_file_is_an_io_error() {
    match GgufFile::open("/nonexistent/model.gguf") {
        Err(Error::Io { .. }) => {}
        other => panic!("expected Io, got {:?}", other.err()),
    }
}

#[test]
fn wrong_magic_is_rejected() {
    let mut b = tiny_bytes();
    b[..4].copy_from_slice(b"GGML");
    assert!(matches!(GgufFile::from_bytes(b), Err(Error::BadMagic { found }) if &found == b"GGML"));
}

#[test]
fn unsupported_version_is_rejected() {
    let mut b = tiny_bytes();
    b[4..8].copy_from_slice(&1u32.to_le_bytes());
    assert!(matches!(GgufFile::from_bytes(b), Err(Error::UnsupportedGgufVersion(1))));
}

#[test]
fn truncated_header_is_rejected_at_every_cut() {
    let b = tiny_bytes();
    let g = GgufFile::from_bytes(b.clone()).unwrap();
    // Every cut inside the header (magic, counts, metadata, tensor infos).
    for cut in (0..g.data_offset as usize).step_by(7) {
        match GgufFile::from_bytes(b[..cut].to_vec()) {
            Err(Error::Truncated { .. }) | Err(Error::BadMagic { .. }) | Err(Error::TruncatedTensorData { .. }) => {}
            Err(other) => panic!("cut at {cut}: unexpected error {other}"),
            Ok(_) => panic!("cut at {cut}: parsed a truncated header"),
        }
    }
    assert!(matches!(
        GgufFile::from_bytes(b[..20].to_vec()),
        Err(Error::Truncated { .. })
    ));
}

#[test]
fn truncated_tensor_data_is_rejected() {
    let b = tiny_bytes();
    let cut = b.len() - 100;
    match GgufFile::from_bytes(b[..cut].to_vec()) {
        Err(Error::TruncatedTensorData { tensor, .. }) => assert_eq!(tensor, "output.weight"),
        other => panic!("expected TruncatedTensorData, got {:?}", other.err()),
    }
}

/// Rewrites the offset field of tensor `name` in a GGUF image.
fn patch_tensor_field(bytes: &mut [u8], name: &str, new_type: Option<u32>, new_offset: Option<u64>) {
    let needle = [&(name.len() as u64).to_le_bytes()[..], name.as_bytes()].concat();
    let at = bytes
        .windows(needle.len())
        .position(|w| w == needle)
        .expect("tensor info")
        + needle.len();
    let n_dims = u32::from_le_bytes(bytes[at..at + 4].try_into().unwrap()) as usize;
    let ty_at = at + 4 + 8 * n_dims;
    if let Some(t) = new_type {
        bytes[ty_at..ty_at + 4].copy_from_slice(&t.to_le_bytes());
    }
    if let Some(o) = new_offset {
        bytes[ty_at + 4..ty_at + 12].copy_from_slice(&o.to_le_bytes());
    }
}

#[test]
fn tensor_offset_out_of_bounds_is_rejected() {
    let mut b = tiny_bytes();
    patch_tensor_field(&mut b, "blk.0.attn_q.weight", None, Some(1 << 40));
    match GgufFile::from_bytes(b) {
        Err(Error::TensorOffsetOutOfBounds { tensor, offset, .. }) => {
            assert_eq!((tensor.as_str(), offset), ("blk.0.attn_q.weight", 1 << 40))
        }
        other => panic!("expected TensorOffsetOutOfBounds, got {:?}", other.err()),
    }
}

#[test]
fn unknown_tensor_type_names_the_type_and_tensor() {
    let mut b = tiny_bytes();
    patch_tensor_field(&mut b, "blk.1.ffn_up.weight", Some(12), None); // Q4_K
    match GgufFile::from_bytes(b) {
        Err(e @ Error::UnsupportedTensorType { .. }) => {
            let msg = e.to_string();
            assert!(msg.contains("Q4_K") && msg.contains("blk.1.ffn_up.weight"), "{msg}");
        }
        other => panic!("expected UnsupportedTensorType, got {:?}", other.err()),
    }
}

#[test]
fn missing_required_metadata_key_is_named() {
    let mut w = GgufWriter::new();
    for (k, v) in GgufFile::from_bytes(tiny_bytes()).unwrap().metadata {
        if k != "llama.embedding_length" {
            w.meta(&k, v);
        }
    }
    let g = GgufFile::from_bytes(w.to_bytes()).unwrap();
    match ModelConfig::from_gguf(&g) {
        Err(Error::MissingMetadata(k)) => assert_eq!(k, "llama.embedding_length"),
        other => panic!("expected MissingMetadata, got {other:?}"),
    }
}

#[test]
fn inconsistent_config_and_shapes_are_rejected() {
    // Heads that do not divide the width.
    let mut w = GgufWriter::new();
    for (k, v) in GgufFile::from_bytes(tiny_bytes()).unwrap().metadata {
        let v = if k == "llama.attention.head_count_kv" {
            MetaValue::U32(3)
        } else {
            v
        };
        w.meta(&k, v);
    }
    let g = GgufFile::from_bytes(w.to_bytes()).unwrap();
    assert!(matches!(ModelConfig::from_gguf(&g), Err(Error::InvalidConfig(_))));

    // A tensor whose shape disagrees with the config.
    let spec = TinySpec::default();
    let mut w = GgufWriter::new();
    let src = GgufFile::from_bytes(tiny_model_writer(spec, 1).to_bytes()).unwrap();
    for (k, v) in &src.metadata {
        w.meta(k, v.clone());
    }
    for t in &src.tensors {
        let mut shape = t.shape();
        let mut data = src.tensor_data(t).to_vec();
        if t.name == "blk.1.attn_k.weight" {
            shape = vec![shape[0] + 1, shape[1]]; // one extra output row
            data.extend_from_within(..shape[1] / 32 * 20);
        }
        w.tensor(&t.name, &shape, t.ty, data).unwrap();
    }
    let g = GgufFile::from_bytes(w.to_bytes()).unwrap();
    let config = ModelConfig::from_gguf(&g).unwrap();
    let backend = qmtot::backend::cpu::CpuBackend::new(1).unwrap();
    match qmtot::model::Llama::load(backend, config, &g, |_, _| {}) {
        Err(Error::ShapeMismatch {
            tensor,
            expected,
            found,
        }) => {
            assert_eq!(tensor, "blk.1.attn_k.weight");
            assert_eq!(expected, vec![32, 64]);
            assert_eq!(found, vec![33, 64]);
        }
        other => panic!("expected ShapeMismatch, got {:?}", other.err()),
    }
}

#[test]
fn corrupt_metadata_values_are_typed_errors() {
    // Unknown value type tag.
    let mut w = GgufWriter::new();
    w.meta("k", MetaValue::U8(1));
    let mut b = w.to_bytes();
    let tag_at = 24 + 8 + 1; // header, key length, key "k"
    b[tag_at..tag_at + 4].copy_from_slice(&99u32.to_le_bytes());
    assert!(matches!(
        GgufFile::from_bytes(b),
        Err(Error::UnknownMetaType { ty: 99, .. })
    ));
    // An array claiming more elements than the file holds.
    let mut w = GgufWriter::new();
    w.meta("a", MetaValue::Array(MetaType::U8, vec![MetaValue::U8(1)]));
    let mut b = w.to_bytes();
    let count_at = 24 + 8 + 1 + 4 + 4;
    b[count_at..count_at + 8].copy_from_slice(&u64::MAX.to_le_bytes());
    assert!(matches!(GgufFile::from_bytes(b), Err(Error::Truncated { .. })));
}
