//! Evaluation on a held-out QA set: how likely the model finds the reference answers
//! (teacher-forced, mean log-probability per answer token) with no context, with the corpus in
//! context, with a truncated corpus, with each cartridge and with the cartridges composed, plus
//! a few generated answers to read.

use std::io::BufRead;
use std::path::Path;

use candle_core::{D, DType, IndexOp, Tensor};
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::model::{
    Context, GenerationRequest, LoadedModel, Mask, Message, Prefix, Sampling, generate,
};

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct QaPair {
    pub question: String,
    pub answer: String,
}

/// Reads a JSON-lines file of `{"question": …, "answer": …}`.
pub fn read_qa(path: &Path) -> Result<Vec<QaPair>> {
    let file = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
    let mut pairs = Vec::new();
    for (number, line) in std::io::BufReader::new(file).lines().enumerate() {
        let line =
            line.map_err(|e| Error::Data(format!("{}:{}: {e}", path.display(), number + 1)))?;
        // A byte-order mark is no JSON.
        let line = line.strip_prefix('\u{feff}').unwrap_or(&line);
        if line.trim().is_empty() {
            continue;
        }
        let pair: QaPair = serde_json::from_str(line).map_err(|e| {
            Error::Data(format!(
                "{}:{}: expected {{\"question\": …, \"answer\": …}}: {e}",
                path.display(),
                number + 1
            ))
        })?;
        // An empty answer has no tokens to score.
        if pair.question.trim().is_empty() || pair.answer.trim().is_empty() {
            return Err(Error::Data(format!(
                "{}:{}: the question and the answer must not be empty",
                path.display(),
                number + 1
            )));
        }
        pairs.push(pair);
    }
    if pairs.is_empty() {
        return Err(Error::Data(format!(
            "{} holds no questions",
            path.display()
        )));
    }
    Ok(pairs)
}

/// What the model has besides the question: a system turn, as text read into the KV cache or as
/// a cartridge standing for it. Every mode's question follows it alike, as conversations
/// followed the cartridge in training, so modes differ in what the turn holds and nothing else.
pub enum Setting {
    /// The tokens of a system turn holding text (none, the corpus, or its first tokens): its
    /// keys and values serve every question, like a cartridge's.
    Turn(Vec<u32>),
    /// A cartridge (or several composed).
    Cartridge(Prefix),
}

