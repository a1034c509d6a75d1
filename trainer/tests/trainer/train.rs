//! Synthesis and distillation: resumable, deterministic, and actually learning.

use candle_core::{DType, Device, IndexOp};
use cartridge_schemas::fingerprint::{ModelFingerprint, Rope, RopeLayout};
use cartridge_trainer::corpus::Corpus;
use cartridge_trainer::distill::{DistillOptions, Distiller, check_resumable, steps_for_epochs};
use cartridge_trainer::model::{
    Config, Context, Llama, LoadedModel, Mask, Message, ModelSource, TextCodec,
};
use cartridge_trainer::synthesis::{
    Conversation, RECITATION_REQUEST, SeedKind, SynthesisOptions, read_conversations, synthesize,
};

use crate::support::{max_difference, smollm2, smollm2_path};

/// A tiny random model that speaks SmolLM2's tokens (so its tokenizer and template apply).
fn tiny_model() -> LoadedModel {
    tiny_model_reading(512)
}

fn tiny_model_reading(max_positions: usize) -> LoadedModel {
    let mut file = std::fs::File::open(smollm2_path()).unwrap();
    let content = candle_core::quantized::gguf_file::Content::read(&mut file).unwrap();
    let config = Config {
        vocab: 49152,
        hidden: 32,
        intermediate: 64,
        layers: 2,
        heads: 4,
        kv_heads: 2,
        head_dim: 8,
        rope_theta: 10_000.0,
        rms_eps: 1e-5,
        max_positions,
        tie_embeddings: true,
    };
    LoadedModel {
        llama: Llama::random(config, 3, &Device::Cpu, DType::F32).unwrap(),
        text: TextCodec::from_gguf(&content).unwrap(),
        fingerprint: ModelFingerprint {
            architecture: "llama".into(),
            layers: 2,
            kv_heads: 2,
            head_dim: 8,
            rope: Rope {
                theta: 10_000.0,
                layout: RopeLayout::Half,
                scaling: None,
            },
            weights: cartridge_schemas::Digest::of(b"tiny"),
        },
    }
}

/// Conversations whose teacher is sure of every answer token.
fn conversations(count: usize) -> Vec<Conversation> {
    (0..count)
        .map(|i| {
            let answer: Vec<u32> = (0..6)
                .map(|j| 100 + ((i * 7 + j * 3) % 50) as u32)
                .collect();
            Conversation {
                batch: 0,
                chunk_start: 0,
                chunk_tokens: 0,
                seed: SeedKind::Question,
                user: String::new(),
                opening: String::new(),
                assistant: String::new(),
                prompt_ids: vec![1, 200 + i as u32, 300, 2],
                teacher: answer
                    .iter()
                    .map(|&t| vec![(t, -0.01), (t + 1, -4.6)])
                    .collect(),
                answer_ids: answer,
            }
        })
        .collect()
}

fn options(steps: usize) -> DistillOptions {
    DistillOptions {
        tokens: 8,
        frozen: 1,
        learning_rate: 2e-2,
        steps,
        row_tokens: 48,
        rows: 2,
        seed: 5,
        ..DistillOptions::default()
    }
}

fn initial_prefix(model: &LoadedModel) -> cartridge_trainer::model::Prefix {
    model
        .llama
        .prefix_of(&[1, 5, 9, 13, 17, 21, 25, 29])
        .unwrap()
}

#[test]
fn conversations_past_the_models_positions_are_left_out() {
    // A cartridge of 8 and conversations of 10 tokens: 18 positions (rows as long as the
    // model reads).
    let distill = |max_positions: usize| {
        let model = tiny_model_reading(max_positions);
        let options = DistillOptions {
            row_tokens: max_positions,
            ..options(1)
        };
        let mut distiller =
            Distiller::from_prefix(&model.llama, &initial_prefix(&model), options).unwrap();
        distiller
            .train(&conversations(2), |_, _, _, _| Ok(()))
            .map(|()| distiller.losses.len())
    };
    assert_eq!(distill(18).unwrap(), 1);
    let error = distill(17).unwrap_err().to_string();
    assert!(error.contains("the model has 17 positions"), "{error}");
    let full = tiny_model_reading(8);
    let error = Distiller::from_prefix(&full.llama, &initial_prefix(&full), options(1))
        .err()
        .unwrap()
        .to_string();
    assert!(error.contains("none of the model's 8 positions"), "{error}");
}

#[test]
fn distillation_lowers_the_loss_and_keeps_the_frozen_token() {
    let model = tiny_model();
    let start = initial_prefix(&model);
    let mut distiller = Distiller::from_prefix(&model.llama, &start, options(30)).unwrap();
    distiller
        .train(&conversations(12), |_, _, _, _| Ok(()))
        .unwrap();
    let losses = &distiller.losses;
    assert_eq!(losses.len(), 30);
    let (first, last) = (
        losses[..3].iter().sum::<f32>() / 3.0,
        losses[27..].iter().sum::<f32>() / 3.0,
    );
    assert!(last < first - 0.5, "loss went from {first} to {last}");
    let trained = distiller.prefix().unwrap();
    for layer in 0..2 {
        let pairs = [
            (&trained.keys[layer], &start.keys[layer]),
            (&trained.values[layer], &start.values[layer]),
        ];
        for (now, then) in pairs {
            let frozen = |t: &candle_core::Tensor| t.i((.., 0..1, ..)).unwrap();
            let difference = max_difference(&frozen(now), &frozen(then));
            assert_eq!(difference, 0.0, "the frozen token moved in layer {layer}");
        }
        let moved = max_difference(&trained.values[layer], &start.values[layer]);
        assert!(moved > 0.0, "layer {layer} did not train");
    }
}

