//! Tokenizer: a `tokenizers::Tokenizer` built from GGUF metadata (byte-level BPE) or loaded
//! from a Hugging Face `tokenizer.json`, plus the model's chat template rendered by minijinja.

use std::path::Path;

use tokenizers::decoders::byte_level::ByteLevel as ByteLevelDecoder;
use tokenizers::models::bpe::BPE;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::digits::Digits;
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::pre_tokenizers::PreTokenizerWrapper;
use tokenizers::processors::template::TemplateProcessing;
use tokenizers::{AddedToken, SplitDelimiterBehavior};

use crate::error::{Error, Result};
use crate::formats::gguf::GgufFile;

/// GGUF `tokenizer.ggml.token_type` values (llama.cpp's `llama_token_type`).
const TOKEN_TYPE_CONTROL: i64 = 3;
const TOKEN_TYPE_USER_DEFINED: i64 = 4;

/// The split regex of the LLaMA-3 tokenizer (`tokenizer.ggml.pre = llama-bpe`): contractions,
/// letter runs with one leading non-letter, digit runs of at most three, punctuation runs,
/// newlines, and whitespace.
const LLAMA3_SPLIT: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// One chat message for the template.
#[derive(Clone, Debug, serde::Serialize)]
pub struct ChatMessage {
    pub role: String,
    pub content: String,
}

impl ChatMessage {
    pub fn new(role: &str, content: &str) -> Self {
        Self {
            role: role.to_string(),
            content: content.to_string(),
        }
    }
}

#[derive(Clone)]
pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
    bos: Option<u32>,
    eos: Vec<u32>,
    add_bos: bool,
    chat_template: Option<String>,
}

fn tok_err(e: impl std::fmt::Display) -> Error {
    Error::Tokenizer(e.to_string())
}

impl Tokenizer {
    /// Builds the tokenizer a GGUF file describes (`tokenizer.ggml.*` keys).
    pub fn from_gguf(g: &GgufFile) -> Result<Self> {
        let model = g.get_str("tokenizer.ggml.model")?;
        if model != "gpt2" {
            return Err(Error::Tokenizer(format!(
                "tokenizer model {model:?} is not supported (qmtot builds byte-level BPE, \"gpt2\")"
            )));
        }
        let tokens = g.get_array("tokenizer.ggml.tokens")?;
        let mut vocab = tokenizers::models::bpe::Vocab::with_capacity(tokens.len());
        let mut names = Vec::with_capacity(tokens.len());
        for (id, t) in tokens.iter().enumerate() {
            let s = t
                .as_str()
                .ok_or_else(|| Error::Tokenizer(format!("token {id} is not a string")))?;
            vocab.insert(s.to_string(), id as u32);
            names.push(s);
        }
        let merges = match g.get("tokenizer.ggml.merges") {
            None => Vec::new(),
            Some(_) => g
                .get_array("tokenizer.ggml.merges")?
                .iter()
                .enumerate()
                .map(|(i, m)| {
                    m.as_str()
                        .and_then(|s| s.split_once(' '))
                        .map(|(a, b)| (a.to_string(), b.to_string()))
                        .ok_or_else(|| Error::Tokenizer(format!("merge {i} is not \"a b\"")))
                })
                .collect::<Result<Vec<_>>>()?,
        };
        let bpe = BPE::builder()
            .vocab_and_merges(vocab, merges)
            .build()
            .map_err(tok_err)?;

        let pre = match g.get("tokenizer.ggml.pre") {
            None => "default",
            Some(_) => g.get_str("tokenizer.ggml.pre")?,
        };
        let byte_level = |use_regex| PreTokenizerWrapper::ByteLevel(ByteLevel::new(false, true, use_regex));
        let pre_tokenizer = match pre {
            // SmolLM: every digit its own pre-token, then GPT-2's byte-level split.
            "smollm" => Sequence::new(vec![PreTokenizerWrapper::Digits(Digits::new(true)), byte_level(true)]),
            "llama-bpe" | "llama3" => Sequence::new(vec![
                PreTokenizerWrapper::Split(
                    Split::new(
                        SplitPattern::Regex(LLAMA3_SPLIT.to_string()),
                        SplitDelimiterBehavior::Isolated,
                        false,
                    )
                    .map_err(tok_err)?,
                ),
                byte_level(false),
            ]),
            "gpt2" | "default" => Sequence::new(vec![byte_level(true)]),
            other => return Err(Error::UnknownPreTokenizer(other.to_string())),
        };

        let mut inner = tokenizers::Tokenizer::new(bpe);
        inner
            .with_pre_tokenizer(Some(pre_tokenizer))
            .with_decoder(Some(ByteLevelDecoder::default()));

        // Control and user-defined tokens are matched whole before BPE runs.
        if let Some(types) = g.get("tokenizer.ggml.token_type") {
            let types = types
                .as_array()
                .ok_or_else(|| Error::Tokenizer("token_type is not an array".into()))?;
            let mut special = Vec::new();
            for (id, t) in types.iter().enumerate() {
                let ty = t.as_f64().unwrap_or(1.0) as i64;
                if (ty == TOKEN_TYPE_CONTROL || ty == TOKEN_TYPE_USER_DEFINED) && id < names.len() {
                    special.push(AddedToken::from(names[id].to_string(), ty == TOKEN_TYPE_CONTROL));
                }
            }
            inner.add_special_tokens(special).map_err(tok_err)?;
        }

        let id_key = |k: &str| -> Result<Option<u32>> {
            match g.get(k) {
                None => Ok(None),
                Some(_) => {
                    let id = g.get_u64(k)?;
                    if id as usize >= names.len() {
                        return Err(Error::Tokenizer(format!("{k} = {id} is outside the vocabulary")));
                    }
                    Ok(Some(id as u32))
                }
            }
        };
        let bos = id_key("tokenizer.ggml.bos_token_id")?;
        let eos: Vec<u32> = id_key("tokenizer.ggml.eos_token_id")?
            .into_iter()
            .chain(id_key("tokenizer.ggml.eot_token_id")?)
            .collect();
        let add_bos = g
            .get("tokenizer.ggml.add_bos_token")
            .and_then(|v| v.as_bool())
            .unwrap_or(false);
        if add_bos {
            let bos_id = bos.ok_or_else(|| Error::Tokenizer("add_bos_token without bos_token_id".into()))?;
            let bos_name = names[bos_id as usize].to_string();
            let post = TemplateProcessing::builder()
                .try_single(format!("{bos_name} $A"))
                .map_err(tok_err)?
                .special_tokens(vec![(bos_name, bos_id)])
                .build()
                .map_err(tok_err)?;
            inner.with_post_processor(Some(post));
        }
        let chat_template = match g.get("tokenizer.chat_template") {
            None => None,
            Some(_) => Some(g.get_str("tokenizer.chat_template")?.to_string()),
        };
        Ok(Self {
            inner,
            bos,
            eos,
            add_bos,
            chat_template,
        })
    }

