//! Hugging Face folders: a float copy of the default model written from its GGUF by the crate
//! (weights dequantized, W_q / W_k un-permuted to the half-split RoPE convention, config.json,
//! tokenizer.json) computes the same logits as the GGUF (which uses adjacent RoPE pairs), in
//! f32, f16 and INT4 (round-to-nearest at load); and bad folders are typed errors.

mod common;

use std::path::Path;

use qmtot::backend::cpu::CpuBackend;
use qmtot::engine::SequenceKv;
use qmtot::error::Error;
use qmtot::formats::checkpoint::Checkpoint;
use qmtot::formats::gguf::GgufFile;
use qmtot::formats::hf_write::{export_gguf, ExportDtype};
use qmtot::formats::safetensors::{FloatWeights, LoadOptions};
use qmtot::model::Llama;

use common::{assert_close, data_path, model_path};

const VOCAB: usize = 49152;

#[derive(serde::Deserialize)]
struct Reference {
    prompt_ids: Vec<u32>,
    greedy_text: String,
}

fn reference() -> Reference {
    serde_json::from_str(&std::fs::read_to_string(data_path("smollm2-capital.json")).unwrap()).unwrap()
}

/// Logits at every prompt position, and the greedy continuation's text.
fn run(ckpt: &Checkpoint, prompt: &[u32], greedy_tokens: usize) -> (Vec<f32>, String) {
    let model = Llama::load(CpuBackend::new(2).unwrap(), ckpt.config().unwrap(), ckpt, |_, _| {}).unwrap();
    let tok = ckpt.tokenizer().unwrap();
    let logits = SequenceKv::new(&model, prompt.len())
        .unwrap()
        .extend(&model, prompt, true)
        .unwrap();
    let mut seq = SequenceKv::new(&model, prompt.len() + greedy_tokens).unwrap();
    let mut last = seq.extend(&model, prompt, false).unwrap();
    let mut out = Vec::new();
    for _ in 0..greedy_tokens {
        let next = qmtot::engine::sampler::argmax(&last);
        out.push(next);
        last = seq.extend(&model, &[next], false).unwrap();
    }
    (logits, tok.decode(&out).unwrap())
}

fn export(dir: &Path, dtype: ExportDtype) {
    let g = GgufFile::open(model_path()).unwrap();
    let tok = qmtot::tokenizer::Tokenizer::from_gguf(&g).unwrap();
    export_gguf(&g, &tok, dir, dtype).unwrap();
}

fn open(dir: &Path, weights: FloatWeights) -> Checkpoint {
    Checkpoint::open(
        dir,
        LoadOptions {
            weights,
            quantize_lm_head: false,
        },
    )
    .unwrap()
}

