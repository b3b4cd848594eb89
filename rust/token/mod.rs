//! Tokenizers: the built-in OpenAI encodings and Hugging Face `tokenizer.json` files.
//!
//! Nothing is downloaded, ever: `o200k_base` and `cl100k_base` are embedded in
//! the `tiktoken-rs` crate (its `assets/*.tiktoken`, compiled in with
//! `include_str!`), and a Hugging Face tokenizer is read from a local file.
//!
//! A [`Tokenizer`] is immutable and `Send + Sync`; share one per model.
//!
//! Text is encoded as *ordinary* text: in the built-in encodings the text
//! `<|endoftext|>` is five ordinary tokens, never the special token, so user
//! content can never forge framing. (Hugging Face tokenizers match their added
//! tokens inside text as the `tokenizers` library always does.)
//!
//! Items and instructions are rendered by [`render`] and framed with three
//! token ids per message ([`Framing`]).

mod bpe;
pub mod render;

use std::fmt;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::Path;
use std::sync::OnceLock;

use bpe::FastBpe;

pub use render::{
    render_instructions, render_item, render_tools, ItemError, Rendered, TEMPLATE_VERSION,
};

/// Every error of this module; one `Display` holds every message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TokenError {
    /// `Tokenizer::builtin` with a name that is not a built-in encoding.
    UnknownEncoding { name: String },
    /// The tokenizer file could not be read.
    TokenizerFileUnreadable { path: String, reason: String },
    /// The tokenizer file is not a valid Hugging Face `tokenizer.json`.
    InvalidTokenizerFile { path: String, reason: String },
    /// Item JSON that is not UTF-8 JSON of an object.
    InvalidItem { reason: String },
    /// The tokenizer failed on a text (a Hugging Face tokenizer's error; the
    /// built-in encodings never fail).
    Encode { reason: String },
}

impl fmt::Display for TokenError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::UnknownEncoding { name } => write!(
                f,
                "unknown encoding {name:?}: use one of {BUILTIN_NAMES:?}, \
                 Tokenizer.for_model(model) to pick one by model name, \
                 or Tokenizer.from_file(path) for a Hugging Face tokenizer.json"
            ),
            Self::TokenizerFileUnreadable { path, reason } => write!(
                f,
                "cannot read tokenizer file {path:?}: {reason}; pass the path of a local \
                 Hugging Face tokenizer.json (nothing is downloaded)"
            ),
            Self::InvalidTokenizerFile { path, reason } => write!(
                f,
                "{path:?} is not a valid Hugging Face tokenizer.json: {reason}; save one with \
                 `tokenizer.save(path)` from the `tokenizers` library or \
                 `AutoTokenizer.from_pretrained(...).save_pretrained(dir)`"
            ),
            Self::InvalidItem { reason } if reason.starts_with("tools") => write!(
                f,
                "{reason}; pass the request's tools as the UTF-8 JSON of an array"
            ),
            Self::InvalidItem { reason } => write!(
                f,
                "{reason}; pass one Responses API item as the UTF-8 JSON of an object"
            ),
            Self::Encode { reason } => write!(f, "tokenizer failed on this text: {reason}"),
        }
    }
}

impl std::error::Error for TokenError {}

impl From<ItemError> for TokenError {
    fn from(e: ItemError) -> Self {
        Self::InvalidItem { reason: e.reason }
    }
}

/// The built-in encodings.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Encoding {
    O200kBase,
    Cl100kBase,
}

/// Names accepted by [`Tokenizer::builtin`].
pub const BUILTIN_NAMES: [&str; 2] = ["o200k_base", "cl100k_base"];

/// The encoding [`encoding_for_model`] returns for a model it does not know.
pub const DEFAULT_ENCODING: Encoding = Encoding::O200kBase;

