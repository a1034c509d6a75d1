use std::io::Read;
use std::os::fd::IntoRawFd;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicI32, Ordering};
use std::thread::JoinHandle;

use anyhow::{Context, Result, bail};
use candle_core::{DType, Device};
use cartridge_schemas::Dtype;
use cartridge_schemas::file::Cartridge;
use cartridge_schemas::paths::Paths;
use cartridge_trainer::corpus::Corpus;
use cartridge_trainer::distill::DistillOptions;
use cartridge_trainer::model::ModelSource;
use cartridge_trainer::pipeline::{Objective, TrainProgress, TrainRequest, train};
use cartridge_trainer::synthesis::SynthesisOptions;
use clap::{Args, ValueEnum};
use indicatif::{HumanDuration, MultiProgress, ProgressBar, ProgressDrawTarget};

use super::{Input, check_outputs};
use crate::output::human_bytes;
use crate::progress::{Lines, bar, left};

#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum ObjectiveArg {
    SelfStudy,
    NextToken,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum DeviceKind {
    Cpu,
    Cuda,
}

impl DeviceKind {
    /// The device and the dtype the model computes in there.
    pub fn open(self) -> Result<(Device, DType)> {
        match self {
            Self::Cpu => Ok((Device::Cpu, DType::F32)),
            Self::Cuda if candle_core::utils::cuda_is_available() => {
                Ok((Device::new_cuda(0)?, DType::BF16))
            }
            Self::Cuda => bail!("this build has no CUDA support (build with --features cuda)"),
        }
    }
}

/// Train a cartridge on a corpus by self-study: the model writes conversations about chunks of
/// the corpus, and the cartridge learns to make the model answer them without the corpus.
#[derive(Debug, Args)]
pub struct TrainArgs {
    /// The model: a GGUF file, a Hugging Face checkpoint directory or an installed alias.
    #[arg(long)]
    pub model: String,
    /// Corpus files or folders. In a folder, hidden files and what its own .gitignore and
    /// .ignore files leave out are skipped (name such a file to read it).
    #[arg(long, required = true, num_args = 1..)]
    pub corpus: Vec<PathBuf>,
    /// Cartridge length in tokens.
    #[arg(long, value_parser = positive)]
    pub tokens: usize,
    /// Where to write the cartridge.
    #[arg(short, long)]
    pub output: PathBuf,
    /// Conversations to synthesize.
    #[arg(long, default_value_t = 1024, value_parser = positive)]
    pub conversations: usize,
    /// Optimizer steps (default: two epochs over the conversations, and the steps on
    /// --partner-conversations on top; 0 writes the initialization, a baseline).
    #[arg(long)]
    pub steps: Option<usize>,
    /// Adam learning rate (constant).
    #[arg(long, default_value_t = 2e-2, value_parser = learning_rate)]
    pub lr: f64,
    /// Where the model runs (`cuda` needs a build with `--features cuda`).
    #[arg(long, value_enum, default_value = "cpu")]
    pub device: DeviceKind,
    /// self-study (the method), or next-token: plain next-token prediction on the corpus (the
    /// baseline).
    #[arg(long, value_enum, default_value = "self-study")]
    pub objective: ObjectiveArg,
    /// Continue an interrupted run from its work directory.
    #[arg(long)]
    pub resume: bool,
    /// Conversations and checkpoints (default: OUTPUT.work).
    #[arg(long)]
    pub work_dir: Option<PathBuf>,
    /// Chunk sizes drawn from MIN..MAX tokens.
    #[arg(long, default_value = "512..4096", value_parser = parse_range)]
    pub chunk_tokens: (usize, usize),
    /// Conversations generated per chunk, as one batch.
    #[arg(long, default_value_t = 16, value_parser = positive)]
    pub per_chunk: usize,
    /// Longest synthesized user message.
    #[arg(long, default_value_t = 128, value_parser = positive)]
    pub user_tokens: usize,
    /// Longest synthesized answer.
    #[arg(long, default_value_t = 512, value_parser = positive)]
    pub answer_tokens: usize,
    /// Tokens per packed training row.
    #[arg(long, default_value_t = 2048, value_parser = positive)]
    pub row_tokens: usize,
    /// The share of conversations that are recitations (0 to 1): a passage of the chunk asked
    /// for word for word, its first words given. The rest are written from the seed prompts.
    #[arg(long, default_value_t = cartridge_trainer::synthesis::RECITATION, value_parser = share)]
    pub recitation: f64,
    /// Stop a synthesized message or answer where its last N tokens repeat what it already
    /// wrote (a loop); 0 keeps loops.
    #[arg(long, default_value_t = 16, value_name = "N")]
    pub stop_on_repeat: usize,
    /// Rows per optimizer step.
    #[arg(long, default_value_t = 4, value_parser = positive)]
    pub rows: usize,
    /// Leading tokens kept as initialized (the attention sink).
    #[arg(long, default_value_t = 1)]
    pub frozen: usize,
    /// Steps between checkpoints in the work folder, which `--resume` continues from (0: none;
    /// a run stopped by Ctrl-C writes one where it stopped).
    #[arg(long, default_value_t = 50)]
    pub checkpoint_every: usize,
    /// A line describing the corpus, shown to the model with every chunk.
    #[arg(long)]
    pub description: Option<String>,
    /// Seed of everything drawn: chunks, sampled messages, batches.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// A cartridge this one will be composed with (repeatable): every other training step (with
    /// --partner-conversations, two in three) reads them before it, as a composition does, so it
    /// learns to answer beside them as well as alone.
    #[arg(long = "compose-with", value_name = "CARTRIDGE")]
    pub compose_with: Vec<PathBuf>,
    /// The stored conversations of a --compose-with cartridge (its work directory's
    /// conversations.jsonl, its record beside it; repeatable): every third step reads them
    /// beside the cartridges to compose with, so the new one learns to leave their answers as
    /// they were. The other steps read its own, beside them and alone.
    #[arg(
        long = "partner-conversations",
        value_name = "FILE",
        requires = "compose_with"
    )]
    pub partner_conversations: Vec<PathBuf>,
    /// Print a JSON report.
    #[arg(long)]
    pub json: bool,
}

