//! The tokenizer built from GGUF metadata against the reference tokenizer.json and prompt ids.

mod common;

use std::io::Read;

use qmtot::error::Error;
use qmtot::formats::gguf::{GgufFile, GgufWriter, MetaValue};
use qmtot::tokenizer::{ChatMessage, Tokenizer};

use common::{data_path, tiny_model_writer, TinySpec};

#[derive(serde::Deserialize)]
struct Reference {
    prompt: String,
    prompt_ids: Vec<u32>,
    greedy_ids: Vec<u32>,
    greedy_text: String,
}

fn reference() -> Reference {
    serde_json::from_str(&std::fs::read_to_string(data_path("smollm2-capital.json")).unwrap()).unwrap()
}

fn gguf_tokenizer() -> Tokenizer {
    Tokenizer::from_gguf(&GgufFile::open(common::model_path()).unwrap()).unwrap()
}

/// The reference `tokenizer.json`, decompressed into a temporary file.
fn reference_tokenizer() -> (tempfile::TempDir, Tokenizer) {
    let mut json = String::new();
    let gz = std::fs::File::open(data_path("smollm2-tokenizer.json.gz")).unwrap();
    flate2::read::GzDecoder::new(gz).read_to_string(&mut json).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tokenizer.json");
    std::fs::write(&path, json).unwrap();
    let t = Tokenizer::from_file(&path, vec![2], None).unwrap();
    (dir, t)
}

const TRICKY: &[&str] = &[
    "What is the capital of France?",
    "1234567890 and 3.14159, 2024-11-25 12:00",
    "  leading spaces,\ttabs\t\tand   runs of    spaces  ",
    "new\nlines\r\n\n\nand blank lines\n",
    "ünïcödé: naïve café — “quotes” ‘single’ … 日本語のテキスト 中文 한국어 العربية",
    "emoji 🙂👍🏽 and ZWJ 👩‍💻 sequences",
    "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n",
    "code: fn main() { println!(\"{}\", x[0] >> 2); } // ok?",
    "MedQA: A 23-year-old woman (G2P1) presents with 38.5°C fever; BP 90/60 mmHg. Which is next?",
    "",
];

#[test]
fn the_reference_prompt_encodes_to_its_ids() {
    let r = reference();
    let t = gguf_tokenizer();
    assert_eq!(t.encode(&r.prompt, false).unwrap(), r.prompt_ids);
    // The model adds no BOS of its own (add_bos_token = false), so add_special changes nothing.
    assert_eq!(t.encode(&r.prompt, true).unwrap(), r.prompt_ids);
    assert_eq!(t.decode(&r.greedy_ids).unwrap(), r.greedy_text);
}

#[test]
fn the_chat_template_renders_the_reference_prompt() {
    let r = reference();
    let t = gguf_tokenizer();
    let text = t
        .apply_chat_template(&[ChatMessage::new("user", "What is the capital of France?")], true)
        .unwrap();
    assert_eq!(text, r.prompt, "the template inserts its default system message");
    let template = std::fs::read_to_string(data_path("smollm2-chat_template.jinja")).unwrap();
    assert_eq!(
        t.chat_template(),
        Some(template.as_str()),
        "same template as transformers writes"
    );
    let with_system = t
        .apply_chat_template(
            &[ChatMessage::new("system", "Be brief."), ChatMessage::new("user", "Hi")],
            true,
        )
        .unwrap();
    assert_eq!(
        with_system,
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    );
}

#[test]
fn decode_inverts_encode_on_tricky_strings() {
    let t = gguf_tokenizer();
    for s in TRICKY {
        let ids = t.encode(s, false).unwrap();
        assert_eq!(t.decode(&ids).unwrap(), *s, "round trip of {s:?} via {ids:?}");
    }
}

#[test]
fn special_tokens_are_matched_whole() {
    let t = gguf_tokenizer();
    assert_eq!(t.encode("<|im_start|><|im_end|>", false).unwrap(), vec![1, 2]);
    assert_eq!(t.eos_ids(), &[2]);
    assert_eq!(t.bos_id(), Some(1));
}

