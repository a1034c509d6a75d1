//! Text in and out of a model: its tokenizer and its chat template.
//!
//! A GGUF file carries both in its metadata; a Hugging Face checkpoint has `tokenizer.json` and a
//! chat template in `chat_template.jinja` or `tokenizer_config.json`.

use std::path::Path;

use candle_core::quantized::gguf_file;
use serde::Serialize;
use tokenizers::models::bpe::BPE;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::digits::Digits;
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::{AddedToken, PostProcessorWrapper, Tokenizer};

use crate::error::{Error, Result};

/// One chat message.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct Message {
    pub role: String,
    pub content: String,
}

impl Message {
    pub fn new(role: &str, content: impl Into<String>) -> Self {
        Self {
            role: role.to_owned(),
            content: content.into(),
        }
    }
}

/// A model's tokenizer, chat template and stop tokens.
///
/// Text is read two ways: the chat template's own text with its special tokens
/// (`<|im_start|>`), and everything else (a corpus, a message, an answer) as plain text, where
/// `<|im_end|>` is the characters a codebase or a manual may well hold, never a turn's end.
/// A rendered conversation whose contents name a special token is read piece by piece, each
/// the way its source asks.
pub struct TextCodec {
    tokenizer: Tokenizer,
    /// The same tokenizer with its special tokens read as plain text.
    literal: Tokenizer,
    /// The special tokens' texts.
    specials: Vec<String>,
    template: String,
    bos_token: String,
    eos_token: String,
    /// Tokens that end an assistant turn.
    pub stop_ids: Vec<u32>,
}

impl std::fmt::Debug for TextCodec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TextCodec")
            .field("stop_ids", &self.stop_ids)
            .finish()
    }
}

fn strings(value: Option<&gguf_file::Value>, key: &str) -> Result<Vec<String>> {
    match value {
        Some(gguf_file::Value::Array(items)) => items
            .iter()
            .map(|item| match item {
                gguf_file::Value::String(s) => Ok(s.clone()),
                other => Err(Error::Model(format!(
                    "{key} holds {other:?}, expected strings"
                ))),
            })
            .collect(),
        _ => Err(Error::Model(format!("GGUF metadata has no {key} array"))),
    }
}

fn token_id(content: &gguf_file::Content, key: &str) -> Option<u32> {
    content.metadata.get(key).and_then(|v| v.to_u32().ok())
}

impl TextCodec {
    /// Builds the byte-level BPE tokenizer GGUF's `gpt2` tokenizer model describes.
    pub fn from_gguf(content: &gguf_file::Content) -> Result<Self> {
        match content.metadata.get("tokenizer.ggml.model") {
            Some(gguf_file::Value::String(model)) if model == "gpt2" => {}
            other => {
                return Err(Error::Model(format!(
                    "tokenizer.ggml.model is {other:?}; only gpt2 (byte-level BPE) is supported"
                )));
            }
        }
        // The pre-tokenizer built below is SmolLM's (single digits, then GPT-2 byte-level
        // splitting); another model's would tokenize off-distribution without any error.
        match content.metadata.get("tokenizer.ggml.pre") {
            Some(gguf_file::Value::String(pre)) if pre == "smollm" => {}
            other => {
                return Err(Error::Model(format!(
                    "tokenizer.ggml.pre is {other:?}; from GGUF this build reads the \"smollm\" pre-tokenizer \
                     (use a Hugging Face checkpoint directory for other models)"
                )));
            }
        }
        let tokens = strings(
            content.metadata.get("tokenizer.ggml.tokens"),
            "tokenizer.ggml.tokens",
        )?;
        let merges: Vec<(String, String)> = strings(
            content.metadata.get("tokenizer.ggml.merges"),
            "tokenizer.ggml.merges",
        )?
        .into_iter()
        .filter_map(|merge| {
            merge
                .split_once(' ')
                .map(|(a, b)| (a.to_owned(), b.to_owned()))
        })
        .collect();
        let types: Vec<i32> = match content.metadata.get("tokenizer.ggml.token_type") {
            Some(gguf_file::Value::Array(items)) => {
                items.iter().map(|v| v.to_i32().unwrap_or(1)).collect()
            }
            _ => vec![1; tokens.len()],
        };
        let vocab: ahash::AHashMap<String, u32> = tokens
            .iter()
            .enumerate()
            .map(|(i, t)| (t.clone(), i as u32))
            .collect();
        let bpe = BPE::builder()
            .vocab_and_merges(vocab, merges)
            .build()
            .map_err(|e| Error::Model(format!("BPE: {e}")))?;
        let mut tokenizer = Tokenizer::new(bpe);
        tokenizer.with_pre_tokenizer(Some(Sequence::new(vec![
            Digits::new(true).into(),
            ByteLevel::new(false, true, true).into(),
        ])));
        tokenizer.with_decoder(Some(ByteLevel::default()));
        // Control tokens (type 3) are matched whole, never split by the BPE.
        let special: Vec<AddedToken> = tokens
            .iter()
            .zip(&types)
            .filter(|(_, t)| **t == 3)
            .map(|(token, _)| AddedToken::from(token.clone(), true))
            .collect();
        tokenizer
            .add_special_tokens(special)
            .map_err(|e| Error::Model(format!("special tokens: {e}")))?;

        let template = match content.metadata.get("tokenizer.chat_template") {
            Some(gguf_file::Value::String(template)) => template.clone(),
            _ => {
                return Err(Error::Model(
                    "GGUF metadata has no tokenizer.chat_template".into(),
                ));
            }
        };
        let name = |id: Option<u32>| {
            id.and_then(|i| tokens.get(i as usize))
                .cloned()
                .unwrap_or_default()
        };
        let eos = token_id(content, "tokenizer.ggml.eos_token_id");
        Ok(Self::assemble(
            tokenizer,
            template,
            name(token_id(content, "tokenizer.ggml.bos_token_id")),
            name(eos),
            eos,
        ))
    }