/// The student's log-probabilities of the next token at each of `ids`, read after `prefix`.
fn log_probabilities_after(
    model: &LoadedModel,
    prefix: &cartridge_trainer::model::Prefix,
    ids: &[u32],
) -> Vec<Vec<f32>> {
    let device = Device::Cpu;
    let p = prefix.tokens();
    let positions: Vec<u32> = (p..p + ids.len()).map(|i| i as u32).collect();
    let hidden = model
        .llama
        .forward(
            &candle_core::Tensor::new(ids, &device)
                .unwrap()
                .unsqueeze(0)
                .unwrap(),
            &candle_core::Tensor::new(positions.as_slice(), &device)
                .unwrap()
                .unsqueeze(0)
                .unwrap(),
            &Mask::causal(1, p, ids.len(), &device).unwrap(),
            Context::Prefix(prefix),
        )
        .unwrap();
    candle_nn::ops::log_softmax(
        &model.llama.logits(&hidden.i(0).unwrap()).unwrap(),
        candle_core::D::Minus1,
    )
    .unwrap()
    .to_vec2::<f32>()
    .unwrap()
}

#[test]
fn the_loss_is_zero_where_the_student_already_predicts_as_its_teacher() {
    let model = tiny_model();
    let start = initial_prefix(&model);
    // The teacher of this conversation is the student itself: its whole next-token distribution
    // after the initial cartridge.
    let (prompt, answer) = (vec![1u32, 210, 300, 2], vec![120u32, 133, 101, 145]);
    let ids: Vec<u32> = prompt.iter().chain(&answer).copied().collect();
    let log_probabilities = log_probabilities_after(&model, &start, &ids);
    let teacher = (prompt.len() - 1..ids.len() - 1)
        .map(|i| (0u32..).zip(log_probabilities[i].iter().copied()).collect())
        .collect();
    let conversation = Conversation {
        prompt_ids: prompt,
        answer_ids: answer,
        teacher,
        ..conversations(1).remove(0)
    };
    let mut distiller = Distiller::from_prefix(&model.llama, &start, options(1)).unwrap();
    distiller
        .train(&[conversation], |_, _, _, _| Ok(()))
        .unwrap();
    assert!(
        distiller.losses[0].abs() < 1e-4,
        "loss {}",
        distiller.losses[0]
    );

    // Against a teacher it does not match, the loss is positive.
    let mut distiller = Distiller::from_prefix(&model.llama, &start, options(3)).unwrap();
    distiller
        .train(&conversations(4), |_, _, _, _| Ok(()))
        .unwrap();
    assert!(
        distiller.losses.iter().all(|&l| l > 0.1),
        "losses {:?}",
        distiller.losses
    );
}

