//! Context distillation: train the cartridge so the model reading only the conversation (after
//! the cartridge) predicts the answers as the model did with the chunk in its context.
//!
//! The loss on each answer token is the divergence from the teacher's kept top-k distribution,
//! `Σ p_teacher · (log p_teacher - log p_student)`, averaged over answer tokens: the reference's
//! cross-entropy less the teacher's entropy, a constant, so the gradients are the same and 0
//! reads as "predicts as the teacher did" (a cross-entropy's floor varies with the data). Several
//! conversations are packed into each row (each attends to the cartridge and to itself, and
//! starts at position P), several rows make a step. Only the cartridge trains, with Adam at a
//! constant learning rate; its first `frozen` tokens (the attention sink) stay as initialized.
//!
//! A cartridge trained alone loses much of its gain when composed: the other cartridge's
//! entries draw the attention its own held. Trained to compose with given cartridges
//! ([`Distiller::compose_with`]), every other step reads them before it, frozen, as a
//! composition would, and the steps between read it alone, so it learns to answer both ways.
//! Given the partners' own conversations too, every third step reads those beside the partners:
//! the cartridge also learns to leave the partners' answers as they were, which it otherwise
//! disturbs (nothing in its own conversations asks it not to).

use std::path::Path;
use std::sync::Arc;

use candle_core::{DType, Device, Tensor};
use rand::SeedableRng;
use rand::seq::SliceRandom;
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::model::{
    AdamStep, Llama, LoadedModel, Mask, Prefix, TextCodec, select_rows, select_rows_backward,
    top_k_cross_entropy, top_k_cross_entropy_backward,
};
use crate::synthesis::Conversation;

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct DistillOptions {
    /// Cartridge length P.
    pub tokens: usize,
    /// Leading tokens kept as initialized.
    pub frozen: usize,
    pub learning_rate: f64,
    pub steps: usize,
    /// Tokens per packed row.
    pub row_tokens: usize,
    /// Rows per step.
    pub rows: usize,
    pub seed: u64,
    /// Tokens of the cartridges it learns to compose with ([`Distiller::compose_with`]):
    /// conversations read after them and the cartridge, so rows must fit after both.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub partner_tokens: usize,
    /// Whether steps beside the partners also train on the partners' own conversations
    /// ([`Distiller::compose_with`]).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub partner_conversations: bool,
}

fn is_zero(n: &usize) -> bool {
    *n == 0
}

/// What a step reads before its conversations, and whose conversations they are.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Step {
    /// The cartridge alone, before its own conversations.
    Alone,
    /// The partners then the cartridge, before its own conversations.
    BesidePartners,
    /// The partners then the cartridge, before the partners' conversations.
    PartnersConversations,
}

impl Default for DistillOptions {
    fn default() -> Self {
        Self {
            tokens: 2048,
            frozen: 1,
            learning_rate: 2e-2,
            steps: 256,
            row_tokens: 2048,
            rows: 4,
            seed: 0,
            partner_tokens: 0,
            partner_conversations: false,
        }
    }
}

impl DistillOptions {
    /// The longest conversation a row holds: it reads at positions p.. after the cartridge
    /// (and after its partners, on the steps that read them).
    pub fn room(&self, max_positions: usize) -> usize {
        self.row_tokens
            .min(max_positions.saturating_sub(self.tokens + self.partner_tokens))
    }

    /// What conversations read after, in words: the cartridge, and the cartridges it composes
    /// with on the steps that read them.
    pub fn before_conversations(&self, p: usize) -> String {
        match self.partner_tokens {
            0 => format!("a cartridge of {p} tokens"),
            n => format!("a cartridge of {p} tokens and the {n} of those it composes with"),
        }
    }

    /// What step `step` (counted from 0) reads. Beside partners, every other step reads them;
    /// with their conversations, steps go by threes: its own beside them, its own alone, theirs
    /// beside them.
    fn step(&self, step: usize) -> Step {
        match (self.partner_tokens, self.partner_conversations) {
            (0, _) => Step::Alone,
            (_, false) if step.is_multiple_of(2) => Step::BesidePartners,
            (_, false) => Step::Alone,
            (_, true) => match step % 3 {
                0 => Step::BesidePartners,
                1 => Step::Alone,
                _ => Step::PartnersConversations,
            },
        }
    }

    /// Whether these options can train a cartridge of `p` tokens: its first `frozen` stay as
    /// initialized and the rest train, and conversations read at positions after it.
    pub fn check(&self, p: usize, max_positions: usize) -> Result<()> {
        if self.partner_conversations && self.partner_tokens == 0 {
            return Err(Error::Data(
                "the partners' conversations are read beside the partners, and there are none"
                    .into(),
            ));
        }
        if self.frozen >= p {
            return Err(Error::Data(format!(
                "{} frozen tokens leave nothing of the cartridge's {p} to train",
                self.frozen
            )));
        }
        if p + self.partner_tokens >= max_positions {
            return Err(Error::Data(format!(
                "{} leaves none of the model's {max_positions} positions to a conversation",
                self.before_conversations(p)
            )));
        }
        // A step's attention reads rows × row_tokens × (p + row_tokens) scores per head.
        if self.row_tokens == 0 || self.row_tokens > max_positions {
            return Err(Error::Data(format!(
                "rows of {} tokens: expected 1 to the model's {max_positions} positions",
                self.row_tokens
            )));
        }
        if self.rows == 0 || self.rows > MAX_ROWS {
            return Err(Error::Data(format!(
                "{} rows a step: expected 1 to {MAX_ROWS}",
                self.rows
            )));
        }
        Ok(())
    }
}

