use std::io::{BufRead, IsTerminal, Write};
use std::path::PathBuf;

use anyhow::{Context, Result, bail};
use cartridge_client::{Cache, PullOptions, pull};
use cartridge_schemas::file::Cartridge;
use cartridge_schemas::paths::Paths;
use cartridge_trainer::cartridge::{concatenate, prefix_of_cartridge};
use cartridge_trainer::eval::QaPair;
use cartridge_trainer::model::{
    Alias, GenerationRequest, LoadedModel, Message, ModelSource, Prefix, Sampling,
    generate_streaming,
};
use clap::Args;

use super::train::{DeviceKind, positive};
use super::{RegistryArgs, Target};
use crate::progress::Bar;

/// Ask a model about what a cartridge holds: the answer is printed as it is written. Without a
/// question, each line read is a turn of one conversation (an empty line or end of input ends
/// it).
#[derive(Debug, Args)]
pub struct ChatArgs {
    /// A cartridge file, or a reference to one in a registry (`ns/name@version`), pulled into
    /// the local cache.
    pub cartridge: String,
    /// The question; without one, questions are read from standard input.
    pub question: Option<String>,
    /// Another cartridge composed after the first (repeatable, in order).
    #[arg(long = "with", value_name = "CARTRIDGE")]
    pub with: Vec<String>,
    /// The model: a GGUF file, a Hugging Face checkpoint directory or an installed alias
    /// (default: the installed alias the cartridge was trained for).
    #[arg(long)]
    pub model: Option<String>,
    /// Longest answer, in tokens.
    #[arg(long, default_value_t = 256, value_parser = positive)]
    pub max_tokens: usize,
    /// Sampling temperature; 0 always takes the most likely token (the same answer every time).
    #[arg(long, default_value_t = 0.7, value_parser = at_least_zero)]
    pub temperature: f64,
    /// Draw only from the most likely tokens holding this much of the probability.
    #[arg(long, default_value_t = 0.9, value_parser = share)]
    pub top_p: f64,
    /// Seed of the sampling (default: a fresh one each run).
    #[arg(long)]
    pub seed: Option<u64>,
    /// Where the model runs (`cuda` needs a build with `--features cuda`).
    #[arg(long, value_enum, default_value = "cpu")]
    pub device: DeviceKind,
    /// Print each answer once written, as a line of JSON: `{"question": …, "answer": …}`.
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub registry: RegistryArgs,
}

fn at_least_zero(text: &str) -> Result<f64, String> {
    match text.parse::<f64>() {
        Ok(value) if value.is_finite() && value >= 0.0 => Ok(value),
        _ => Err("expected a number of 0 or more".into()),
    }
}

fn share(text: &str) -> Result<f64, String> {
    match text.parse::<f64>() {
        Ok(value) if value > 0.0 && value <= 1.0 => Ok(value),
        _ => Err("expected a number above 0 and at most 1".into()),
    }
}

pub fn run(args: ChatArgs) -> Result<()> {
    if args.question.as_ref().is_some_and(|q| q.trim().is_empty()) {
        bail!("the question is empty");
    }
    let paths = Paths::from_env()?;
    let named: Vec<&str> = std::iter::once(&args.cartridge)
        .chain(&args.with)
        .map(String::as_str)
        .collect();
    let cartridges = named
        .iter()
        .map(|target| {
            let path = locate(target, &args.registry, &paths)?;
            Cartridge::open(&path).with_context(|| target.to_string())
        })
        .collect::<Result<Vec<_>>>()?;
    let model = match &args.model {
        Some(model) => model.clone(),
        None => trained_for(&cartridges[0], &args.cartridge, &paths)?,
    };
    let (device, dtype) = args.device.open()?;
    let model = ModelSource::resolve(&model, &paths.models())?
        .load(&device, dtype)
        .with_context(|| format!("loading {model}"))?;
    let prefixes = cartridges
        .iter()
        .zip(&named)
        .map(|(cartridge, target)| {
            prefix_of_cartridge(cartridge, &model.llama, &model.fingerprint)
                .with_context(|| target.to_string())
        })
        .collect::<Result<Vec<_>>>()?;
    let prefix = concatenate(&prefixes)?;
    let mut chat = Chat {
        model: &model,
        prefix: &prefix,
        conversation: Vec::new(),
        sampling: Sampling {
            temperature: args.temperature,
            top_p: args.top_p,
        },
        max_tokens: args.max_tokens,
        seed: args.seed.unwrap_or_else(rand::random),
        json: args.json,
    };
    if let Some(question) = &args.question {
        return chat.answer(question.trim());
    }
    let stdin = std::io::stdin();
    let terminal = stdin.is_terminal();
    if terminal {
        eprintln!(
            "{} ({} tokens); an empty line or Ctrl-D ends the conversation",
            named.join(" + "),
            prefix.tokens()
        );
    }
    let mut lines = stdin.lock().lines();
    loop {
        if terminal {
            eprint!("> ");
        }
        let Some(line) = lines.next() else {
            break;
        };
        let line = line.context("reading a question from standard input")?;
        if line.trim().is_empty() {
            break;
        }
        chat.answer(line.trim())?;
    }
    Ok(())
}