    /// Loads a Hugging Face `tokenizer.json`. Its post-processor decides special tokens;
    /// `eos` and the chat template come from the caller (they live in other files there).
    pub fn from_file(path: impl AsRef<Path>, eos: Vec<u32>, chat_template: Option<String>) -> Result<Self> {
        let path = path.as_ref();
        let inner =
            tokenizers::Tokenizer::from_file(path).map_err(|e| Error::Tokenizer(format!("{}: {e}", path.display())))?;
        Ok(Self {
            inner,
            bos: None,
            eos,
            add_bos: true,
            chat_template,
        })
    }

    /// The same tokenizer with these end-of-generation ids.
    pub fn with_eos(mut self, eos: Vec<u32>) -> Self {
        self.eos = eos;
        self
    }

    /// Token ids of `text`. With `add_special`, the model's BOS (if it wants one) is prepended;
    /// special-token text such as `<|im_start|>` is always matched as its token.
    pub fn encode(&self, text: &str, add_special: bool) -> Result<Vec<u32>> {
        let enc = self.inner.encode(text, add_special).map_err(tok_err)?;
        Ok(enc.get_ids().to_vec())
    }

    /// The tokenizer as a Hugging Face `tokenizer.json` (eos ids and the chat template live
    /// in other files there).
    pub fn to_json(&self) -> Result<String> {
        self.inner.to_string(true).map_err(tok_err)
    }

    /// Text of `ids`, special tokens included.
    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        self.inner.decode(ids, false).map_err(tok_err)
    }

    /// An incremental decoder for streaming output: feed ids one at a time, get the text they
    /// complete (a partial UTF-8 sequence is held back until it completes).
    pub fn stream(&self) -> TextStream {
        TextStream::default()
    }

    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    /// The vocabulary entry of `id` (its raw form, e.g. `Ġthe` in byte-level BPE).
    pub fn id_to_token(&self, id: u32) -> Option<String> {
        self.inner.id_to_token(id)
    }

    pub fn token_to_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    pub fn bos_id(&self) -> Option<u32> {
        self.bos
    }

    pub fn adds_bos(&self) -> bool {
        self.add_bos
    }

    /// Ids that end generation (eos, and end-of-turn where the model has one).
    pub fn eos_ids(&self) -> &[u32] {
        &self.eos
    }

    pub fn chat_template(&self) -> Option<&str> {
        self.chat_template.as_deref()
    }

    /// Renders the chat template over `messages`. With `add_generation_prompt`, the text ends
    /// where the assistant's reply starts.
    pub fn apply_chat_template(&self, messages: &[ChatMessage], add_generation_prompt: bool) -> Result<String> {
        let template = self
            .chat_template
            .as_deref()
            .ok_or_else(|| Error::ChatTemplate("the model has no chat template".into()))?;
        let mut env = minijinja::Environment::new();
        env.add_function(
            "raise_exception",
            |msg: String| -> std::result::Result<String, minijinja::Error> {
                Err(minijinja::Error::new(minijinja::ErrorKind::InvalidOperation, msg))
            },
        );
        env.add_template("chat", template)
            .map_err(|e| Error::ChatTemplate(e.to_string()))?;
        let token_text = |id: Option<u32>| id.and_then(|i| self.inner.id_to_token(i)).unwrap_or_default();
        let ctx = minijinja::context! {
            messages => messages,
            add_generation_prompt => add_generation_prompt,
            bos_token => token_text(self.bos),
            eos_token => token_text(self.eos.first().copied()),
        };
        env.get_template("chat")
            .and_then(|t| t.render(ctx))
            .map_err(|e| Error::ChatTemplate(e.to_string()))
    }
}

/// Incremental detokenizer; see [`Tokenizer::stream`]. It owns its state (so a sequence can
/// keep one) and borrows the tokenizer only while stepping.
#[derive(Clone, Debug, Default)]
pub struct TextStream {
    /// Ids not yet settled into emitted text (the decode window).
    ids: Vec<u32>,
    /// Text of `ids[..prefix_index]`, already emitted.
    prefix: String,
    prefix_index: usize,
}

impl TextStream {
    /// Feeds one id; returns the text it completes, if any.
    pub fn step(&mut self, tokenizer: &Tokenizer, id: u32) -> Result<Option<String>> {
        tokenizers::tokenizer::step_decode_stream(
            &tokenizer.inner,
            vec![id],
            false,
            &mut self.ids,
            &mut self.prefix,
            &mut self.prefix_index,
        )
        .map_err(tok_err)
    }
}