#[test]
fn gguf_tokenizer_encodes_like_the_reference_tokenizer_json() {
    let (_dir, json) = reference_tokenizer();
    let t = gguf_tokenizer();
    let r = reference();
    assert_eq!(json.encode(&r.prompt, false).unwrap(), r.prompt_ids);
    for s in TRICKY {
        assert_eq!(t.encode(s, false).unwrap(), json.encode(s, false).unwrap(), "{s:?}");
    }
    assert_eq!(t.vocab_size(), json.vocab_size());
}

#[test]
fn streaming_decode_reassembles_multibyte_characters() {
    let t = gguf_tokenizer();
    let text = "naïve 日本語 🙂 done";
    let ids = t.encode(text, false).unwrap();
    let mut stream = t.stream();
    let mut out = String::new();
    for id in ids {
        if let Some(piece) = stream.step(&t, id).unwrap() {
            assert!(!piece.contains('\u{fffd}'), "a partial character leaked: {piece:?}");
            out.push_str(&piece);
        }
    }
    assert_eq!(out, text);
}

#[test]
fn unknown_pre_tokenizer_is_a_clear_error() {
    let mut w = GgufWriter::new();
    let src = GgufFile::from_bytes(tiny_model_writer(TinySpec::default(), 1).to_bytes()).unwrap();
    for (k, v) in src.metadata {
        let v = if k == "tokenizer.ggml.pre" {
            MetaValue::String("nonsense".into())
        } else {
            v
        };
        w.meta(&k, v);
    }
    let g = GgufFile::from_bytes(w.to_bytes()).unwrap();
    match Tokenizer::from_gguf(&g) {
        Err(Error::UnknownPreTokenizer(p)) => assert_eq!(p, "nonsense"),
        other => panic!("expected UnknownPreTokenizer, got {:?}", other.err()),
    }
}

#[test]
fn llama_bpe_pre_tokenizer_splits_digits_in_threes() {
    let mut w = GgufWriter::new();
    let src = GgufFile::from_bytes(tiny_model_writer(TinySpec::default(), 1).to_bytes()).unwrap();
    for (k, v) in src.metadata {
        let v = match k.as_str() {
            "tokenizer.ggml.pre" => MetaValue::String("llama-bpe".into()),
            // A byte-level vocabulary: the 256 byte symbols, plus "12" and "123" reachable by merges.
            "tokenizer.ggml.tokens" => {
                let mut toks: Vec<MetaValue> = (0..256).map(|i| MetaValue::String(byte_symbol(i))).collect();
                toks.push(MetaValue::String("12".into()));
                toks.push(MetaValue::String("123".into()));
                MetaValue::Array(qmtot::formats::gguf::MetaType::String, toks)
            }
            "llama.vocab_size" => MetaValue::U32(258),
            _ => v,
        };
        w.meta(&k, v);
    }
    w.meta(
        "tokenizer.ggml.merges",
        MetaValue::Array(
            qmtot::formats::gguf::MetaType::String,
            vec![MetaValue::String("1 2".into()), MetaValue::String("12 3".into())],
        ),
    );
    let t = Tokenizer::from_gguf(&GgufFile::from_bytes(w.to_bytes()).unwrap()).unwrap();
    // "123123" splits as "123" | "123" (digit runs of at most three), each one merged token.
    assert_eq!(t.encode("123123", false).unwrap(), vec![257, 257]);
    assert_eq!(t.decode(&[257, 257]).unwrap(), "123123");
}

/// GPT-2's byte-to-unicode symbol for byte `b`.
fn byte_symbol(b: u32) -> String {
    let printable = |c: u32| (33..=126).contains(&c) || (161..=172).contains(&c) || (174..=255).contains(&c);
    if printable(b) {
        return char::from_u32(b).unwrap().to_string();
    }
    let n = (0..b).filter(|&c| !printable(c)).count() as u32;
    char::from_u32(256 + n).unwrap().to_string()
}