#[test]
fn a_hugging_face_copy_of_the_default_model_computes_the_same_logits() {
    let r = reference();
    let gguf = Checkpoint::open(&model_path(), LoadOptions::default()).unwrap();
    let (want, want_text) = run(&gguf, &r.prompt_ids, 6);
    assert!(
        r.greedy_text.starts_with(&want_text),
        "{want_text:?} vs the reference {:?}",
        r.greedy_text
    );

    let dir = tempfile::tempdir().unwrap();
    export(dir.path(), ExportDtype::F32);
    for f in [
        "config.json",
        "tokenizer.json",
        "generation_config.json",
        "chat_template.jinja",
        "model.safetensors",
    ] {
        assert!(dir.path().join(f).is_file(), "{f} written");
    }
    let hf = open(dir.path(), FloatWeights::F32);
    let config = hf.config().unwrap();
    assert_eq!(config.rope_style, qmtot::config::RopeStyle::HalfSplit);
    assert_eq!(
        config,
        qmtot::config::ModelConfig {
            rope_style: config.rope_style,
            ..gguf.config().unwrap()
        }
    );
    // The tokenizer round-trips through tokenizer.json.
    let (a, b) = (gguf.tokenizer().unwrap(), hf.tokenizer().unwrap());
    let text = "The capital of France is Paris.<|im_end|>\n ünïcode 123";
    assert_eq!(a.encode(text, true).unwrap(), b.encode(text, true).unwrap());
    assert_eq!(a.eos_ids(), b.eos_ids());
    assert_eq!(a.chat_template(), b.chat_template());

    // f32: the same function (the other RoPE convention, the same weights): 1e-3 absolute, as
    // the forward tests allow between two f32 forwards that differ in summation order (here
    // the INT4 kernel against the dense one over the same dequantized values).
    let (got, text) = run(&hf, &r.prompt_ids, 6);
    assert_close("HF f32 vs GGUF logits", &got, &want, 1e-3, 0.0);
    eprintln!(
        "max |Δ logit| against the GGUF: f32 {}",
        common::max_abs_diff(&got, &want)
    );
    assert_eq!(text, want_text);

    // f16 weights: each weight rounded to f16 (relative error ≤ 2^-11). Through 30 layers that
    // moves logits by a few hundredths; 0.1 absolute (logits span ~30) still catches any
    // real error, which moves them by whole units.
    let (got16, text16) = run(&open(dir.path(), FloatWeights::F16), &r.prompt_ids, 6);
    assert_close("HF f16 vs GGUF logits", &got16, &want, 0.1, 0.0);
    eprintln!(
        "max |Δ logit| against the GGUF: f16 {}",
        common::max_abs_diff(&got16, &want)
    );
    assert_eq!(text16, want_text, "greedy text survives f16 weights");

    // INT4 round-to-nearest at load (group 32, which the Q4_1 values came from): re-quantizing
    // values that were already 4-bit per 32 is exact up to the f16 rounding of the scale, so
    // the logits stay close to the GGUF's.
    let (got4, _) = run(&open(dir.path(), FloatWeights::Int4 { group: 32 }), &r.prompt_ids, 0);
    let worst = common::max_abs_diff(&got4, &want);
    eprintln!("max |Δ logit| against the GGUF: INT4 g32 {worst}");
    assert!(worst < 0.1, "INT4 g32 re-quantization moved logits by {worst}");
    assert_eq!(got4.len(), r.prompt_ids.len() * VOCAB);
}