impl Setting {
    /// How many positions it takes before the question.
    pub fn tokens(&self) -> usize {
        match self {
            Self::Turn(ids) => ids.len(),
            Self::Cartridge(prefix) => prefix.tokens(),
        }
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct Sample {
    pub question: String,
    pub reference: String,
    pub generated: String,
}

#[derive(Debug, Clone, Serialize)]
pub struct ModeReport {
    pub mode: String,
    /// Mean log-probability per answer token; none for a mode that does not fit the model.
    pub log_likelihood: Option<f64>,
    /// Improvement over no context (filled in by [`evaluate`]).
    pub gain: Option<f64>,
    /// Why the mode was not scored: its context, question and answer exceed the model's
    /// positions (a corpus too long for the context is what a cartridge is for).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub skipped: Option<String>,
    /// Tokens of context the mode keeps in the KV cache.
    pub context_tokens: usize,
    /// Bytes of that KV cache in bf16.
    pub kv_bytes: u64,
    pub samples: Vec<Sample>,
}

/// Scores every setting on the QA set; `samples` answers per setting are generated to read.
/// Gains are over the first setting (no context). `progress` hears the setting at work, and
/// how many of all the answers to score and to generate are done.
pub fn evaluate(
    model: &LoadedModel,
    settings: Vec<(String, Setting)>,
    qa: &[QaPair],
    (samples, max_answer_tokens): (usize, usize),
    mut progress: impl FnMut(&str, usize, usize),
) -> Result<Vec<ModeReport>> {
    // A pair too long to read even after the first setting (no context) would leave every
    // mode unscored: named instead.
    if let Some((_, setting)) = settings.first() {
        let limit = model.llama.config.max_positions;
        for (index, pair) in qa.iter().enumerate() {
            let question = Message::new("user", &pair.question);
            let needed = setting.tokens()
                + model.text.render_after_system_ids(&[question], true)?.len()
                + model.text.encode(&pair.answer)?.len();
            if needed > limit {
                let shown: String = pair.question.chars().take(60).collect();
                return Err(Error::Data(format!(
                    "question {} ({shown:?}) and its answer need {needed} positions without any context; the model has {limit}",
                    index + 1
                )));
            }
        }
    }
    let samples = samples.min(qa.len());
    // A setting found not to fit leaves the whole: its answers are no work done.
    let each = qa.len() + samples;
    let (mut done, mut total) = (0, settings.len() * each);
    let mut reports = Vec::new();
    for (name, setting) in settings {
        progress(&name, done, total);
        let report = evaluate_one(
            model,
            &name,
            &setting,
            qa,
            (samples, max_answer_tokens),
            |answers| progress(&name, done + answers, total),
        )?;
        if report.skipped.is_some() {
            total -= each;
        } else {
            done += each;
        }
        reports.push(report);
    }
    // A last setting that did not fit ends the count with no answer of its own to say so.
    if let Some(last) = reports.last().filter(|r| r.skipped.is_some()) {
        progress(&last.mode, done, total);
    }
    let bare = reports.first().and_then(|r| r.log_likelihood);
    for report in &mut reports {
        report.gain = report.log_likelihood.zip(bare).map(|(l, b)| l - b);
    }
    Ok(reports)
}

/// One setting's report; `progress` hears how many answers are scored or generated.
fn evaluate_one(
    model: &LoadedModel,
    name: &str,
    setting: &Setting,
    qa: &[QaPair],
    (samples, max_answer_tokens): (usize, usize),
    mut progress: impl FnMut(usize),
) -> Result<ModeReport> {
    let prompts: Vec<Vec<u32>> = qa
        .iter()
        .map(|pair| {
            let question = Message::new("user", &pair.question);
            model.text.render_after_system_ids(&[question], true)
        })
        .collect::<Result<_>>()?;
    let context_tokens = setting.tokens();
    let config = &model.llama.config;
    let kv_bytes =
        (context_tokens * config.layers * 2 * config.kv_heads * config.head_dim * 2) as u64;

    // The longest reading: the context, a question and its answer.
    let answers: Vec<Vec<u32>> = qa
        .iter()
        .map(|pair| model.text.encode(&pair.answer))
        .collect::<Result<_>>()?;
    let longest = prompts
        .iter()
        .zip(&answers)
        .map(|(prompt, answer)| context_tokens + prompt.len() + answer.len())
        .max()
        .unwrap_or(0);
    if longest > config.max_positions {
        return Ok(ModeReport {
            mode: name.to_owned(),
            log_likelihood: None,
            gain: None,
            skipped: Some(format!(
                "needs {longest} positions, the model has {}",
                config.max_positions
            )),
            context_tokens,
            kv_bytes,
            samples: Vec::new(),
        });
    }
    let text_prefix = match setting {
        Setting::Turn(ids) => Some(model.llama.prefix_of(ids)?),
        Setting::Cartridge(_) => None,
    };
    let prefix = match setting {
        Setting::Cartridge(prefix) => Some(prefix),
        Setting::Turn(_) => text_prefix.as_ref(),
    };

    let mut total = 0.0;
    let mut count = 0usize;
    for (scored, ((pair, prompt), answer)) in qa.iter().zip(&prompts).zip(&answers).enumerate() {
        if answer.is_empty() {
            return Err(Error::Data(format!(
                "the answer to {:?} is empty",
                pair.question
            )));
        }
        total += score(model, prefix, prompt, answer)?;
        count += answer.len();
        progress(scored + 1);
    }

    let mut generated = Vec::new();
    for (written, (pair, prompt)) in qa.iter().zip(&prompts).take(samples).enumerate() {
        // As much of an answer as the model's positions leave room for.
        let room = config.max_positions - context_tokens - prompt.len();
        let request = GenerationRequest {
            prefix,
            shared: prompt,
            prompts: &[Vec::new()],
            max_new_tokens: max_answer_tokens.min(room),
            sampling: Sampling::GREEDY,
            top_logprobs: None,
            stop_ids: &model.text.stop_ids,
            // Shown as the model wrote them, loops and all.
            stop_on_repeat: 0,
            seed: 0,
        };
        let tokens = generate(&model.llama, &request)?.remove(0).tokens;
        generated.push(Sample {
            question: pair.question.clone(),
            reference: pair.answer.clone(),
            generated: model.text.answer_text(&tokens)?.trim().to_owned(),
        });
        progress(qa.len() + written + 1);
    }
    Ok(ModeReport {
        mode: name.to_owned(),
        log_likelihood: Some(total / count as f64),
        gain: None,
        skipped: None,
        context_tokens,
        kv_bytes,
        samples: generated,
    })
}

/// Sum of the log-probabilities of `answer` following `question` (after `prefix`).
fn score(
    model: &LoadedModel,
    prefix: Option<&Prefix>,
    question: &[u32],
    answer: &[u32],
) -> Result<f64> {
    let llama = &model.llama;
    let device = llama.device();
    let p = prefix.map_or(0, Prefix::tokens);
    let ids: Vec<u32> = question.iter().chain(answer).copied().collect();
    let n = ids.len();
    let input = Tensor::new(ids.as_slice(), device)?.unsqueeze(0)?;
    let positions = Tensor::arange(p as u32, (p + n) as u32, device)?.unsqueeze(0)?;
    let mask = Mask::causal(1, p, n, device)?;
    let context = prefix.map_or(Context::None, Context::Prefix);
    let hidden = llama.forward(&input, &positions, &mask, context)?;
    // Outputs at question.len()-1 .. n-1 predict the answer tokens.
    let rows = hidden.i((0, question.len() - 1..n - 1))?;
    let log_probabilities =
        candle_nn::ops::log_softmax(&llama.logits(&rows)?.to_dtype(DType::F32)?, D::Minus1)?;
    let targets = Tensor::new(answer, device)?.unsqueeze(1)?;
    Ok(f64::from(
        log_probabilities
            .gather(&targets, 1)?
            .sum_all()?
            .to_scalar::<f32>()?,
    ))
}
