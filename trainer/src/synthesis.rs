//! Self-study synthesis: the model writes conversations about chunks of the corpus.
//!
//! For each sampled chunk, model A — the chunk in its system prompt — is given a seed prompt of
//! one of five kinds (structuring, summarization, question, use case, creative) and writes a user
//! message (sampled). Model B, seeing the same chunk, answers it greedily, and the top-k
//! log-probabilities of every answer token (kept up to a probability mass) become the
//! distillation targets. A share of the conversations are recitations instead: the user asks for
//! a passage word for word, and B's answer is given the opening words of a line or sentence of
//! the chunk (past those, of another word), which B continues from the chunk. Conversations
//! sharing a chunk are generated as one batch.
//!
//! Conversations are appended to a JSON-lines file as they are made, so a run can stop and resume,
//! and a person can read what the cartridge is trained on.

use std::collections::HashSet;
use std::io::Write;
use std::path::{Path, PathBuf};

use rand::seq::{IndexedRandom, SliceRandom};
use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};

use crate::corpus::Corpus;
use crate::error::{Error, Result};
use crate::model::{GenerationRequest, LoadedModel, Message, Sampling, TextCodec, generate};

/// What kind of conversation a seed prompt starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SeedKind {
    Structuring,
    Summarization,
    Question,
    UseCase,
    Creative,
    /// A passage asked for word for word, its opening given (no seed prompt: the request is
    /// [`RECITATION_REQUEST`]).
    Recitation,
}

/// The user message of a recitation.
pub const RECITATION_REQUEST: &str = "Quote a passage of the information, word for word.";

/// Words a recitation's answer is given: enough to find one place in a chunk.
const OPENING_WORDS: usize = 5;

/// The most bytes (so tokens) of an opening: text with few spaces (Chinese, minified code) has
/// long "words".
const OPENING_BYTES: usize = 64;

impl SeedKind {
    /// The kinds whose user message model A writes.
    pub const WRITTEN: [Self; 5] = [
        Self::Structuring,
        Self::Summarization,
        Self::Question,
        Self::UseCase,
        Self::Creative,
    ];

    /// The instruction model A gets, to write the first user message (none for a recitation).
    pub fn prompt(self) -> Option<&'static str> {
        Some(match self {
            Self::Structuring => {
                "Write a single message asking an assistant to restructure part of the information above in a \
                 specific format (a JSON object, a YAML document, a table, or a list of key points). Name the part \
                 and the format precisely. Reply with the message only."
            }
            Self::Summarization => {
                "Write a single message asking an assistant to summarize a specific part of the information \
                 above. Say which part, and give enough detail that the request is unambiguous. Reply with the \
                 message only."
            }
            Self::Question => {
                "Write one question that tests knowledge of the information above. It should be answerable from \
                 the information, specific, and mention the details needed to answer it. Reply with the question only."
            }
            Self::UseCase => {
                "Think of a practical, real-world task someone could have that the information above helps with. \
                 Write the single message they would send an assistant about it. Reply with the message only."
            }
            Self::Creative => {
                "Write a message that starts a creative conversation inspired by the information above: a \
                 thought experiment, an analogy, or a scenario to explore. Reply with the message only."
            }
            Self::Recitation => return None,
        })
    }
}