#[test]
fn bad_folders_are_typed_errors() {
    let dir = tempfile::tempdir().unwrap();
    export(dir.path(), ExportDtype::F16);
    let opts = LoadOptions::default();
    let copy = |edit: &dyn Fn(&Path)| {
        let d = tempfile::tempdir().unwrap();
        for e in std::fs::read_dir(dir.path()).unwrap() {
            let e = e.unwrap();
            std::fs::copy(e.path(), d.path().join(e.file_name())).unwrap();
        }
        edit(d.path());
        d
    };
    let load = |d: &Path| -> Result<(), Error> {
        let c = Checkpoint::open(d, opts)?;
        Llama::load(CpuBackend::new(1).unwrap(), c.config()?, &c, |_, _| {})?;
        Ok(())
    };
    let set_config = |d: &Path, f: &dyn Fn(&mut serde_json::Value)| {
        let p = d.join("config.json");
        let mut v: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&p).unwrap()).unwrap();
        f(&mut v);
        std::fs::write(&p, v.to_string()).unwrap();
    };

    // A folder with no weights, and one that is not a checkpoint at all.
    let d = copy(&|d| std::fs::remove_file(d.join("model.safetensors")).unwrap());
    assert!(matches!(load(d.path()), Err(Error::Checkpoint { reason, .. }) if reason.contains("no model.safetensors")));
    let empty = tempfile::tempdir().unwrap();
    assert!(matches!(load(empty.path()), Err(Error::Checkpoint { reason, .. }) if reason.contains("config.json")));
    // Shape mismatch against the config.
    let d = copy(&|d| set_config(d, &|v| v["intermediate_size"] = 1024.into()));
    assert!(matches!(load(d.path()), Err(Error::ShapeMismatch { tensor, .. }) if tensor.contains("ffn_gate")));
    // Impossible head counts.
    let d = copy(&|d| set_config(d, &|v| v["num_key_value_heads"] = 4.into()));
    assert!(matches!(load(d.path()), Err(Error::InvalidConfig(_))));
    // An unknown quant_method.
    let d = copy(&|d| {
        set_config(d, &|v| {
            v["quantization_config"] = serde_json::json!({"quant_method": "bitsandbytes"})
        })
    });
    assert!(matches!(load(d.path()), Err(Error::UnsupportedQuantization(m)) if m.contains("bitsandbytes")));
    // A tensor missing: an untied model without lm_head.weight.
    let d = copy(&|d| set_config(d, &|v| v["tie_word_embeddings"] = false.into()));
    assert!(matches!(load(d.path()), Err(Error::MissingTensor(t)) if t == "output.weight"));
    // A missing shard named in the index.
    let d = copy(&|d| {
        std::fs::write(
            d.join("model.safetensors.index.json"),
            r#"{"weight_map": {"model.norm.weight": "model.safetensors", "lm_head.weight": "model-00002-of-00002.safetensors"}}"#,
        )
        .unwrap()
    });
    assert!(matches!(load(d.path()), Err(Error::Checkpoint { path, reason })
        if path.ends_with("model-00002-of-00002.safetensors") && reason.contains("missing")));
    // A truncated weights file.
    let d = copy(&|d| {
        let p = d.join("model.safetensors");
        let len = std::fs::metadata(&p).unwrap().len();
        std::fs::OpenOptions::new()
            .write(true)
            .open(&p)
            .unwrap()
            .set_len(len / 2)
            .unwrap();
    });
    assert!(matches!(load(d.path()), Err(Error::Checkpoint { reason, .. }) if reason.contains("safetensors")));
    // The chat template from tokenizer_config.json when there is no chat_template.jinja (as
    // transformers 4.x writes it), and eos ids from config.json without generation_config.json.
    let d = copy(&|d| {
        let t = std::fs::read_to_string(d.join("chat_template.jinja")).unwrap();
        std::fs::remove_file(d.join("chat_template.jinja")).unwrap();
        std::fs::remove_file(d.join("generation_config.json")).unwrap();
        std::fs::write(
            d.join("tokenizer_config.json"),
            serde_json::json!({"chat_template": t}).to_string(),
        )
        .unwrap();
    });
    let (a, b) = (
        Checkpoint::open(dir.path(), opts).unwrap().tokenizer().unwrap(),
        Checkpoint::open(d.path(), opts).unwrap().tokenizer().unwrap(),
    );
    assert!(b.chat_template().is_some());
    assert_eq!(a.chat_template(), b.chat_template());
    assert_eq!(a.eos_ids(), b.eos_ids());
    // Not a checkpoint: a text file.
    let f = dir.path().join("config.json");
    assert!(
        matches!(Checkpoint::open(&f, opts), Err(Error::Checkpoint { reason, .. }) if reason.contains("GGUF file or a Hugging Face folder"))
    );
}

#[test]
fn quantize_output_of_the_default_model_generates_the_same_text() {
    use qmtot::formats::quantize::{quantize, OutFormat, QuantizeOptions};
    let r = reference();
    let src = Checkpoint::open(
        &model_path(),
        LoadOptions {
            weights: FloatWeights::F32,
            quantize_lm_head: false,
        },
    )
    .unwrap();
    let (want, want_text) = run(&src, &r.prompt_ids, 12);
    let dir = tempfile::tempdir().unwrap();
    for (format, path) in [
        (OutFormat::Safetensors, dir.path().join("int4")),
        (OutFormat::Gguf, dir.path().join("int4.gguf")),
    ] {
        let opts = QuantizeOptions {
            group: None,
            format,
            quantize_lm_head: false,
        };
        let s = quantize(&src, &path, opts, |_, _| {}).unwrap();
        assert_eq!(
            (s.int4_tensors, s.requantized),
            (210, 0),
            "{format:?}: the Q4_1 layers are kept"
        );
        let back = Checkpoint::open(&path, LoadOptions::default()).unwrap();
        let (got, text) = run(&back, &r.prompt_ids, 12);
        assert_eq!(text, want_text, "{format:?}: greedy text");
        match format {
            // The same tensors in the same file format: the same logits, bit for bit.
            OutFormat::Gguf => assert_eq!(got, want),
            // The same INT4 layers (W_q / W_k rows moved to the half-split order) and the
            // Q8_0 embedding written exactly in f32: the same function, f32 summation order
            // aside (1e-3 as above).
            OutFormat::Safetensors => assert_close("quantized folder vs GGUF", &got, &want, 1e-3, 0.0),
        }
    }
}