/// The most rows a step packs.
pub const MAX_ROWS: usize = 1024;

/// Adam with its moments in a tensor, so a checkpoint can hold them (candle-nn's optimizer keeps
/// its state private, and restarting the moments at every resume would jolt training). The
/// moments are stacked, `[2, ..]` (first, second), as the fused step reads them.
struct Adam {
    learning_rate: f64,
    step: usize,
    moments: Tensor,
}

const BETA1: f64 = 0.9;
const BETA2: f64 = 0.999;
const EPSILON: f64 = 1e-8;

impl Adam {
    fn new(parameters: &Tensor, learning_rate: f64) -> Result<Self> {
        let dims: Vec<usize> = std::iter::once(2)
            .chain(parameters.dims().iter().copied())
            .collect();
        Ok(Self {
            learning_rate,
            step: 0,
            moments: Tensor::zeros(dims, parameters.dtype(), parameters.device())?,
        })
    }

    /// Updates the parameters by their gradients, all in one kernel.
    fn update(&mut self, parameters: &mut Tensor, gradients: &Tensor) -> Result<()> {
        self.step += 1;
        let step = AdamStep {
            learning_rate: self.learning_rate,
            beta1: BETA1,
            beta2: BETA2,
            epsilon: EPSILON,
            correction1: 1.0 - BETA1.powi(self.step as i32),
            correction2: 1.0 - BETA2.powi(self.step as i32),
        };
        let updated =
            parameters.apply_op3_no_bwd(&gradients.contiguous()?, &self.moments, &step)?;
        *parameters = updated.get(0)?;
        self.moments = updated.narrow(0, 1, 2)?;
        Ok(())
    }
}

/// A scalar that is finite exactly when every element of `tensor` is: each element becomes 0 if
/// finite and NaN if not (`x * 0`), so their sum never overflows. Summed by rows first: a whole
/// tensor summed at once is one block on a GPU (candle reduces each output in a block), 2.4 ms of
/// an H200's step over the gradients.
fn finiteness(tensor: &Tensor) -> Result<Tensor> {
    let zeros = tensor.to_dtype(DType::F32)?.affine(0.0, 0.0)?;
    let rows = match zeros.rank() {
        0 | 1 => zeros,
        rank => zeros.flatten_to(rank - 2)?.sum(1)?,
    };
    Ok(rows.sum_all()?)
}

/// A step's loss, and whether every element of its gradients is finite, read together in one
/// transfer: a GPU waits once a step.
fn loss_and_finiteness(loss: &Tensor, gradients: &Tensor) -> Result<(f32, bool)> {
    let read = [
        loss.to_dtype(DType::F32)?.reshape(())?,
        finiteness(gradients)?,
    ];
    let values = Tensor::stack(&read, 0)?.to_vec1::<f32>()?;
    Ok((values[0], values[1].is_finite()))
}

/// A cartridge being trained: per layer, frozen leading tokens and trainable ones.
pub struct Distiller<'a> {
    model: &'a Llama,
    options: DistillOptions,
    /// The frozen tokens' keys and values, `[2·layers, kv_heads, frozen, head_dim]` (every
    /// layer's keys, then every layer's values), in the model's dtype.
    frozen: Tensor,
    /// The trainable tokens' the same way, in f32: one tensor, so that a step updates and checks
    /// them all in a few kernels, not a few for each layer.
    trainable: Tensor,
    adam: Adam,
    /// Where the next step draws conversations from: the epoch (which seeds its order) and the
    /// position in it. Checkpointed, so a resumed run sees the same batches.
    epoch: u64,
    cursor: usize,
    pub losses: Vec<f32>,
    /// What the run trains on (corpus, model, objective…), as its caller describes it: kept in
    /// checkpoints, and a resume must match it.
    pub run: serde_json::Value,
    /// The cartridges it learns to compose with, one after another (frozen).
    partners: Option<Prefix>,
    /// Their own conversations, if given, and where their draw stands (as for its own).
    partner_conversations: Arc<[Conversation]>,
    partner_epoch: u64,
    partner_cursor: usize,
}

/// One step's packed input.
struct Batch {
    ids: Tensor,
    positions: Tensor,
    mask: Mask,
    /// Flat `row * row_tokens + column` indices whose output predicts an answer token.
    rows: Vec<u32>,
    teacher_ids: Tensor,
    teacher_probabilities: Tensor,
    /// `Σ p log p` over the kept teacher distributions: minus their summed entropy.
    teacher_negentropy: f64,
    targets: usize,
    tokens: usize,
    /// Whether the partners come before the cartridge.
    beside_partners: bool,
}

/// The conversations a row can hold: each reads at positions p.. after the cartridge, within
/// the row and the model's positions. One with no prompt has no token to predict its answer's
/// first from. `whose` names them in what is said.
fn usable<'c>(
    options: &DistillOptions,
    max_positions: usize,
    conversations: &'c [Conversation],
    whose: &str,
) -> Result<Vec<&'c Conversation>> {
    let longest = options.room(max_positions);
    let usable: Vec<&Conversation> = conversations
        .iter()
        .filter(|c| !c.is_empty() && !c.prompt_ids.is_empty() && c.len() <= longest)
        .collect();
    if usable.is_empty() {
        return Err(Error::Data(format!(
            "no {whose} fits in a row of {} tokens after {} (the model has {max_positions} positions)",
            options.row_tokens,
            options.before_conversations(options.tokens)
        )));
    }
    let left_out = conversations.len() - usable.len();
    if left_out > 0 {
        tracing::warn!(
            left_out,
            of = conversations.len(),
            row_tokens = options.row_tokens,
            whose,
            "conversations empty or too long for a row are left out of training"
        );
    }
    Ok(usable)
}