/// Openings for `count` recitations of `chunk`: the first [`OPENING_WORDS`] words (at most
/// [`OPENING_BYTES`]), as written, of lines or sentences with more words than that; past those,
/// of the other words with as many after them. Each start is taken once before any is taken
/// again, so that no opening (and so no greedy answer) repeats while the chunk has another to
/// give. `cut` says the chunk's first line was cut (it starts mid-line, maybe mid-word: neither
/// that line nor that word is a start). None where the chunk has too few words to continue.
fn openings<'a>(chunk: &'a str, cut: bool, count: usize, rng: &mut impl Rng) -> Vec<&'a str> {
    let long = |piece: &&str| piece.split_whitespace().nth(OPENING_WORDS).is_some();
    let mut starts: Vec<&str> = chunk
        .split('\n')
        .flat_map(|line| line.split_inclusive(". "))
        .skip(usize::from(cut))
        .map(str::trim_start)
        .filter(long)
        .collect();
    starts.shuffle(rng);
    if count > starts.len() {
        let taken: HashSet<usize> = starts.iter().map(|start| offset(chunk, start)).collect();
        // The words are slices of the chunk: each with more after it starts the rest of it.
        let mut others: Vec<&str> = chunk
            .split_whitespace()
            .skip(usize::from(cut))
            .map(|word| &chunk[offset(chunk, word)..])
            .filter(|rest| long(rest) && !taken.contains(&offset(chunk, rest)))
            .collect();
        others.shuffle(rng);
        starts.extend(others);
    }
    if starts.is_empty() {
        return Vec::new();
    }
    (0..count)
        .map(|i| {
            let start = starts[i % starts.len()];
            // To the end of its last opening word, the spacing between them kept: what follows
            // in the chunk continues exactly that text.
            let words_end = start
                .split_whitespace()
                .take(OPENING_WORDS)
                .last()
                .map_or(0, |word| offset(start, word) + word.len());
            let mut end = words_end.min(OPENING_BYTES);
            while !start.is_char_boundary(end) {
                end -= 1;
            }
            start[..end].trim_end()
        })
        .collect()
}

/// Where `part`, a slice of `text`, starts in it.
fn offset(text: &str, part: &str) -> usize {
    part.as_ptr() as usize - text.as_ptr() as usize
}

/// The system prompt that puts a chunk in a model's context.
pub fn system_prompt(description: Option<&str>, chunk: &str) -> String {
    let description = description.map(|d| format!("{d}\n")).unwrap_or_default();
    format!(
        "You are in a conversation about the following information:\n<info>\n{description}{chunk}\n</info>"
    )
}

/// A synthesized conversation and the teacher's targets for its answer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Conversation {
    /// The generation batch it came from (a resumed run continues after the last one).
    #[serde(default)]
    pub batch: u64,
    /// Which tokens of the corpus the chunk was: `[start, start + tokens)`.
    pub chunk_start: usize,
    pub chunk_tokens: usize,
    pub seed: SeedKind,
    pub user: String,
    /// A recitation's given opening words, which `assistant` continues.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub opening: String,
    pub assistant: String,
    /// What the student reads before the answer, after the cartridge: the chat-templated user
    /// turn as it follows a system turn (no chunk, no default system prompt), then a
    /// recitation's opening.
    pub prompt_ids: Vec<u32>,
    /// The teacher's answer, its stop token included when it finished.
    pub answer_ids: Vec<u32>,
    /// Per answer token: the teacher's most likely tokens and their log-probabilities.
    pub teacher: Vec<Vec<(u32, f32)>>,
}

impl Conversation {
    pub fn len(&self) -> usize {
        self.prompt_ids.len() + self.answer_ids.len()
    }