#[test]
fn a_resumed_run_continues_exactly() {
    let model = tiny_model();
    let dir = tempfile::tempdir().unwrap();
    let checkpoint = dir.path().join("checkpoint.safetensors");
    let data = conversations(6);

    let mut straight =
        Distiller::from_prefix(&model.llama, &initial_prefix(&model), options(4)).unwrap();
    straight.train(&data, |_, _, _, _| Ok(())).unwrap();

    let run = || serde_json::json!({"corpus": "a"});
    let mut first =
        Distiller::from_prefix(&model.llama, &initial_prefix(&model), options(2)).unwrap();
    first.run = run();
    first.train(&data, |_, _, _, _| Ok(())).unwrap();
    first.save_checkpoint(&checkpoint).unwrap();
    // More steps than the interrupted run planned is a resume too.
    let mut resumed = Distiller::resume(&model.llama, &checkpoint, options(4), run()).unwrap();
    assert_eq!(resumed.step_count(), 2);
    resumed.train(&data, |_, _, _, _| Ok(())).unwrap();

    assert_eq!(resumed.losses, straight.losses);
    let (a, b) = (resumed.prefix().unwrap(), straight.prefix().unwrap());
    for layer in 0..2 {
        let difference = max_difference(&a.keys[layer], &b.keys[layer]);
        assert!(difference < 1e-6, "layer {layer} differs by {difference}");
    }
    // Anything else would train on other batches or with other updates: refused, named.
    let refused = |options: DistillOptions, run: serde_json::Value| {
        Distiller::resume(&model.llama, &checkpoint, options, run)
            .err()
            .unwrap()
            .to_string()
    };
    let mut other = options(4);
    other.tokens = 16;
    assert!(refused(other, run()).contains("tokens 8 (the run asks for 16)"));
    let mut other = options(4);
    other.row_tokens = 32;
    assert!(refused(other, run()).contains("row_tokens 48 (the run asks for 32)"));
    let error = refused(options(4), serde_json::json!({"corpus": "b"}));
    assert!(
        error.contains(r#"corpus "a" (the run asks for "b")"#),
        "{error}"
    );
    // Fewer steps than it already made: its cartridge is not the one asked for.
    let error = refused(options(1), run());
    assert!(error.contains("at step 2, past the 1"), "{error}");
    // The same refusals from the checkpoint's header alone, as a run makes them before synthesis.
    let early = |options: DistillOptions, steps, run: serde_json::Value| {
        check_resumable(&checkpoint, &options, steps, &run)
            .err()
            .map(|e| e.to_string())
    };
    assert_eq!(early(options(4), Some(4), run()), None);
    assert_eq!(early(options(4), None, serde_json::json!({})), None);
    let mut other = options(4);
    other.tokens = 16;
    let error = early(other, Some(4), run()).unwrap();
    assert!(error.contains("tokens 8 (the run asks for 16)"), "{error}");
    let error = early(options(4), Some(4), serde_json::json!({"corpus": "b"})).unwrap();
    assert!(
        error.contains(r#"corpus "a" (the run asks for "b")"#),
        "{error}"
    );
    let error = early(options(1), Some(1), run()).unwrap();
    assert!(error.contains("at step 2, past the 1"), "{error}");
    std::fs::write(&checkpoint, b"not a checkpoint").unwrap();
    let error = early(options(4), Some(4), run()).unwrap();
    assert!(error.contains("not a safetensors checkpoint"), "{error}");
}

/// The last step's update has no step after it to find it not finite: a cartridge or checkpoint
/// that is not finite is refused where it would be written.
#[test]
fn a_cartridge_that_is_not_finite_is_never_written() {
    let model = tiny_model();
    let options = DistillOptions {
        learning_rate: 1e39,
        ..options(1)
    };
    let mut distiller =
        Distiller::from_prefix(&model.llama, &initial_prefix(&model), options).unwrap();
    distiller.prefix().unwrap();
    distiller
        .train(&conversations(4), |_, _, _, _| Ok(()))
        .unwrap();
    let error = distiller.prefix().unwrap_err().to_string();
    assert!(
        error.contains("after step 1 the cartridge is no longer finite"),
        "{error}"
    );
    let dir = tempfile::tempdir().unwrap();
    let checkpoint = dir.path().join("checkpoint.safetensors");
    assert!(distiller.save_checkpoint(&checkpoint).is_err());
    assert!(!checkpoint.exists());
}

#[test]
fn synthesis_writes_readable_conversations_and_resumes() {
    let model = smollm2();
    let dir = tempfile::tempdir().unwrap();
    let corpus_path = dir.path().join("corpus.txt");
    std::fs::write(&corpus_path, "The lighthouse on Varn Island was built in 1871 by Edda Morrow. Its lamp burns whale oil and can be seen for nineteen miles. The keeper must log every ship that passes.").unwrap();
    let corpus = Corpus::read(&[corpus_path]).unwrap();
    let corpus = (&corpus, &model.text.encode(&corpus.text()).unwrap()[..]);
    let path = dir.path().join("conversations.jsonl");
    let mut options = SynthesisOptions {
        conversations: 2,
        per_chunk: 2,
        chunk_tokens: (24, 40),
        user_max_tokens: 24,
        answer_max_tokens: 16,
        ..SynthesisOptions::default()
    };
    let first = synthesize(model, corpus, &options, &path, |_, _| Ok(())).unwrap();
    assert_eq!(first.len(), 2);
    for conversation in &first {
        assert!(!conversation.user.is_empty() && !conversation.assistant.is_empty());
        assert_eq!(conversation.teacher.len(), conversation.answer_ids.len());
        // The teacher's most likely tokens, most likely first, up to 20 or 0.99 of the mass.
        for top in &conversation.teacher {
            let mass: f32 = top.iter().map(|(_, logp)| logp.exp()).sum();
            assert!(!top.is_empty() && top.len() <= 20, "{top:?}");
            assert!(top.len() == 20 || mass >= 0.99, "{mass} in {top:?}");
            assert!(mass <= 1.0 + 1e-3, "{mass} in {top:?}");
            assert!(top.windows(2).all(|w| w[0].1 >= w[1].1), "{top:?}");
        }
        // The student's view has no chunk in it (but a recitation's given opening).
        let prompt = model.text.decode(&conversation.prompt_ids).unwrap();
        let prompt = prompt.trim_end_matches(conversation.opening.as_str());
        assert!(!prompt.contains("Varn Island"), "{prompt}");
        // ...nor the template's default system prompt: the cartridge stands for the system turn.
        assert!(!prompt.contains("SmolLM"), "{prompt}");
    }
    let vocab = model.llama.config.vocab;
    assert_eq!(read_conversations(&path, vocab).unwrap(), first);
    // A stored conversation that training would index out of bounds is named with its line.
    let stored = std::fs::read_to_string(&path).unwrap();
    let mut bad = first[1].clone();
    bad.answer_ids[0] = vocab as u32;
    let damaged = path.with_extension("damaged.jsonl");
    let line = serde_json::to_string(&bad).unwrap();
    let first_line = stored.lines().next().unwrap();
    std::fs::write(&damaged, format!("{first_line}\n{line}\n")).unwrap();
    let err = read_conversations(&damaged, vocab).unwrap_err().to_string();
    assert!(
        err.contains("damaged.jsonl:2: token 49152 is outside the model's 49152 tokens"),
        "{err}"
    );

    // Conversations whose record is gone are refused, and kept.
    let meta = path.with_extension("meta.json");
    let record = std::fs::read(&meta).unwrap();
    std::fs::remove_file(&meta).unwrap();
    let err = synthesize(model, corpus, &options, &path, |_, _| Ok(())).unwrap_err();
    assert!(
        err.to_string().contains("holds conversations without"),
        "{err}"
    );
    assert_eq!(std::fs::read_to_string(&path).unwrap(), stored);
    std::fs::write(&meta, record).unwrap();

    // A run with other settings is refused: the file holds another run's conversations.
    options.answer_max_tokens = 17;
    let err = synthesize(model, corpus, &options, &path, |_, _| Ok(())).unwrap_err();
    assert!(
        err.to_string()
            .contains("holds conversations made with options.answer_max_tokens"),
        "{err}"
    );
    options.answer_max_tokens = 16;
    // A run asking for fewer takes the first ones.
    options.conversations = 1;
    let fewer = synthesize(model, corpus, &options, &path, |_, _| Ok(())).unwrap();
    assert_eq!(fewer, first[..1]);
    options.conversations = 2;
    // What a run reports done, from its start on: work redone would start from 0.
    let run = |progress: &mut Vec<usize>| {
        synthesize(model, corpus, &options, &path, |done, _| {
            progress.push(done);
            Ok(())
        })
        .unwrap()
    };
    let mut progress = Vec::new();
    assert_eq!(run(&mut progress), first);
    assert_eq!(progress, [2], "a finished run does no more work");

    // A torn last line (an interrupted write) takes its batch with it, and the run makes that
    // batch again, as it was.
    let text = std::fs::read_to_string(&path).unwrap();
    std::fs::write(&path, &text[..text.len() - 20]).unwrap();
    let mut progress = Vec::new();
    let repaired = run(&mut progress);
    assert_eq!(progress, [0, 2]);
    assert_eq!(repaired, first);
    assert_eq!(read_conversations(&path, vocab).unwrap(), first);

    // A run asking for more extends the set batch by batch: in whole batches, as a run asking
    // for that many from the start would have made it.
    let extended = dir.path().join("extended.jsonl");
    assert_eq!(
        synthesize(model, corpus, &options, &extended, |_, _| Ok(())).unwrap(),
        first
    );
    options.conversations = 4;
    let extended = synthesize(model, corpus, &options, &extended, |_, _| Ok(())).unwrap();
    assert_eq!(extended[..2], first);
    let whole = dir.path().join("whole.jsonl");
    assert_eq!(
        synthesize(model, corpus, &options, &whole, |_, _| Ok(())).unwrap(),
        extended
    );

    // A set still empty (a run stopped before its first batch) starts over with new settings.
    let stopped = dir.path().join("stopped.jsonl");
    std::fs::write(
        stopped.with_extension("meta.json"),
        std::fs::read(&meta).unwrap(),
    )
    .unwrap();
    std::fs::write(&stopped, "").unwrap();
    options.answer_max_tokens = 12;
    options.conversations = 2;
    assert_eq!(
        synthesize(model, corpus, &options, &stopped, |_, _| Ok(()))
            .unwrap()
            .len(),
        2
    );
}

#[test]
fn recitations_continue_the_chunk_from_the_opening_given() {
    let model = smollm2();
    let dir = tempfile::tempdir().unwrap();
    let text = "The lighthouse on Varn Island was built in 1871 by Edda Morrow. Its lamp burns whale oil and can be seen for nineteen miles. The keeper must log every ship that passes.";
    let corpus_path = dir.path().join("corpus.txt");
    std::fs::write(&corpus_path, text).unwrap();
    let corpus = Corpus::read(&[corpus_path]).unwrap();
    let corpus = (&corpus, &model.text.encode(&corpus.text()).unwrap()[..]);
    let options = SynthesisOptions {
        conversations: 4,
        per_chunk: 4,
        chunk_tokens: (64, 64),
        answer_max_tokens: 8,
        recitation: 1.0,
        ..SynthesisOptions::default()
    };
    let path = dir.path().join("conversations.jsonl");
    let recitations = synthesize(model, corpus, &options, &path, |_, _| Ok(())).unwrap();
    assert_eq!(recitations.len(), 4);
    let words: Vec<&str> = text.split_whitespace().collect();
    let mut starts = Vec::new();
    for recitation in &recitations {
        assert_eq!(recitation.seed, SeedKind::Recitation);
        assert_eq!(recitation.user, RECITATION_REQUEST);
        // The student reads the request, then the opening: five words of the chunk.
        let opening = model.text.encode(&recitation.opening).unwrap();
        assert!(recitation.prompt_ids.ends_with(&opening), "{recitation:?}");
        let given: Vec<&str> = recitation.opening.split_whitespace().collect();
        let at = words
            .windows(5)
            .position(|w| w == given)
            .unwrap_or_else(|| panic!("{:?} is not in the corpus", recitation.opening));
        starts.push(at);
        // The teacher, the chunk in view, goes on with the chunk's next words.
        let answer: Vec<&str> = recitation.assistant.split_whitespace().take(2).collect();
        assert_eq!(answer, words[at + 5..at + 7], "{recitation:?}");
    }
    // The three sentences' starts first, then another word's: none twice.
    let sentence = |&at: &usize| at == 0 || words[at - 1].ends_with('.');
    assert!(starts[..3].iter().all(sentence), "{starts:?}");
    assert!(!sentence(&starts[3]), "{starts:?}");
    let distinct: std::collections::BTreeSet<usize> = starts.iter().copied().collect();
    assert_eq!(distinct.len(), 4, "{starts:?}");
    // Mixed with written conversations, each is what its kind says.
    let mixed = synthesize(
        model,
        corpus,
        &SynthesisOptions {
            conversations: 8,
            per_chunk: 8,
            recitation: 0.5,
            user_max_tokens: 16,
            ..options.clone()
        },
        &dir.path().join("mixed.jsonl"),
        |_, _| Ok(()),
    )
    .unwrap();
    let recited = mixed.iter().filter(|c| c.seed == SeedKind::Recitation);
    assert!((1..mixed.len()).contains(&recited.count()), "{mixed:?}");
    for conversation in &mixed {
        let recitation = conversation.seed == SeedKind::Recitation;
        assert_eq!(conversation.user == RECITATION_REQUEST, recitation);
        assert_eq!(!conversation.opening.is_empty(), recitation);
        let mut prompt = model
            .text
            .render_after_system_ids(&[Message::new("user", conversation.user.clone())], true)
            .unwrap();
        prompt.extend(model.text.encode(&conversation.opening).unwrap());
        assert_eq!(conversation.prompt_ids, prompt, "{conversation:?}");
    }
    // A share outside 0 to 1 is refused before any work.
    let err = synthesize(
        model,
        corpus,
        &SynthesisOptions {
            recitation: 1.5,
            ..options
        },
        &dir.path().join("other.jsonl"),
        |_, _| Ok(()),
    )
    .unwrap_err();
    assert!(
        err.to_string().contains("share of recitations is 1.5"),
        "{err}"
    );
}

#[test]
fn loading_refuses_a_fingerprint_without_weights() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("model.json");
    std::fs::write(
        &path,
        serde_json::to_string(&tiny_model().fingerprint).unwrap(),
    )
    .unwrap();
    let source = ModelSource::resolve(path.to_str().unwrap(), dir.path()).unwrap();
    let err = source
        .load(&Device::Cpu, DType::F32)
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains("holds no weights to run"), "{err}");
}