/// What [`usable`] calls a run's own conversations, and its partners'.
const OWN: &str = "conversation";
const PARTNERS: &str = "conversation of the partners";

/// Whether the partners' conversations can be trained on beside them (some fit a row after the
/// partners and the cartridge): checked before synthesis, which takes a while.
pub fn check_partner_conversations(
    options: &DistillOptions,
    max_positions: usize,
    conversations: &[Conversation],
) -> Result<()> {
    usable(options, max_positions, conversations, PARTNERS).map(drop)
}

/// How many steps make `epochs` passes over the conversations, as [`Distiller::train`] packs
/// them (rows are seldom full, and conversations too long for a row are left out); steps on the
/// partners' conversations come on top.
pub fn steps_for_epochs(
    options: &DistillOptions,
    max_positions: usize,
    conversations: &[Conversation],
    epochs: f64,
) -> Result<usize> {
    if !(epochs.is_finite() && epochs > 0.0 && epochs <= 1e6) {
        return Err(Error::Data(format!(
            "{epochs} epochs: expected a positive number, at most a million"
        )));
    }
    let usable = usable(options, max_positions, conversations, OWN)?;
    let wanted = (epochs * usable.len() as f64).ceil() as usize;
    let mut draw = Draw::new(usable, options.seed, 0, 0);
    let (mut drawn, mut rows) = (0, 0usize);
    while drawn < wanted {
        drawn += draw.row(options.row_tokens).len();
        rows += 1;
    }
    let own = rows.div_ceil(options.rows).max(1);
    let (mut steps, mut counted) = (0, 0);
    while counted < own {
        counted += usize::from(options.step(steps) != Step::PartnersConversations);
        steps += 1;
    }
    Ok(steps)
}

/// The order conversations are packed in: a seeded shuffle per epoch, epoch after epoch. A row
/// ends with its epoch, so it never holds a conversation twice.
struct Draw<'c> {
    usable: Vec<&'c Conversation>,
    seed: u64,
    epoch: u64,
    /// The next conversation's place in this epoch's order.
    cursor: usize,
    order: Vec<usize>,
}

impl<'c> Draw<'c> {
    fn new(usable: Vec<&'c Conversation>, seed: u64, epoch: u64, cursor: usize) -> Self {
        let order = shuffled(usable.len(), seed, epoch);
        Self {
            usable,
            seed,
            epoch,
            cursor,
            order,
        }
    }

    /// The next conversations in order while they fit in `row_tokens` (each one does alone).
    fn row(&mut self, row_tokens: usize) -> Vec<&'c Conversation> {
        if self.cursor >= self.order.len() {
            self.epoch += 1;
            self.cursor = 0;
            self.order = shuffled(self.usable.len(), self.seed, self.epoch);
        }
        let mut row = Vec::new();
        let mut used = 0;
        while let Some(&index) = self.order.get(self.cursor) {
            let next = self.usable[index];
            if !row.is_empty() && used + next.len() > row_tokens {
                break;
            }
            used += next.len();
            row.push(next);
            self.cursor += 1;
        }
        row
    }
}

fn shuffled(count: usize, seed: u64, epoch: u64) -> Vec<usize> {
    let mut order: Vec<usize> = (0..count).collect();
    order.shuffle(&mut rand::rngs::StdRng::seed_from_u64(
        seed ^ epoch.wrapping_mul(0x9e37_79b9_7f4a_7c15),
    ));
    order
}

/// The tokens a cartridge of `tokens` starts from: a system turn holding the first of the
/// corpus's tokens `corpus`, as many as fit with the template around them (the reference's
/// best initialization; the student reads its conversations as following a system turn).
/// Cheap: a run checks it before hours of synthesis.
pub fn initial_ids(text: &TextCodec, corpus: &[u32], tokens: usize) -> Result<Vec<u32>> {
    let (before, after, room) = text.system_turn_ids(tokens)?;
    if corpus.len() < room {
        return Err(Error::Data(format!(
            "the corpus has {} tokens, fewer than the {room} a cartridge of {tokens} tokens holds (with {} of chat template)",
            corpus.len(),
            before.len() + after.len()
        )));
    }
    Ok([&before, &corpus[..room], &after].concat())
}

impl<'a> Distiller<'a> {
    /// Initializes the cartridge from the keys and values of [`initial_ids`].
    pub fn from_corpus(
        model: &'a LoadedModel,
        init: &[u32],
        options: DistillOptions,
    ) -> Result<Self> {
        let prefix = model.llama.prefix_of(init)?;
        Self::from_prefix(&model.llama, &prefix, options)
    }