    pub fn is_empty(&self) -> bool {
        self.answer_ids.is_empty()
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct SynthesisOptions {
    pub conversations: usize,
    /// Conversations per chunk (one generation batch).
    pub per_chunk: usize,
    /// Chunk sizes are drawn uniformly from this range of tokens.
    pub chunk_tokens: (usize, usize),
    pub user_max_tokens: usize,
    pub answer_max_tokens: usize,
    pub user_temperature: f64,
    pub top_logprobs: usize,
    pub logprob_mass: f32,
    /// The share of conversations that are recitations (0 to 1). The rest are written from the
    /// five seed prompts, drawn evenly. Left out when 0, as it was before this setting existed,
    /// so that files and checkpoints made then are read and resumed as they were.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub recitation: f64,
    /// A message or answer stops where its last this-many tokens repeat what it already wrote:
    /// a loop teaches nothing about the corpus. 0 keeps loops (and reads conversation files
    /// made before this setting existed).
    #[serde(default)]
    pub stop_on_repeat: usize,
    /// A line describing the corpus, put before each chunk.
    pub description: Option<String>,
    pub seed: u64,
}

impl Default for SynthesisOptions {
    fn default() -> Self {
        Self {
            conversations: 1024,
            per_chunk: 16,
            chunk_tokens: (512, 4096),
            user_max_tokens: 128,
            answer_max_tokens: 512,
            user_temperature: 0.6,
            top_logprobs: 20,
            logprob_mass: 0.99,
            recitation: RECITATION,
            stop_on_repeat: 16,
            description: None,
            seed: 0,
        }
    }
}

fn is_zero(share: &f64) -> bool {
    *share == 0.0
}

/// The most tokens a user turn takes with what follows it before the answer: a written message,
/// or a recitation's request and opening.
pub(crate) fn longest_message(text: &TextCodec, options: &SynthesisOptions) -> Result<usize> {
    let recitation = if options.recitation > 0.0 {
        text.encode(RECITATION_REQUEST)?.len() + OPENING_BYTES
    } else {
        0
    };
    Ok(options.user_max_tokens.max(recitation))
}

/// The default share of recitations. SmolLM2-135M's own messages rarely use their chunk, and
/// distilling its answers to them lowered what the initialization holds (bench/quality); its
/// copying from the chunk is sure, and recitations raised it.
pub const RECITATION: f64 = 0.5;

/// What a conversations file belongs to; a resumed run must match it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
struct Provenance {
    corpus: cartridge_schemas::Digest,
    model: cartridge_schemas::Digest,
    options: SynthesisOptions,
    /// How the student's prompts were rendered: [`PROMPT_FORMAT`]; 0 in files made before it
    /// (the user turn alone, with a template's default system prompt), which are not resumed.
    #[serde(default)]
    prompt_format: u32,
}

/// Student prompts follow the system turn the cartridge stands for (1), and message contents
/// are read as plain text, never as the template's control tokens (2).
pub(crate) const PROMPT_FORMAT: u32 = 2;

/// Appends `conversation` to `lines` as one line of the conversations file.
fn push_line(lines: &mut Vec<u8>, conversation: &Conversation) -> Result<()> {
    serde_json::to_writer(&mut *lines, conversation).map_err(|e| Error::Data(e.to_string()))?;
    lines.push(b'\n');
    Ok(())
}

/// Replaces a conversations file with `conversations`, whole or not at all.
fn rewrite_conversations(path: &Path, conversations: &[Conversation]) -> Result<()> {
    let mut lines = Vec::new();
    for conversation in conversations {
        push_line(&mut lines, conversation)?;
    }
    replace_file(path, &lines)
}

/// Records what makes a conversations file, whole or not at all: a torn record would block
/// every later run in its directory.
fn write_provenance(meta_path: &Path, provenance: &Provenance) -> Result<()> {
    replace_file(
        meta_path,
        &serde_json::to_vec_pretty(provenance).unwrap_or_default(),
    )
}

/// Writes `bytes` to `path` whole or not at all: they are on disk, with the permissions of the
/// file they replace (if any), before they take its place, so a crash leaves one or the other,
/// never a torn or empty file.
fn replace_file(path: &Path, bytes: &[u8]) -> Result<()> {
    let mut partial = path.as_os_str().to_owned();
    partial.push(".partial");
    let partial = PathBuf::from(partial);
    let written = || -> std::io::Result<()> {
        let mut file = std::fs::File::create(&partial)?;
        file.write_all(bytes)?;
        if let Ok(existing) = std::fs::metadata(path) {
            file.set_permissions(existing.permissions())?;
        }
        file.sync_all()?;
        std::fs::rename(&partial, path)
    };
    written().map_err(|e| Error::io(path, e))
}

/// The longest token prefix every list shares.
fn common_prefix(lists: &[Vec<u32>]) -> usize {
    let first = &lists[0];
    (0..first.len())
        .take_while(|&i| lists.iter().all(|l| l.get(i) == Some(&first[i])))
        .count()
}

/// `conversation` rendered with an open assistant turn, which `opening` begins.
fn rendered(model: &LoadedModel, conversation: &[Message], opening: &[u32]) -> Result<Vec<u32>> {
    let mut ids = model.text.render_ids(conversation, true)?;
    ids.extend_from_slice(opening);
    Ok(ids)
}

/// Generates one batch of continuations of `encoded` conversations (each [`rendered`]).
fn continue_all(
    model: &LoadedModel,
    encoded: &[Vec<u32>],
    max_new_tokens: usize,
    sampling: Sampling,
    top_logprobs: Option<(usize, f32)>,
    stop_on_repeat: usize,
    seed: u64,
) -> Result<Vec<crate::model::Generated>> {
    // The chunk's system prompt is the same for all: process it once.
    let shared = common_prefix(encoded);
    let prompts: Vec<Vec<u32>> = encoded.iter().map(|e| e[shared..].to_vec()).collect();
    let request = GenerationRequest {
        prefix: None,
        shared: &encoded[0][..shared],
        prompts: &prompts,
        max_new_tokens,
        sampling,
        top_logprobs,
        stop_ids: &model.text.stop_ids,
        stop_on_repeat,
        seed,
    };
    generate(&model.llama, &request)
}

fn clean(text: &TextCodec, tokens: &[u32]) -> Result<String> {
    let stops = &text.stop_ids;
    let content: Vec<u32> = tokens
        .iter()
        .copied()
        .filter(|t| !stops.contains(t))
        .collect();
    Ok(text.decode(&content)?.trim().to_owned())
}

/// Whether synthesis with `options` over the corpus's `tokens` fits: the template has a system
/// turn, and the longest chunk's prompts with the longest message and answer fit the model's
/// positions. Found out before synthesis, not when a batch draws such a chunk hours in.
pub fn check_synthesis(
    model: &LoadedModel,
    tokens: &[u32],
    options: &SynthesisOptions,
) -> Result<()> {
    if !(0.0..=1.0).contains(&options.recitation) {
        return Err(Error::Data(format!(
            "the share of recitations is {}: it must be from 0 to 1",
            options.recitation
        )));
    }
    // The student's prompts follow a system turn; a template without one fails here, not after
    // hours of synthesis.
    model
        .text
        .render_after_system(&[Message::new("user", "?")], true)?;
    if tokens.is_empty() {
        return Err(Error::Data("the corpus tokenizes to nothing".into()));
    }
    // The longest chunk's prompts, with the longest message and answer, must fit the model's
    // positions: found out here, not when a batch draws such a chunk hours in. (Estimated from
    // the corpus's first chunk: one cut elsewhere may re-encode a few tokens longer, which
    // RE_ENCODING_SLACK allows for.)
    let (_, high) = options.chunk_tokens;
    let longest = Message::new(
        "system",
        system_prompt(
            options.description.as_deref(),
            &model.text.decode(&tokens[..high.min(tokens.len())])?,
        ),
    );
    // A written conversation's writer reads its instruction and writes the message; a
    // recitation's teacher reads the request and the opening (tokens no more than its bytes).
    let prompt = |message: &str, after: usize| -> Result<usize> {
        let turns = [longest.clone(), Message::new("user", message)];
        Ok(model.text.render_ids(&turns, true)?.len() + after)
    };
    let mut prompts = SeedKind::WRITTEN
        .iter()
        .filter_map(|seed| seed.prompt())
        .map(|instruction| prompt(instruction, options.user_max_tokens))
        .collect::<Result<Vec<_>>>()?;
    if options.recitation > 0.0 {
        prompts.push(prompt(RECITATION_REQUEST, OPENING_BYTES)?);
    }
    let needed = prompts
        .into_iter()
        .max()
        .unwrap_or(0)
        .saturating_add(options.answer_max_tokens)
        .saturating_add(RE_ENCODING_SLACK);
    if needed > model.llama.config.max_positions {
        return Err(Error::Data(format!(
            "chunks of up to {high} tokens with messages of {} and answers of {} need {needed} positions; the model has {} (lower --chunk-tokens, --user-tokens or --answer-tokens)",
            options.user_max_tokens, options.answer_max_tokens, model.llama.config.max_positions
        )));
    }
    Ok(())
}

/// Synthesizes conversations about `corpus`, whose tokens are `tokens`, into `path` (JSON
/// lines), continuing a file an earlier run left. Returns every conversation in the file.
/// `progress` hears how many are done, before the first batch and after each; an error it
/// returns stops synthesis there (every batch made is stored).
pub fn synthesize(
    model: &LoadedModel,
    (corpus, tokens): (&Corpus, &[u32]),
    options: &SynthesisOptions,
    path: &Path,
    mut progress: impl FnMut(usize, usize) -> Result<()>,
) -> Result<Vec<Conversation>> {
    check_synthesis(model, tokens, options)?;
    let provenance = Provenance {
        corpus: corpus.digest,
        model: model.fingerprint.weights,
        options: options.clone(),
        prompt_format: PROMPT_FORMAT,
    };
    let meta_path = path.with_extension("meta.json");
    let mut conversations = match std::fs::read_to_string(&meta_path) {
        Err(error) if error.kind() != std::io::ErrorKind::NotFound => {
            return Err(Error::io(&meta_path, error));
        }
        Ok(text) => {
            let stored: Provenance = serde_json::from_str(&text)
                .map_err(|e| Error::Data(format!("{}: {e}", meta_path.display())))?;
            // How many is no part of how they are made: a run asking for more extends the set
            // batch by batch (each batch has its own seed), one asking for fewer takes the
            // first ones. A set still empty (a run stopped before its first batch) is anyone's
            // to start over.
            let asked = Provenance {
                options: SynthesisOptions {
                    conversations: stored.options.conversations,
                    ..provenance.options.clone()
                },
                ..provenance.clone()
            };
            let empty = std::fs::metadata(path).map_or(true, |m| m.len() == 0);
            if asked != stored && !empty {
                let differ = crate::distill::differing(
                    &serde_json::json!(stored),
                    &serde_json::json!(asked),
                    &[],
                );
                let made_with = match differ.is_empty() {
                    true => "other settings, by an older version".to_owned(),
                    false => differ.join(", "),
                };
                return Err(Error::Data(format!(
                    "{} holds conversations made with {made_with}; choose another work directory, or the same settings",
                    path.display(),
                )));
            }
            if stored != provenance {
                write_provenance(&meta_path, &provenance)?;
            }
            let (mut conversations, torn) = read_stored(path, model.llama.config.vocab)?;
            if torn {
                // A batch is written at once: a torn last line means the last batch may lack
                // its end. It goes whole, to be made again as it was (should this run stop too,
                // the next finds only whole batches).
                let last = conversations.iter().map(|c| c.batch).max();
                conversations.retain(|c| Some(c.batch) != last);
                rewrite_conversations(path, &conversations)?;
            }
            conversations.truncate(options.conversations);
            conversations
        }
        Err(_) => {
            // Conversations without the record of what made them are no run's to resume, nor
            // this run's to remove.
            if path.exists() {
                return Err(Error::Data(format!(
                    "{} holds conversations without {} (what made them): move it away or choose another work directory",
                    path.display(),
                    meta_path.display()
                )));
            }
            if let Some(dir) = path.parent() {
                std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
            }
            write_provenance(&meta_path, &provenance)?;
            Vec::new()
        }
    };
    let mut file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .map_err(|e| Error::io(path, e))?;
    // Each batch draws from its own seed, so a resumed run continues the same sequence.
    let mut batch_index = conversations.iter().map(|c| c.batch + 1).max().unwrap_or(0);
    progress(conversations.len(), options.conversations)?;
    let mut barren = 0;
    while conversations.len() < options.conversations {
        let before = conversations.len();
        let mut rng = rand::rngs::StdRng::seed_from_u64(
            options.seed ^ batch_index.wrapping_mul(0x9e37_79b9_7f4a_7c15),
        );
        batch_index += 1;
        let (low, high) = options.chunk_tokens;
        let length = rng
            .random_range(low.min(high)..=high.max(low))
            .clamp(1, tokens.len());
        let start = rng.random_range(0..=tokens.len() - length);
        // A cut through a character's byte tokens decodes as U+FFFD at the chunk's edges.
        let chunk = model.text.decode(&tokens[start..start + length])?;
        let chunk = chunk.trim_matches(char::REPLACEMENT_CHARACTER);
        let system = Message::new(
            "system",
            system_prompt(options.description.as_deref(), chunk),
        );
        let count = options
            .per_chunk
            .min(options.conversations - conversations.len())
            .max(1);
        let written_kind = |rng: &mut rand::rngs::StdRng| {
            *SeedKind::WRITTEN.choose(rng).unwrap_or(&SeedKind::Question)
        };
        let mut seeds: Vec<SeedKind> = (0..count)
            .map(|_| {
                // Drawn only where recitations are asked for: a run without them draws as
                // runs before this setting did.
                if options.recitation > 0.0 && rng.random_bool(options.recitation) {
                    SeedKind::Recitation
                } else {
                    written_kind(&mut rng)
                }
            })
            .collect();
        let recitations: Vec<usize> = (0..count)
            .filter(|&i| seeds[i] == SeedKind::Recitation)
            .collect();
        let mut users = vec![String::new(); count];
        // A recitation's opening, given; empty for a written conversation.
        let mut given = vec![""; count];
        if !recitations.is_empty() {
            let openings = openings(chunk, start > 0, recitations.len(), &mut rng);
            // A chunk of a few words has nothing to recite: those conversations are written.
            if openings.is_empty() {
                for &i in &recitations {
                    seeds[i] = written_kind(&mut rng);
                }
            }
            for (&i, opening) in recitations.iter().zip(openings) {
                users[i] = RECITATION_REQUEST.to_owned();
                given[i] = opening;
            }
        }
        let written: Vec<usize> = (0..count)
            .filter(|&i| seeds[i].prompt().is_some())
            .collect();
        if !written.is_empty() {
            let writer = written
                .iter()
                .map(|&i| {
                    let instruction = Message::new("user", seeds[i].prompt().unwrap_or_default());
                    rendered(model, &[system.clone(), instruction], &[])
                })
                .collect::<Result<Vec<_>>>()?;
            let sampling = Sampling {
                temperature: options.user_temperature,
                top_p: 0.95,
            };
            let questions = continue_all(
                model,
                &writer,
                options.user_max_tokens,
                sampling,
                None,
                options.stop_on_repeat,
                rng.random(),
            )?;
            for (&i, question) in written.iter().zip(&questions) {
                users[i] = clean(&model.text, &question.tokens)?;
            }
        }

        let kept: Vec<usize> = (0..count).filter(|&i| !users[i].is_empty()).collect();
        if kept.is_empty() {
            barren += 1;
            if barren == BARREN_BATCHES {
                return Err(barren_error());
            }
            continue;
        }
        let opening_ids = kept
            .iter()
            .map(|&i| model.text.encode(given[i]))
            .collect::<Result<Vec<_>>>()?;
        let answerer = kept
            .iter()
            .zip(&opening_ids)
            .map(|(&i, opening)| {
                let user = Message::new("user", users[i].clone());
                rendered(model, &[system.clone(), user], opening)
            })
            .collect::<Result<Vec<_>>>()?;
        let top = Some((options.top_logprobs, options.logprob_mass));
        let answers = continue_all(
            model,
            &answerer,
            options.answer_max_tokens,
            Sampling::GREEDY,
            top,
            options.stop_on_repeat,
            0,
        )?;
        let mut lines = Vec::new();
        for ((&i, answer), opening) in kept.iter().zip(answers).zip(opening_ids) {
            let mut prompt_ids = model
                .text
                .render_after_system_ids(&[Message::new("user", users[i].clone())], true)?;
            prompt_ids.extend(opening);
            let conversation = Conversation {
                batch: batch_index - 1,
                chunk_start: start,
                chunk_tokens: length,
                seed: seeds[i],
                user: users[i].clone(),
                opening: given[i].to_owned(),
                assistant: clean(&model.text, &answer.tokens)?,
                prompt_ids,
                answer_ids: answer.tokens,
                teacher: answer.top_logprobs,
            };
            // An answer of nothing but its stop token would teach stopping at once.
            if conversation.assistant.is_empty() {
                continue;
            }
            push_line(&mut lines, &conversation)?;
            conversations.push(conversation);
            if conversations.len() == options.conversations {
                break;
            }
        }
        file.write_all(&lines)
            .and_then(|()| file.flush())
            .map_err(|e| Error::io(path, e))?;
        barren = if conversations.len() > before {
            0
        } else {
            barren + 1
        };
        if barren == BARREN_BATCHES {
            return Err(barren_error());
        }
        progress(conversations.len(), options.conversations)?;
    }
    Ok(conversations)
}

/// Batches in a row that may give no conversation before synthesis stops: a model that
/// writes only empty messages or answers would otherwise loop for good.
const BARREN_BATCHES: usize = 64;

/// Positions allowed beyond the estimate of the longest prompt: text cut at a token boundary
/// elsewhere in the corpus, or a message cut mid-character, re-encodes a few tokens longer.
const RE_ENCODING_SLACK: usize = 16;

fn barren_error() -> Error {
    Error::Data(format!(
        "{BARREN_BATCHES} generation batches in a row gave no conversation (every message or answer was empty): does the model follow its chat template?"
    ))
}

/// The baseline objective: plain next-token prediction on the corpus's `tokens`. Consecutive
/// pieces of `length` tokens become "conversations" whose first token is the prompt and whose
/// teacher is certain of every following token, so the same distillation loss is the
/// cross-entropy of the corpus text read after the cartridge.
pub fn next_token_conversations(tokens: &[u32], length: usize) -> Vec<Conversation> {
    let length = length.max(2);
    tokens
        .chunks(length)
        .enumerate()
        .filter(|(_, piece)| piece.len() >= 2)
        .map(|(index, piece)| Conversation {
            batch: index as u64,
            chunk_start: index * length,
            chunk_tokens: piece.len(),
            seed: SeedKind::Structuring,
            user: String::new(),
            opening: String::new(),
            assistant: String::new(),
            prompt_ids: piece[..1].to_vec(),
            answer_ids: piece[1..].to_vec(),
            teacher: piece[1..].iter().map(|&t| vec![(t, 0.0)]).collect(),
        })
        .collect()
}

impl Conversation {
    /// What training indexes by: token ids within the vocabulary, one teacher distribution per
    /// answer token, log-probabilities that are probabilities' (an id past the embeddings stops a
    /// CUDA kernel by a device assert, which ends the process).
    pub(crate) fn check(&self, vocab: usize) -> std::result::Result<(), String> {
        let ids = self.prompt_ids.iter().chain(&self.answer_ids);
        if let Some(id) = ids
            .chain(self.teacher.iter().flatten().map(|(id, _)| id))
            .find(|&&id| id as usize >= vocab)
        {
            return Err(format!("token {id} is outside the model's {vocab} tokens"));
        }
        if self.teacher.len() != self.answer_ids.len() {
            return Err(format!(
                "{} teacher distributions for {} answer tokens",
                self.teacher.len(),
                self.answer_ids.len()
            ));
        }
        if let Some((_, logp)) = self
            .teacher
            .iter()
            .flatten()
            .find(|(_, logp)| !(logp.is_finite() && *logp <= 0.0))
        {
            return Err(format!("the log-probability {logp} is not one"));
        }
        Ok(())
    }
}

/// Reads a conversations file written for a model of `vocab` tokens, leaving it as it is. A last
/// line an interrupted run cut off (no newline) is not read (a resumed synthesis drops it, with
/// its batch); any other unreadable line is an error.
pub fn read_conversations(path: &Path, vocab: usize) -> Result<Vec<Conversation>> {
    read_stored(path, vocab).map(|(conversations, _)| conversations)
}

/// The whole lines of a conversations file, and whether a torn last line follows them (the file
/// is left as it is).
fn read_stored(path: &Path, vocab: usize) -> Result<(Vec<Conversation>, bool)> {
    match std::fs::read(path) {
        Ok(bytes) => parse_stored(path, &bytes, vocab),
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => Ok((Vec::new(), false)),
        Err(error) => Err(Error::io(path, error)),
    }
}

/// The whole lines of a conversations file's `bytes`, and whether a torn last line follows them.
fn parse_stored(path: &Path, bytes: &[u8], vocab: usize) -> Result<(Vec<Conversation>, bool)> {
    let complete = bytes.iter().rposition(|&b| b == b'\n').map_or(0, |i| i + 1);
    let mut conversations = Vec::new();
    for (number, line) in bytes[..complete].split(|&b| b == b'\n').enumerate() {
        if line.is_empty() {
            continue;
        }
        let conversation: Conversation = serde_json::from_slice(line)
            .map_err(|e| format!("not a conversation: {e}"))
            .and_then(|c: Conversation| c.check(vocab).map(|()| c))
            .map_err(|e| Error::Data(format!("{}:{}: {e}", path.display(), number + 1)))?;
        conversations.push(conversation);
    }
    Ok((conversations, complete < bytes.len()))
}

/// Another run's stored conversations, as [`read_made_for`] reads them.
pub struct MadeConversations {
    /// As many as that run asked for (the first ones of the file).
    pub conversations: Vec<Conversation>,
    /// The corpus they are about.
    pub corpus: cartridge_schemas::Digest,
    /// The file's bytes as read.
    pub digest: cartridge_schemas::Digest,
}

/// Another run's stored conversations (its work directory's `conversations.jsonl`), for a model
/// with these weights. The record beside them says what made them: without it, made for another
/// model or prompt format, or fewer than it asked for (a synthesis stopped or still running),
/// they are refused, named.
pub fn read_made_for(path: &Path, model: &LoadedModel) -> Result<MadeConversations> {
    let meta_path = path.with_extension("meta.json");
    let text = std::fs::read_to_string(&meta_path).map_err(|e| {
        Error::Data(format!(
            "{}: {e} (the record of what made {})",
            meta_path.display(),
            path.display()
        ))
    })?;
    let made: Provenance = serde_json::from_str(&text)
        .map_err(|e| Error::Data(format!("{}: {e}", meta_path.display())))?;
    if made.model != model.fingerprint.weights {
        return Err(Error::Data(format!(
            "{} holds conversations made with the model {}, not this one ({})",
            path.display(),
            made.model,
            model.fingerprint.weights
        )));
    }
    if made.prompt_format != PROMPT_FORMAT {
        return Err(Error::Data(format!(
            "{} holds conversations in prompt format {} (this version reads {PROMPT_FORMAT}): synthesize them again",
            path.display(),
            made.prompt_format
        )));
    }
    let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    let (mut conversations, torn) = parse_stored(path, &bytes, model.llama.config.vocab)?;
    let asked = made.options.conversations;
    if torn || conversations.len() < asked {
        return Err(Error::Data(format!(
            "{} holds {} whole conversations{} of the {asked} its run asked for: finish that run first",
            path.display(),
            conversations.len(),
            if torn { " and a torn line" } else { "" }
        )));
    }
    conversations.truncate(asked);
    Ok(MadeConversations {
        conversations,
        corpus: made.corpus,
        digest: blake3::hash(&bytes).into(),
    })
}

pub fn conversations_path(work_dir: &Path) -> PathBuf {
    work_dir.join("conversations.jsonl")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn openings_are_the_first_words_of_lines_or_sentences_as_written() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        let chunk = "ouse on the hill, cut short by the sea.\n  The lamp   burns whale oil and can be seen. Its keeper logs\tevery ship that passes.\nShort line.";
        // Pieces of more than five words first, their spacing kept; the cut first line's piece is
        // no start.
        let mut given = openings(chunk, true, 4, &mut rng);
        given[..2].sort_unstable();
        let both = ["Its keeper logs\tevery ship", "The lamp   burns whale oil"];
        assert_eq!(given[..2], both);
        // Past them, the other words with five more after them, never the cut first word: 21 of
        // the 27 words start an opening, each once before any again.
        for opening in &given[2..] {
            assert!(
                chunk.contains(opening) && !both.contains(opening),
                "{opening:?}"
            );
        }
        let all = openings(chunk, true, 21, &mut rng);
        let distinct: std::collections::BTreeSet<&str> = all.iter().copied().collect();
        assert_eq!(distinct.len(), 21);
        assert!(!all.iter().any(|opening| opening.starts_with("ouse")));
        let again = openings(chunk, true, 22, &mut rng);
        assert_eq!(
            again
                .iter()
                .collect::<std::collections::BTreeSet<_>>()
                .len(),
            21
        );
        // Where the first line is whole, it is a start like any other.
        let whole = "One two three four five six.\nShort.";
        assert_eq!(
            openings(whole, false, 1, &mut rng),
            ["One two three four five"]
        );
        // Without a long line or sentence, openings start at words with more after them.
        let mut given = openings("a b c\nd e f g", false, 2, &mut rng);
        given.sort_unstable();
        assert_eq!(given, ["a b c\nd e", "b c\nd e f"]);
        assert_eq!(
            openings("a b c\nd e f g", true, 2, &mut rng),
            ["b c\nd e f"; 2]
        );
        // Long words are cut, on a character's boundary.
        let wide = "é".repeat(40) + " b c d e f g";
        assert_eq!(openings(&wide, false, 1, &mut rng), ["é".repeat(32)]);
        // Too few words to continue (the cut first one not counted): none.
        assert!(openings("a b c d e", false, 3, &mut rng).is_empty());
        assert!(openings("a b c d e f", true, 3, &mut rng).is_empty());
    }
}
