//! The CLIP BPE tokenizer, built with the `tokenizers` crate from a checkpoint's
//! `tokenizer/vocab.json` + `merges.txt`, giving the ids of transformers' fast `CLIPTokenizer`:
//! NFC, whitespace runs → one space, lower-case; CLIP's split regex then byte-level
//! pre-tokenisation; BPE with the `</w>` end-of-word suffix; `<|startoftext|>` … `<|endoftext|>`
//! around the tokens; truncation to 77 with the specials counted; padding with the pad token
//! (`<|endoftext|>` for SD 1.x) to 77.

use std::path::Path;

use serde_json::{Value, json};

use crate::error::ModelError;

const BOS: &str = "<|startoftext|>";
const EOS: &str = "<|endoftext|>";

/// A tokenized prompt, padded to the model's length.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TokenizedPrompt {
    /// Exactly `max_length` ids: BOS, tokens, EOS, padding.
    pub ids: Vec<u32>,
    /// The prompt did not fit: its tail was dropped.
    pub truncated: bool,
    /// Tokens in the prompt before truncation, specials excluded.
    pub token_count: usize,
}

/// The CLIP tokenizer of a checkpoint.
pub struct ClipTokenizer {
    inner: tokenizers::Tokenizer,
    max_length: usize,
    pad_id: u32,
}

impl std::fmt::Debug for ClipTokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClipTokenizer").field("max_length", &self.max_length).field("pad_id", &self.pad_id).finish()
    }
}

fn tok_err(message: impl std::fmt::Display) -> ModelError {
    ModelError::Tokenizer(message.to_string())
}

/// The text of a special-token entry in `tokenizer_config.json` (a string or `{content}`).
fn token_text(v: &Value) -> Option<String> {
    match v {
        Value::String(s) => Some(s.clone()),
        Value::Object(o) => o.get("content").and_then(Value::as_str).map(str::to_string),
        _ => None,
    }
}

impl ClipTokenizer {
    /// Loads the tokenizer from a checkpoint's `tokenizer/` directory. `max_length` is the text
    /// encoder's position count (77), which `model_max_length` may lower but never raise.
    ///
    /// # Errors
    /// [`ModelError::MissingFile`] without `vocab.json`/`merges.txt`; [`ModelError::Tokenizer`]
    /// when they are malformed or lack the special tokens.
    pub fn from_dir(dir: &Path, max_length: usize) -> Result<Self, ModelError> {
        let read = |name: &str| -> Result<String, ModelError> {
            let path = dir.join(name);
            std::fs::read_to_string(&path).map_err(|source| {
                if source.kind() == std::io::ErrorKind::NotFound {
                    ModelError::MissingFile(path)
                } else {
                    ModelError::Io { path, source }
                }
            })
        };
        let vocab: serde_json::Map<String, Value> =
            serde_json::from_str(&read("vocab.json")?).map_err(|e| tok_err(format!("vocab.json: {e}")))?;
        let merges: Vec<String> = read("merges.txt")?
            .lines()
            .filter(|l| !l.starts_with("#version") && !l.trim().is_empty())
            .map(str::to_string)
            .collect();
        if let Some(bad) = merges.iter().find(|m| m.split(' ').count() != 2) {
            return Err(tok_err(format!("merges.txt: malformed line {bad:?}")));
        }

        let mut pad = EOS.to_string();
        let mut model_max = max_length;
        let config_path = dir.join("tokenizer_config.json");
        if config_path.is_file() {
            let config = crate::config::read_json_object(&config_path)?;
            if let Some(p) = config.get("pad_token").and_then(token_text) {
                pad = p;
            }
            if let Some(m) = config.get("model_max_length").and_then(Value::as_u64) {
                model_max = model_max.min(m as usize);
            }
        }
        let id_of = |token: &str| -> Result<u32, ModelError> {
            vocab
                .get(token)
                .and_then(Value::as_u64)
                .map(|id| id as u32)
                .ok_or_else(|| tok_err(format!("vocab.json has no {token:?}")))
        };
        let (bos_id, eos_id, pad_id) = (id_of(BOS)?, id_of(EOS)?, id_of(&pad)?);

        let special = |id: u32, content: &str| {
            json!({"id": id, "content": content, "single_word": false, "lstrip": false, "rstrip": false,
                   "normalized": false, "special": true})
        };
        let mut added = vec![special(bos_id, BOS), special(eos_id, EOS)];
        if pad != EOS && pad != BOS {
            added.push(special(pad_id, &pad));
        }
        let spec = json!({
            "version": "1.0",
            "truncation": null,
            "padding": null,
            "added_tokens": added,
            "normalizer": {"type": "Sequence", "normalizers": [
                {"type": "NFC"},
                {"type": "Replace", "pattern": {"Regex": r"\s+"}, "content": " "},
                {"type": "Lowercase"}
            ]},
            "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
                {"type": "Split",
                 "pattern": {"Regex": r"<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"},
                 "behavior": "Removed", "invert": true},
                {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": true}
            ]},
            "post_processor": {"type": "RobertaProcessing", "sep": [EOS, eos_id], "cls": [BOS, bos_id],
                               "trim_offsets": false, "add_prefix_space": false},
            "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true},
            "model": {"type": "BPE", "dropout": null, "unk_token": EOS, "continuing_subword_prefix": "",
                      "end_of_word_suffix": "</w>", "fuse_unk": false, "byte_fallback": false,
                      "ignore_merges": false, "vocab": vocab, "merges": merges}
        });
        let inner: tokenizers::Tokenizer = spec.to_string().parse().map_err(tok_err)?;
        if model_max < 2 {
            return Err(tok_err(format!("model_max_length {model_max} leaves no room for BOS and EOS")));
        }
        Ok(Self { inner, max_length: model_max, pad_id })
    }

    /// The padded length (77).
    pub fn max_length(&self) -> usize {
        self.max_length
    }

    /// Tokenizes one prompt: BOS, up to `max_length − 2` tokens, EOS, padding.
    ///
    /// # Errors
    /// [`ModelError::Tokenizer`] only if the tokenizer itself fails.
    pub fn encode(&self, text: &str) -> Result<TokenizedPrompt, ModelError> {
        let encoding = self.inner.encode(text, true).map_err(tok_err)?;
        let all = encoding.get_ids();
        // `all` = BOS, tokens…, EOS.
        let token_count = all.len().saturating_sub(2);
        let room = self.max_length - 2;
        let truncated = token_count > room;
        let mut ids = Vec::with_capacity(self.max_length);
        ids.push(all[0]);
        ids.extend_from_slice(&all[1..1 + token_count.min(room)]);
        ids.push(all[all.len() - 1]);
        ids.resize(self.max_length, self.pad_id);
        Ok(TokenizedPrompt { ids, truncated, token_count })
    }
}