#[test]
fn next_token_prediction_is_distillation_onto_the_text() {
    let model = tiny_model();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("corpus.txt");
    std::fs::write(
        &path,
        "one two three four five six seven eight nine ten eleven twelve thirteen",
    )
    .unwrap();
    let corpus = Corpus::read(&[path]).unwrap();
    let tokens = model.text.encode(&corpus.text()).unwrap();
    let pieces = cartridge_trainer::synthesis::next_token_conversations(&tokens, 5);
    let rebuilt: Vec<u32> = pieces
        .iter()
        .flat_map(|c| c.prompt_ids.iter().chain(&c.answer_ids).copied())
        .collect();
    // The whole text but a last piece too short to predict anything from.
    assert!(pieces.len() > 1, "{} pieces", pieces.len());
    assert!(
        rebuilt.len() + 1 >= tokens.len(),
        "{rebuilt:?} of {tokens:?}"
    );
    assert_eq!(rebuilt, tokens[..rebuilt.len()]);
    for piece in &pieces {
        assert_eq!(piece.teacher.len(), piece.answer_ids.len());
        assert!(
            piece
                .teacher
                .iter()
                .zip(&piece.answer_ids)
                .all(|(top, &t)| top == &vec![(t, 0.0)])
        );
    }
    let mut distiller = Distiller::from_prefix(
        &model.llama,
        &initial_prefix(&model),
        DistillOptions {
            row_tokens: 16,
            ..options(3)
        },
    )
    .unwrap();
    distiller.train(&pieces, |_, _, _, _| Ok(())).unwrap();
    assert_eq!(distiller.losses.len(), 3);
    // A step holding every piece: its loss is the text's mean negative log-likelihood, token by
    // token after each piece's first, as the student reads it after the cartridge.
    let start = initial_prefix(&model);
    let (mut total, mut targets) = (0f64, 0usize);
    for piece in &pieces {
        let ids: Vec<u32> = piece
            .prompt_ids
            .iter()
            .chain(&piece.answer_ids)
            .copied()
            .collect();
        let log_probabilities = log_probabilities_after(&model, &start, &ids);
        for (row, &next) in log_probabilities.iter().zip(&ids[1..]) {
            total -= f64::from(row[next as usize]);
            targets += 1;
        }
    }
    let mut whole = Distiller::from_prefix(
        &model.llama,
        &start,
        DistillOptions {
            row_tokens: rebuilt.len(),
            rows: 1,
            ..options(1)
        },
    )
    .unwrap();
    whole.train(&pieces, |_, _, _, _| Ok(())).unwrap();
    let expected = total / targets as f64;
    assert!(
        (f64::from(whole.losses[0]) - expected).abs() < 1e-4,
        "loss {} against {expected}",
        whole.losses[0]
    );
}