    /// Loads `tokenizer.json` and the chat template of `tokenizer_config.json` from a Hugging Face
    /// checkpoint directory.
    pub fn from_hf_dir(dir: &Path) -> Result<Self> {
        let tokenizer = Tokenizer::from_file(dir.join("tokenizer.json"))
            .map_err(|e| Error::Model(format!("tokenizer.json: {e}")))?;
        let config_path = dir.join("tokenizer_config.json");
        let config: serde_json::Value = serde_json::from_str(
            &std::fs::read_to_string(&config_path).map_err(|e| Error::io(&config_path, e))?,
        )
        .map_err(|e| Error::Model(format!("tokenizer_config.json: {e}")))?;
        let text = |key: &str| match &config[key] {
            serde_json::Value::String(s) => s.clone(),
            serde_json::Value::Object(o) => o
                .get("content")
                .and_then(|c| c.as_str())
                .unwrap_or_default()
                .to_owned(),
            _ => String::new(),
        };
        // Newer checkpoints keep the template in a file of its own, which transformers prefers;
        // older ones in the config, as text or as named templates of which "default" is used.
        let jinja = dir.join("chat_template.jinja");
        let template = match std::fs::read_to_string(&jinja) {
            Ok(template) => template,
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => {
                match &config["chat_template"] {
                    serde_json::Value::Array(named) => named
                        .iter()
                        .find(|t| t["name"] == "default")
                        .and_then(|t| t["template"].as_str())
                        .unwrap_or_default()
                        .to_owned(),
                    _ => text("chat_template"),
                }
            }
            Err(error) => return Err(Error::io(&jinja, error)),
        };
        if template.is_empty() {
            return Err(Error::Model(
                "the checkpoint has no chat template (chat_template.jinja, or chat_template in tokenizer_config.json)"
                    .into(),
            ));
        }
        let eos = text("eos_token");
        let eos_id = tokenizer.token_to_id(&eos);
        Ok(Self::assemble(
            tokenizer,
            template,
            text("bos_token"),
            eos,
            eos_id,
        ))
    }