    /// Continues training from a cartridge's keys and values.
    pub fn from_prefix(model: &'a Llama, prefix: &Prefix, options: DistillOptions) -> Result<Self> {
        let p = prefix.tokens();
        if p != options.tokens {
            return Err(Error::Data(format!(
                "the cartridge holds {p} tokens, the options say {}",
                options.tokens
            )));
        }
        options.check(p, model.config.max_positions)?;
        let layers = model.config.layers;
        if prefix.keys.len() != layers || prefix.values.len() != layers {
            return Err(Error::Data(format!(
                "the cartridge has {} layers of keys and {} of values, the model {layers}",
                prefix.keys.len(),
                prefix.values.len()
            )));
        }
        // The trainable part and the optimizer's moments stay in f32 whatever the model computes
        // in: in bf16, Adam's 0.999 rounds to 1 and small steps round away.
        let all = Tensor::stack(
            &prefix.keys.iter().chain(&prefix.values).collect::<Vec<_>>(),
            0,
        )?;
        let frozen = all
            .narrow(2, 0, options.frozen)?
            .to_dtype(model.dtype())?
            .contiguous()?
            .detach();
        let trainable = all
            .narrow(2, options.frozen, p - options.frozen)?
            .to_dtype(DType::F32)?
            .contiguous()?;
        let adam = Adam::new(&trainable, options.learning_rate)?;
        Ok(Self {
            model,
            options,
            frozen,
            trainable,
            adam,
            epoch: 0,
            cursor: 0,
            losses: Vec::new(),
            run: serde_json::Value::Null,
            partners: None,
            partner_conversations: Arc::from([]),
            partner_epoch: 0,
            partner_cursor: 0,
        })
    }

    /// Trains the cartridge to compose with `partners` (their keys and values, one after
    /// another, as many tokens as the options' `partner_tokens`): some steps read them before
    /// the cartridge, with the conversations after both, as a composition does, the others read
    /// the cartridge alone (see `DistillOptions::step`). Given their own `conversations` (as
    /// the options' `partner_conversations` say), some of those steps train on them.
    pub fn compose_with(
        &mut self,
        partners: Prefix,
        conversations: Vec<Conversation>,
    ) -> Result<()> {
        if partners.tokens() != self.options.partner_tokens {
            return Err(Error::Data(format!(
                "the cartridges to compose with hold {} tokens, the options say {}",
                partners.tokens(),
                self.options.partner_tokens
            )));
        }
        if conversations.is_empty() == self.options.partner_conversations {
            return Err(Error::Data(format!(
                "{} of the partners' conversations given, the options say {}",
                conversations.len(),
                if self.options.partner_conversations {
                    "some"
                } else {
                    "none"
                }
            )));
        }
        let frozen = |tensors: Vec<Tensor>| -> Result<Vec<Tensor>> {
            tensors
                .into_iter()
                .map(|t| Ok(t.to_dtype(self.model.dtype())?.detach()))
                .collect()
        };
        self.partners = Some(Prefix {
            keys: frozen(partners.keys)?,
            values: frozen(partners.values)?,
        });
        self.partner_conversations = conversations.into();
        Ok(())
    }

    pub fn step_count(&self) -> usize {
        self.adam.step
    }

    /// The losses of the steps that read the cartridge alone before its own conversations, as
    /// a run trained alone reads it (all of them if none did): beside partners, or on their
    /// conversations, a step's loss measures something else.
    pub fn alone_losses(&self) -> Vec<f32> {
        // The last steps' (a checkpoint from before losses were kept resumes without them).
        let first = self.adam.step.saturating_sub(self.losses.len());
        let alone: Vec<f32> = (self.losses.iter().enumerate())
            .filter(|&(i, _)| self.options.step(first + i) == Step::Alone)
            .map(|(_, &loss)| loss)
            .collect();
        if alone.is_empty() {
            self.losses.clone()
        } else {
            alone
        }
    }

    /// The cartridge as it stands; refused if an update left it not finite (the last step's
    /// update is not checked by a step after it).
    pub fn prefix(&self) -> Result<Prefix> {
        self.check_finite()?;
        self.joined()
    }

    /// The frozen and trainable tokens as one prefix (each step's, unchecked: the step checks
    /// its loss and gradients).
    fn joined(&self) -> Result<Prefix> {
        let trainable = self.trainable.to_dtype(self.frozen.dtype())?;
        let all = Tensor::cat(&[&self.frozen, &trainable], 2)?;
        // Each layer's a view of `all`, contiguous.
        let layers = self.model.config.layers;
        let part = |range: std::ops::Range<usize>| -> Result<Vec<Tensor>> {
            range.map(|i| Ok(all.get(i)?)).collect()
        };
        Ok(Prefix {
            keys: part(0..layers)?,
            values: part(layers..2 * layers)?,
        })
    }

    fn check_finite(&self) -> Result<()> {
        let sums = [finiteness(&self.trainable)?, finiteness(&self.frozen)?];
        let sum = Tensor::stack(&sums, 0)?.sum_all()?.to_scalar::<f32>()?;
        match (sum.is_finite(), self.adam.step) {
            (true, _) => Ok(()),
            (false, 0) => Err(Error::Data(
                "the cartridge's initialization is not finite (the model's keys or values overflow its dtype)".into(),
            )),
            (false, step) => Err(Error::Data(format!(
                "after step {step} the cartridge is no longer finite: train with a lower --lr"
            ))),
        }
    }