pub(super) fn positive(text: &str) -> Result<usize, String> {
    match text.parse() {
        Ok(0) | Err(_) => Err("expected a whole number above 0".into()),
        Ok(n) => Ok(n),
    }
}

fn learning_rate(text: &str) -> Result<f64, String> {
    match text.parse::<f64>() {
        Ok(rate) if rate.is_finite() && rate > 0.0 => Ok(rate),
        _ => Err("expected a number above 0".into()),
    }
}

fn share(text: &str) -> Result<f64, String> {
    match text.parse::<f64>() {
        Ok(share) if (0.0..=1.0).contains(&share) => Ok(share),
        _ => Err("expected a number from 0 to 1".into()),
    }
}

fn parse_range(text: &str) -> Result<(usize, usize), String> {
    let (low, high) = text.split_once("..").ok_or("expected MIN..MAX")?;
    let (low, high): (usize, usize) = (
        low.parse().map_err(|_| "MIN is not a number")?,
        high.parse().map_err(|_| "MAX is not a number")?,
    );
    if low == 0 || low > high {
        return Err("expected 0 < MIN <= MAX".into());
    }
    Ok((low, high))
}

struct Bars {
    /// Where the bars are drawn, each below the last as its phase starts (two bars drawn apart
    /// on one terminal each take the other's line for theirs).
    shown: MultiProgress,
    synthesis: ProgressBar,
    training: ProgressBar,
    /// Where the bars draw nothing.
    lines: Lines,
}

impl Bars {
    /// Moves `bar` to `done` of `total`, showing it first. The first move (to a resumed
    /// synthesis's stored conversations, or to the first step) is not taken for speed: the
    /// time taken and the estimate of the time left start after it.
    fn advance(&self, bar: &ProgressBar, done: usize, total: usize) {
        let first = bar.length().is_none();
        if first {
            self.shown.add(bar.clone());
        }
        bar.set_length(total as u64);
        bar.set_position(done as u64);
        if first {
            bar.reset_elapsed();
            bar.reset_eta();
        }
    }
}

