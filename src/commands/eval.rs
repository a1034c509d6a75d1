use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use cartridge_schemas::file::Cartridge;
use cartridge_schemas::paths::Paths;
use cartridge_trainer::cartridge::{concatenate, prefix_of_cartridge};
use cartridge_trainer::corpus::Corpus;
use cartridge_trainer::eval::{Setting, evaluate, read_qa};
use cartridge_trainer::model::ModelSource;
use clap::Args;

use super::train::DeviceKind;
use crate::output::human_bytes;

/// Measure how well a model answers questions about a corpus: with no context, with the corpus in
/// context, with a truncated corpus, with each cartridge, and with the cartridges composed.
#[derive(Debug, Args)]
pub struct EvalArgs {
    /// The model: a GGUF file, a Hugging Face checkpoint directory or an installed alias.
    #[arg(long)]
    pub model: String,
    /// Corpus files or folders (for the in-context baselines), read as `train` reads them.
    #[arg(long, required = true, num_args = 1..)]
    pub corpus: Vec<PathBuf>,
    /// Questions and reference answers, one `{"question": …, "answer": …}` per line.
    #[arg(long)]
    pub qa: PathBuf,
    /// Cartridges to evaluate (repeatable); with several, their composition too.
    #[arg(long = "cartridge")]
    pub cartridges: Vec<PathBuf>,
    /// Tokens of the truncated-corpus baseline, its system turn's template included, as a
    /// cartridge of that length holds them (default: the first cartridge's length).
    #[arg(long)]
    pub tokens: Option<usize>,
    /// Generated answers to show per mode.
    #[arg(long, default_value_t = 3)]
    pub samples: usize,
    /// Longest generated answer, in tokens.
    #[arg(long, default_value_t = 64)]
    pub max_answer_tokens: usize,
    /// Where the model runs (`cuda` needs a build with `--features cuda`).
    #[arg(long, value_enum, default_value = "cpu")]
    pub device: DeviceKind,
    /// Print JSON.
    #[arg(long)]
    pub json: bool,
}