/// A cartridge starts as a system turn holding the corpus's first tokens, the chat template
/// around them, exactly `tokens` long, and trains from their keys and values unchanged (that
/// those are the text's, read in context, `model.rs` checks).
#[test]
fn a_cartridge_starts_as_the_corpus_in_a_system_turn() {
    let model = tiny_model();
    let corpus = "The lighthouse on Varn is kept by three sisters who take turns at the lamp.";
    let (before, after, room) = model.text.system_turn_ids(16).unwrap();
    let encode = |text: &str| model.text.encode(text).unwrap();
    let ids = cartridge_trainer::distill::initial_ids(&model.text, &encode(corpus), 16).unwrap();
    assert_eq!(ids.len(), 16);
    assert_eq!(ids[..before.len()], before);
    assert_eq!(ids[ids.len() - after.len()..], after);
    let text = model
        .text
        .decode(&ids[before.len()..before.len() + room])
        .unwrap();
    assert!(corpus.starts_with(text.trim_end()), "{text:?}");
    let err = cartridge_trainer::distill::initial_ids(&model.text, &encode("Too short."), 16)
        .unwrap_err();
    assert!(err.to_string().contains("the corpus has"), "{err}");

    let distiller = Distiller::from_corpus(
        &model,
        &ids,
        DistillOptions {
            tokens: 16,
            ..options(1)
        },
    )
    .unwrap();
    let trained = distiller.prefix().unwrap();
    let expected = model.llama.prefix_of(&ids).unwrap();
    for (ours, theirs) in trained
        .keys
        .iter()
        .chain(&trained.values)
        .zip(expected.keys.iter().chain(&expected.values))
    {
        assert!(max_difference(ours, theirs) < 1e-6);
    }
}

