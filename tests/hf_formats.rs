//! Tiny random LLaMA checkpoints written here in every Hugging Face format qmtot reads —
//! float f32 / f16 / bf16 (one file and sharded), GPTQ (sym and asym, v1 and v2 zeros, with
//! and without act-order), AWQ, and qmtot's own INT4 — following the published packing rules,
//! then loaded: every weight the loader returns equals what the test packed (bit for bit), the
//! forward runs, `qmtot quantize` output reloads to the very matrices it wrote, and bad input is
//! a typed error.

mod common;

use std::collections::BTreeMap;
use std::io::Read;
use std::path::Path;

use half::{bf16, f16};
use qmtot::backend::cpu::CpuBackend;
use qmtot::engine::SequenceKv;
use qmtot::error::Error;
use qmtot::formats::awq::pack_awq;
use qmtot::formats::checkpoint::Checkpoint;
use qmtot::formats::gptq::pack_gptq;
use qmtot::formats::hf_write::{write_folder, OutTensor};
use qmtot::formats::quantize::{quantize, OutFormat, QuantizeOptions};
use qmtot::formats::safetensors::{FloatWeights, LoadOptions};
use qmtot::model::{tensor_names, Llama, WeightSource};
use qmtot::quant::{Int4Matrix, WeightMatrix};
use qmtot::tokenizer::Tokenizer;
use safetensors::Dtype;
use serde_json::{json, Value};

use common::data_path;

// A tiny LLaMA over the default model's 49,152-token vocabulary (so its tokenizer fits).
const HIDDEN: usize = 64;
const FF: usize = 128;
const LAYERS: usize = 2;
const HEADS: usize = 4;
const KV_HEADS: usize = 2;
const HEAD_DIM: usize = HIDDEN / HEADS;
const VOCAB: usize = 49152;

struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn uniform(&mut self) -> f32 {
        (self.next() >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

fn tokenizer() -> Tokenizer {
    let mut gz = flate2::read::GzDecoder::new(std::fs::File::open(data_path("smollm2-tokenizer.json.gz")).unwrap());
    let mut json = String::new();
    gz.read_to_string(&mut json).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tokenizer.json");
    std::fs::write(&path, json).unwrap();
    let template = std::fs::read_to_string(data_path("smollm2-chat_template.jinja")).unwrap();
    Tokenizer::from_file(&path, vec![2], Some(template)).unwrap()
}

fn config(quantization: Option<Value>) -> Value {
    let mut c = json!({
        "architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "hidden_size": HIDDEN, "intermediate_size": FF, "num_hidden_layers": LAYERS,
        "num_attention_heads": HEADS, "num_key_value_heads": KV_HEADS, "vocab_size": VOCAB,
        "max_position_embeddings": 256, "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
        "tie_word_embeddings": false, "eos_token_id": 2
    });
    if let Some(q) = quantization {
        c["quantization_config"] = q;
    }
    c
}

/// Hugging Face name, `[rows, cols]` (or `[n]`) and f32 values of every tensor.
fn float_model(seed: u64) -> Vec<(String, Vec<usize>, Vec<f32>)> {
    let mut rng = Rng(seed);
    let mut out = Vec::new();
    let mut add = |name: String, shape: Vec<usize>, scale: f32, offset: f32| {
        let n = shape.iter().product();
        let v = (0..n).map(|_| offset + scale * rng.uniform()).collect();
        out.push((name, shape, v));
    };
    add("model.embed_tokens.weight".into(), vec![VOCAB, HIDDEN], 1.0, 0.0);
    for l in 0..LAYERS {
        let p = format!("model.layers.{l}");
        add(format!("{p}.input_layernorm.weight"), vec![HIDDEN], 0.2, 1.0);
        add(format!("{p}.post_attention_layernorm.weight"), vec![HIDDEN], 0.2, 1.0);
        for (m, rows, cols) in linear_shapes() {
            add(format!("{p}.{m}.weight"), vec![rows, cols], 0.2, 0.0);
        }
    }
    add("model.norm.weight".into(), vec![HIDDEN], 0.2, 1.0);
    add("lm_head.weight".into(), vec![VOCAB, HIDDEN], 0.2, 0.0);
    out
}

/// `(module, out, in)` of a layer's linear weights.
fn linear_shapes() -> [(&'static str, usize, usize); 7] {
    [
        ("self_attn.q_proj", HIDDEN, HIDDEN),
        ("self_attn.k_proj", KV_HEADS * HEAD_DIM, HIDDEN),
        ("self_attn.v_proj", KV_HEADS * HEAD_DIM, HIDDEN),
        ("self_attn.o_proj", HIDDEN, HIDDEN),
        ("mlp.gate_proj", FF, HIDDEN),
        ("mlp.up_proj", FF, HIDDEN),
        ("mlp.down_proj", HIDDEN, FF),
    ]
}

fn bytes_of(dtype: Dtype, v: &[f32]) -> Vec<u8> {
    match dtype {
        Dtype::F32 => v.iter().flat_map(|x| x.to_le_bytes()).collect(),
        Dtype::F16 => v.iter().flat_map(|&x| f16::from_f32(x).to_le_bytes()).collect(),
        Dtype::BF16 => v.iter().flat_map(|&x| bf16::from_f32(x).to_le_bytes()).collect(),
        _ => unreachable!(),
    }
}

/// The value the file holds for `x` stored as `dtype`.
fn stored(dtype: Dtype, x: f32) -> f32 {
    match dtype {
        Dtype::F32 => x,
        Dtype::F16 => f16::from_f32(x).to_f32(),
        Dtype::BF16 => bf16::from_f32(x).to_f32(),
        _ => unreachable!(),
    }
}

fn open(dir: &Path, weights: FloatWeights) -> Result<Checkpoint, Error> {
    Checkpoint::open(
        dir,
        LoadOptions {
            weights,
            quantize_lm_head: false,
        },
    )
}

/// Loads the model and runs a short prompt: the logits are finite.
fn forward_runs(ckpt: &Checkpoint) {
    let l = logits(ckpt);
    assert_eq!(l.len(), VOCAB);
    assert!(l.iter().all(|v| v.is_finite()));
}

/// The GGUF name of a Hugging Face weight.
fn gguf_name(hf: &str) -> String {
    let names = tensor_names(&qmtot::config::ModelConfig::from_hf(&config(None)).unwrap());
    names
        .into_iter()
        .find(|n| qmtot::formats::safetensors::hf_tensor_name(n).as_deref() == Some(hf))
        .unwrap_or_else(|| panic!("{hf} maps to no model tensor"))
}

#[test]
fn float_checkpoints_in_every_dtype_single_and_sharded_load_exactly() {
    let tok = tokenizer();
    let model = float_model(7);
    for dtype in [Dtype::F32, Dtype::F16, Dtype::BF16] {
        for sharded in [false, true] {
            let dir = tempfile::tempdir().unwrap();
            let tensors: Vec<OutTensor> = model
                .iter()
                .map(|(n, s, v)| OutTensor {
                    name: n.clone(),
                    dtype,
                    shape: s.clone(),
                    data: bytes_of(dtype, v),
                })
                .collect();
            write_folder(dir.path(), &config(None), &tok, &tensors).unwrap();
            if sharded {
                // Two shards split by tensor, and the index naming each one's tensors.
                std::fs::remove_file(dir.path().join("model.safetensors")).unwrap();
                let mut map = serde_json::Map::new();
                for (k, part) in tensors.chunks(tensors.len() / 2 + 1).enumerate() {
                    let file = format!("model-{:05}-of-00002.safetensors", k + 1);
                    let views: Vec<_> = part
                        .iter()
                        .map(|t| {
                            map.insert(t.name.clone(), json!(file));
                            (
                                t.name.clone(),
                                safetensors::tensor::TensorView::new(t.dtype, t.shape.clone(), &t.data).unwrap(),
                            )
                        })
                        .collect();
                    safetensors::serialize_to_file(views, None, &dir.path().join(&file)).unwrap();
                }
                std::fs::write(
                    dir.path().join("model.safetensors.index.json"),
                    json!({"metadata": {}, "weight_map": map}).to_string(),
                )
                .unwrap();
            }
            let what = format!("{dtype:?} sharded={sharded}");
            // f32 weights: every element exactly the stored value.
            let ckpt = open(dir.path(), FloatWeights::F32).unwrap();
            assert_eq!(ckpt.config().unwrap().rope_style, qmtot::config::RopeStyle::HalfSplit);
            for (name, shape, v) in &model {
                let g = gguf_name(name);
                let got = if shape.len() == 1 {
                    ckpt.vector(&g).unwrap()
                } else {
                    ckpt.matrix(&g).unwrap().dequant()
                };
                let want: Vec<f32> = v.iter().map(|&x| stored(dtype, x)).collect();
                assert!(
                    got.iter().zip(&want).all(|(a, b)| a.to_bits() == b.to_bits()),
                    "{what}: {name}"
                );
            }
            forward_runs(&ckpt);
            // f16: the f16 rounding of the stored value; embeddings and lm_head f16 under int4.
            let h = open(dir.path(), FloatWeights::F16).unwrap();
            let q = h.matrix("blk.0.ffn_down.weight").unwrap();
            assert!(matches!(q, WeightMatrix::F16(_)), "{what}");
            let down = &model
                .iter()
                .find(|t| t.0 == "model.layers.0.mlp.down_proj.weight")
                .unwrap()
                .2;
            let want: Vec<f32> = down.iter().map(|&x| f16::from_f32(stored(dtype, x)).to_f32()).collect();
            assert_eq!(q.dequant(), want, "{what}: f16 weights");
            let i4 = open(dir.path(), FloatWeights::Int4 { group: 64 }).unwrap();
            assert!(matches!(i4.matrix("output.weight").unwrap(), WeightMatrix::F16(_)));
            match i4.matrix("blk.1.attn_q.weight").unwrap() {
                WeightMatrix::Int4(m) => assert_eq!(m.group, 64),
                other => panic!("{what}: {}", other.kind()),
            }
            if !sharded {
                forward_runs(&i4);
            }
        }
    }
}

/// Random nibbles, zeros and f16 scales for one `[out, in]` layer with group `g`.
struct Quantized {
    q: Vec<u8>,
    zeros: Vec<u8>,
    scales: Vec<f16>,
}

fn random_layer(rng: &mut Rng, out: usize, inp: usize, g: usize, zero_range: (u8, u8)) -> Quantized {
    let groups = inp / g;
    Quantized {
        q: (0..out * inp).map(|_| rng.below(16) as u8).collect(),
        zeros: (0..groups * out)
            .map(|_| zero_range.0 + rng.below((zero_range.1 - zero_range.0 + 1) as u64) as u8)
            .collect(),
        scales: (0..groups * out)
            .map(|_| f16::from_f32(0.002 + 0.02 * rng.uniform().abs()))
            .collect(),
    }
}

fn i32_tensor(name: String, shape: &[usize], v: &[i32]) -> OutTensor {
    OutTensor {
        name,
        dtype: Dtype::I32,
        shape: shape.to_vec(),
        data: v.iter().flat_map(|x| x.to_le_bytes()).collect(),
    }
}

/// One layer as the checkpoint stores it, with the group of each input and the true zeros
/// `[groups, out]` it was packed with.
struct Packed {
    tensors: Vec<OutTensor>,
    group_of: Vec<usize>,
    zeros: Vec<u8>,
}

/// Writes a folder whose linear layers are quantized by `pack` (returning the layer's tensors),
/// everything else float; returns the reference weights `s·(q − z)` by GGUF name.
fn quantized_folder(
    dir: &Path,
    quantization: Value,
    seed: u64,
    mut pack: impl FnMut(&str, usize, usize, &Quantized, &mut Rng) -> Packed,
) -> BTreeMap<String, Vec<f32>> {
    let mut rng = Rng(seed);
    let mut tensors = Vec::new();
    let mut reference = BTreeMap::new();
    for (name, shape, v) in float_model(seed) {
        if shape.len() == 2 && name.starts_with("model.layers.") {
            let (out, inp) = (shape[0], shape[1]);
            let module = name.strip_suffix(".weight").unwrap();
            let g = 32;
            let layer = random_layer(&mut rng, out, inp, g, (1, 15));
            let p = pack(module, out, inp, &layer, &mut rng);
            tensors.extend(p.tensors);
            let w: Vec<f32> = (0..out * inp)
                .map(|i| {
                    let (o, c) = (i / inp, i % inp);
                    let grp = p.group_of[c];
                    layer.scales[grp * out + o].to_f32() * (layer.q[i] as f32 - p.zeros[grp * out + o] as f32)
                })
                .collect();
            reference.insert(gguf_name(&name), w);
        } else {
            tensors.push(OutTensor::f32(name, shape, &v));
        }
    }
    write_folder(dir, &config(Some(quantization)), &tokenizer(), &tensors).unwrap();
    reference
}

/// Equal bits, or both zeros (s·q + m gives +0 where s·(q − z) may give −0).
fn same(a: &[f32], b: &[f32]) -> bool {
    a.len() == b.len()
        && a.iter()
            .zip(b)
            .all(|(x, y)| x.to_bits() == y.to_bits() || (*x == 0.0 && *y == 0.0))
}

fn gptq_folder(dir: &Path, sym: bool, v1: bool, act_order: bool, seed: u64) -> BTreeMap<String, Vec<f32>> {
    let q = json!({"quant_method": "gptq", "bits": 4, "group_size": 32, "sym": sym, "desc_act": act_order,
                   "checkpoint_format": if v1 { "gptq" } else { "gptq_v2" }});
    quantized_folder(dir, q, seed, |module, out, inp, layer, _| {
        // Symmetric checkpoints have zero 8 everywhere.
        let zeros = if sym {
            vec![8; layer.zeros.len()]
        } else {
            layer.zeros.clone()
        };
        // Act-order: a shuffled g_idx with 32 columns per group, the same for the layers that
        // read one input (GPTQ derives it from that input's statistics: q/k/v share one, as do
        // gate/up).
        let mut group_of: Vec<usize> = (0..inp).map(|c| c / 32).collect();
        if act_order {
            let input = module.rsplit_once('.').map_or("", |(_, m)| match m {
                "q_proj" | "k_proj" | "v_proj" => "qkv",
                "gate_proj" | "up_proj" => "gate_up",
                other => other,
            });
            let layer: u64 = module.split('.').nth(2).and_then(|l| l.parse().ok()).unwrap_or(0);
            let mut shuffle = Rng(0x9e37 + seed * 31 + layer * 7 + input.bytes().map(u64::from).sum::<u64>());
            for i in (1..inp).rev() {
                group_of.swap(i, shuffle.below(i as u64 + 1) as usize);
            }
        }
        let g_idx: Vec<u32> = group_of.iter().map(|&g| g as u32).collect();
        let p = pack_gptq(inp, out, 32, &layer.q, &zeros, &layer.scales, Some(&g_idx), v1).unwrap();
        let tensors = vec![
            i32_tensor(format!("{module}.qweight"), &p.qweight_shape, &p.qweight),
            i32_tensor(format!("{module}.qzeros"), &p.qzeros_shape, &p.qzeros),
            OutTensor::f16(format!("{module}.scales"), p.scales_shape.to_vec(), &p.scales),
            i32_tensor(format!("{module}.g_idx"), &p.g_idx_shape, &p.g_idx),
        ];
        Packed {
            tensors,
            group_of,
            zeros,
        }
    })
}

/// Last-position logits of a short prompt.
fn logits(ckpt: &Checkpoint) -> Vec<f32> {
    let model = Llama::load(CpuBackend::new(1).unwrap(), ckpt.config().unwrap(), ckpt, |_, _| {}).unwrap();
    let prompt = ckpt
        .tokenizer()
        .unwrap()
        .encode("The capital of France is", false)
        .unwrap();
    SequenceKv::new(&model, prompt.len())
        .unwrap()
        .extend(&model, &prompt, false)
        .unwrap()
}

/// A float folder with `weights` (by GGUF name) for the quantized layers and `float_model(seed)`
/// for the rest: the function a quantized folder of the same seed must compute.
fn float_twin(dir: &Path, seed: u64, weights: &BTreeMap<String, Vec<f32>>) {
    let tensors: Vec<OutTensor> = float_model(seed)
        .into_iter()
        .map(|(name, shape, v)| {
            let v = weights.get(&gguf_name(&name)).cloned().unwrap_or(v);
            OutTensor::f32(name, shape, &v)
        })
        .collect();
    write_folder(dir, &config(None), &tokenizer(), &tensors).unwrap();
}

#[test]
fn gptq_checkpoints_load_bit_exactly_with_and_without_act_order() {
    let mut seed = 11;
    for act_order in [false, true] {
        for sym in [true, false] {
            for v1 in [true, false] {
                seed += 1;
                let what = format!("GPTQ act_order={act_order} sym={sym} v1={v1}");
                let dir = tempfile::tempdir().unwrap();
                let reference = gptq_folder(dir.path(), sym, v1, act_order, seed);
                let ckpt = open(dir.path(), FloatWeights::Int4 { group: 128 }).unwrap();
                for (name, want) in &reference {
                    let m = ckpt.matrix(name).unwrap();
                    let WeightMatrix::Int4(q) = &m else {
                        panic!("{what}: {name} is {}", m.kind())
                    };
                    assert_eq!((q.group, q.input_order.is_some()), (32, act_order), "{what}: {name}");
                    assert!(same(&m.dequant(), want), "{what}: {name}");
                }
                // The model computes W·x with the stored columns fed their own inputs: the same
                // logits as a float folder holding the reference weights (1e-4: the same f32
                // values, summed in another order by the INT4 and dense kernels).
                let twin = tempfile::tempdir().unwrap();
                float_twin(twin.path(), seed, &reference);
                common::assert_close(
                    &what,
                    &logits(&ckpt),
                    &logits(&open(twin.path(), FloatWeights::F32).unwrap()),
                    1e-4,
                    1e-4,
                );
                if act_order && !sym && v1 {
                    // quantize keeps the order: the folder reloads to the very same matrices.
                    let out = tempfile::tempdir().unwrap();
                    let opts = QuantizeOptions {
                        group: None,
                        format: OutFormat::Safetensors,
                        quantize_lm_head: false,
                    };
                    let s = quantize(&ckpt, out.path(), opts, |_, _| {}).unwrap();
                    assert_eq!(s.requantized, 0);
                    let back = open(out.path(), FloatWeights::F32).unwrap();
                    for name in reference.keys() {
                        assert_eq!(back.matrix(name).unwrap(), ckpt.matrix(name).unwrap(), "{name}");
                    }
                }
            }
        }
    }
}

#[test]
fn awq_checkpoints_load_bit_exactly() {
    let dir = tempfile::tempdir().unwrap();
    let q = json!({"quant_method": "awq", "bits": 4, "group_size": 32, "zero_point": true, "version": "gemm"});
    let reference = quantized_folder(dir.path(), q, 21, |module, out, inp, layer, _| {
        let p = pack_awq(inp, out, 32, &layer.q, &layer.zeros, &layer.scales).unwrap();
        Packed {
            tensors: vec![
                i32_tensor(format!("{module}.qweight"), &p.qweight_shape, &p.qweight),
                i32_tensor(format!("{module}.qzeros"), &p.qzeros_shape, &p.qzeros),
                OutTensor::f16(format!("{module}.scales"), p.scales_shape.to_vec(), &p.scales),
            ],
            group_of: (0..inp).map(|c| c / 32).collect(),
            zeros: layer.zeros.clone(),
        }
    });
    let ckpt = open(dir.path(), FloatWeights::Int4 { group: 128 }).unwrap();
    for (name, want) in &reference {
        assert!(same(&ckpt.matrix(name).unwrap().dequant(), want), "AWQ {name}");
    }
    forward_runs(&ckpt);
}

#[test]
fn quantize_writes_int4_folders_that_reload_to_the_same_matrices() {
    let tok = tokenizer();
    let model = float_model(3);
    let src = tempfile::tempdir().unwrap();
    let tensors: Vec<OutTensor> = model
        .iter()
        .map(|(n, s, v)| OutTensor::f32(n.clone(), s.clone(), v))
        .collect();
    write_folder(src.path(), &config(None), &tok, &tensors).unwrap();
    let source = open(src.path(), FloatWeights::F32).unwrap();
    for group in [32, 64] {
        let out = tempfile::tempdir().unwrap();
        let opts = QuantizeOptions {
            group: Some(group),
            format: OutFormat::Safetensors,
            quantize_lm_head: false,
        };
        let s = quantize(&source, out.path(), opts, |_, _| {}).unwrap();
        assert_eq!(s.int4_tensors, LAYERS * 7);
        let back = open(out.path(), FloatWeights::F32).unwrap();
        for (name, shape, v) in &model {
            let g = gguf_name(name);
            if shape.len() == 1 {
                assert_eq!(&back.vector(&g).unwrap(), v);
            } else if name.starts_with("model.layers.") {
                let want = Int4Matrix::quantize_rtn(shape[0], shape[1], group, v).unwrap();
                assert_eq!(back.matrix(&g).unwrap(), WeightMatrix::Int4(want), "g{group}: {name}");
            } else {
                // The embedding and lm_head stay float (f32 here: random values are not f16).
                assert_eq!(&back.matrix(&g).unwrap().dequant(), v, "{name}");
            }
        }
        forward_runs(&back);
    }
    // A group wider than a layer's inputs (128 > 64 here), unsupported group sizes and GGUF
    // output of a Hugging Face source are refused.
    let wide = QuantizeOptions {
        group: Some(128),
        format: OutFormat::Safetensors,
        quantize_lm_head: false,
    };
    assert!(
        matches!(quantize(&source, &src.path().join("w"), wide, |_, _| {}), Err(Error::InvalidArgument(m)) if m.contains("does not divide"))
    );
    let bad = QuantizeOptions {
        group: Some(48),
        format: OutFormat::Safetensors,
        quantize_lm_head: false,
    };
    assert!(matches!(
        quantize(&source, &src.path().join("x"), bad, |_, _| {}),
        Err(Error::InvalidArgument(_))
    ));
    let gguf = QuantizeOptions {
        group: None,
        format: OutFormat::Gguf,
        quantize_lm_head: false,
    };
    assert!(
        matches!(quantize(&source, &src.path().join("x.gguf"), gguf, |_, _| {}), Err(Error::InvalidArgument(m)) if m.contains("GGUF source"))
    );
}

#[test]
fn bad_quantized_folders_are_typed_errors() {
    let dir = tempfile::tempdir().unwrap();
    gptq_folder(dir.path(), false, true, false, 31);
    let edit = |f: &dyn Fn(&mut Value)| {
        let p = dir.path().join("config.json");
        let mut v: Value = serde_json::from_str(&std::fs::read_to_string(&p).unwrap()).unwrap();
        f(&mut v);
        std::fs::write(&p, v.to_string()).unwrap();
    };
    for bits in [3, 8] {
        edit(&|v| v["quantization_config"]["bits"] = bits.into());
        let err = open(dir.path(), FloatWeights::F32).map(|_| ()).unwrap_err();
        assert!(
            matches!(&err, Error::UnsupportedQuantization(m) if m.contains(&format!("{bits} bits"))),
            "{err}"
        );
    }
    edit(&|v| v["quantization_config"]["bits"] = 4.into());
    edit(&|v| v["quantization_config"]["quant_method"] = "hqq".into());
    assert!(matches!(open(dir.path(), FloatWeights::F32), Err(Error::UnsupportedQuantization(m)) if m.contains("hqq")));
    edit(&|v| v["quantization_config"]["quant_method"] = "gptq".into());
    // A layer's scales stored as f32: that dtype is not allowed there.
    let ckpt = open(dir.path(), FloatWeights::F32).unwrap();
    assert!(ckpt.matrix("blk.0.attn_q.weight").is_ok());
    drop(ckpt);
    let tok = tokenizer();
    let other = tempfile::tempdir().unwrap();
    let mut tensors = Vec::new();
    for (name, shape, v) in float_model(4) {
        if name == "model.layers.0.self_attn.q_proj.weight" {
            let layer = random_layer(&mut Rng(1), HIDDEN, HIDDEN, 32, (1, 15));
            let p = pack_gptq(HIDDEN, HIDDEN, 32, &layer.q, &layer.zeros, &layer.scales, None, true).unwrap();
            let m = "model.layers.0.self_attn.q_proj";
            tensors.push(i32_tensor(format!("{m}.qweight"), &p.qweight_shape, &p.qweight));
            tensors.push(i32_tensor(format!("{m}.qzeros"), &p.qzeros_shape, &p.qzeros));
            let f: Vec<f32> = p.scales.iter().map(|s| s.to_f32()).collect();
            tensors.push(OutTensor::f32(format!("{m}.scales"), p.scales_shape.to_vec(), &f));
        } else {
            tensors.push(OutTensor::f32(name, shape, &v));
        }
    }
    let q = json!({"quant_method": "gptq", "bits": 4, "group_size": 32, "sym": false, "desc_act": false});
    write_folder(other.path(), &config(Some(q)), &tok, &tensors).unwrap();
    let ckpt = open(other.path(), FloatWeights::F32).unwrap();
    let err = ckpt.matrix("blk.0.attn_q.weight").unwrap_err();
    assert!(
        matches!(&err, Error::BadTensor { tensor, reason } if tensor.ends_with("q_proj.scales") && reason.contains("dtype")),
        "{err}"
    );
    // The float layers of that folder still load (a mixed folder is fine).
    assert!(ckpt.matrix("blk.0.attn_k.weight").is_ok());
}

#[test]
fn projection_biases_are_added_where_the_checkpoint_has_them() {
    // Qwen2-style biases, checked by an identity: attention weights sum to 1, so a bias b_v on
    // V adds exactly b_v (per KV head, repeated over its query heads) to every attention
    // output, i.e. the same as an o_proj bias of W_o · expand(b_v).
    let seed = 41;
    let model = float_model(seed);
    let mut rng = Rng(77);
    let tok = tokenizer();
    let write = |dir: &Path, extra: &[(String, Vec<f32>)], arch: &str| {
        let mut tensors: Vec<OutTensor> = model
            .iter()
            .map(|(n, s, v)| OutTensor::f32(n.clone(), s.clone(), v))
            .collect();
        for (name, v) in extra {
            tensors.push(OutTensor::f32(name.clone(), vec![v.len()], v));
        }
        let mut c = config(None);
        if arch == "qwen2" {
            c["architectures"] = json!(["Qwen2ForCausalLM"]);
            c["model_type"] = json!("qwen2");
        }
        write_folder(dir, &c, &tok, &tensors).unwrap();
    };
    let mut v_bias = Vec::new();
    let mut o_bias = Vec::new();
    for l in 0..LAYERS {
        let b_v: Vec<f32> = (0..KV_HEADS * HEAD_DIM).map(|_| 0.5 * rng.uniform()).collect();
        let expanded: Vec<f64> = (0..HEADS * HEAD_DIM)
            .map(|i| b_v[(i / HEAD_DIM) / (HEADS / KV_HEADS) * HEAD_DIM + i % HEAD_DIM] as f64)
            .collect();
        let w_o = &model
            .iter()
            .find(|t| t.0 == format!("model.layers.{l}.self_attn.o_proj.weight"))
            .unwrap()
            .2;
        let b_o: Vec<f32> = (0..HIDDEN)
            .map(|r| {
                (0..HIDDEN)
                    .map(|c| w_o[r * HIDDEN + c] as f64 * expanded[c])
                    .sum::<f64>() as f32
            })
            .collect();
        v_bias.push((format!("model.layers.{l}.self_attn.v_proj.bias"), b_v));
        o_bias.push((format!("model.layers.{l}.self_attn.o_proj.bias"), b_o));
    }
    let (a, b, none, zeros, q) = (
        tempfile::tempdir().unwrap(),
        tempfile::tempdir().unwrap(),
        tempfile::tempdir().unwrap(),
        tempfile::tempdir().unwrap(),
        tempfile::tempdir().unwrap(),
    );
    write(a.path(), &v_bias, "qwen2");
    write(b.path(), &o_bias, "llama");
    write(none.path(), &[], "llama");
    let zero: Vec<(String, Vec<f32>)> = v_bias.iter().map(|(n, v)| (n.clone(), vec![0.0; v.len()])).collect();
    write(zeros.path(), &zero, "qwen2");
    let q_bias: Vec<(String, Vec<f32>)> = (0..LAYERS)
        .map(|l| {
            (
                format!("model.layers.{l}.self_attn.q_proj.bias"),
                (0..HIDDEN).map(|_| rng.uniform()).collect(),
            )
        })
        .collect();
    write(q.path(), &q_bias, "qwen2");
    let run = |d: &Path| logits(&open(d, FloatWeights::F32).unwrap());
    let (with_v, with_o, plain) = (run(a.path()), run(b.path()), run(none.path()));
    // 1e-4: the same function computed two ways in f32.
    common::assert_close(
        "v_proj bias vs the equivalent o_proj bias",
        &with_v,
        &with_o,
        1e-4,
        1e-4,
    );
    assert!(
        common::max_abs_diff(&with_v, &plain) > 1e-2,
        "the bias changes the output"
    );
    assert_eq!(run(zeros.path()), plain, "zero biases change nothing");
    assert!(
        common::max_abs_diff(&run(q.path()), &plain) > 1e-3,
        "q biases are applied"
    );
    // A bias of the wrong length is a shape error naming it.
    let bad = tempfile::tempdir().unwrap();
    write(
        bad.path(),
        &[("model.layers.1.mlp.down_proj.bias".into(), vec![0.0; 3])],
        "llama",
    );
    let c = open(bad.path(), FloatWeights::F32).unwrap();
    let err = Llama::load(CpuBackend::new(1).unwrap(), c.config().unwrap(), &c, |_, _| {})
        .map(|_| ())
        .unwrap_err();
    assert!(
        matches!(&err, Error::ShapeMismatch { tensor, .. } if tensor == "blk.1.ffn_down.bias"),
        "{err}"
    );
}