    fn assemble(
        tokenizer: Tokenizer,
        template: String,
        bos_token: String,
        eos_token: String,
        eos: Option<u32>,
    ) -> Self {
        // Chat models end turns with their own marker, which is often not the EOS token.
        let mut stop_ids: Vec<u32> = eos.into_iter().collect();
        for marker in [
            "<|im_end|>",
            "<|eot_id|>",
            "<|endoftext|>",
            "<|end_of_text|>",
            "</s>",
        ] {
            if let Some(id) = tokenizer.token_to_id(marker)
                && !stop_ids.contains(&id)
            {
                stop_ids.push(id);
            }
        }
        let mut literal = tokenizer.clone();
        literal.set_encode_special_tokens(true);
        // Plain text takes no special tokens, so a post-processor would only trim the tokens'
        // offsets (ByteLevel's drops a space from a token's start), which cuts are made by.
        literal.with_post_processor(None::<PostProcessorWrapper>);
        let specials = tokenizer
            .get_added_tokens_decoder()
            .into_values()
            .filter(|token| token.special)
            .map(|token| token.content)
            .collect();
        Self {
            tokenizer,
            literal,
            specials,
            template,
            bos_token,
            eos_token,
            stop_ids,
        }
    }

    /// Writes `tokenizer.json` and `tokenizer_config.json` (with the chat template) into `dir`,
    /// the layout [`TextCodec::from_hf_dir`] reads.
    pub fn save_hf(&self, dir: &Path) -> Result<()> {
        let tokenizer_path = dir.join("tokenizer.json");
        self.tokenizer
            .save(&tokenizer_path, false)
            .map_err(|e| Error::Model(format!("{}: {e}", tokenizer_path.display())))?;
        let config = serde_json::json!({
            "chat_template": self.template,
            "bos_token": self.bos_token,
            "eos_token": self.eos_token,
        });
        let config_path = dir.join("tokenizer_config.json");
        std::fs::write(&config_path, config.to_string()).map_err(|e| Error::io(&config_path, e))
    }