    /// Runs steps until `options.steps`, each packing conversations drawn in a seeded shuffled
    /// order (epoch after epoch, see `Draw`). Calls `each_step(step, loss, tokens)` after
    /// every step.
    pub fn train(
        &mut self,
        conversations: &[Conversation],
        mut each_step: impl FnMut(&Self, usize, f32, usize) -> Result<()>,
    ) -> Result<()> {
        if self.partners.is_none() && self.options.partner_tokens > 0 {
            return Err(Error::Data(format!(
                "the options say {} tokens of cartridges to compose with, and none were given",
                self.options.partner_tokens
            )));
        }
        // The kernels index by these ids: one out of range must not reach them.
        let vocab = self.model.config.vocab;
        let partner_conversations = Arc::clone(&self.partner_conversations);
        for (whose, conversations) in [
            ("conversation", conversations),
            ("the partners' conversation", &partner_conversations[..]),
        ] {
            if let Some((index, problem)) = conversations
                .iter()
                .enumerate()
                .find_map(|(index, c)| c.check(vocab).err().map(|problem| (index, problem)))
            {
                return Err(Error::Data(format!(
                    "{whose} {index} cannot be trained on: {problem}"
                )));
            }
        }
        let positions = self.model.config.max_positions;
        let usable_own = usable(&self.options, positions, conversations, OWN)?;
        let mut draw = Draw::new(usable_own, self.options.seed, self.epoch, self.cursor);
        let mut partner_draw = match partner_conversations.is_empty() {
            true => None,
            false => Some(Draw::new(
                usable(&self.options, positions, &partner_conversations, PARTNERS)?,
                self.options.seed,
                self.partner_epoch,
                self.partner_cursor,
            )),
        };
        while self.adam.step < self.options.steps {
            let step = self.options.step(self.adam.step);
            let from = match step {
                // `compose_with` gave them, as the options say.
                Step::PartnersConversations => {
                    partner_draw.as_mut().expect("the partners' conversations")
                }
                Step::Alone | Step::BesidePartners => &mut draw,
            };
            let rows: Vec<Vec<&Conversation>> = (0..self.options.rows)
                .map(|_| from.row(self.options.row_tokens))
                .collect();
            (self.epoch, self.cursor) = (draw.epoch, draw.cursor);
            if let Some(partners) = &partner_draw {
                (self.partner_epoch, self.partner_cursor) = (partners.epoch, partners.cursor);
            }
            let batch = self.pack(&rows, step != Step::Alone)?;
            let (loss, gradients) = self.loss_and_gradients(&batch)?;
            // Checked before the update: a step that is not finite would make the cartridge,
            // and every checkpoint from then on, not finite either.
            let (value, gradients_finite) = loss_and_finiteness(&loss, &gradients)?;
            if !value.is_finite() || !gradients_finite {
                // An update that overflowed the cartridge is the cause to name, with its remedy.
                self.check_finite()?;
                return Err(Error::Data(format!(
                    "step {} went wrong: its loss is {value}{}",
                    self.adam.step + 1,
                    if gradients_finite {
                        ""
                    } else {
                        ", and its gradients are not finite"
                    }
                )));
            }
            self.adam.update(&mut self.trainable, &gradients)?;
            self.losses.push(value);
            each_step(self, self.adam.step, value, batch.tokens)?;
        }
        Ok(())
    }

    fn pack(&self, rows: &[Vec<&Conversation>], beside_partners: bool) -> Result<Batch> {
        let device = self.model.device();
        // Everything before the conversations: the partners, if this step reads them, and the
        // cartridge.
        let p = self.options.tokens + beside_partners as usize * self.options.partner_tokens;
        let length = self.options.row_tokens;
        let batch = rows.len();
        let mut ids = vec![0u32; batch * length];
        let mut positions = vec![p as u32; batch * length];
        // Each column's own span of keys; padding's is empty (it sees the cartridge only, so
        // its softmax stays finite).
        let mut spans = vec![((p + length) as u32, 0u32); batch * length];
        let (mut flat_rows, mut teacher_ids, mut teacher_probabilities) =
            (Vec::new(), Vec::new(), Vec::new());
        let mut teacher_negentropy = 0f64;
        // As many teacher slots as the widest kept distribution in this batch.
        let k = rows
            .iter()
            .flatten()
            .flat_map(|c| c.teacher.iter().map(Vec::len))
            .max()
            .unwrap_or(1)
            .max(1);
        let mut tokens = 0;
        for (b, row) in rows.iter().enumerate() {
            let mut start = 0;
            for conversation in row {
                let sequence: Vec<u32> = conversation
                    .prompt_ids
                    .iter()
                    .chain(&conversation.answer_ids)
                    .copied()
                    .collect();
                for (offset, &token) in sequence.iter().enumerate() {
                    let column = start + offset;
                    ids[b * length + column] = token;
                    positions[b * length + column] = (p + offset) as u32;
                    spans[b * length + column] = ((p + start) as u32, (p + column) as u32);
                }
                // The output at column c predicts the token at c + 1.
                let answer_start = start + conversation.prompt_ids.len();
                for (index, top) in conversation
                    .teacher
                    .iter()
                    .enumerate()
                    .take(conversation.answer_ids.len())
                {
                    flat_rows.push((b * length + answer_start + index - 1) as u32);
                    let total: f32 = top.iter().map(|(_, lp)| lp.exp()).sum();
                    for slot in 0..k {
                        let (id, probability) = top.get(slot).map_or((0, 0.0), |&(id, lp)| {
                            (id, lp.exp() / total.max(f32::MIN_POSITIVE))
                        });
                        teacher_ids.push(id);
                        teacher_probabilities.push(probability);
                        if probability > 0.0 {
                            teacher_negentropy +=
                                f64::from(probability) * f64::from(probability).ln();
                        }
                    }
                }
                start += sequence.len();
            }
            tokens += start;
        }
        let targets = flat_rows.len();
        Ok(Batch {
            ids: Tensor::from_vec(ids, (batch, length), device)?,
            positions: Tensor::from_vec(positions, (batch, length), device)?,
            mask: Mask::spans(&spans, (batch, length), p, p + length, device)?,
            rows: flat_rows,
            teacher_ids: Tensor::from_vec(teacher_ids, (targets, k), device)?,
            teacher_probabilities: Tensor::from_vec(teacher_probabilities, (targets, k), device)?,
            teacher_negentropy,
            targets,
            tokens,
            beside_partners,
        })
    }

