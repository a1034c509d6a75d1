//! The whole of `cartridge train`: synthesize conversations about the corpus (resumable), distill
//! them into a cartridge (checkpointed, resumable), and write the cartridge with its provenance.

use std::path::{Path, PathBuf};
use std::time::Instant;

use cartridge_schemas::Dtype;
use cartridge_schemas::file::{Cartridge, Header};
use serde::Serialize;
use serde_json::json;

use crate::cartridge::{concatenate, prefix_of_cartridge};
use crate::corpus::Corpus;
use crate::distill::{DistillOptions, Distiller, initial_ids, steps_for_epochs};
use crate::error::{Error, Result};
use crate::model::{LoadedModel, Message, Prefix};
use crate::synthesis::{
    Conversation, SynthesisOptions, conversations_path, next_token_conversations, read_made_for,
    synthesize,
};

/// What the cartridge learns from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Objective {
    /// Distill the model's own answers about the corpus (the method).
    SelfStudy,
    /// Predict the corpus text itself (the baseline the method is measured against).
    NextToken,
}

#[derive(Debug, Clone)]
pub struct TrainRequest {
    pub objective: Objective,
    pub synthesis: SynthesisOptions,
    /// How to distill (its `partner_tokens` and `partner_conversations` follow from the two
    /// below).
    pub distill: DistillOptions,
    /// Cartridges the new one learns to compose with ([`Distiller::compose_with`]).
    pub compose_with: Vec<PathBuf>,
    /// Their own stored conversations (each about one of their corpora), which the new one
    /// learns not to disturb.
    pub partner_conversations: Vec<PathBuf>,
    /// Conversations and checkpoints live here, so a run can resume.
    pub work_dir: PathBuf,
    pub output: PathBuf,
    /// Continue from the work directory's checkpoint, if it has one.
    pub resume: bool,
    pub checkpoint_every: usize,
    /// Size the run by epochs over the conversations instead of `distill.steps`.
    pub epochs: Option<f64>,
    pub dtype: Dtype,
    /// How the model was named (recorded in the provenance).
    pub model_name: String,
}

/// Hooks for a progress display, and for stopping a run early.
pub trait TrainProgress {
    fn synthesized(&self, done: usize, total: usize);
    fn stepped(&self, step: usize, total: usize, loss: f32, tokens_per_second: f64);
    /// Whether the run is to stop (Ctrl-C): after the synthesis batch or the training step it
    /// is in, with what it made kept for the same command to go on from
    /// ([`Error::Interrupted`]).
    fn stopping(&self) -> bool;
}

#[derive(Debug, Clone, Serialize)]
pub struct TrainReport {
    #[serde(serialize_with = "lossy")]
    pub output: PathBuf,
    pub header: Header,
    pub conversations: usize,
    pub steps: usize,
    /// The mean loss of the first and of the last [`LOSS_STEPS`] steps, or halves of a shorter
    /// run (one step's loss swings with the conversations it drew): how far training moved the
    /// cartridge toward the teacher. Of a cartridge learning to compose, its steps alone
    /// ([`Distiller::alone_losses`]), comparable with a run's trained alone.
    pub first_loss: Option<f32>,
    pub final_loss: Option<f32>,
    pub synthesis_seconds: f64,
    pub training_seconds: f64,
    /// Packed tokens per second through forward and backward.
    pub training_tokens_per_second: f64,
}

/// A path as text, whatever bytes its name holds (JSON has no other spelling of it).
fn lossy<S: serde::Serializer>(path: &Path, serializer: S) -> std::result::Result<S::Ok, S::Error> {
    serializer.collect_str(&path.display())
}

/// How many steps the reported first and final losses average (at most half the run each).
pub const LOSS_STEPS: usize = 10;

/// What only a work directory holds: the lock of its runs, and their conversations or
/// checkpoint.
const WORK_FILES: [&str; 2] = ["conversations.meta.json", "checkpoint.safetensors"];