    /// Plain text's tokens: a special token's name in it is read as its characters. A long text
    /// (a corpus) is read in pieces, on every core, cut only where the tokens about a cut are
    /// those of the text whole ([`encode_in_pieces`]).
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        encode_in_pieces(&self.literal, text, PIECE_BYTES)
    }

    /// The chat template's text, its special tokens recognized.
    pub fn encode_template(&self, text: &str) -> Result<Vec<u32>> {
        ids(&self.tokenizer, text)
    }

    /// The tokens of `messages` rendered with the chat template ([`TextCodec::render`]).
    pub fn render_ids(
        &self,
        messages: &[Message],
        add_generation_prompt: bool,
    ) -> Result<Vec<u32>> {
        self.rendered_ids(messages, |messages| {
            self.render(messages, add_generation_prompt)
        })
    }

    /// The tokens of [`TextCodec::render_after_system`].
    pub fn render_after_system_ids(
        &self,
        messages: &[Message],
        add_generation_prompt: bool,
    ) -> Result<Vec<u32>> {
        self.rendered_ids(messages, |messages| {
            self.render_after_system(messages, add_generation_prompt)
        })
    }

    /// The tokens of `render(messages)`. Contents that name no special token read the same
    /// either way: the whole rendering is read at once, as the model learned to read it. Else
    /// it is read piece by piece ([`TextCodec::pieces_ids`]).
    fn rendered_ids(
        &self,
        messages: &[Message],
        render: impl Fn(&[Message]) -> Result<String>,
    ) -> Result<Vec<u32>> {
        let rendered = render(messages)?;
        let names_one = |content: &str| self.specials.iter().any(|s| content.contains(s.as_str()));
        if !messages.iter().any(|m| names_one(&m.content)) {
            return self.encode_template(&rendered);
        }
        self.pieces_ids(&render(&marked(messages))?, &rendered, messages)
    }

    /// `rendered`'s tokens, read from the rendering of the same messages with their contents
    /// marked (`marked`): the template's pieces with its special tokens, the contents as plain
    /// text, each as the template wrote it (verbatim, or with whitespace trimmed at either end).
    fn pieces_ids(&self, marked: &str, rendered: &str, messages: &[Message]) -> Result<Vec<u32>> {
        let mangled = || {
            Error::Model(
                "the chat template changes message contents (beyond trimming them): their text cannot be told from the template's".into(),
            )
        };
        let pieces: Vec<&str> = marked.split(CONTENT_MARK).collect();
        let (mut at, mut ids) = (0, Vec::new());
        for (k, piece) in pieces.iter().enumerate() {
            let rest = &rendered[at..];
            if k % 2 == 0 {
                if !rest.starts_with(piece) {
                    return Err(mangled());
                }
                ids.extend(self.encode_template(piece)?);
                at += piece.len();
                continue;
            }
            let message = piece
                .parse::<usize>()
                .ok()
                .and_then(|i| messages.get(i))
                .ok_or_else(mangled)?;
            let next = pieces.get(k + 1).copied().unwrap_or_default();
            let content = &message.content;
            let written = [
                content.as_str(),
                content.trim(),
                content.trim_start(),
                content.trim_end(),
            ]
            .into_iter()
            .find(|c| {
                rest.strip_prefix(c)
                    .is_some_and(|after| after.starts_with(next))
            })
            .ok_or_else(mangled)?;
            ids.extend(self.encode(written)?);
            at += written.len();
        }
        if at != rendered.len() {
            return Err(mangled());
        }
        Ok(ids)
    }

    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        self.tokenizer
            .decode(ids, true)
            .map_err(|e| Error::Model(format!("detokenizing: {e}")))
    }

    /// The text of generated tokens, without the token that stopped them.
    pub fn answer_text(&self, tokens: &[u32]) -> Result<String> {
        let kept: Vec<u32> = tokens
            .iter()
            .copied()
            .filter(|t| !self.stop_ids.contains(t))
            .collect();
        self.decode(&kept)
    }

    /// One past the highest id the tokenizer gives (its added tokens' too, with `added`).
    pub fn id_bound(&self, added: bool) -> usize {
        self.tokenizer
            .get_vocab(added)
            .values()
            .max()
            .map_or(0, |&id| id as usize + 1)
    }

    /// Renders messages with the model's chat template.
    pub fn render(&self, messages: &[Message], add_generation_prompt: bool) -> Result<String> {
        let mut environment = minijinja::Environment::new();
        // As transformers renders chat templates.
        environment.set_trim_blocks(true);
        environment.set_lstrip_blocks(true);
        minijinja_contrib::add_to_environment(&mut environment);
        environment
            .set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        // Templates refuse what they cannot render (a system message, roles out of order) by
        // calling this, as transformers defines it.
        environment.add_function(
            "raise_exception",
            |message: String| -> std::result::Result<String, minijinja::Error> {
                Err(minijinja::Error::new(
                    minijinja::ErrorKind::InvalidOperation,
                    message,
                ))
            },
        );
        let bad = |e: minijinja::Error| Error::Model(format!("chat template: {e}"));
        environment
            .add_template("chat", &self.template)
            .map_err(bad)?;
        let context = minijinja::context! {
            messages => messages,
            add_generation_prompt => add_generation_prompt,
            bos_token => &self.bos_token,
            eos_token => &self.eos_token,
        };
        environment
            .get_template("chat")
            .and_then(|t| t.render(context))
            .map_err(bad)
    }

    /// The template's text around a system message's content, the turn closed: a cartridge
    /// initialized from corpus text stands for that system turn.
    pub fn system_turn(&self) -> Result<(String, String)> {
        let turn = self.render(&[Message::new("system", MARKER)], false)?;
        // Templates that fold the system message into the first user turn (Llama-2's) render
        // nothing for it alone: there is no system turn to stand for.
        let (before, after) = turn.split_once(MARKER).ok_or_else(|| {
            Error::Model(
                "the chat template renders no system turn of its own (a cartridge stands for one)"
                    .into(),
            )
        })?;
        if after.contains(MARKER) {
            return Err(Error::Model(
                "the chat template writes a system message's content twice in its turn".into(),
            ));
        }
        Ok((before.to_owned(), after.to_owned()))
    }

    /// The tokens of [`TextCodec::system_turn`]'s two sides, what a cartridge holds around the
    /// corpus, and how many corpus tokens fit between them in a cartridge of `tokens` in all.
    pub fn system_turn_ids(&self, tokens: usize) -> Result<(Vec<u32>, Vec<u32>, usize)> {
        let (before, after) = self.system_turn()?;
        let (before, after) = (
            self.encode_template(&before)?,
            self.encode_template(&after)?,
        );
        let template = before.len() + after.len();
        let room = tokens.checked_sub(template).filter(|&n| n > 0).ok_or_else(|| {
            Error::Data(format!(
                "a cartridge of {tokens} tokens cannot hold a system turn ({template} tokens of template around the corpus)"
            ))
        })?;
        Ok((before, after, room))
    }

    /// `messages` rendered as they follow a system turn: what a model with a cartridge (which
    /// stands for the system turn) reads. Rendered alone they would get the template's
    /// beginning of text and, in some templates, a default system prompt.
    pub fn render_after_system(
        &self,
        messages: &[Message],
        add_generation_prompt: bool,
    ) -> Result<String> {
        let system = Message::new("system", MARKER);
        let (before, after) = self.system_turn()?;
        let turn = format!("{before}{MARKER}{after}");
        let conversation: Vec<Message> = std::iter::once(system)
            .chain(messages.iter().cloned())
            .collect();
        let rendered = self.render(&conversation, add_generation_prompt)?;
        let rest = rendered.strip_prefix(&turn).ok_or_else(|| {
            Error::Model(
                "the chat template renders a system message differently once a conversation follows it (a cartridge stands for a system turn of its own)".into(),
            )
        })?;
        // The student would read the marker where the teacher read the chunk.
        if rest.contains(MARKER) {
            return Err(Error::Model(
                "the chat template repeats the system message in a later turn (a cartridge stands for a system turn of its own)".into(),
            ));
        }
        Ok(rest.to_owned())
    }
}