impl TrainProgress for Bars {
    fn synthesized(&self, done: usize, total: usize) {
        let stored = self.synthesis.length().is_none() && done == total;
        self.advance(&self.synthesis, done, total);
        self.lines.line("synthesis", done == total, || {
            format!("{done}/{total} conversations{}", left(&self.synthesis))
        });
        if done == total {
            // A line for the phase done: a finished bar's elapsed time would go on counting
            // while the training's is drawn below it.
            self.synthesis.finish_and_clear();
            let _ = self.shown.println(if stored {
                format!("synthesis: {total} conversations, stored before")
            } else {
                let took = HumanDuration(self.synthesis.elapsed());
                format!("synthesis: {total} conversations in {took}")
            });
        }
    }

    fn stopping(&self) -> bool {
        STOPPING.load(Ordering::Relaxed)
    }

    fn stepped(&self, step: usize, total: usize, loss: f32, tokens_per_second: f64) {
        let message = format!("loss {loss:.4}, {tokens_per_second:.0} tok/s");
        self.advance(&self.training, step, total);
        self.training.set_message(message.clone());
        self.lines.line("training", step == total, || {
            format!("step {step}/{total}, {message}{}", left(&self.training))
        });
    }
}

/// Set by the first Ctrl-C: the run stops at the end of the batch or step it is in.
static STOPPING: AtomicBool = AtomicBool::new(false);

/// Where the first Ctrl-C is told, for [`stop_on_ctrl_c`]'s thread to say so through the bars
/// (a line written by the handler itself leaves a copy of the bar drawn above it).
static TOLD: AtomicI32 = AtomicI32::new(-1);

#[allow(unsafe_code)]
extern "C" fn stop_soon(_: libc::c_int) {
    STOPPING.store(true, Ordering::Relaxed);
    // SAFETY: signal and write are async-signal-safe; the byte outlives the call.
    unsafe {
        libc::signal(libc::SIGINT, libc::SIG_DFL);
        libc::write(TOLD.load(Ordering::Relaxed), [1u8].as_ptr().cast(), 1);
    }
}

/// From here, a first Ctrl-C asks the run to stop where what it made is kept (hours of
/// synthesis or training otherwise lost back to the last checkpoint), a second ends it. Where
/// SIGINT is ignored (a job started in the background), it stays ignored. The thread returned
/// says that the run stops, once it is asked to.
#[allow(unsafe_code)]
fn stop_on_ctrl_c(bars: &Bars) -> Result<Option<JoinHandle<()>>> {
    if super::sigint_ignored() {
        return Ok(None);
    }
    let (tell, mut told) = UnixStream::pair().context("making the Ctrl-C handler's socket")?;
    let shown = bars.shown.clone();
    let saying = std::thread::spawn(move || {
        if told.read_exact(&mut [0]).is_ok() {
            shown.suspend(|| {
                eprintln!("stopping where the run's work is kept (Ctrl-C again stops at once)")
            });
        }
    });
    // Open for the rest of the process, for the handler.
    TOLD.store(tell.into_raw_fd(), Ordering::Relaxed);
    let handler = stop_soon as extern "C" fn(libc::c_int);
    // SAFETY: the handler does only what a signal handler may.
    unsafe { libc::signal(libc::SIGINT, handler as libc::sighandler_t) };
    Ok(Some(saying))
}

/// Once the run is done, Ctrl-C ends the command at once, as it would any other (it says no
/// more that the run stops).
#[allow(unsafe_code)]
fn ctrl_c_ends_the_command() {
    // SAFETY: setting a signal's default action.
    unsafe { libc::signal(libc::SIGINT, libc::SIG_DFL) };
}