    /// The step's loss, and its gradients with respect to the trainable tokens, laid out as
    /// they are (`trainable`: every layer's keys, then every layer's values).
    fn loss_and_gradients(&self, batch: &Batch) -> Result<(Tensor, Tensor)> {
        if batch.targets == 0 {
            return Err(Error::Data("a step packed no answer tokens".into()));
        }
        let partners = self.partners.as_ref().filter(|_| batch.beside_partners);
        let prefix = match partners {
            Some(partners) => crate::cartridge::concatenate(&[partners.clone(), self.joined()?])?,
            None => self.joined()?,
        };
        let llama = self.model;
        let (loss, gradients) = llama.prefix_gradients(
            &batch.ids,
            &batch.positions,
            &batch.mask,
            &prefix,
            |output| {
                let all = output.flatten_to(1)?;
                let hidden = select_rows(&all, &batch.rows)?;
                // The vocabulary projection runs only where there is a target: a fraction of
                // all tokens.
                let logits = llama.logits(&hidden)?;
                let (cross_entropy, log_sums) =
                    top_k_cross_entropy(&logits, &batch.teacher_ids, &batch.teacher_probabilities)?;
                let scale = 1.0 / batch.targets as f64;
                let loss = ((cross_entropy.sum_all()? + batch.teacher_negentropy)? * scale)?;
                // d loss / d cross-entropy of each row is the same 1/targets.
                let d_rows = (cross_entropy.ones_like()? * scale)?;
                let d_logits = top_k_cross_entropy_backward(
                    &logits,
                    &batch.teacher_ids,
                    &batch.teacher_probabilities,
                    &log_sums,
                    &d_rows,
                )?;
                let d_hidden = select_rows_backward(
                    &llama.logits_backward(&d_logits)?,
                    &batch.rows,
                    all.dim(0)?,
                )?;
                Ok((loss, d_hidden.reshape(output.shape())?))
            },
        )?;
        // The trainable tokens come after the partners' and the frozen ones.
        let start = partners.map_or(0, Prefix::tokens) + self.options.frozen;
        let trainable = self.options.tokens - self.options.frozen;
        let gradients = gradients
            .keys
            .iter()
            .chain(&gradients.values)
            .map(|g| g.narrow(1, start, trainable))
            .collect::<candle_core::Result<Vec<_>>>()?;
        Ok((loss, Tensor::stack(&gradients, 0)?.to_dtype(DType::F32)?))
    }

    /// Saves the cartridge and the optimizer's moments, to resume from.
    pub fn save_checkpoint(&self, path: &Path) -> Result<()> {
        self.check_finite()?;
        // One safetensors file, written to a temporary name and renamed: tensors (in f32) and
        // the loop's position (in the metadata) always match.
        let f32 =
            |t: &Tensor| -> Result<Tensor> { Ok(t.to_dtype(DType::F32)?.to_device(&Device::Cpu)?) };
        // By layer, as a cartridge is (and as checkpoints were before the layers were one
        // tensor): the moments' i counts every layer's keys, then every layer's values.
        let layers = self.model.config.layers;
        let (frozen, trainable, moments) = (
            f32(&self.frozen)?,
            f32(&self.trainable)?,
            f32(&self.adam.moments)?,
        );
        let mut tensors = Vec::new();
        for i in 0..layers {
            for (part, at) in [("keys", i), ("values", layers + i)] {
                tensors.push((format!("frozen.{i}.{part}"), frozen.get(at)?));
                tensors.push((format!("trainable.{i}.{part}"), trainable.get(at)?));
            }
        }
        for i in 0..2 * layers {
            tensors.push((format!("adam.{i}.first"), moments.get(0)?.get(i)?));
            tensors.push((format!("adam.{i}.second"), moments.get(1)?.get(i)?));
        }
        let state = serde_json::json!({
            "step": self.adam.step,
            "epoch": self.epoch,
            "cursor": self.cursor,
            "partner_epoch": self.partner_epoch,
            "partner_cursor": self.partner_cursor,
            "options": self.options,
            "losses": self.losses,
            "run": self.run,
        });
        let metadata =
            std::collections::HashMap::from([("checkpoint".to_owned(), state.to_string())]);
        // On disk whole before it replaces the previous one: a crash leaves one or the other.
        let partial = path.with_extension("partial");
        safetensors::serialize_to_file(tensors, Some(metadata), &partial)
            .map_err(|e| Error::Data(format!("{}: {e}", partial.display())))?;
        std::fs::File::open(&partial)
            .and_then(|file| file.sync_all())
            .and_then(|()| std::fs::rename(&partial, path))
            .map_err(|e| Error::io(path, e))?;
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::File::open(dir)
                .and_then(|dir| dir.sync_all())
                .map_err(|e| Error::io(dir, e))?;
        }
        Ok(())
    }

    /// Restores a checkpoint written by [`Distiller::save_checkpoint`] for the same `run` with
    /// the same options (but for the number of steps, which a resume may extend).
    pub fn resume(
        model: &'a Llama,
        path: &Path,
        options: DistillOptions,
        run: serde_json::Value,
    ) -> Result<Self> {
        let bad = |detail: String| Error::Data(format!("checkpoint {}: {detail}", path.display()));
        let state = checkpoint_state(path)?;
        check_same_making(path, &state, &options, &run)?;
        let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
        let tensors = candle_core::safetensors::load_buffer(&bytes, model.device())?;
        let get = |name: String| {
            tensors
                .get(&name)
                .cloned()
                .ok_or_else(|| bad(format!("no tensor {name}")))
        };
        let layers = model.config.layers;
        let join = |part: &str| -> Result<Vec<Tensor>> {
            (0..layers)
                .map(|i| {
                    Ok(Tensor::cat(
                        &[
                            get(format!("frozen.{i}.{part}"))?,
                            get(format!("trainable.{i}.{part}"))?,
                        ],
                        1,
                    )?)
                })
                .collect()
        };
        let prefix = Prefix {
            keys: join("keys")?,
            values: join("values")?,
        };
        let mut distiller = Self::from_prefix(model, &prefix, options)?;
        let shape = distiller.trainable.get(0)?.shape().clone();
        let moments = |which: &str| -> Result<Tensor> {
            let each = (0..2 * layers)
                .map(|i| {
                    let name = format!("adam.{i}.{which}");
                    let moment = get(name.clone())?;
                    if moment.shape() != &shape {
                        return Err(bad(format!(
                            "{name} is {:?}, the cartridge's trainable tokens {shape:?}",
                            moment.shape()
                        )));
                    }
                    Ok(moment)
                })
                .collect::<Result<Vec<_>>>()?;
            Ok(Tensor::stack(&each, 0)?)
        };
        distiller.adam.moments = Tensor::stack(&[moments("first")?, moments("second")?], 0)?;
        distiller.adam.step = state["step"].as_u64().unwrap_or(0) as usize;
        // Its cartridge would be written as this run's, trained further than asked.
        if distiller.adam.step > distiller.options.steps {
            return Err(bad(format!(
                "it is at step {}, past the {} this run asks for: ask for at least as many, or start afresh without --resume",
                distiller.adam.step, distiller.options.steps
            )));
        }
        distiller.epoch = state["epoch"].as_u64().unwrap_or(0);
        distiller.cursor = state["cursor"].as_u64().unwrap_or(0) as usize;
        distiller.partner_epoch = state["partner_epoch"].as_u64().unwrap_or(0);
        distiller.partner_cursor = state["partner_cursor"].as_u64().unwrap_or(0) as usize;
        distiller.losses = serde_json::from_value(state["losses"].clone()).unwrap_or_default();
        distiller.run = run;
        Ok(distiller)
    }
}