fn ids(tokenizer: &Tokenizer, text: &str) -> Result<Vec<u32>> {
    Ok(tokenizer
        .encode(text, false)
        .map_err(|e| Error::Model(format!("tokenizing: {e}")))?
        .get_ids()
        .to_vec())
}

/// The length of text read at once that pieces aim at (each is at least this long, where the
/// text is): a tokenizer holds about 150 bytes for each byte it reads (its splits, their offsets
/// and each token's string), 7.5 GB for a 50 MB codebase read whole.
const PIECE_BYTES: usize = 256 << 10;

/// Bytes read either side of a cut to see whether it changes the tokens there.
const CUT_WINDOW: usize = 256;

/// Cuts checked (by their window) before the search moves a piece's length on.
const CUT_TRIES: usize = 16;

/// The longest run of characters of one kind (whitespace, letters, digits, others) touching a
/// cut: a tokenizer splits text where its kind changes, and how it splits a run may depend on
/// the whole run (a run of whitespace is one piece, but for the whitespace before a word), so
/// the window must see each run about a cut whole, and what is beyond it (48 characters take at
/// most 192 bytes, less than the window's side).
const CUT_RUN: usize = 48;

/// `text`'s tokens, read in pieces of about `piece` bytes each. A piece ends at the start of a
/// line, before a space, or where ASCII letters or digits meet ASCII punctuation (minified code
/// and data have neither lines nor spaces), with short runs of one kind about it ([`CUT_RUN`]),
/// between two pieces of the tokenizer's pre-tokenizer, where reading the text about it in two
/// gives the tokens it gives whole (a cut the tokenizer reads differently at a text's start
/// would not): tokenizers decide each token from text nearby (their pre-tokenizers split on
/// whitespace and character classes first), so those are the whole text's tokens. Where no
/// such cut is found, the text is read whole.
fn encode_in_pieces(tokenizer: &Tokenizer, text: &str, piece: usize) -> Result<Vec<u32>> {
    let cuts = cuts(tokenizer, text, piece)?;
    if cuts.len() == 2 {
        return ids(tokenizer, text);
    }
    let pieces: Vec<&str> = cuts.windows(2).map(|w| &text[w[0]..w[1]]).collect();
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    let per_thread = pieces.len().div_ceil(threads).max(1);
    let read = std::thread::scope(|scope| {
        let workers: Vec<_> = pieces
            .chunks(per_thread)
            .map(|mine| {
                scope.spawn(move || {
                    let read = mine.iter().map(|piece| ids(tokenizer, piece));
                    read.collect::<Result<Vec<_>>>().map(|ids| ids.concat())
                })
            })
            .collect();
        workers
            .into_iter()
            .map(|worker| {
                worker
                    .join()
                    .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
            })
            .collect::<Result<Vec<_>>>()
    })?;
    Ok(read.concat())
}