/// The output can be written where it is asked for, and is not in a work directory.
fn check_paths(request: &TrainRequest) -> Result<()> {
    let output = &request.output;
    cartridge_schemas::file::check_destination(output)
        .map_err(|e| Error::Data(format!("cannot write {}: {e}", output.display())))?;
    // Its own work directory, or another run's (what one holds: a cartridge written there
    // could replace its conversations or checkpoint).
    let resolved = resolve(output);
    let work_dir = if resolved.starts_with(resolve(&request.work_dir)) {
        Some(request.work_dir.clone())
    } else {
        resolved
            .parent()
            .filter(|dir| {
                dir.join("lock").exists() && WORK_FILES.iter().any(|name| dir.join(name).exists())
            })
            .map(Path::to_owned)
    };
    if let Some(work_dir) = work_dir {
        return Err(Error::Data(format!(
            "the output {} is in the work directory {} (whose conversations and checkpoints it could overwrite); name another",
            output.display(),
            work_dir.display()
        )));
    }
    Ok(())
}

/// `path` made absolute through its nearest existing ancestor (what it will be once created),
/// so two spellings of one place compare equal.
pub fn resolve(path: &Path) -> PathBuf {
    let absolute = std::path::absolute(path).unwrap_or_else(|_| path.to_owned());
    let mut resolved = PathBuf::new();
    let mut exists = true;
    for component in absolute.components() {
        match component {
            std::path::Component::CurDir => continue,
            // Where the path exists, `..` is the system's to resolve (after a symbolic link it
            // leads out of the link's target, not back to the link's folder); past a folder
            // that does not exist yet, it is undone by name.
            std::path::Component::ParentDir if !exists => {
                resolved.pop();
            }
            other => resolved.push(other),
        }
        match resolved.canonicalize() {
            Ok(found) => (resolved, exists) = (found, true),
            Err(_) => exists = false,
        }
    }
    resolved
}

/// Creates the work directory and locks it for this run.
fn lock_work_dir(dir: &Path) -> Result<std::fs::File> {
    std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    let path = dir.join("lock");
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .map_err(|e| Error::io(&path, e))?;
    match file.try_lock() {
        Ok(()) => Ok(file),
        Err(std::fs::TryLockError::WouldBlock) => Err(Error::Data(format!(
            "another run is using the work directory {}",
            dir.display()
        ))),
        Err(std::fs::TryLockError::Error(e)) => Err(Error::io(&path, e)),
    }
}

/// A row, after the cartridge, holds the longest conversation synthesis may write (a shorter
/// one would leave the long answers out of training, or all of them after hours of synthesis).
fn check_rows_hold_a_conversation(
    model: &LoadedModel,
    synthesis: &SynthesisOptions,
    distill: &DistillOptions,
) -> Result<()> {
    let template = model
        .text
        .render_after_system_ids(&[Message::new("user", "")], true)?
        .len();
    let message = crate::synthesis::longest_message(&model.text, synthesis)?;
    let longest = template
        .saturating_add(message)
        .saturating_add(synthesis.answer_max_tokens);
    let (p, positions) = (distill.tokens, model.llama.config.max_positions);
    let room = distill.room(positions);
    if longest > room {
        return Err(Error::Data(format!(
            "a conversation takes up to {longest} tokens ({template} of chat template, messages of {message} and answers of {}), more than a row of {} after {} holds ({room}; the model has {positions} positions): raise --row-tokens or lower --user-tokens or --answer-tokens",
            synthesis.answer_max_tokens,
            distill.row_tokens,
            distill.before_conversations(p)
        )));
    }
    Ok(())
}

/// The cartridges to compose with, and their conversations the run reads.
struct Partners {
    /// Their keys and values, one after another.
    prefix: Prefix,
    /// What records each (its payload digest, length and corpus).
    described: Vec<serde_json::Value>,
    conversations: Vec<Conversation>,
    /// What records each conversations file (its digest, corpus and count).
    conversations_described: Vec<serde_json::Value>,
}