/// Composition puts each cartridge's tokens after the one before, per layer and head.
#[test]
fn concatenated_prefixes_keep_each_part_in_order() {
    let model = tiny_model();
    let first = model.llama.prefix_of(&[5, 9, 13]).unwrap();
    let second = model.llama.prefix_of(&[40, 41]).unwrap();
    let both = cartridge_trainer::cartridge::concatenate(&[first.clone(), second.clone()]).unwrap();
    assert_eq!(both.tokens(), 5);
    for layer in 0..both.keys.len() {
        for (joined, a, b) in [
            (&both.keys[layer], &first.keys[layer], &second.keys[layer]),
            (
                &both.values[layer],
                &first.values[layer],
                &second.values[layer],
            ),
        ] {
            assert_eq!(max_difference(&joined.narrow(1, 0, 3).unwrap(), a), 0.0);
            assert_eq!(max_difference(&joined.narrow(1, 3, 2).unwrap(), b), 0.0);
        }
    }
}

/// The loss of one step on `data` after `prefix`.
fn first_loss(
    model: &LoadedModel,
    prefix: &cartridge_trainer::model::Prefix,
    options: DistillOptions,
    data: &[Conversation],
) -> f32 {
    let mut distiller = Distiller::from_prefix(&model.llama, prefix, options).unwrap();
    distiller.train(data, |_, _, _, _| Ok(())).unwrap();
    distiller.losses[0]
}

/// One step's options for the five partner tokens and the cartridge read as one prefix (its
/// trainable part the cartridge's).
fn one_prefix() -> DistillOptions {
    DistillOptions {
        tokens: 13,
        frozen: 6,
        ..options(1)
    }
}