/// Where [`encode_in_pieces`] cuts `text`: its start, the cuts, its end.
fn cuts(tokenizer: &Tokenizer, text: &str, piece: usize) -> Result<Vec<usize>> {
    debug_assert!(piece > 0, "pieces of no length");
    let bytes = text.as_bytes();
    let apart = std::cell::OnceCell::new();
    let mut cuts = vec![0];
    let mut from = piece;
    'stretches: while from + piece <= text.len() {
        let mut candidate = from;
        let mut tries = 0;
        while tries < CUT_TRIES {
            // A byte search: `from` may fall inside a character, and the bytes `may_cut` looks
            // for (ASCII) are never part of one.
            let Some(cut) = (candidate..text.len()).find(|&at| may_cut(bytes, at)) else {
                break 'stretches;
            };
            candidate = cut + 1;
            if !short_runs_about(text, cut) {
                continue;
            }
            tries += 1;
            if keeps_tokens(tokenizer, text, cut, &apart)? {
                cuts.push(cut);
                from = cut + piece;
                continue 'stretches;
            }
        }
        from = candidate + piece;
    }
    cuts.push(text.len());
    Ok(cuts)
}

/// Whether a piece may end before byte `at` (past its first): past a line break, before a space
/// (which a tokenizer reads with the word after it), or between an ASCII letter or digit and an
/// ASCII punctuation mark.
fn may_cut(bytes: &[u8], at: usize) -> bool {
    let (before, after) = (bytes[at - 1], bytes[at]);
    let meet = |a: u8, b: u8| a.is_ascii_alphanumeric() && b.is_ascii_punctuation();
    before == b'\n' || after == b' ' || meet(before, after) || meet(after, before)
}

/// Whether the runs of one kind of character touching `at` are at most [`CUT_RUN`]
/// characters, one run through `at` counted whole.
fn short_runs_about(text: &str, at: usize) -> bool {
    fn kind(c: char) -> u8 {
        match c {
            c if c.is_whitespace() => 0,
            c if c.is_alphabetic() => 1,
            c if c.is_numeric() => 2,
            _ => 3,
        }
    }
    fn run(mut chars: impl Iterator<Item = char>) -> (Option<u8>, usize) {
        let Some(first) = chars.next().map(kind) else {
            return (None, 0);
        };
        let rest = chars
            .take_while(|&c| kind(c) == first)
            .take(CUT_RUN)
            .count();
        (Some(first), 1 + rest)
    }
    let (before, before_len) = run(text[..at].chars().rev());
    let (after, after_len) = run(text[at..].chars());
    if before == after {
        before_len + after_len <= CUT_RUN
    } else {
        before_len.max(after_len) <= CUT_RUN
    }
}

/// Whether cutting `text` at `at` leaves the tokens around it as they are. A tokenizer reads
/// each piece its pre-tokenizer splits text into on its own (a BPE merges within one, where the
/// piece's start may decide its tokens), so the cut must fall between two of them in the text
/// about it; and that text read in two must have the tokens it has whole (a tokenizer may read
/// a text's start otherwise). A tokenizer that does not split text (SentencePiece's) reads the
/// text about the cut as one piece: there a cut falls only before a space that starts a run of
/// whitespace, where the text about it reads the same in two, and where no token of its
/// vocabulary holds a word's end and the next one's start (`apart`, [`words_apart`]).
fn keeps_tokens(
    tokenizer: &Tokenizer,
    text: &str,
    at: usize,
    apart: &std::cell::OnceCell<bool>,
) -> Result<bool> {
    let start = text.floor_char_boundary(at.saturating_sub(CUT_WINDOW));
    let end = text.ceil_char_boundary(at + CUT_WINDOW);
    let whole = tokenizer
        .encode(&text[start..end], false)
        .map_err(|e| Error::Model(format!("tokenizing: {e}")))?;
    let (offsets, pieces) = (whole.get_offsets(), whole.get_word_ids());
    let between_pieces = if pieces.windows(2).all(|w| w[0] == w[1]) {
        // At a run of whitespace's start: a token such as "▁▁" may span a cut inside one.
        text.as_bytes()[at] == b' '
            && !text[..at].ends_with(char::is_whitespace)
            && *apart.get_or_init(|| words_apart(tokenizer))
    } else {
        (1..offsets.len()).any(|i| offsets[i].0 == at - start && pieces[i] != pieces[i - 1])
    };
    if !between_pieces {
        return Ok(false);
    }
    let mut cut = ids(tokenizer, &text[start..at])?;
    cut.extend(ids(tokenizer, &text[at..end])?);
    Ok(whole.get_ids() == cut)
}