/// Model-name prefixes, first match wins (so `gpt-4o` is tried before `gpt-4`).
const MODEL_PREFIXES: &[(&str, Encoding)] = &[
    ("gpt-4o", Encoding::O200kBase),
    ("chatgpt-4o", Encoding::O200kBase),
    ("gpt-4.1", Encoding::O200kBase),
    ("gpt-4.5", Encoding::O200kBase),
    ("gpt-5", Encoding::O200kBase),
    ("gpt-oss", Encoding::O200kBase),
    ("o1", Encoding::O200kBase),
    ("o3", Encoding::O200kBase),
    ("o4", Encoding::O200kBase),
    ("codex", Encoding::O200kBase),
    ("computer-use", Encoding::O200kBase),
    ("gpt-4", Encoding::Cl100kBase),
    ("gpt-3.5", Encoding::Cl100kBase),
    ("gpt-35", Encoding::Cl100kBase),
    ("text-embedding-3", Encoding::Cl100kBase),
    ("text-embedding-ada-002", Encoding::Cl100kBase),
];

impl Encoding {
    pub fn from_name(name: &str) -> Option<Self> {
        match name {
            "o200k_base" => Some(Self::O200kBase),
            "cl100k_base" => Some(Self::Cl100kBase),
            _ => None,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Self::O200kBase => "o200k_base",
            Self::Cl100kBase => "cl100k_base",
        }
    }

    /// The message framing ids: the chat-format special tokens of the encoding.
    pub fn framing(self) -> Framing {
        match self {
            // o200k_harmony's <|start|>, <|message|>, <|end|> (tiktoken's
            // o200k_harmony; outside o200k_base's text ranks, < 199998).
            Self::O200kBase => Framing {
                start: 200_006,
                sep: 200_008,
                end: 200_007,
            },
            // cl100k's chat tokens <|im_start|>, <|im_sep|>, <|im_end|>
            // (outside cl100k_base's text ranks, < 100256).
            Self::Cl100kBase => Framing {
                start: 100_264,
                sep: 100_266,
                end: 100_265,
            },
        }
    }

    /// The encoder, built on first use from tiktoken-rs's embedded ranks.
    fn bpe(self) -> &'static FastBpe {
        static O200K: OnceLock<FastBpe> = OnceLock::new();
        static CL100K: OnceLock<FastBpe> = OnceLock::new();
        match self {
            Self::O200kBase => {
                O200K.get_or_init(|| FastBpe::o200k(tiktoken_rs::o200k_base_singleton()))
            }
            Self::Cl100kBase => {
                CL100K.get_or_init(|| FastBpe::cl100k(tiktoken_rs::cl100k_base_singleton()))
            }
        }
    }
}

/// The encoding for a model name, or [`DEFAULT_ENCODING`] when the model is unknown.
///
/// The name is matched case-insensitively by prefix after dropping a provider
/// prefix (`openai/gpt-4o`) and a fine-tune wrapper (`ft:gpt-4o-mini:org::id`).
pub fn encoding_for_model(model: &str) -> Encoding {
    known_encoding_for_model(model).unwrap_or(DEFAULT_ENCODING)
}

/// Like [`encoding_for_model`], but `None` for a model that is not in the table.
pub fn known_encoding_for_model(model: &str) -> Option<Encoding> {
    let mut name = model.trim().to_ascii_lowercase();
    if let Some(rest) = name.strip_prefix("ft:") {
        name = rest.split(':').next().unwrap_or(rest).to_owned();
    }
    if let Some((_, base)) = name.rsplit_once('/') {
        name = base.to_owned();
    }
    MODEL_PREFIXES
        .iter()
        .find(|(prefix, _)| name.starts_with(prefix))
        .map(|&(_, encoding)| encoding)
}

/// The three token ids that frame each rendered message:
/// `start enc(role) sep enc(content...) end`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Framing {
    pub start: u32,
    pub sep: u32,
    pub end: u32,
}

/// Framing tokens per message.
pub const FRAMING_TOKENS: usize = 3;

enum Backend {
    Tiktoken(&'static FastBpe),
    #[cfg(feature = "hf")]
    HuggingFace(Box<tokenizers::Tokenizer>),
}

/// A tokenizer: a built-in encoding or a Hugging Face `tokenizer.json`.
pub struct Tokenizer {
    name: String,
    backend: Backend,
    framing: Framing,
    fingerprint: u64,
}

impl fmt::Debug for Tokenizer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Tokenizer")
            .field("name", &self.name)
            .field("framing", &self.framing)
            .field("fingerprint", &self.fingerprint)
            .finish_non_exhaustive()
    }
}

