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
    Context, GenerationRequest, LoadedModel, Message, Prefix, Sampling, causal_mask, generate,
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

/// What the model has besides the question.
pub enum Setting {
    /// Nothing.
    Bare,
    /// Text in a system message (the corpus, or its first tokens).
    Text(String),
    /// A cartridge (or several composed) standing for a system turn, the conversation following
    /// it, as it was trained.
    Cartridge(Prefix),
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
pub fn evaluate(
    model: &LoadedModel,
    settings: Vec<(String, Setting)>,
    qa: &[QaPair],
    samples: usize,
    max_answer_tokens: usize,
) -> Result<Vec<ModeReport>> {
    let mut reports = Vec::new();
    for (name, setting) in settings {
        reports.push(evaluate_one(
            model,
            &name,
            &setting,
            qa,
            samples,
            max_answer_tokens,
        )?);
    }
    let bare = reports
        .iter()
        .find(|r| r.context_tokens == 0)
        .and_then(|r| r.log_likelihood);
    for report in &mut reports {
        report.gain = report.log_likelihood.zip(bare).map(|(l, b)| l - b);
    }
    Ok(reports)
}

fn evaluate_one(
    model: &LoadedModel,
    name: &str,
    setting: &Setting,
    qa: &[QaPair],
    samples: usize,
    max_answer_tokens: usize,
) -> Result<ModeReport> {
    let prompts: Vec<Vec<u32>> = qa
        .iter()
        .map(|pair| {
            let question = Message::new("user", &pair.question);
            match setting {
                Setting::Bare => model.text.render_ids(&[question], true),
                Setting::Text(text) => model
                    .text
                    .render_ids(&[Message::new("system", text.clone()), question], true),
                Setting::Cartridge(_) => model.text.render_after_system_ids(&[question], true),
            }
        })
        .collect::<Result<_>>()?;
    // Context text is read once: its keys and values serve every question, like a cartridge.
    // That is what the prompts share up to the question (an empty one shows where it starts:
    // words the questions happen to share are not context), and at least one token of each
    // prompt stays out of it, to score from.
    let shortest = prompts.iter().map(Vec::len).min().unwrap_or(1);
    let shared = match setting {
        Setting::Text(text) => {
            let empty = Message::new("user", "");
            let context = model
                .text
                .render_ids(&[Message::new("system", text.clone()), empty], true)?;
            prompts
                .iter()
                .fold((shortest - 1).min(common(&prompts[0], &context)), |n, p| {
                    n.min(common(&prompts[0], p))
                })
        }
        _ => 0,
    };
    let context_tokens = match setting {
        Setting::Cartridge(prefix) => prefix.tokens(),
        _ => shared,
    };
    let config = &model.llama.config;
    let kv_bytes =
        (context_tokens * config.layers * 2 * config.kv_heads * config.head_dim * 2) as u64;

    // The longest reading: the context, a question and its answer (or a generated one).
    let answers: Vec<Vec<u32>> = qa
        .iter()
        .map(|pair| model.text.encode(&pair.answer))
        .collect::<Result<_>>()?;
    let longest = prompts
        .iter()
        .zip(&answers)
        .enumerate()
        .map(|(i, (prompt, answer))| {
            let generated = if i < samples { max_answer_tokens } else { 0 };
            (context_tokens + prompt.len() - shared).saturating_add(answer.len().max(generated))
        })
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
    let text_prefix = if shared > 0 {
        Some(model.llama.prefix_of(&prompts[0][..shared])?)
    } else {
        None
    };
    let prefix = match setting {
        Setting::Cartridge(prefix) => Some(prefix),
        _ => text_prefix.as_ref(),
    };

    let mut total = 0.0;
    let mut count = 0usize;
    for ((pair, prompt), answer) in qa.iter().zip(&prompts).zip(&answers) {
        if answer.is_empty() {
            return Err(Error::Data(format!(
                "the answer to {:?} is empty",
                pair.question
            )));
        }
        let question = &prompt[shared..];
        total += score(model, prefix, question, answer)?;
        count += answer.len();
    }

    let mut generated = Vec::new();
    for (pair, prompt) in qa.iter().zip(&prompts).take(samples) {
        let request = GenerationRequest {
            prefix,
            shared: &prompt[shared..],
            prompts: &[Vec::new()],
            max_new_tokens: max_answer_tokens,
            sampling: Sampling::GREEDY,
            top_logprobs: None,
            stop_ids: &model.text.stop_ids,
            // Shown as the model wrote them, loops and all.
            stop_on_repeat: 0,
            seed: 0,
        };
        let tokens: Vec<u32> = generate(&model.llama, &request)?
            .remove(0)
            .tokens
            .into_iter()
            .filter(|t| !model.text.stop_ids.contains(t))
            .collect();
        generated.push(Sample {
            question: pair.question.clone(),
            reference: pair.answer.clone(),
            generated: model.text.decode(&tokens)?.trim().to_owned(),
        });
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

fn common(a: &[u32], b: &[u32]) -> usize {
    a.iter().zip(b).take_while(|(x, y)| x == y).count()
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
    let mask = causal_mask(&[n], p, n, llama.dtype(), device)?;
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