/// Whether no token of `tokenizer`'s vocabulary holds a space (as " ", SentencePiece's "▁" or
/// byte-level "Ġ") after another character: then its tokens end before every word's space, so
/// a cut there reads as the text whole does.
fn words_apart(tokenizer: &Tokenizer) -> bool {
    let space = |c: char| matches!(c, ' ' | '▁' | 'Ġ');
    tokenizer.get_vocab(true).keys().all(|token| {
        let mut chars = token.chars().peekable();
        std::iter::from_fn(|| Some((chars.next()?, *chars.peek()?)))
            .all(|(a, b)| space(a) || !space(b))
    })
}

/// Content no template writes itself, to find where a message's content goes.
const MARKER: &str = "\u{e000}content\u{e000}";

/// Around a message's index where its content goes, to tell the template's text from contents.
const CONTENT_MARK: char = '\u{e001}';

/// `messages` with each content replaced by its marked index (an empty one stays empty: a
/// template may write nothing for it).
fn marked(messages: &[Message]) -> Vec<Message> {
    messages
        .iter()
        .enumerate()
        .map(|(i, m)| {
            let content = if m.content.is_empty() {
                String::new()
            } else {
                format!("{CONTENT_MARK}{i}{CONTENT_MARK}")
            };
            Message::new(&m.role, content)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// SmolLM2's tokenizer (plain text's), from its GGUF.
    fn smollm2() -> Tokenizer {
        let models = cartridge_schemas::paths::Paths::from_env()
            .expect("HOME is set")
            .models();
        let path = super::super::Alias::find("smollm2-135m")
            .expect("known alias")
            .install(&models)
            .expect("installing the test model");
        let (_, content, _) = super::super::config::read_gguf(&path).unwrap();
        TextCodec::from_gguf(&content).unwrap().literal
    }

    /// `text` read in pieces of `piece` bytes has the tokens it has whole.
    fn assert_reads_as_whole(tokenizer: &Tokenizer, text: &str, piece: usize) {
        assert_eq!(
            encode_in_pieces(tokenizer, text, piece).unwrap(),
            ids(tokenizer, text).unwrap()
        );
    }

    #[test]
    fn a_text_read_in_pieces_has_the_tokens_it_has_whole() {
        let tokenizer = smollm2();
        // Short pieces of code (indented lines, blank lines, digits), characters of several
        // bytes (a window's edge or a piece's length inside one), runs of whitespace longer
        // than a window's side and Windows line breaks: many cuts tried, some refused.
        let mut text = String::new();
        for round in 0..6 {
            text.push_str(include_str!("text.rs"));
            text.push_str(&format!(
                "\n\n  Round {round}: café — naïve “quotes” 12345 …\n"
            ));
            text.push_str(&"\n".repeat(300));
            text.push_str(&format!("after the blank lines{}\n", " ".repeat(300)));
            text.push_str(&"日本語のテキスト。\n".repeat(600));
            text.push_str(&"A line ending in CR LF.\r\n".repeat(100));
            text.push_str(include_str!("../corpus.rs"));
        }
        let cuts = cuts(&tokenizer, &text, 4096).unwrap();
        assert!(cuts.len() > 20, "{} cuts", cuts.len());
        assert_reads_as_whole(&tokenizer, &text, 4096);
        // Paragraphs of one line each, between blank lines: cut between words.
        let prose = "A paragraph of words on a line of its own, and no other.\n\n".repeat(400);
        assert!(super::cuts(&tokenizer, &prose, 1024).unwrap().len() > 10);
        assert_reads_as_whole(&tokenizer, &prose, 1024);
        // Minified data, one line without spaces: cut where letters or digits meet
        // punctuation, never about a long run of one kind.
        let minified: String = (0..3000)
            .map(|i| format!(r#"{{"id":{i},"name":"item-{i}","v":0.{i}e-3,"t":["ab","c"]}},"#))
            .collect();
        let cut = super::cuts(&tokenizer, &minified, 4096).unwrap();
        assert!(cut.len() > 20, "{} cuts", cut.len());
        assert_reads_as_whole(&tokenizer, &minified, 4096);
        let long = format!("{}){}", "a".repeat(CUT_RUN), "b".repeat(CUT_RUN));
        assert!(short_runs_about(&long, CUT_RUN));
        assert!(!short_runs_about(&format!("a{long}"), CUT_RUN + 1));
        assert!(!short_runs_about(&format!("{long}b"), CUT_RUN + 1));
        // A run through the cut counts whole.
        let spaces = format!("a{}b", " ".repeat(CUT_RUN + 2));
        assert!(!short_runs_about(&spaces, CUT_RUN / 2 + 2));
        // No cut about a run of whitespace longer than the window's side: the window's part of
        // the run splits as the window does, the whole run otherwise. Cuts are made near them.
        let runs = format!("x{}y\nsome words here\n", "\n".repeat(601)).repeat(20);
        let cut = super::cuts(&tokenizer, &runs, 512).unwrap();
        assert!(cut.len() > 10, "{cut:?}");
        assert_reads_as_whole(&tokenizer, &runs, 512);
    }

    #[test]
    fn where_every_cut_changes_the_tokens_the_text_is_read_whole() {
        // Byte-level BPE (Ġ a space, Ċ a line break) that reads a text not starting with
        // whitespace as if it did: a piece starting at a line of "ab" would be read otherwise.
        let bpe = |symbols: &[&str], merges: &[(&str, &str)]| {
            let vocab: ahash::AHashMap<String, u32> = symbols
                .iter()
                .enumerate()
                .map(|(i, s)| (s.to_string(), i as u32))
                .collect();
            let merges = merges
                .iter()
                .map(|(a, b)| (a.to_string(), b.to_string()))
                .collect();
            BPE::builder()
                .vocab_and_merges(vocab, merges)
                .build()
                .unwrap()
        };
        let mut tokenizer = Tokenizer::new(bpe(
            &["a", "b", "Ċ", "Ġ", "ab", "Ġb"],
            &[("a", "b"), ("Ġ", "b")],
        ));
        tokenizer.with_pre_tokenizer(Some(ByteLevel::new(true, false, true)));
        let lines = "ab\n".repeat(300);
        assert_eq!(cuts(&tokenizer, &lines, 64).unwrap(), [0, lines.len()]);
        assert_reads_as_whole(&tokenizer, &lines, 64);
        // Lines starting with a space can be cut before.
        let mixed = "ab\n b\n".repeat(150);
        let cut = cuts(&tokenizer, &mixed, 64).unwrap();
        assert!(cut.len() > 3, "{cut:?}");
        assert!(
            cut[1..cut.len() - 1]
                .iter()
                .all(|&at| mixed[at..].starts_with(" b"))
        );
        assert_reads_as_whole(&tokenizer, &mixed, 64);
        // Without a pre-tokenizer the text about a cut is one piece, whose start may decide its
        // tokens: ",a,a" is one, so the text's tokens end every 4 bytes from its start, and a
        // window's every 4 from the window's. Its cut falls before a space only.
        let tokenizer = Tokenizer::new(bpe(
            &[",", "a", " ", ",a", ",a,a"],
            &[(",", "a"), (",a", ",a")],
        ));
        let pairs = ",a".repeat(1000);
        let window = ids(&tokenizer, &pairs[46..558]).unwrap();
        let mut two = ids(&tokenizer, &pairs[46..302]).unwrap();
        two.extend(ids(&tokenizer, &pairs[302..558]).unwrap());
        assert_eq!(
            window, two,
            "the window reads a cut inside a token the same in two"
        );
        assert_eq!(cuts(&tokenizer, &pairs, 64).unwrap(), [0, pairs.len()]);
        let words = ",a,a ".repeat(400);
        let cut = cuts(&tokenizer, &words, 64).unwrap();
        assert!(cut.len() > 3, "{cut:?}");
        assert!(
            cut[1..cut.len() - 1]
                .iter()
                .all(|&at| words[at..].starts_with(' '))
        );
        assert_reads_as_whole(&tokenizer, &words, 64);
        // Unless a token holds a word's end and the next one's start.
        let tokenizer = Tokenizer::new(bpe(
            &[",", "a", " ", ",a", ",a,a", "a "],
            &[(",", "a"), (",a", ",a"), ("a", " ")],
        ));
        assert_eq!(cuts(&tokenizer, &words, 64).unwrap(), [0, words.len()]);
    }
}