impl Tokenizer {
    /// A built-in encoding. The first use of each encoding in a process builds
    /// its rank table from the embedded file (about 0.1–0.3 s); later ones share it.
    pub fn encoding(encoding: Encoding) -> Self {
        Self {
            name: encoding.name().to_owned(),
            backend: Backend::Tiktoken(encoding.bpe()),
            framing: encoding.framing(),
            fingerprint: fingerprint(encoding.name().as_bytes()),
        }
    }

    /// A built-in encoding by name (`o200k_base`, `cl100k_base`).
    pub fn builtin(name: &str) -> Result<Self, TokenError> {
        Encoding::from_name(name)
            .map(Self::encoding)
            .ok_or_else(|| TokenError::UnknownEncoding {
                name: name.to_owned(),
            })
    }

    /// The encoding of a model by name; unknown models get [`DEFAULT_ENCODING`].
    pub fn for_model(model: &str) -> Self {
        Self::encoding(encoding_for_model(model))
    }

    /// A Hugging Face tokenizer from a local `tokenizer.json`.
    pub fn from_file(path: &Path) -> Result<Self, TokenError> {
        let shown = path.display().to_string();
        let bytes = std::fs::read(path).map_err(|e| TokenError::TokenizerFileUnreadable {
            path: shown.clone(),
            reason: e.to_string(),
        })?;
        Self::from_json(&bytes, shown)
    }

    /// A Hugging Face tokenizer from the contents of a `tokenizer.json`;
    /// `name` is what [`Tokenizer::name`] reports and errors show.
    ///
    /// Truncation and padding configured in the file are switched off: counts
    /// are of the whole text. The framing ids are the three ids after the
    /// largest id of the vocabulary (added tokens included), so they never
    /// collide with a text token.
    pub fn from_json(json: &[u8], name: String) -> Result<Self, TokenError> {
        match hf::load(json) {
            Ok((backend, framing)) => Ok(Self {
                name,
                backend,
                framing,
                fingerprint: fingerprint(json),
            }),
            Err(reason) => Err(TokenError::InvalidTokenizerFile { path: name, reason }),
        }
    }

    /// `o200k_base`, `cl100k_base`, or the path of the `tokenizer.json`.
    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn framing(&self) -> Framing {
        self.framing
    }

    /// Identifies what this tokenizer produces for an item: the encoding's name
    /// (or the `tokenizer.json` bytes) and [`TEMPLATE_VERSION`]. Equal
    /// fingerprints give equal tokens, so counts made by one tokenizer can be
    /// reused by another with the same fingerprint.
    pub fn fingerprint(&self) -> u64 {
        self.fingerprint
    }

    /// Token ids of `text` (ordinary text: no special tokens).
    pub fn encode(&self, text: &str) -> Result<Vec<u32>, TokenError> {
        let mut out = Vec::new();
        self.encode_into(text, &mut out)?;
        Ok(out)
    }

    /// Append the token ids of `text` (ordinary text) to `out`.
    pub fn encode_into(&self, text: &str, out: &mut Vec<u32>) -> Result<(), TokenError> {
        if text.is_empty() {
            return Ok(());
        }
        match &self.backend {
            Backend::Tiktoken(bpe) => guard(|| bpe.encode_into(text, out)),
            #[cfg(feature = "hf")]
            Backend::HuggingFace(tokenizer) => {
                out.extend(hf::encode(tokenizer, text)?);
                Ok(())
            }
        }
    }

    /// Number of tokens of `text`.
    pub fn count(&self, text: &str) -> Result<usize, TokenError> {
        self.encode(text).map(|t| t.len())
    }

    /// Token ids of a rendered message, framing included.
    pub fn encode_rendered(&self, rendered: &Rendered<'_>) -> Result<Vec<u32>, TokenError> {
        let mut out = Vec::new();
        self.encode_rendered_into(rendered, &mut out)?;
        Ok(out)
    }