/// The cartridges to compose with and their conversations; none without any. A cartridge made
/// for another model is refused, and so are conversations made for another model or about a
/// corpus none of the cartridges was trained on.
fn read_partners(
    model: &LoadedModel,
    paths: &[PathBuf],
    conversation_paths: &[PathBuf],
    work_dir: &Path,
) -> Result<Option<Partners>> {
    if paths.is_empty() {
        return match conversation_paths.first() {
            None => Ok(None),
            Some(path) => Err(Error::Data(format!(
                "--partner-conversations {}: conversations of the cartridges to compose with, and there are none (--compose-with)",
                path.display()
            ))),
        };
    }
    let mut prefixes = Vec::new();
    let mut described = Vec::new();
    for path in paths {
        let named = |e: Error| Error::Data(format!("--compose-with {}: {e}", path.display()));
        let cartridge = Cartridge::open(path).map_err(|e| named(e.into()))?;
        prefixes.push(
            prefix_of_cartridge(&cartridge, &model.llama, &model.fingerprint).map_err(named)?,
        );
        let header = cartridge.header();
        described.push(json!({
            "payload_digest": header.payload_digest,
            "tokens": header.tokens,
            "corpus": header.provenance["trainer"]["corpus"]["digest"],
        }));
    }
    let mut conversations = Vec::new();
    let mut conversations_described: Vec<serde_json::Value> = Vec::new();
    for path in conversation_paths {
        let named =
            |e: Error| Error::Data(format!("--partner-conversations {}: {e}", path.display()));
        // The run's own work directory: synthesis could change them after they are read.
        if resolve(path).starts_with(resolve(work_dir)) {
            return Err(named(Error::Data(format!(
                "it is in this run's work directory {}",
                work_dir.display()
            ))));
        }
        let made = read_made_for(path, model).map_err(named)?;
        if !described.iter().any(|d| d["corpus"] == json!(made.corpus)) {
            let corpora: Vec<String> = described.iter().map(|d| d["corpus"].to_string()).collect();
            return Err(named(Error::Data(format!(
                "they are about the corpus {}, and the cartridges to compose with were trained on {}",
                made.corpus,
                corpora.join(", ")
            ))));
        }
        if conversations_described
            .iter()
            .any(|d| d["digest"] == json!(made.digest))
        {
            return Err(named(Error::Data(
                "given twice (the same conversations would count double)".into(),
            )));
        }
        conversations_described.push(json!({
            "digest": made.digest,
            "corpus": made.corpus,
            "conversations": made.conversations.len(),
        }));
        conversations.extend(made.conversations);
    }
    Ok(Some(Partners {
        prefix: concatenate(&prefixes)?,
        described,
        conversations,
        conversations_described,
    }))
}