pub fn run(args: EvalArgs) -> Result<()> {
    let paths = Paths::from_env()?;
    // Read before the model, which takes a while to load: a wrong path fails at once.
    let corpus = Corpus::read(&args.corpus)?;
    let qa = read_qa(&args.qa)?;
    let mut seen = std::collections::HashSet::new();
    if let Some(twice) = args
        .cartridges
        .iter()
        .find(|path| !seen.insert(path.canonicalize().unwrap_or_else(|_| path.to_path_buf())))
    {
        bail!(
            "{} is given twice (to evaluate it composed with itself, compose it first)",
            twice.display()
        );
    }
    let (device, dtype) = args.device.open()?;
    let model = ModelSource::resolve(&args.model, &paths.models())?
        .load(&device, dtype)
        .with_context(|| format!("loading {}", args.model))?;

    // Labelled by file name, or by the path given where two share one.
    let file_name = |path: &Path| path.file_name().map(|n| n.to_string_lossy().into_owned());
    let shared_names = args
        .cartridges
        .iter()
        .filter_map(|p| file_name(p))
        .collect::<Vec<_>>();
    let mut cartridges = Vec::new();
    let mut trained_on_corpus = Vec::new();
    for path in &args.cartridges {
        let cartridge = Cartridge::open(path).with_context(|| format!("{}", path.display()))?;
        let prefix = prefix_of_cartridge(&cartridge, &model.llama, &model.fingerprint)
            .with_context(|| format!("{}", path.display()))?;
        let trained_on = &cartridge.header().provenance["trainer"]["corpus"]["digest"];
        trained_on_corpus.push(trained_on.as_str().map(|d| d == corpus.digest.to_string()));
        let name = file_name(path)
            .filter(|name| shared_names.iter().filter(|n| *n == name).count() == 1)
            .unwrap_or_else(|| path.display().to_string());
        cartridges.push((name, prefix));
    }
    // Composed with others of other corpora is what composition is for; none of this corpus is
    // more likely the wrong --corpus.
    if trained_on_corpus.contains(&Some(false)) && !trained_on_corpus.contains(&Some(true)) {
        eprintln!(
            "warning: no cartridge given was trained on this --corpus (their provenance names another)"
        );
    }
    let truncated_tokens = match (args.tokens, cartridges.first()) {
        (Some(tokens), _) => tokens,
        (None, Some((_, prefix))) => prefix.tokens(),
        (None, None) => {
            bail!("--tokens is needed for the truncated baseline when no cartridge is given")
        }
    };
    let corpus_tokens = model.text.encode(&corpus.text())?;
    // The same budget as a cartridge of that length, which holds the template around the corpus:
    // the truncated corpus is a cartridge's initialization, token for token.
    let (before, after, room) = model.text.system_turn_ids(truncated_tokens).context(
        "the truncated-corpus baseline (its budget is --tokens, else the first cartridge's)",
    )?;
    let turn = |ids: &[u32]| Setting::Turn([&before[..], ids, &after[..]].concat());
    let mut settings = vec![
        ("no context".to_owned(), turn(&[])),
        (
            format!("corpus in context ({} tokens)", corpus_tokens.len()),
            turn(&corpus_tokens),
        ),
        (
            format!("truncated corpus ({truncated_tokens} tokens)"),
            turn(&corpus_tokens[..room.min(corpus_tokens.len())]),
        ),
    ];
    if cartridges.len() > 1 {
        let composed = concatenate(
            &cartridges
                .iter()
                .map(|(_, p)| p.clone())
                .collect::<Vec<_>>(),
        )?;
        let names: Vec<&str> = cartridges.iter().map(|(n, _)| n.as_str()).collect();
        settings.push((
            format!("composed: {}", names.join(" + ")),
            Setting::Cartridge(composed),
        ));
    }
    settings.extend(
        cartridges
            .into_iter()
            .map(|(name, prefix)| (format!("cartridge: {name}"), Setting::Cartridge(prefix))),
    );

    let bar = crate::progress::bar("eval [{bar:30}] {msg} {elapsed} {left}", args.json);
    let lines = crate::progress::Lines::where_bars_cannot_draw();
    let reports = evaluate(
        &model,
        settings,
        &qa,
        (args.samples, args.max_answer_tokens),
        |mode, done, total| {
            bar.set_length(total as u64);
            bar.set_position(done as u64);
            bar.set_message(mode.to_owned());
            lines.line("eval", done == total, || {
                let left = crate::progress::left(&bar);
                format!("{done}/{total} answers, {mode}{left}")
            });
        },
    )?;
    bar.finish_and_clear();
    if args.json {
        println!(
            "{}",
            serde_json::to_string_pretty(
                &serde_json::json!({"questions": qa.len(), "modes": reports})
            )?
        );
        return Ok(());
    }
    println!(
        "{} questions; mean log-likelihood per answer token (higher is better)\n",
        qa.len()
    );
    println!(
        "{:<44} {:>10} {:>8} {:>10} {:>10}",
        "mode", "log-lik", "gain", "KV tokens", "KV bytes"
    );
    let number = |value: Option<f64>| value.map_or("-".to_owned(), |v| format!("{v:.4}"));
    for report in &reports {
        println!(
            "{:<44} {:>10} {:>8} {:>10} {:>10}{}",
            report.mode,
            number(report.log_likelihood),
            number(report.gain),
            report.context_tokens,
            human_bytes(report.kv_bytes),
            report
                .skipped
                .as_ref()
                .map_or(String::new(), |why| format!("  (not scored: {why})"))
        );
    }
    for report in &reports {
        println!("\n{}", report.mode);
        for sample in &report.samples {
            println!(
                "  Q: {}\n  A: {}\n  reference: {}",
                sample.question, sample.generated, sample.reference
            );
        }
    }
    Ok(())
}