/// Whether the checkpoint at `path` could be resumed with `options` (to `steps`, where known)
/// for a run described by (some of) `run`'s fields: checked before synthesis, so a refusal comes
/// before hours of it. Reads the checkpoint's header alone.
pub fn check_resumable(
    path: &Path,
    options: &DistillOptions,
    steps: Option<usize>,
    run: &serde_json::Value,
) -> Result<()> {
    let state = checkpoint_state(path)?;
    check_same_making(path, &state, options, run)?;
    match (steps, state["step"].as_u64()) {
        (Some(steps), Some(step)) if step as usize > steps => Err(Error::Data(format!(
            "checkpoint {}: at step {step}, past the {steps} this run asks for",
            path.display()
        ))),
        _ => Ok(()),
    }
}

/// A checkpoint's recorded state (its step, position in the data, options, losses and run),
/// from the safetensors header alone: a checkpoint holds the cartridge and Adam's moments too.
fn checkpoint_state(path: &Path) -> Result<serde_json::Value> {
    use std::io::Read;
    let bad = |detail: String| Error::Data(format!("checkpoint {}: {detail}", path.display()));
    let mut file = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
    let mut length = [0u8; 8];
    file.read_exact(&mut length)
        .map_err(|_| bad("too short for a safetensors header".into()))?;
    let length = u64::from_le_bytes(length);
    // As safetensors bounds it.
    if length > 100_000_000 {
        return Err(bad(format!(
            "not a safetensors checkpoint (its header would be {length} bytes)"
        )));
    }
    let mut header = Vec::new();
    file.take(length)
        .read_to_end(&mut header)
        .map_err(|e| Error::io(path, e))?;
    if header.len() as u64 != length {
        return Err(bad(format!(
            "truncated: the file ends inside its {length}-byte header"
        )));
    }
    let header: serde_json::Value =
        serde_json::from_slice(&header).map_err(|e| bad(format!("its header: {e}")))?;
    header["__metadata__"]["checkpoint"]
        .as_str()
        .ok_or_else(|| bad("no checkpoint state".into()))
        .and_then(|json| serde_json::from_str(json).map_err(|e| bad(e.to_string())))
}

/// Other settings would change the batches (their order is seeded by the epoch, over the
/// conversations that fit a row) or the updates under the restored position and moments.
fn check_same_making(
    path: &Path,
    state: &serde_json::Value,
    options: &DistillOptions,
    run: &serde_json::Value,
) -> Result<()> {
    // Trained beside no other cartridges, neither side records them: absent is none.
    let none_absent = |value: &serde_json::Value, key: &str, none: serde_json::Value| {
        let mut value = value.clone();
        if let Some(object) = value.as_object_mut() {
            object.entry(key).or_insert(none);
        }
        value
    };
    let (mut options, mut stored) = (serde_json::json!(options), state["options"].clone());
    for (key, none) in [
        ("partner_tokens", serde_json::json!(0)),
        ("partner_conversations", false.into()),
    ] {
        options = none_absent(&options, key, none.clone());
        stored = none_absent(&stored, key, none);
    }
    let mut differ = differing(&stored, &options, &["steps"]);
    let (mut run, mut stored) = (run.clone(), state["run"].clone());
    for key in ["compose_with", "partner_conversations"] {
        run = none_absent(&run, key, serde_json::json!([]));
        stored = none_absent(&stored, key, serde_json::json!([]));
    }
    differ.extend(differing(&stored, &run, &[]));
    if differ.is_empty() {
        return Ok(());
    }
    Err(Error::Data(format!(
        "checkpoint {}: made with {}; resume with the same, or start afresh without --resume",
        path.display(),
        differ.join(", ")
    )))
}