pub fn train(
    model: &LoadedModel,
    corpus: &Corpus,
    request: &TrainRequest,
    progress: &dyn TrainProgress,
) -> Result<TrainReport> {
    let started = Instant::now();
    let checkpoint = request.work_dir.join("checkpoint.safetensors");
    // What would fail later fails here, before hours of synthesis and before anything stored is
    // touched.
    check_paths(request)?;
    let zero_steps = request.epochs.is_none() && request.distill.steps == 0;
    if zero_steps && !request.compose_with.is_empty() {
        return Err(Error::Data(
            "--compose-with shapes training, and 0 steps writes the initialization, which no step trains".into(),
        ));
    }
    let mut partners = read_partners(
        model,
        &request.compose_with,
        &request.partner_conversations,
        &request.work_dir,
    )?;
    let distill = DistillOptions {
        partner_tokens: partners.as_ref().map_or(0, |p| p.prefix.tokens()),
        partner_conversations: partners
            .as_ref()
            .is_some_and(|p| !p.conversations.is_empty()),
        ..request.distill.clone()
    };
    let max_positions = model.llama.config.max_positions;
    distill.check(distill.tokens, max_positions)?;
    if let Some(partners) = partners.as_ref().filter(|p| !p.conversations.is_empty()) {
        crate::distill::check_partner_conversations(
            &distill,
            max_positions,
            &partners.conversations,
        )?;
    }
    // Tokenized once: a large corpus takes seconds.
    let corpus_tokens = model.text.encode(&corpus.text())?;
    let init = initial_ids(&model.text, &corpus_tokens, distill.tokens)?;
    if request.objective == Objective::SelfStudy && !zero_steps {
        check_rows_hold_a_conversation(model, &request.synthesis, &distill)?;
    }
    if request.resume && zero_steps {
        return Err(Error::Data(
            "--resume continues a checkpoint to --steps, and 0 steps leaves nothing to continue"
                .into(),
        ));
    }
    // Held to the end, and before a checkpoint is looked for: a second run in this work
    // directory would interleave the stored conversations, and set aside or write over the
    // checkpoints.
    let _lock = (!zero_steps || request.resume)
        .then(|| lock_work_dir(&request.work_dir))
        .transpose()?;
    let resuming = request.resume && checkpoint.exists();
    if request.resume && !resuming {
        // Resuming synthesis that never reached a checkpoint is a resume too: said, not refused.
        tracing::warn!(
            work = %request.work_dir.display(),
            "no checkpoint to resume: training starts at step 0 (a fresh run sets an older checkpoint aside as checkpoint.previous*.safetensors)"
        );
    }
    // What the checkpoint must have been made from, as far as it is known before synthesis:
    // refused now rather than after it.
    let run = |conversations: usize| {
        let mut run = json!({
            "corpus": corpus.digest,
            "model": model.fingerprint.weights,
            "objective": request.objective,
            "conversations": conversations,
            // How text became tokens: a next-token run's pieces are the corpus's.
            "prompt_format": crate::synthesis::PROMPT_FORMAT,
            // What the conversations were made with: a work folder's conversations may have
            // been made again with other settings since the checkpoint was.
            "synthesis": (request.objective == Objective::SelfStudy).then_some(&request.synthesis),
        });
        // Named only when there are some: a checkpoint from before they could be stays
        // resumable.
        if let Some(partners) = &partners {
            run["compose_with"] = json!(partners.described);
            if !partners.conversations_described.is_empty() {
                run["partner_conversations"] = json!(partners.conversations_described);
            }
        }
        run
    };
    if resuming && request.objective == Objective::SelfStudy {
        // Its own arguments first: they are named whatever the checkpoint holds.
        crate::synthesis::check_synthesis(model, &corpus_tokens, &request.synthesis)?;
        let known = run(request.synthesis.conversations);
        // Steps are known now unless they follow from the conversations (--epochs).
        let steps = request.epochs.is_none().then_some(distill.steps);
        crate::distill::check_resumable(&checkpoint, &distill, steps, &known)?;
    }
    let init = (!resuming).then_some(init);
    // Zero steps of a fresh run writes the initialization (a baseline): nothing to synthesize,
    // no work folder.
    let initialization_only = init.is_some() && zero_steps;
    let conversations = match request.objective {
        _ if initialization_only => Vec::new(),
        Objective::SelfStudy => {
            let path = conversations_path(&request.work_dir);
            synthesize(
                model,
                (corpus, &corpus_tokens),
                &request.synthesis,
                &path,
                |done, total| {
                    progress.synthesized(done, total);
                    if progress.stopping() {
                        return Err(Error::Interrupted(format!(
                            "stopped after {done} of {total} conversations, kept in {}: the same command goes on from them",
                            path.display()
                        )));
                    }
                    Ok(())
                },
            )?
        }
        // Pieces short enough that two pack into what a row holds after the cartridge.
        Objective::NextToken => {
            next_token_conversations(&corpus_tokens, distill.room(max_positions) / 2)
        }
    };
    let synthesis_seconds = started.elapsed().as_secs_f64();
    drop(corpus_tokens);

    let mut options = distill;
    if let Some(epochs) = request.epochs {
        options.steps = steps_for_epochs(&options, max_positions, &conversations, epochs)?;
    }
    let run = run(conversations.len());
    // A fresh run's checkpoints are its own: an older one is set aside, never resumed (and
    // only now, once synthesis accepted the work folder: a refused run moves nothing).
    // (Writing the initialization alone leaves them be: it makes no checkpoint.)
    if init.is_some() && !initialization_only && checkpoint.exists() {
        // Under a name of its own: one set aside before stays too.
        let aside = (1..)
            .map(|n| match n {
                1 => checkpoint.with_extension("previous.safetensors"),
                n => checkpoint.with_extension(format!("previous-{n}.safetensors")),
            })
            .find(|aside| !aside.exists())
            .expect("a free name");
        std::fs::rename(&checkpoint, &aside).map_err(|e| Error::io(&aside, e))?;
        // They are never removed: what they add up to is said, so a sweep of runs is noticed.
        let (count, bytes) = std::fs::read_dir(&request.work_dir)
            .map_err(|e| Error::io(&request.work_dir, e))?
            .flatten()
            .filter(|entry| {
                let name = entry.file_name();
                let name = name.to_string_lossy();
                name.starts_with("checkpoint.previous") && name.ends_with(".safetensors")
            })
            .fold((0u64, 0u64), |(count, bytes), entry| {
                (count + 1, bytes + entry.metadata().map_or(0, |m| m.len()))
            });
        tracing::warn!(
            aside = %aside.display(),
            set_aside = count,
            megabytes = bytes / 1_000_000,
            "an older run's checkpoint set aside (this run starts at step 0); remove set-aside checkpoints no longer needed"
        );
    }
    let mut distiller = match &init {
        None => Distiller::resume(&model.llama, &checkpoint, options.clone(), run)?,
        Some(init) => {
            let mut distiller = Distiller::from_corpus(model, init, options.clone())?;
            distiller.run = run;
            distiller
        }
    };
    if let Some(partners) = partners.as_mut() {
        // Theirs to train on from here: the rest of `partners` is what records them.
        let conversations = std::mem::take(&mut partners.conversations);
        distiller.compose_with(partners.prefix.clone(), conversations)?;
    }
    let training = Instant::now();
    let mut tokens = 0usize;
    let first_step = distiller.step_count();
    if !initialization_only {
        distiller.train(&conversations, |distiller, step, loss, step_tokens| {
            tokens += step_tokens;
            let rate = tokens as f64 / training.elapsed().as_secs_f64().max(1e-9);
            progress.stepped(step, options.steps, loss, rate);
            // The last step goes on to write the cartridge.
            let stopping = step < options.steps && progress.stopping();
            if stopping || request.checkpoint_every > 0 && step % request.checkpoint_every == 0 {
                distiller.save_checkpoint(&checkpoint)?;
            }
            if stopping {
                return Err(Error::Interrupted(format!(
                    "stopped at step {step} of {}, kept in {}: the same command with --resume goes on from there",
                    options.steps,
                    checkpoint.display()
                )));
            }
            Ok(())
        })?;
    }
    let training_seconds = training.elapsed().as_secs_f64();
    let mean = |losses: &[f32]| {
        (!losses.is_empty()).then(|| losses.iter().sum::<f32>() / losses.len() as f32)
    };
    // Windows that do not overlap (but in a run of one step): in a shorter run, each half.
    let losses = &distiller.alone_losses();
    let window = LOSS_STEPS.min((losses.len() / 2).max(1)).min(losses.len());
    let first_loss = mean(&losses[..window]);
    let final_loss = mean(&losses[losses.len() - window..]);
    // The initialization alone was trained by no method.
    let method = if initialization_only {
        json!("initialization")
    } else {
        json!(request.objective)
    };
    let mut provenance = json!({
        "trainer": {
            "method": method,
            "model": request.model_name,
            "corpus": {"digest": corpus.digest, "documents": corpus.documents},
            "conversations": conversations.len(),
            "synthesis": request.synthesis,
            "distillation": options,
            "steps": distiller.step_count(),
            "first_loss": first_loss,
            "final_loss": final_loss,
        }
    });
    if let Some(partners) = &partners {
        provenance["trainer"]["compose_with"] = json!(partners.described);
        if !partners.conversations_described.is_empty() {
            provenance["trainer"]["partner_conversations"] =
                json!(partners.conversations_described);
        }
    }
    let header = crate::cartridge::write(
        &request.output,
        &distiller.prefix()?,
        model.fingerprint.clone(),
        request.dtype,
        options.frozen,
        provenance,
    )?;
    Ok(TrainReport {
        output: request.output.clone(),
        header,
        conversations: conversations.len(),
        steps: distiller.step_count(),
        first_loss,
        final_loss,
        synthesis_seconds,
        training_seconds,
        training_tokens_per_second: if distiller.step_count() > first_step {
            tokens as f64 / training_seconds
        } else {
            0.0
        },
    })
}