pub fn run(args: TrainArgs) -> Result<()> {
    let work_dir = args
        .work_dir
        .clone()
        .unwrap_or_else(|| args.output.with_extension("work"));
    let paths = Paths::from_env()?;
    let source = ModelSource::resolve(&args.model, &paths.models())?;
    // Written inside a corpus folder, the cartridge and the work would be read as corpus by
    // the next run (a resume would find another corpus).
    let inputs: Vec<(Input, &Path)> = args
        .corpus
        .iter()
        .map(|c| (Input::Corpus, c.as_path()))
        .chain(source.path().map(|m| (Input::Model, m)))
        .chain(args.compose_with.iter().map(|c| (Input::File, c.as_path())))
        .chain(
            args.partner_conversations
                .iter()
                .map(|c| (Input::File, c.as_path())),
        )
        .collect();
    // Found out now, not when the cartridge is written at the end of the run.
    cartridge_schemas::file::check_destination(&args.output)
        .with_context(|| format!("cannot write {}", args.output.display()))?;
    check_outputs(
        &[("output", &args.output), ("work directory", &work_dir)],
        &inputs,
    )?;
    // Read before the model, which takes a while to load: a wrong path fails at once.
    let corpus = Corpus::read(&args.corpus)?;
    for partner in &args.compose_with {
        Cartridge::open(partner)
            .with_context(|| format!("--compose-with {}", partner.display()))?;
    }
    for conversations in &args.partner_conversations {
        std::fs::File::open(conversations)
            .with_context(|| format!("--partner-conversations {}", conversations.display()))?;
    }
    let (device, dtype) = args.device.open()?;
    let model = source
        .load(&device, dtype)
        .with_context(|| format!("loading {}", args.model))?;
    let request = TrainRequest {
        objective: match args.objective {
            ObjectiveArg::SelfStudy => Objective::SelfStudy,
            ObjectiveArg::NextToken => Objective::NextToken,
        },
        synthesis: SynthesisOptions {
            conversations: args.conversations,
            per_chunk: args.per_chunk,
            chunk_tokens: args.chunk_tokens,
            user_max_tokens: args.user_tokens,
            answer_max_tokens: args.answer_tokens,
            recitation: args.recitation,
            stop_on_repeat: args.stop_on_repeat,
            description: args.description.clone(),
            seed: args.seed,
            ..SynthesisOptions::default()
        },
        distill: DistillOptions {
            tokens: args.tokens,
            frozen: args.frozen,
            learning_rate: args.lr,
            steps: args.steps.unwrap_or(1),
            row_tokens: args.row_tokens,
            rows: args.rows,
            seed: args.seed,
            // Follow from the cartridges to compose with, as the run reads them.
            partner_tokens: 0,
            partner_conversations: false,
        },
        compose_with: args.compose_with.clone(),
        partner_conversations: args.partner_conversations.clone(),
        work_dir,
        output: args.output.clone(),
        resume: args.resume,
        checkpoint_every: args.checkpoint_every,
        epochs: args.steps.is_none().then_some(2.0),
        dtype: Dtype::Bf16,
        model_name: args.model.clone(),
    };
    // Hidden until added to `shown`, which draws them.
    let bars = Bars {
        shown: MultiProgress::with_draw_target(if args.json {
            ProgressDrawTarget::hidden()
        } else {
            ProgressDrawTarget::stderr()
        }),
        synthesis: bar(
            "synthesis [{bar:30}] {pos}/{len} conversations {elapsed} {left}",
            true,
        ),
        training: bar(
            "training  [{bar:30}] {pos}/{len} steps {msg} {elapsed} {left}",
            true,
        ),
        lines: Lines::where_bars_cannot_draw(),
    };
    let saying = stop_on_ctrl_c(&bars)?;
    let report = match train(&model, &corpus, &request, &bars) {
        Err(cartridge_trainer::Error::Interrupted(said)) => {
            // Said first, that it stops (asked to, the run has told the thread).
            if let Some(saying) = saying {
                let _ = saying.join();
            }
            for bar in [&bars.synthesis, &bars.training] {
                // Left where they stopped; a finished one has its line.
                if !bar.is_finished() {
                    bar.abandon();
                }
            }
            eprintln!("{said}");
            super::end_interrupted();
        }
        trained => trained?,
    };
    if saying.is_some() {
        ctrl_c_ends_the_command();
    }
    bars.synthesis.finish_and_clear();
    bars.training.finish_and_clear();
    let loss = |l: Option<f32>| l.map_or("-".into(), |l| format!("{l:.4}"));
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        println!(
            "wrote {}: {} tokens, {} from {} conversations in {} steps (loss {} to {}), {:.0} training tok/s",
            report.output.display(),
            report.header.tokens,
            human_bytes(report.header.payload_bytes()),
            report.conversations,
            report.steps,
            loss(report.first_loss),
            loss(report.final_loss),
            report.training_tokens_per_second
        );
    }
    Ok(())
}