/// Learning to compose: even steps read the partners before the cartridge, as one prefix
/// would be read (the conversations after both), odd steps the cartridge alone; the partners
/// never train and are no part of the cartridge.
#[test]
fn a_cartridge_learning_to_compose_reads_its_partners_every_other_step() {
    let model = tiny_model();
    let start = initial_prefix(&model);
    let partners = model.llama.prefix_of(&[1, 40, 41, 42, 43]).unwrap();
    // One conversation: every row of every step holds it alone, so steps differ in what they
    // read before it.
    let data = conversations(1);
    let composing = |steps: usize| {
        let options = DistillOptions {
            partner_tokens: 5,
            ..options(steps)
        };
        let mut distiller = Distiller::from_prefix(&model.llama, &start, options).unwrap();
        distiller
            .compose_with(partners.clone(), Vec::new())
            .unwrap();
        distiller.train(&data, |_, _, _, _| Ok(())).unwrap();
        distiller
    };
    let first_loss = |prefix: &cartridge_trainer::model::Prefix, options| {
        first_loss(&model, prefix, options, &data)
    };
    let two = composing(2);
    assert_eq!(two.alone_losses(), [two.losses[1]]);
    // Of a run with no steps alone, all.
    assert_eq!(composing(1).alone_losses(), composing(1).losses);
    // Step 1 reads the partners and the cartridge as one prefix of 13 tokens.
    let joined =
        cartridge_trainer::cartridge::concatenate(&[partners.clone(), start.clone()]).unwrap();
    let difference = (two.losses[0] - first_loss(&joined, one_prefix())).abs();
    assert!(difference < 1e-5, "step 1 differs by {difference}");
    // Step 2 reads the cartridge step 1 left, alone.
    let after_one = composing(1).prefix().unwrap();
    assert_eq!(after_one.tokens(), 8);
    let difference = (two.losses[1] - first_loss(&after_one, options(1))).abs();
    assert!(difference < 1e-5, "step 2 differs by {difference}");
    // Which is not what it reads with the partners before it.
    let with_partners = cartridge_trainer::cartridge::concatenate(&[partners.clone(), after_one]);
    let other = first_loss(&with_partners.unwrap(), one_prefix());
    assert!(
        (two.losses[1] - other).abs() > 1e-3,
        "{} {other}",
        two.losses[1]
    );

    // Resumed after an odd number of steps, a run goes on as it would have: which steps read
    // the partners follows the step count, which the checkpoint keeps.
    let dir = tempfile::tempdir().unwrap();
    let checkpoint = dir.path().join("checkpoint.safetensors");
    composing(1).save_checkpoint(&checkpoint).unwrap();
    let three = DistillOptions {
        partner_tokens: 5,
        ..options(3)
    };
    let mut resumed =
        Distiller::resume(&model.llama, &checkpoint, three, serde_json::Value::Null).unwrap();
    resumed.compose_with(partners.clone(), Vec::new()).unwrap();
    resumed.train(&data, |_, _, _, _| Ok(())).unwrap();
    assert_eq!(resumed.losses, composing(3).losses);

    // Partners of another length than the options say are refused, named.
    let mut distiller = Distiller::from_prefix(&model.llama, &start, options(1)).unwrap();
    let error = distiller
        .compose_with(partners, Vec::new())
        .unwrap_err()
        .to_string();
    assert!(
        error.contains("hold 5 tokens, the options say 0"),
        "{error}"
    );
    // And training without the partners the options say.
    let only_partners = DistillOptions {
        partner_tokens: 5,
        ..options(1)
    };
    let mut distiller = Distiller::from_prefix(&model.llama, &start, only_partners).unwrap();
    let error = distiller.train(&data, |_, _, _, _| Ok(())).unwrap_err();
    assert!(
        error
            .to_string()
            .contains("5 tokens of cartridges to compose with, and none were given"),
        "{error}"
    );
}