    /// Append the token ids of a rendered message, framing included, to `out`.
    pub fn encode_rendered_into(
        &self,
        rendered: &Rendered<'_>,
        out: &mut Vec<u32>,
    ) -> Result<(), TokenError> {
        out.push(self.framing.start);
        self.encode_into(&rendered.role, out)?;
        out.push(self.framing.sep);
        for segment in &rendered.segments {
            self.encode_into(segment, out)?;
        }
        out.push(self.framing.end);
        Ok(())
    }

    /// Token ids of one item (its canonical JSON), framing included.
    pub fn encode_item(&self, item_json: &[u8]) -> Result<Vec<u32>, TokenError> {
        self.encode_rendered(&render_item(item_json)?)
    }

    /// Append the token ids of one item, framing included, to `out` (so the
    /// items of a turn can be encoded into one buffer and hashed in one
    /// `BlockHasher::extend`). On error `out` may hold part of the item.
    pub fn encode_item_into(&self, item_json: &[u8], out: &mut Vec<u32>) -> Result<(), TokenError> {
        self.encode_rendered_into(&render_item(item_json)?, out)
    }

    /// Number of tokens of one item, framing included.
    pub fn count_item(&self, item_json: &[u8]) -> Result<usize, TokenError> {
        self.encode_item(item_json).map(|t| t.len())
    }

    /// Token ids of the instructions (a `system` message), framing included.
    pub fn encode_instructions(&self, instructions: &str) -> Result<Vec<u32>, TokenError> {
        self.encode_rendered(&render_instructions(instructions))
    }

    /// Number of tokens of the instructions, framing included.
    pub fn count_instructions(&self, instructions: &str) -> Result<usize, TokenError> {
        self.encode_instructions(instructions).map(|t| t.len())
    }

    /// Token ids of a request's tools (a JSON array; one `system` message, each
    /// tool's JSON text a segment), framing included; none for an empty array.
    pub fn encode_tools(&self, tools_json: &[u8]) -> Result<Vec<u32>, TokenError> {
        match render_tools(tools_json)? {
            Some(rendered) => self.encode_rendered(&rendered),
            None => Ok(Vec::new()),
        }
    }

    /// Number of tokens of a request's tools (see [`Tokenizer::encode_tools`]).
    pub fn count_tools(&self, tools_json: &[u8]) -> Result<usize, TokenError> {
        self.encode_tools(tools_json).map(|t| t.len())
    }
}

fn fingerprint(source: &[u8]) -> u64 {
    xxhash_rust::xxh3::xxh3_64_with_seed(source, u64::from(TEMPLATE_VERSION))
}

/// Hugging Face `tokenizer.json` support (cargo feature `hf`, on by default).
#[cfg(feature = "hf")]
mod hf {
    use super::{guard, Backend, Framing, TokenError};

    /// The backend and its framing ids, or why the JSON is not a tokenizer.
    pub(super) fn load(json: &[u8]) -> Result<(Backend, Framing), String> {
        let mut hf = guard(|| tokenizers::Tokenizer::from_bytes(json))
            .map_err(|e| e.to_string())?
            .map_err(|e| e.to_string())?;
        hf.with_truncation(None).map_err(|e| e.to_string())?;
        hf.with_padding(None);
        let next_id = hf
            .get_vocab(true)
            .values()
            .max()
            .map_or(0, |&max| max.saturating_add(1));
        if next_id > u32::MAX - 3 {
            return Err("token ids leave no room for framing ids".into());
        }
        let framing = Framing {
            start: next_id,
            sep: next_id + 1,
            end: next_id + 2,
        };
        Ok((Backend::HuggingFace(Box::new(hf)), framing))
    }

    pub(super) fn encode(hf: &tokenizers::Tokenizer, text: &str) -> Result<Vec<u32>, TokenError> {
        let encoding = guard(|| hf.encode_fast(text, false))?.map_err(|e| TokenError::Encode {
            reason: e.to_string(),
        })?;
        Ok(encoding.get_ids().to_vec())
    }
}