/// A cartridge file's path: the file named, or a reference's cartridge pulled into the cache.
fn locate(target: &str, registry: &RegistryArgs, paths: &Paths) -> Result<PathBuf> {
    let reference = match Target::parse(target)? {
        Target::File(path) => return Ok(path),
        Target::Reference(reference) => reference,
    };
    let pulled = registry
        .connect(reference.registry.as_ref())
        .and_then(|client| {
            let cache = Cache::new(paths.cache.clone())?;
            let bar = Bar::new(&format!("pull {reference}"), false);
            Ok(super::runtime()?.block_on(pull(
                &client,
                &reference.repository,
                &reference.selector,
                &cache,
                &PullOptions::default(),
                &bar,
            ))?)
        });
    Ok(super::looked_up(target, pulled)?.path)
}

/// The installed alias whose weights a cartridge was trained against.
fn trained_for(cartridge: &Cartridge, target: &str, paths: &Paths) -> Result<String> {
    let weights = cartridge.header().model.weights;
    match Alias::of_weights(&weights) {
        // Where `--model ALIAS` would look; loading reads the file anyway, so it is not hashed
        // here as `model install` does.
        Some(alias) if alias.weights_path(&paths.models()).is_file() => Ok(alias.name.to_owned()),
        Some(alias) => bail!(
            "{target} is for {}, which is not installed: run `cartridge model install {}`",
            alias.name,
            alias.name
        ),
        None => bail!(
            "{target} is for a model with weights {weights}, which no alias names: name it with --model"
        ),
    }
}

/// One conversation with the cartridges in front of it.
struct Chat<'a> {
    model: &'a LoadedModel,
    prefix: &'a Prefix,
    conversation: Vec<Message>,
    sampling: Sampling,
    max_tokens: usize,
    seed: u64,
    json: bool,
}

impl Chat<'_> {
    /// Answers `question` after the turns so far, printing the answer as it is written.
    fn answer(&mut self, question: &str) -> Result<()> {
        let text = &self.model.text;
        self.conversation.push(Message::new("user", question));
        let prompt = text.render_after_system_ids(&self.conversation, true)?;
        let limit = self.model.llama.config.max_positions;
        let room = limit.saturating_sub(self.prefix.tokens() + prompt.len());
        if room == 0 {
            let (what, then) = match self.conversation.len() {
                1 => ("the question does not fit", ""),
                _ => ("the conversation no longer fits", ": start a new one"),
            };
            bail!(
                "{what} in the model's {limit} positions after the cartridges' {}{then}",
                self.prefix.tokens()
            );
        }
        let request = GenerationRequest {
            prefix: Some(self.prefix),
            shared: &prompt,
            prompts: &[Vec::new()],
            max_new_tokens: self.max_tokens.min(room),
            sampling: self.sampling,
            top_logprobs: None,
            stop_ids: &text.stop_ids,
            stop_on_repeat: 0,
            seed: self.seed,
        };
        // Each turn draws afresh.
        self.seed = self.seed.wrapping_add(1);
        let mut stdout = std::io::stdout().lock();
        let mut shown = String::new();
        let mut failed: Option<anyhow::Error> = None;
        let generated = generate_streaming(&self.model.llama, &request, |sequences| {
            if self.json {
                return;
            }
            // The whole answer decoded again: a token alone may be half a character, or read
            // otherwise beside its neighbours. Shown as far as it continues what is on screen,
            // short of a last half character and of whitespace at either end, which the answer
            // keeps only where more follows.
            let written = match self.model.text.answer_text(&sequences[0].tokens) {
                Ok(written) => written,
                Err(error) => {
                    failed = Some(error.into());
                    sequences[0].stopped = true;
                    return;
                }
            };
            let written = written.trim_start().trim_end_matches('\u{fffd}').trim_end();
            if let Some(new) = written.strip_prefix(shown.as_str()) {
                if let Err(error) = stdout
                    .write_all(new.as_bytes())
                    .and_then(|()| stdout.flush())
                {
                    failed = Some(anyhow::Error::new(error).context("writing the answer"));
                    sequences[0].stopped = true;
                    return;
                }
                shown = written.to_owned();
            }
        })?;
        if let Some(error) = failed {
            return Err(error);
        }
        let answer = self
            .model
            .text
            .answer_text(&generated[0].tokens)?
            .trim()
            .to_owned();
        if self.json {
            // The shape of `eval`'s questions file.
            let pair = QaPair {
                question: question.to_owned(),
                answer: answer.clone(),
            };
            writeln!(stdout, "{}", serde_json::to_string(&pair)?)
        } else {
            match answer.strip_prefix(shown.as_str()) {
                Some(rest) => writeln!(stdout, "{rest}"),
                // Read whole, the answer does not continue what is on screen: it follows in
                // full.
                None => writeln!(stdout, "\n{answer}"),
            }
        }
        .context("writing the answer")?;
        let ended = &generated[0];
        if !ended.stopped && ended.tokens.len() == room && room < self.max_tokens {
            eprintln!("(the answer was cut where the model's {limit} positions end)");
        }
        self.conversation.push(Message::new("assistant", answer));
        Ok(())
    }
}