/// The settings of `asked` that `stored` holds otherwise, as `name stored (the run asks for
/// asked)`, nested settings named by their path (`synthesis.answer_max_tokens`).
pub(crate) fn differing(
    stored: &serde_json::Value,
    asked: &serde_json::Value,
    skip: &[&str],
) -> Vec<String> {
    let mut found = Vec::new();
    for (key, value) in asked.as_object().into_iter().flatten() {
        let recorded = stored.get(key.as_str());
        let held = recorded.unwrap_or(&serde_json::Value::Null);
        if skip.contains(&key.as_str()) || held == value {
            continue;
        }
        if value.is_object() && held.is_object() {
            found.extend(
                differing(held, value, &[])
                    .into_iter()
                    .map(|inner| format!("{key}.{inner}")),
            );
        } else if recorded.is_none() {
            found.push(format!("no {key} recorded (made by an older version)"));
        } else {
            found.push(format!("{key} {held} (the run asks for {value})"));
        }
    }
    found
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::synthesis::SeedKind;

    #[test]
    fn a_step_is_finite_only_when_its_loss_and_every_gradient_are() {
        let tensor = |values: &[f32]| Tensor::new(values, &Device::Cpu).unwrap();
        let (loss, gradients) = (tensor(&[5.0]), tensor(&[1.0, 2.0, -3.0]));
        assert_eq!(loss_and_finiteness(&loss, &gradients).unwrap(), (5.0, true));
        // Gradients far too large to add up in f32 are still finite.
        let huge = tensor(&[3e38, 3e38, 3e38]);
        assert!(loss_and_finiteness(&loss, &huge).unwrap().1);
        // Of the shape a step stacks (2·layers, kv_heads, tokens, head_dim; summed by rows),
        // one element not finite anywhere is found.
        let shaped = Tensor::ones((2, 3, 5, 4), DType::F32, &Device::Cpu).unwrap();
        assert!(loss_and_finiteness(&loss, &shaped).unwrap().1);
        for at in [0, 37, 59, 60, 119] {
            let mut values = vec![1f32; 120];
            values[at] = f32::NAN;
            let bad = Tensor::from_vec(values, (2, 3, 5, 4), &Device::Cpu).unwrap();
            assert!(!loss_and_finiteness(&loss, &bad).unwrap().1);
        }
        // A finite loss with a gradient that is not.
        for bad in [f32::INFINITY, f32::NAN] {
            let gradients = tensor(&[1.0, 2.0, 0.0, bad]);
            assert_eq!(
                loss_and_finiteness(&loss, &gradients).unwrap(),
                (5.0, false)
            );
        }
        // And a loss that is not finite.
        let (loss, finite) = loss_and_finiteness(&tensor(&[f32::NAN]), &gradients).unwrap();
        assert!(loss.is_nan() && finite);
    }

    fn conversation(id: usize, prompt: usize, answer: usize) -> Conversation {
        Conversation {
            batch: 0,
            chunk_start: id,
            chunk_tokens: 0,
            seed: SeedKind::Question,
            user: String::new(),
            opening: String::new(),
            assistant: String::new(),
            prompt_ids: vec![1; prompt],
            answer_ids: vec![2; answer],
            teacher: vec![vec![(2, 0.0)]; answer],
        }
    }

    #[test]
    fn rows_hold_a_conversation_once_and_epochs_count_the_rows_packed() {
        let mut conversations: Vec<Conversation> = (0..3).map(|i| conversation(i, 2, 4)).collect();
        // Nothing to predict its answer's first token from: left out.
        conversations.push(conversation(3, 0, 6));
        let options = DistillOptions {
            tokens: 4,
            row_tokens: 13,
            rows: 2,
            ..DistillOptions::default()
        };
        let kept = usable(&options, 1024, &conversations, OWN).unwrap();
        assert_eq!(kept.len(), 3);
        // Two of six tokens fit in a row of 13; the third closes its epoch alone (filling the
        // row with the next epoch's first could put one conversation in a row twice).
        let mut draw = Draw::new(kept, options.seed, 0, 0);
        let mut seen = vec![0; 3];
        for epoch in 0..10 {
            let rows = [draw.row(options.row_tokens), draw.row(options.row_tokens)];
            assert_eq!(rows.each_ref().map(|r| r.len()), [2, 1], "epoch {epoch}");
            for row in rows {
                for c in row {
                    seen[c.chunk_start] += 1;
                }
            }
            assert_eq!(seen, vec![epoch + 1; 3]);
        }
        // Two epochs are four rows, two steps of two rows, or four of one; the tokens alone
        // (36 in rows of 13) would say three steps of one row, 1.5 epochs.
        assert_eq!(
            steps_for_epochs(&options, 1024, &conversations, 2.0).unwrap(),
            2
        );
        let one_row = DistillOptions {
            rows: 1,
            ..options.clone()
        };
        assert_eq!(
            steps_for_epochs(&one_row, 1024, &conversations, 2.0).unwrap(),
            4
        );
        assert_eq!(
            steps_for_epochs(&one_row, 1024, &conversations, 3.0).unwrap(),
            6
        );
        assert_eq!(
            steps_for_epochs(&one_row, 1024, &conversations, 0.1).unwrap(),
            1
        );
        // None fits after the cartridge in the model's positions.
        assert!(usable(&options, 9, &conversations, OWN).is_err());
    }
}