/// Built without the `hf` feature: every tokenizer.json is refused.
#[cfg(not(feature = "hf"))]
mod hf {
    use super::{Backend, Framing};

    pub(super) fn load(_json: &[u8]) -> Result<(Backend, Framing), String> {
        Err("this build has no Hugging Face tokenizer support \
             (it was built without the default cargo feature `hf`)"
            .into())
    }
}

/// Run tokenizer library code, turning a panic inside it into an error.
fn guard<T>(f: impl FnOnce() -> T) -> Result<T, TokenError> {
    catch_unwind(AssertUnwindSafe(f)).map_err(|payload| TokenError::Encode {
        reason: payload
            .downcast_ref::<&str>()
            .map(|s| (*s).to_owned())
            .or_else(|| payload.downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "the tokenizer panicked".to_owned()),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn o200k() -> Tokenizer {
        Tokenizer::builtin("o200k_base").unwrap()
    }

    fn cl100k() -> Tokenizer {
        Tokenizer::builtin("cl100k_base").unwrap()
    }

    const SAMPLE: &str = "Hello, world! <|endoftext|> naïve 12345 東京\n\n  def f(x):\n\treturn x";

    #[test]
    fn known_token_ids() {
        // Checked against OpenAI's `tiktoken` 0.14 (Python) for the same strings.
        assert_eq!(o200k().encode("hello world").unwrap(), [24912, 2375]);
        assert_eq!(cl100k().encode("hello world").unwrap(), [15339, 1917]);
        assert_eq!(
            o200k().encode(SAMPLE).unwrap(),
            [
                13225, 11, 2375, 0, 464, 91, 419, 1440, 919, 91, 29, 153475, 737, 220, 7633, 2548,
                185244, 279, 220, 1056, 285, 4061, 1883, 1393, 1215
            ]
        );
        assert_eq!(
            cl100k().encode(SAMPLE).unwrap(),
            [
                9906, 11, 1917, 0, 83739, 8862, 728, 428, 91, 29, 95980, 588, 220, 4513, 1774,
                61696, 109, 47653, 271, 220, 711, 282, 2120, 997, 862, 865
            ]
        );
        assert_eq!(o200k().count("").unwrap(), 0);
        assert_eq!(o200k().count(SAMPLE).unwrap(), 25);
    }

    #[test]
    fn special_token_text_is_ordinary_text() {
        let t = o200k();
        let ids = t.encode("<|endoftext|>").unwrap();
        assert!(ids.len() > 1);
        assert!(!ids.contains(&199_999));
    }

    #[test]
    fn framing_ids_are_outside_the_text_ranks() {
        for t in [o200k(), cl100k()] {
            let f = t.framing();
            let text = "<|im_start|><|im_end|><|im_sep|><|start|><|message|><|end|> x";
            let ids = t.encode(text).unwrap();
            assert!(![f.start, f.sep, f.end].iter().any(|id| ids.contains(id)));
        }
    }

    #[test]
    fn builtin_errors() {
        let err = Tokenizer::builtin("p50k_base").unwrap_err();
        assert_eq!(
            err,
            TokenError::UnknownEncoding {
                name: "p50k_base".into()
            }
        );
        let msg = err.to_string();
        assert!(
            msg.contains("o200k_base") && msg.contains("for_model"),
            "{msg}"
        );
    }

    #[test]
    fn model_names() {
        for (model, enc) in [
            ("gpt-4o", "o200k_base"),
            ("gpt-4o-mini-2024-07-18", "o200k_base"),
            ("chatgpt-4o-latest", "o200k_base"),
            ("gpt-4.1-nano", "o200k_base"),
            ("gpt-5", "o200k_base"),
            ("gpt-5.2-codex", "o200k_base"),
            ("o1-preview", "o200k_base"),
            ("o3", "o200k_base"),
            ("o4-mini", "o200k_base"),
            ("gpt-4", "cl100k_base"),
            ("gpt-4-turbo-2024-04-09", "cl100k_base"),
            ("gpt-3.5-turbo", "cl100k_base"),
            ("gpt-35-turbo", "cl100k_base"),
            ("GPT-4", "cl100k_base"),
            ("openai/gpt-4", "cl100k_base"),
            ("ft:gpt-3.5-turbo-0613:acme::abc123", "cl100k_base"),
            ("ft:gpt-4o-mini-2024-07-18:acme::abc", "o200k_base"),
            ("text-embedding-3-small", "cl100k_base"),
            ("llama-3-70b", "o200k_base"),
            ("", "o200k_base"),
        ] {
            assert_eq!(Tokenizer::for_model(model).name(), enc, "{model}");
        }
        assert_eq!(known_encoding_for_model("llama-3-70b"), None);
        assert_eq!(
            known_encoding_for_model("gpt-4o"),
            Some(Encoding::O200kBase)
        );
    }

    #[test]
    fn item_tokens_are_framed_role_and_segments() {
        let t = o200k();
        let f = t.framing();
        let item = br#"{"content":[{"text":"hello","type":"input_text"},{"text":" world","type":"input_text"}],"role":"user","type":"message"}"#;
        let mut expect = vec![f.start];
        expect.extend(t.encode("user").unwrap());
        expect.push(f.sep);
        expect.extend(t.encode("hello").unwrap());
        expect.extend(t.encode(" world").unwrap());
        expect.push(f.end);
        assert_eq!(t.encode_item(item).unwrap(), expect);
        assert_eq!(t.count_item(item).unwrap(), expect.len());
        let mut two = vec![7];
        t.encode_item_into(item, &mut two).unwrap();
        t.encode_item_into(item, &mut two).unwrap();
        assert_eq!(two, [&[7][..], &expect, &expect].concat());
        // "user", "hello", " world" are one token each in o200k_base.
        assert_eq!(t.count_item(item).unwrap(), FRAMING_TOKENS + 3);
    }

    #[test]
    fn instructions_are_a_system_message() {
        let t = cl100k();
        let f = t.framing();
        let ids = t.encode_instructions("Be brief.").unwrap();
        assert_eq!(ids[0], f.start);
        assert_eq!(&ids[1..2], t.encode("system").unwrap().as_slice());
        assert_eq!(ids[2], f.sep);
        assert_eq!(*ids.last().unwrap(), f.end);
        assert_eq!(
            t.count_instructions("Be brief.").unwrap(),
            3 + 1 + t.count("Be brief.").unwrap()
        );
    }

    #[test]
    fn tools_are_a_system_message_of_their_json() {
        let t = o200k();
        let f = t.framing();
        let a = r#"{"name":"f","type":"function"}"#;
        let b = r#"{"type":"web_search"}"#;
        let ids = t.encode_tools(format!("[{a}, {b}]").as_bytes()).unwrap();
        let mut expect = vec![f.start];
        expect.extend(t.encode("system").unwrap());
        expect.push(f.sep);
        expect.extend(t.encode(a).unwrap());
        expect.extend(t.encode(b).unwrap());
        expect.push(f.end);
        assert_eq!(ids, expect);
        assert_eq!(
            t.count_tools(format!("[{a},{b}]").as_bytes()).unwrap(),
            ids.len()
        );
        assert_eq!(t.count_tools(b" [ ] ").unwrap(), 0);
        for bad in [&b"\xff"[..], b"{}", b"[", b"", b"[1]x"] {
            let err = t.count_tools(bad).unwrap_err();
            assert!(matches!(err, TokenError::InvalidItem { .. }), "{err}");
            assert!(err.to_string().contains("tools"), "{err}");
            assert!(err.to_string().ends_with("JSON of an array"), "{err}");
        }
    }

    #[test]
    fn invalid_items_are_errors() {
        let t = o200k();
        for bad in [&b"\xff\xfe"[..], b"[1]", b"{", b""] {
            let err = t.count_item(bad).unwrap_err();
            assert!(matches!(err, TokenError::InvalidItem { .. }), "{err}");
            assert!(err.to_string().contains("JSON"), "{err}");
        }
    }

    #[test]
    fn long_repetitive_text_does_not_panic() {
        // Inputs that have crashed regex-based BPE before (deep backtracking).
        let t = o200k();
        for unit in ["a", "^", " ", "\n", "1", "'s"] {
            let text = unit.repeat(200_000);
            assert!(t.count(&text).unwrap() > 0);
        }
    }

    #[test]
    fn texts_a_backtracking_split_gives_up_on_are_encoded_whole() {
        // A million spaces overflow fancy-regex's backtracking stack (tiktoken
        // fails on them too); the automaton split has no such limit.
        let t = o200k();
        let text = " ".repeat(1_000_000);
        let ids = t.encode(&text).unwrap();
        let core = tiktoken_rs::o200k_base_singleton();
        assert_eq!(core.decode_bytes(&ids).unwrap(), text.as_bytes());
        assert!(core.encode(&text, &Default::default()).is_err());
    }

    /// A tiny WordLevel tokenizer.json with a whitespace pre-tokenizer.
    #[cfg(feature = "hf")]
    const TINY_HF: &str = r#"{
      "version": "1.0",
      "truncation": {"direction": "Right", "max_length": 2, "strategy": "LongestFirst", "stride": 0},
      "padding": null,
      "added_tokens": [{"id": 5, "content": "[UNK]", "single_word": false, "lstrip": false,
                        "rstrip": false, "normalized": false, "special": true}],
      "normalizer": {"type": "Lowercase"},
      "pre_tokenizer": {"type": "Whitespace"},
      "post_processor": null,
      "decoder": null,
      "model": {"type": "WordLevel", "vocab": {"hello": 0, "world": 1, "user": 2, "system": 3, "!": 4, "[UNK]": 5},
                "unk_token": "[UNK]"}
    }"#;

    #[test]
    #[cfg(feature = "hf")]
    fn hugging_face_tokenizer_json() {
        let t = Tokenizer::from_json(TINY_HF.as_bytes(), "tiny".into()).unwrap();
        assert_eq!(t.name(), "tiny");
        // Truncation (max_length 2) in the file is switched off.
        assert_eq!(t.encode("Hello world ! zebra").unwrap(), [0, 1, 4, 5]);
        assert_eq!(
            t.framing(),
            Framing {
                start: 6,
                sep: 7,
                end: 8
            }
        );
        let item = br#"{"content":"hello world","role":"user"}"#;
        assert_eq!(t.encode_item(item).unwrap(), [6, 2, 7, 0, 1, 8]);
        assert_eq!(t.encode_instructions("hello").unwrap(), [6, 3, 7, 0, 8]);
    }

    #[test]
    fn hugging_face_errors() {
        let missing = Path::new("/nonexistent/tokenizer.json");
        let err = Tokenizer::from_file(missing).unwrap_err();
        assert!(
            matches!(err, TokenError::TokenizerFileUnreadable { .. }),
            "{err:?}"
        );
        assert!(err.to_string().contains("/nonexistent/tokenizer.json"));
        for bad in ["", "{}", "not json", r#"{"model": {"type": "Nope"}}"#] {
            let err = Tokenizer::from_json(bad.as_bytes(), "x.json".into()).unwrap_err();
            assert!(
                matches!(err, TokenError::InvalidTokenizerFile { .. }),
                "{err:?}"
            );
            assert!(err.to_string().contains("save"), "{err}");
        }
    }

    #[test]
    fn tokenizers_are_shareable_across_threads() {
        fn assert_send_sync<T: Send + Sync>() {}
        assert_send_sync::<Tokenizer>();
        let t = std::sync::Arc::new(o200k());
        let text = |i: usize| "hello world ".repeat(100 + i);
        let handles: Vec<_> = (0..4)
            .map(|i| {
                let t = t.clone();
                std::thread::spawn(move || t.encode(&text(i)).unwrap())
            })
            .collect();
        for (i, h) in handles.into_iter().enumerate() {
            assert_eq!(h.join().unwrap(), t.encode(&text(i)).unwrap());
        }
    }
}