/// Given the partners' own conversations too, steps go by threes: its own conversations beside
/// the partners, its own alone, the partners' beside them. Every step trains the cartridge (and
/// never the partners), and a resumed run draws the partners' conversations where it stopped.
#[test]
fn a_cartridge_learning_to_compose_trains_on_its_partners_conversations_every_third_step() {
    let model = tiny_model();
    let start = initial_prefix(&model);
    let partners = model.llama.prefix_of(&[1, 40, 41, 42, 43]).unwrap();
    let own = conversations(1);
    // Twelve of theirs, other prompts and answers: three rows of four, so the second epoch
    // starts in the middle of a step.
    let theirs: Vec<Conversation> = conversations(32).split_off(20);
    let with_theirs = |steps: usize| DistillOptions {
        partner_tokens: 5,
        partner_conversations: true,
        ..options(steps)
    };
    let composing = |steps: usize| {
        let mut distiller =
            Distiller::from_prefix(&model.llama, &start, with_theirs(steps)).unwrap();
        distiller
            .compose_with(partners.clone(), theirs.clone())
            .unwrap();
        distiller.train(&own, |_, _, _, _| Ok(())).unwrap();
        distiller
    };
    let first_loss = |prefix: &cartridge_trainer::model::Prefix, options, data: &[Conversation]| {
        first_loss(&model, prefix, options, data)
    };
    let beside = |prefix: cartridge_trainer::model::Prefix| {
        cartridge_trainer::cartridge::concatenate(&[partners.clone(), prefix]).unwrap()
    };
    let three = composing(3);
    let after = |steps: usize| composing(steps).prefix().unwrap();
    let expected = [
        first_loss(&beside(start.clone()), one_prefix(), &own),
        first_loss(&after(1), options(1), &own),
        first_loss(&beside(after(2)), one_prefix(), &theirs),
    ];
    for (step, (ours, expected)) in three.losses.iter().zip(expected).enumerate() {
        let difference = (ours - expected).abs();
        assert!(
            difference < 1e-5,
            "step {} differs by {difference}",
            step + 1
        );
    }
    // The third step trained the cartridge, which holds its own tokens alone.
    let (two, trained) = (after(2), three.prefix().unwrap());
    assert_eq!(trained.tokens(), 8);
    assert!(max_difference(&trained.keys[1], &two.keys[1]) > 1e-4);

    // Resumed after step 4, the sixth step draws the rows of theirs that follow the third's.
    let dir = tempfile::tempdir().unwrap();
    let checkpoint = dir.path().join("checkpoint.safetensors");
    composing(4).save_checkpoint(&checkpoint).unwrap();
    let mut resumed = Distiller::resume(
        &model.llama,
        &checkpoint,
        with_theirs(6),
        serde_json::Value::Null,
    )
    .unwrap();
    resumed
        .compose_with(partners.clone(), theirs.clone())
        .unwrap();
    resumed.train(&own, |_, _, _, _| Ok(())).unwrap();
    let straight = composing(6);
    assert_eq!(resumed.losses, straight.losses);
    // The losses a run alone would report are those of its steps alone.
    assert_eq!(
        straight.alone_losses(),
        [straight.losses[1], straight.losses[4]]
    );
    // Which are not the rows a fresh draw of theirs starts with.
    let fresh = first_loss(&beside(after(5)), one_prefix(), &theirs);
    assert!((straight.losses[5] - fresh).abs() > 1e-4);

    // Epochs count its own conversations: their steps come on top (four rows of its own, one
    // a step, are steps 1, 2, 4 and 5).
    let one_row = |options: DistillOptions| DistillOptions { rows: 1, ..options };
    let steps = |options| steps_for_epochs(&options, 512, &own, 4.0).unwrap();
    assert_eq!(steps(one_row(options(0))), 4);
    assert_eq!(steps(one_row(with_theirs(0))), 5);

    // Their conversations go with the options that say so, and with partners.
    let mut distiller = Distiller::from_prefix(&model.llama, &start, with_theirs(1)).unwrap();
    let error = distiller
        .compose_with(partners.clone(), Vec::new())
        .unwrap_err();
    assert!(
        error
            .to_string()
            .contains("0 of the partners' conversations given, the options say some"),
        "{error}"
    );
    let only_partners = DistillOptions {
        partner_tokens: 5,
        ..options(1)
    };
    let mut distiller = Distiller::from_prefix(&model.llama, &start, only_partners).unwrap();
    let error = distiller.compose_with(partners, theirs).unwrap_err();
    assert!(
        error
            .to_string()
            .contains("12 of the partners' conversations given, the options say none"),
        "{error}"
    );
    let no_partners = DistillOptions {
        partner_conversations: true,
        ..options(1)
    };
    let error = Distiller::from_prefix(&model.llama, &start, no_partners)
        .err()
        .unwrap();
    assert!(
        error
            .to_string()
            .contains("beside the partners, and there are none"),
        "{error}"
    );
}

/// `evaluate` says how far it is: each setting named as it starts, every answer scored or
/// generated counted once, in order, up to the whole.
#[test]
fn evaluation_reports_its_progress_to_the_end() {
    use cartridge_trainer::eval::{QaPair, Setting, evaluate};
    let model = tiny_model();
    let qa: Vec<QaPair> = [
        "Who keeps the lamp?",
        "How far is it seen?",
        "When was it built?",
    ]
    .iter()
    .map(|question| QaPair {
        question: question.to_string(),
        answer: "Three sisters.".into(),
    })
    .collect();
    let turn = |text: &str| {
        let (before, after, _) = model.text.system_turn_ids(16).unwrap();
        let corpus = model.text.encode(text).unwrap();
        Setting::Turn([&before[..], &corpus, &after[..]].concat())
    };
    // The second reads more than the model's 512 positions: skipped, no work.
    let settings = vec![
        ("none".to_owned(), turn("")),
        ("long".to_owned(), Setting::Turn(vec![0; 600])),
        ("text".to_owned(), turn("The lighthouse on Varn.")),
    ];
    let mut heard = Vec::new();
    let reports = evaluate(&model, settings, &qa, (2, 4), |mode, done, total| {
        heard.push((mode.to_owned(), done, total));
    })
    .unwrap();
    assert_eq!(reports.len(), 3);
    assert!(reports[1].skipped.is_some());
    // Three scored and two written a setting: fifteen, then ten once one does not fit.
    let totals: Vec<usize> = heard.iter().map(|&(_, _, total)| total).collect();
    assert_eq!(totals.first(), Some(&15), "{heard:?}");
    assert_eq!(totals.last(), Some(&10), "{heard:?}");
    assert!(heard.contains(&("long".to_owned(), 5, 15)), "{heard:?}");
    let counts: Vec<usize> = heard.iter().map(|&(_, done, _)| done).collect();
    assert!(counts.windows(2).all(|w| w[0] <= w[1]), "{heard:?}");
    assert_eq!(
        heard.first().map(|h| (h.0.as_str(), h.1)),
        Some(("none", 0))
    );
    assert_eq!(
        heard.last().map(|h| (h.0.as_str(), h.1)),
        Some(("text", 10))
    );
    assert!(heard.contains(&("text".to_owned(), 5, 10)), "{heard:?}");
    for done in 1..=10 {
        assert!(
            heard.iter().any(|h| h.1 == done),
            "{done} never said: {heard:?}"
        );
    }
}
