//! `cartridge train` and `cartridge eval` on the real small model, at sizes a CPU runs in seconds.

use std::path::Path;

use serde_json::Value;

use crate::support::{cartridge, path_str, smollm2_gguf};

pub(crate) const CORPUS: &str = "The lighthouse on Varn Island was built in 1871 by the engineer Edda Morrow. \
Its lamp burns whale oil and can be seen for nineteen miles on a clear night. The keeper, by order of \
the harbour board, must log every ship that passes and ring the fog bell every two minutes in fog. \
In 1903 a storm broke the lantern glass, and it was replaced with glass made in Birmingham.";

pub(crate) const QA: &str = r#"{"question": "Who built the lighthouse on Varn Island?", "answer": "The engineer Edda Morrow built it, in 1871."}
{"question": "How far can the lamp be seen?", "answer": "Nineteen miles on a clear night."}
{"question": "What must the keeper do in fog?", "answer": "Ring the fog bell every two minutes."}
"#;

fn train_args<'a>(model: &'a str, steps: &'a str) -> Vec<&'a str> {
    vec![
        "train",
        "--model",
        model,
        "--corpus",
        "corpus.txt",
        "--tokens",
        "32",
        "-o",
        "varn.safetensors",
        "--conversations",
        "3",
        "--per-chunk",
        "3",
        "--chunk-tokens",
        "48..64",
        "--user-tokens",
        "24",
        "--answer-tokens",
        "24",
        "--row-tokens",
        "128",
        "--rows",
        "1",
        "--steps",
        steps,
        "--checkpoint-every",
        "1",
        "--resume",
        "--json",
    ]
}

/// `train_args` with each `--flag value` pair of `flags` set: in place where the usual arguments
/// have the flag, else added.
fn with_flags<'a>(mut args: Vec<&'a str>, flags: &[&'a str]) -> Vec<&'a str> {
    for pair in flags.chunks(2) {
        match args.iter().position(|a| *a == pair[0]) {
            Some(at) => args[at + 1] = pair[1],
            None => args.extend_from_slice(pair),
        }
    }
    args
}

/// The flags of a next-token cartridge trained for `steps` steps on rows of 64 tokens.
fn next_token_flags(steps: &str) -> Vec<&str> {
    vec![
        "--objective",
        "next-token",
        "--row-tokens",
        "64",
        "--rows",
        "1",
        "--steps",
        steps,
    ]
}

/// A baseline cartridge of 32 tokens of the corpus at `output`: `train` with `extra`, its report.
fn baseline(dir: &Path, model: &str, output: &str, extra: &[&str]) -> Value {
    train_baseline(dir, model, output, extra).json()
}

/// `train` of a 32-token cartridge of the corpus at `output`, with `extra`.
fn train_baseline(dir: &Path, model: &str, output: &str, extra: &[&str]) -> crate::support::Run {
    let mut args = baseline_args(model, output, extra);
    args.push("--json");
    cartridge(dir, &args)
}

/// The arguments of [`train_baseline`] but `--json`.
fn baseline_args<'a>(model: &'a str, output: &'a str, extra: &[&'a str]) -> Vec<&'a str> {
    let mut args = vec![
        "train",
        "--model",
        model,
        "--corpus",
        "corpus.txt",
        "--tokens",
        "32",
        "-o",
        output,
    ];
    args.extend(extra);
    args
}

#[test]
fn train_then_eval_on_the_real_model() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("corpus.txt"), CORPUS).unwrap();
    std::fs::write(dir.path().join("qa.jsonl"), QA).unwrap();
    let gguf = smollm2_gguf();
    let model = path_str(&gguf);

    let first: Value = cartridge(dir.path(), &train_args(model, "2")).json();
    assert_eq!(first["steps"], 2);
    assert_eq!(first["conversations"], 3);
    assert_eq!(first["header"]["tokens"], 32);
    assert_eq!(first["header"]["frozen_tokens"], 1);
    let stored = dir.path().join("varn.work/conversations.jsonl");
    let conversations = std::fs::read(&stored).unwrap();
    // Asked for more steps, the run resumes: the same conversations, two steps further.
    let run = cartridge(dir.path(), &train_args(model, "4"));
    // Its stderr is not a terminal, as in a job's log: progress comes as lines.
    let log = run.stderr.clone();
    let second: Value = run.json();
    assert_eq!(second["steps"], 4);
    assert!(log.contains("synthesis: 3/3 conversations"), "{log}");
    assert!(!log.contains("training: step 1/4"), "{log}");
    assert!(!log.contains("training: step 2/4"), "{log}");
    assert!(log.contains("training: step 3/4, loss "), "{log}");
    assert!(log.contains("training: step 4/4, loss "), "{log}");
    // Losses are divergences from the teacher: never negative.
    for loss in ["first_loss", "final_loss"] {
        assert!(second[loss].as_f64().unwrap() >= 0.0, "{second}");
    }
    // Nothing was synthesized again.
    assert!(!log.contains("synthesis: 0/3"), "{log}");
    assert_eq!(std::fs::read(&stored).unwrap(), conversations);
    // Conversations made again with other settings do not continue the checkpoint.
    let work = dir.path().join("varn.work");
    let aside = dir.path().join("aside");
    std::fs::create_dir(&aside).unwrap();
    for name in ["conversations.jsonl", "conversations.meta.json"] {
        std::fs::rename(work.join(name), aside.join(name)).unwrap();
    }
    let other = with_flags(train_args(model, "5"), &["--answer-tokens", "20"]);
    let err = cartridge(dir.path(), &other).fails();
    assert!(
        err.contains("synthesis.answer_max_tokens 24 (the run asks for 20)"),
        "{err}"
    );
    // Refused before synthesis: nothing was made for it.
    assert!(!work.join("conversations.jsonl").exists());
    for name in ["conversations.jsonl", "conversations.meta.json"] {
        std::fs::rename(aside.join(name), work.join(name)).unwrap();
    }
    // More conversations than the checkpoint was trained on: refused before they are made.
    let more = with_flags(train_args(model, "5"), &["--conversations", "4"]);
    let err = cartridge(dir.path(), &more).fails();
    assert!(
        err.contains("conversations 3 (the run asks for 4)"),
        "{err}"
    );
    assert_eq!(std::fs::read(&stored).unwrap(), conversations);
    // A fresh run on these conversations with other settings is told which.
    let fresh: Vec<&str> = other.iter().copied().filter(|a| *a != "--resume").collect();
    let err = cartridge(dir.path(), &fresh).fails();
    assert!(
        err.contains(
            "holds conversations made with options.answer_max_tokens 24 (the run asks for 20)"
        ),
        "{err}"
    );

    let verified = cartridge(dir.path(), &["verify", "varn.safetensors"]).ok();
    assert!(
        verified.contains("30 layers, 32 tokens, bf16"),
        "{verified}"
    );
    let inspected = cartridge(dir.path(), &["inspect", "--json", "varn.safetensors"]).json();
    let provenance = &inspected["header"]["provenance"]["trainer"];
    assert_eq!(provenance["method"], "self-study");
    assert_eq!(provenance["steps"], 4);
    assert!(
        provenance["corpus"]["digest"]
            .as_str()
            .unwrap()
            .starts_with("blake3:")
    );

    assert_eq!(
        conversations
            .split(|b| *b == b'\n')
            .filter(|l| !l.is_empty())
            .count(),
        3
    );

    // Zero steps writes the initialization alone, a baseline: nothing is synthesized for it
    // (1024 conversations by default).
    let init = baseline(dir.path(), model, "init.safetensors", &["--steps", "0"]);
    assert_eq!(
        (init["steps"].as_u64(), init["conversations"].as_u64()),
        (Some(0), Some(0))
    );
    assert!(!dir.path().join("init.work/conversations.jsonl").exists());
    assert_eq!(
        init["header"]["provenance"]["trainer"]["method"],
        "initialization"
    );

    // The baseline objective: plain next-token prediction on the corpus, no synthesis.
    let next_token = baseline(
        dir.path(),
        model,
        "ntp.safetensors",
        &[next_token_flags("2"), vec!["--checkpoint-every", "1"]].concat(),
    );
    assert_eq!(next_token["steps"], 2);
    assert_eq!(
        next_token["header"]["provenance"]["trainer"]["method"],
        "next-token"
    );

    // Trained to compose with another cartridge: its provenance and checkpoints name it, and
    // the cartridge written is its own tokens alone.
    let composing_flags = |partner: &'static str, steps: &'static str| {
        let tail = [
            "--checkpoint-every",
            "1",
            "--resume",
            "--compose-with",
            partner,
        ];
        [next_token_flags(steps), tail.to_vec()].concat()
    };
    let composing = baseline(
        dir.path(),
        model,
        "composing.safetensors",
        &composing_flags("ntp.safetensors", "2"),
    );
    assert_eq!(composing["steps"], 2);
    assert_eq!(composing["header"]["tokens"], 32);
    let trainer = &composing["header"]["provenance"]["trainer"];
    assert_eq!(trainer["distillation"]["partner_tokens"], 32);
    let partner = &trainer["compose_with"][0];
    assert_eq!(
        partner["payload_digest"],
        next_token["header"]["payload_digest"]
    );
    assert_eq!(partner["tokens"], 32);
    assert_eq!(
        partner["corpus"],
        next_token["header"]["provenance"]["trainer"]["corpus"]["digest"]
    );
    // Its checkpoint continues only beside the same partners.
    let err = train_baseline(
        dir.path(),
        model,
        "composing.safetensors",
        &composing_flags("init.safetensors", "3"),
    )
    .fails();
    assert!(
        err.contains("compose_with") && err.contains("the run asks for"),
        "{err}"
    );
    let resumed = baseline(
        dir.path(),
        model,
        "composing.safetensors",
        &composing_flags("ntp.safetensors", "3"),
    );
    assert_eq!(resumed["steps"], 3);
    // Nor alone, past a checkpoint made beside them.
    let mut alone = composing_flags("ntp.safetensors", "4");
    alone.truncate(alone.len() - 2);
    let err = train_baseline(dir.path(), model, "composing.safetensors", &alone).fails();
    assert!(
        err.contains("partner_tokens 32 (the run asks for 0)")
            && err.contains("(the run asks for [])"),
        "{err}"
    );
    // Zero steps writes the initialization, which nothing trains beside them.
    let err = train_baseline(
        dir.path(),
        model,
        "zero.safetensors",
        &["--steps", "0", "--compose-with", "ntp.safetensors"],
    )
    .fails();
    assert!(err.contains("0 steps writes the initialization"), "{err}");
    // With the partner's own conversations (a self-study run's, about the corpus the partner
    // was trained on): recorded in the provenance, and part of what a checkpoint continues.
    let with_theirs = |conversations: &'static str, steps: &'static str| {
        let flags = [
            "--row-tokens",
            "128",
            "--partner-conversations",
            conversations,
        ];
        with_flags(composing_flags("ntp.safetensors", steps), &flags)
    };
    let stored = "varn.work/conversations.jsonl";
    let theirs = baseline(
        dir.path(),
        model,
        "theirs.safetensors",
        &with_theirs(stored, "3"),
    );
    assert_eq!(theirs["steps"], 3);
    let trainer = &theirs["header"]["provenance"]["trainer"];
    assert_eq!(trainer["distillation"]["partner_conversations"], true);
    let described = &trainer["partner_conversations"][0];
    assert_eq!(described["conversations"], 3);
    assert_eq!(described["corpus"], partner["corpus"]);
    let refused =
        |extra: &[&str]| train_baseline(dir.path(), model, "refused.safetensors", extra).fails();
    // Other conversations (here the first two, a complete set as their record says) do not
    // continue its checkpoint; the same ones do.
    let copied = dir.path().join("copied");
    std::fs::create_dir(&copied).unwrap();
    let lines = std::fs::read_to_string(dir.path().join(stored)).unwrap();
    let first_two: String = lines.split_inclusive('\n').take(2).collect();
    std::fs::write(copied.join("conversations.jsonl"), &first_two).unwrap();
    let meta =
        std::fs::read_to_string(dir.path().join("varn.work/conversations.meta.json")).unwrap();
    let mut record: Value = serde_json::from_str(&meta).unwrap();
    record["options"]["conversations"] = 2.into();
    let write_record = |change: &dyn Fn(&mut Value)| {
        let mut changed = record.clone();
        change(&mut changed);
        std::fs::write(copied.join("conversations.meta.json"), changed.to_string()).unwrap();
    };
    write_record(&|_| {});
    let copy = "copied/conversations.jsonl";
    let err = train_baseline(
        dir.path(),
        model,
        "theirs.safetensors",
        &with_theirs(copy, "4"),
    )
    .fails();
    assert!(
        err.contains("partner_conversations") && err.contains("the run asks for"),
        "{err}"
    );
    let resumed = baseline(
        dir.path(),
        model,
        "theirs.safetensors",
        &with_theirs(stored, "4"),
    );
    assert_eq!(resumed["steps"], 4);
    // Fewer than their run asked for (a synthesis stopped or still running), a torn last line,
    // another corpus or model, no record, the same file twice, a missing one: refused, named.
    write_record(&|r| r["options"]["conversations"] = 3.into());
    let err = refused(&with_theirs(copy, "3"));
    assert!(
        err.contains("holds 2 whole conversations of the 3 its run asked for"),
        "{err}"
    );
    std::fs::write(
        copied.join("conversations.jsonl"),
        format!("{first_two}{{\"batch\""),
    )
    .unwrap();
    write_record(&|_| {});
    let err = refused(&with_theirs(copy, "3"));
    assert!(err.contains("and a torn line"), "{err}");
    std::fs::write(copied.join("conversations.jsonl"), &first_two).unwrap();
    write_record(&|r| r["corpus"] = format!("blake3:{}", "0".repeat(64)).into());
    let err = refused(&with_theirs(copy, "3"));
    assert!(
        err.contains("--partner-conversations copied/conversations.jsonl: they are about the corpus blake3:000")
            && err.contains("were trained on"),
        "{err}"
    );
    write_record(&|r| r["model"] = format!("blake3:{}", "1".repeat(64)).into());
    let err = refused(&with_theirs(copy, "3"));
    assert!(err.contains("made with the model blake3:111"), "{err}");
    std::fs::remove_file(copied.join("conversations.meta.json")).unwrap();
    let err = refused(&with_theirs(copy, "3"));
    assert!(
        err.contains("copied/conversations.meta.json") && err.contains("the record of what made"),
        "{err}"
    );
    let twice = [
        with_theirs(stored, "3"),
        vec!["--partner-conversations", stored],
    ]
    .concat();
    let err = refused(&twice);
    assert!(err.contains("given twice"), "{err}");
    let err = refused(&with_theirs("missing.jsonl", "3"));
    assert!(
        err.contains("--partner-conversations missing.jsonl") && err.contains("No such file"),
        "{err}"
    );
    // Nor are the conversations of this run's own work directory, which it may add to.
    let err = refused(&[with_theirs(stored, "3"), vec!["--work-dir", "varn.work"]].concat());
    assert!(
        err.contains("varn.work/conversations.jsonl: it is in this run's work directory varn.work"),
        "{err}"
    );
    // Without cartridges to compose with, they have no place.
    let err = refused(&["--partner-conversations", stored]);
    assert!(
        err.contains("required arguments were not provided") && err.contains("--compose-with"),
        "{err}"
    );
    assert!(!dir.path().join("refused.safetensors").exists());

    let evaluated = cartridge(
        dir.path(),
        &[
            "eval",
            "--model",
            model,
            "--corpus",
            "corpus.txt",
            "--qa",
            "qa.jsonl",
            "--cartridge",
            "varn.safetensors",
            "--cartridge",
            "ntp.safetensors",
            "--samples",
            "1",
            "--max-answer-tokens",
            "8",
            "--json",
        ],
    );
    // Its progress, with no terminal to draw bars on, as log lines: the first and the last,
    // once.
    let progress: Vec<&str> = evaluated.stderr.lines().collect();
    assert!(progress.windows(2).all(|w| w[0] != w[1]), "{progress:?}");
    assert!(
        progress.first().is_some_and(|l| l.starts_with("eval: 0/")),
        "{progress:?}"
    );
    let last = progress.last().and_then(|l| l.strip_prefix("eval: "));
    assert!(
        last.and_then(|l| l.split_once(" answers"))
            .and_then(|(count, _)| count.split_once('/'))
            .is_some_and(|(done, total)| done == total),
        "{progress:?}"
    );
    let report: Value = evaluated.json();
    let modes = report["modes"].as_array().unwrap();
    let names: Vec<&str> = modes.iter().map(|m| m["mode"].as_str().unwrap()).collect();
    assert_eq!(
        names[3..],
        [
            "composed: varn.safetensors + ntp.safetensors",
            "cartridge: varn.safetensors",
            "cartridge: ntp.safetensors"
        ],
        "{names:?}"
    );
    assert!(names[0] == "no context" && names[1].starts_with("corpus in context"));
    // The corpus in context makes its answers far more likely than no context at all.
    assert!(modes[1]["gain"].as_f64().unwrap() > 0.5, "{}", modes[1]);
    assert_eq!(modes[4]["context_tokens"], 32);
    // The composition holds both: twice the tokens and twice the memory of one.
    assert_eq!(modes[3]["context_tokens"], 64);
    let kv = |m: usize| modes[m]["kv_bytes"].as_u64().unwrap();
    assert_eq!(kv(3), 2 * kv(4));
    assert_eq!(
        kv(4),
        32 * 30 * 2 * 3 * 64 * 2,
        "bf16 keys and values of 30 layers"
    );
    // The truncated corpus gets the cartridge's budget, template included; no context is an
    // empty system turn, so that modes differ only in what that turn holds.
    assert_eq!(modes[2]["context_tokens"], 32);
    let empty_turn = modes[0]["context_tokens"].as_u64().unwrap();
    assert!(0 < empty_turn && empty_turn < 32, "{}", modes[0]);
    assert!(
        modes
            .iter()
            .all(|m| m["samples"].as_array().unwrap().len() == 1)
    );
    // The truncated corpus is a cartridge's initialization token for token: the two score alike
    // but for the cartridge's bf16 rounding.
    let report: Value = cartridge(
        dir.path(),
        &[
            "eval",
            "--model",
            model,
            "--corpus",
            "corpus.txt",
            "--qa",
            "qa.jsonl",
            "--cartridge",
            "init.safetensors",
            "--samples",
            "0",
            "--json",
        ],
    )
    .json();
    let modes = report["modes"].as_array().unwrap();
    let score = |m: usize| modes[m]["log_likelihood"].as_f64().unwrap();
    assert_eq!(modes[3]["mode"], "cartridge: init.safetensors");
    assert!((score(3) - score(2)).abs() < 0.02, "{modes:?}");
    // Which is no small difference: the truncated corpus moves the answers' likelihood.
    assert!((score(2) - score(0)).abs() > 0.1, "{modes:?}");

    let err = cartridge(
        dir.path(),
        &[
            "eval",
            "--model",
            model,
            "--corpus",
            "corpus.txt",
            "--qa",
            "missing.jsonl",
            "--tokens",
            "8",
        ],
    )
    .fails();
    assert!(err.contains("missing.jsonl"), "{err}");

    // One pair too long to read even without context is named, not left to unscore every mode.
    let long = format!(
        "{{\"question\": \"Recite it.\", \"answer\": \"{}\"}}\n",
        "lamp ".repeat(9000)
    );
    std::fs::write(dir.path().join("long.jsonl"), format!("{QA}{long}")).unwrap();
    let eval = |qa: &str, cartridges: &[&str]| {
        let mut args = vec![
            "eval",
            "--model",
            model,
            "--corpus",
            "corpus.txt",
            "--qa",
            qa,
            "--tokens",
            "8",
            "--samples",
            "0",
        ];
        for path in cartridges {
            args.extend(["--cartridge", path]);
        }
        cartridge(dir.path(), &args)
    };
    let err = eval("long.jsonl", &[]).fails();
    assert!(
        err.contains("question 4 (\"Recite it.\") and its answer need")
            && err.contains("without any context; the model has 8192"),
        "{err}"
    );
    let err = eval("qa.jsonl", &["init.safetensors", "./init.safetensors"]).fails();
    assert!(err.contains("./init.safetensors is given twice"), "{err}");
    // Two of one file name are told apart by their paths; a corpus none was trained on is said.
    std::fs::create_dir(dir.path().join("copy")).unwrap();
    std::fs::copy(
        dir.path().join("init.safetensors"),
        dir.path().join("copy/init.safetensors"),
    )
    .unwrap();
    let run = eval("qa.jsonl", &["init.safetensors", "copy/init.safetensors"]);
    assert!(!run.stderr.contains("warning"), "{}", run.stderr);
    let table = run.ok();
    assert!(
        table.contains("cartridge: init.safetensors")
            && table.contains("cartridge: copy/init.safetensors"),
        "{table}"
    );
    std::fs::write(dir.path().join("other.txt"), CORPUS.replace("Varn", "Rava")).unwrap();
    let mut args = vec![
        "eval",
        "--model",
        model,
        "--corpus",
        "other.txt",
        "--qa",
        "qa.jsonl",
    ];
    args.extend(["--cartridge", "init.safetensors", "--samples", "0"]);
    let run = cartridge(dir.path(), &args);
    assert!(
        run.stderr
            .contains("no cartridge given was trained on this --corpus"),
        "{}",
        run.stderr
    );
    run.ok();

    // A learning rate that overflows the cartridge's numbers fails the run; nothing is written.
    let overflow = [next_token_flags("1"), vec!["--lr", "1e39"]].concat();
    let err = train_baseline(dir.path(), model, "overflow.safetensors", &overflow).fails();
    assert!(
        err.contains("after step 1 the cartridge is no longer finite"),
        "{err}"
    );
    assert!(!dir.path().join("overflow.safetensors").exists());

    // A fresh run sets the last checkpoint aside, never over one set aside before, and says so.
    let fresh: Vec<&str> = train_args(model, "1")
        .into_iter()
        .filter(|a| *a != "--resume")
        .collect();
    for _ in 0..2 {
        let run = cartridge(dir.path(), &fresh);
        assert!(
            run.stderr
                .contains("remove set-aside checkpoints no longer needed"),
            "{}",
            run.stderr
        );
        run.ok();
    }
    for aside in ["previous", "previous-2"] {
        let path = dir
            .path()
            .join(format!("varn.work/checkpoint.{aside}.safetensors"));
        assert!(path.exists(), "{}", path.display());
    }
}

#[test]
fn bad_arguments_are_refused_before_any_synthesis() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("corpus.txt"), CORPUS).unwrap();
    let gguf = smollm2_gguf();
    let model = path_str(&gguf);
    // Trains with these flags set (in place where the usual arguments have them).
    let train = |tokens: &str, flags: &[&str]| {
        let args = with_flags(
            train_args(model, "2"),
            &[&["--tokens", tokens][..], flags].concat(),
        );
        cartridge(dir.path(), &args).fails()
    };

    let checkpoint = dir.path().join("varn.work/checkpoint.safetensors");
    std::fs::create_dir(dir.path().join("varn.work")).unwrap();
    std::fs::write(&checkpoint, b"an earlier run's").unwrap();

    // Each of these would otherwise fail only after synthesis, which takes hours at full size.
    let err = train("2", &[]);
    assert!(err.contains("cannot hold a system turn"), "{err}");
    let err = train("4096", &[]);
    assert!(err.contains("the corpus has"), "{err}");
    let err = train("32", &["--frozen", "32"]);
    assert!(
        err.contains("nothing of the cartridge's 32 to train"),
        "{err}"
    );
    // SmolLM2 reads 8192 positions.
    let err = train(
        "32",
        &[
            "--user-tokens",
            "8000",
            "--answer-tokens",
            "100",
            "--row-tokens",
            "8192",
        ],
    );
    assert!(
        err.contains("positions; the model has 8192 (lower"),
        "{err}"
    );
    // Rows that cannot hold a conversation, or could not be allocated.
    let err = train("32", &["--row-tokens", "40"]);
    assert!(err.contains("raise --row-tokens"), "{err}");
    let err = train("32", &["--row-tokens", "100000"]);
    assert!(
        err.contains("expected 1 to the model's 8192 positions"),
        "{err}"
    );
    let err = train("32", &["--rows", "1000000000000"]);
    assert!(err.contains("expected 1 to 1024"), "{err}");
    let err = train("32", &["--steps", "0"]);
    assert!(err.contains("0 steps leaves nothing to continue"), "{err}");
    // Outputs that could not be written, found before the work rather than after it.
    std::fs::create_dir(dir.path().join("folder")).unwrap();
    let err = train("32", &["-o", "folder"]);
    assert!(err.contains("cannot write folder: it is a folder"), "{err}");
    let err = train("32", &["-o", "missing/varn.safetensors"]);
    assert!(err.contains("missing does not exist"), "{err}");
    std::fs::write(dir.path().join("folder/corpus.txt"), CORPUS).unwrap();
    let err = train(
        "32",
        &["--corpus", "folder", "-o", "folder/varn.safetensors"],
    );
    assert!(err.contains("lies inside the corpus folder"), "{err}");
    // The model file is an input too (through a link, so a failing check harms no model).
    std::os::unix::fs::symlink(&gguf, dir.path().join("model.gguf")).unwrap();
    let err = train("32", &["-o", "model.gguf"]);
    assert!(err.contains("is the model file"), "{err}");
    // A pipe is refused before the run, not when the cartridge is written at its end.
    crate::support::fifo(&dir.path().join("out.pipe"));
    let err = train("32", &["-o", "out.pipe"]);
    assert!(err.contains("not a regular file"), "{err}");
    // Nor does reading one wait for a writer.
    let err = cartridge(dir.path(), &["verify", "out.pipe"]).fails();
    assert!(err.contains("not a regular file"), "{err}");
    // Cartridges to compose with are read before the run: one missing, not a cartridge, or
    // the output itself is refused, named.
    let err = train("32", &["--compose-with", "missing.safetensors"]);
    assert!(
        err.contains("--compose-with missing.safetensors") && err.contains("No such file"),
        "{err}"
    );
    let err = train("32", &["--compose-with", "corpus.txt"]);
    assert!(
        err.contains("--compose-with corpus.txt: not a valid safetensors file"),
        "{err}"
    );
    std::fs::write(dir.path().join("partner.safetensors"), b"a partner").unwrap();
    let err = train(
        "32",
        &[
            "--compose-with",
            "partner.safetensors",
            "-o",
            "partner.safetensors",
        ],
    );
    assert!(err.contains("is the input file"), "{err}");
    let err = train("32", &["--work-dir", "./varn.safetensors"]);
    assert!(err.contains("is in the work directory"), "{err}");
    assert!(!dir.path().join("varn.work/conversations.jsonl").exists());
    // One run at a time in a work directory.
    let lock = std::fs::File::create(dir.path().join("varn.work/lock")).unwrap();
    lock.try_lock().unwrap();
    let err = train("32", &[]);
    assert!(
        err.contains("another run is using the work directory"),
        "{err}"
    );
    drop(lock);
    // Nor may the output land among another run's conversations and checkpoints.
    let err = train("32", &["-o", "varn.work/conversations.jsonl"]);
    assert!(err.contains("is in the work directory"), "{err}");
    for (flag, value) in [("--lr", "0"), ("--lr", "NaN"), ("--rows", "0")] {
        let err = train("32", &[flag, value]);
        assert!(err.contains(flag), "{flag} {value}: {err}");
    }
    // A fresh run (no --resume) refused for its arguments keeps it too.
    let mut fresh = train_args(model, "2");
    fresh.retain(|a| *a != "--resume");
    let at = fresh.iter().position(|a| *a == "--tokens").unwrap();
    fresh[at + 1] = "2";
    let err = cartridge(dir.path(), &fresh).fails();
    assert!(err.contains("cannot hold a system turn"), "{err}");
    // And one that synthesis refuses (its work folder holds another run's conversations).
    std::fs::write(dir.path().join("varn.work/conversations.meta.json"), "{}").unwrap();
    fresh[at + 1] = "32";
    let err = cartridge(dir.path(), &fresh).fails();
    assert!(err.contains("conversations.meta.json"), "{err}");
    // None of the refused runs touched an earlier run's checkpoint.
    assert_eq!(std::fs::read(&checkpoint).unwrap(), b"an earlier run's");

    let eval = |qa: &str, tokens: &str| {
        std::fs::write(dir.path().join("qa.jsonl"), qa).unwrap();
        cartridge(
            dir.path(),
            &[
                "eval",
                "--model",
                model,
                "--corpus",
                "corpus.txt",
                "--qa",
                "qa.jsonl",
                "--tokens",
                tokens,
            ],
        )
        .fails()
    };
    let err = eval(
        &format!("{QA}{{\"question\": \"Who?\", \"answer\": \"\"}}\n"),
        "32",
    );
    assert!(
        err.contains("qa.jsonl:4: the question and the answer must not be empty"),
        "{err}"
    );
    let err = eval(QA, "2");
    assert!(err.contains("cannot hold a system turn"), "{err}");
}

/// `train` with `args` in `dir`, sent SIGINT once its stderr holds `cue`; how it ended and its
/// stderr.
fn interrupted(dir: &Path, args: &[&str], cue: &str) -> (std::process::ExitStatus, String) {
    let mut command = std::process::Command::new(env!("CARGO_BIN_EXE_cartridge"));
    command
        .args(args)
        .current_dir(dir)
        .env("CARTRIDGE_HOME", dir.join("home"))
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped());
    let mut child = crate::support::foreground(&mut command).spawn().unwrap();
    let stderr = child.stderr.take().unwrap();
    interrupt_at(&mut child, stderr, cue)
}

/// Sends `child` SIGINT once what it writes to `output` holds `cue`, and waits for it to end:
/// how it ended, and all it wrote. A cue that never comes, or a child that ends first, fails
/// the test instead of hanging it.
#[allow(unsafe_code)]
fn interrupt_at(
    child: &mut std::process::Child,
    mut output: impl std::io::Read + Send + 'static,
    cue: &str,
) -> (std::process::ExitStatus, String) {
    use std::sync::mpsc::RecvTimeoutError;
    use std::time::{Duration, Instant};
    let (sent, received) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut buffer = [0u8; 4096];
        while let Ok(n @ 1..) = output.read(&mut buffer) {
            if sent.send(buffer[..n].to_vec()).is_err() {
                break;
            }
        }
    });
    let mut written = Vec::new();
    let text = |written: &[u8]| String::from_utf8_lossy(written).into_owned();
    let deadline = Instant::now() + Duration::from_secs(300);
    while !text(&written).contains(cue) {
        match received.recv_timeout(Duration::from_secs(1)) {
            Ok(bytes) => written.extend(bytes),
            Err(RecvTimeoutError::Timeout) if Instant::now() < deadline => {}
            Err(RecvTimeoutError::Timeout) => {
                let _ = child.kill();
                panic!("no {cue:?} in time: {}", text(&written));
            }
            Err(RecvTimeoutError::Disconnected) => {
                let status = child.wait().unwrap();
                panic!("it ended ({status}) before {cue:?}: {}", text(&written));
            }
        }
    }
    // SAFETY: a signal to a child of this process, not yet waited for.
    assert_eq!(unsafe { libc::kill(child.id() as i32, libc::SIGINT) }, 0);
    let status = crate::support::exit_within(child, Duration::from_secs(300))
        .unwrap_or_else(|| panic!("it did not stop: {}", text(&written)));
    while let Ok(bytes) = received.recv_timeout(Duration::from_secs(10)) {
        written.extend(bytes);
    }
    (status, text(&written))
}

#[test]
fn ctrl_c_stops_a_run_where_the_same_command_goes_on() {
    use std::os::unix::process::ExitStatusExt;
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("corpus.txt"), CORPUS).unwrap();
    let gguf = smollm2_gguf();
    let model = path_str(&gguf);
    // Training: far more steps than it will take, and no checkpoints but the one Ctrl-C makes.
    let mut args = baseline_args(model, "stopped.safetensors", &["--checkpoint-every", "0"]);
    args.extend(next_token_flags("100000"));
    let (status, said) = interrupted(dir.path(), &args, "training: step 1/100000");
    // It ends as Ctrl-C's default would (a shell script running it stops too), having said at
    // once what it does.
    assert_eq!(status.signal(), Some(libc::SIGINT), "{said}");
    let stopping = said.find("stopping where the run's work is kept");
    assert!(
        stopping.is_some_and(|at| said[at..].contains("stopped at step")),
        "{said}"
    );
    let step: usize = said
        .split_once("stopped at step ")
        .and_then(|(_, rest)| rest.split(' ').next()?.parse().ok())
        .unwrap_or_else(|| panic!("no step said: {said}"));
    assert!(said.contains("of 100000, kept in stopped.work/checkpoint.safetensors"));
    assert!(!dir.path().join("stopped.safetensors").exists());
    // A resume starts from that step: asked for one more, it makes one.
    let further = (step + 1).to_string();
    let mut args = with_flags(args, &["--steps", &further]);
    args.extend(["--resume", "--json"]);
    let resumed = cartridge(dir.path(), &args).json();
    assert_eq!(resumed["steps"], step + 1);

    // Synthesis: batches of one conversation, stopped after the one being made, which is
    // kept.
    let mut args = train_args(model, "2");
    args.retain(|a| *a != "--json");
    let args = with_flags(args, &["--conversations", "6", "--per-chunk", "1"]);
    let (status, said) = interrupted(dir.path(), &args, "synthesis: 0/6");
    assert_eq!(status.signal(), Some(libc::SIGINT), "{said}");
    let done: usize = said
        .split_once("stopped after ")
        .and_then(|(_, rest)| rest.split(' ').next()?.parse().ok())
        .unwrap_or_else(|| panic!("no count said: {said}"));
    // (A batch whose conversation came out empty stores none.)
    assert!(done < 6, "{said}");
    let stored = std::fs::read_to_string(dir.path().join("varn.work/conversations.jsonl")).unwrap();
    assert_eq!(stored.lines().count(), done);
    // The same command makes the rest and trains.
    let mut args = args;
    args.push("--json");
    let finished = cartridge(dir.path(), &args).json();
    assert_eq!(finished["conversations"], 6);
}

#[test]
fn a_terminal_shows_each_phase_and_a_stop_once() {
    use std::os::unix::process::ExitStatusExt;
    use std::process::{Command, Stdio};
    const COLUMNS: u16 = 100;
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("corpus.txt"), CORPUS).unwrap();
    let gguf = smollm2_gguf();
    let mut args = train_args(path_str(&gguf), "100000");
    args.retain(|a| !matches!(*a, "--json" | "--resume"));
    let (master, slave) = terminal(COLUMNS);
    let mut command = Command::new(env!("CARGO_BIN_EXE_cartridge"));
    command
        .args(&args)
        .current_dir(dir.path())
        .env("CARTRIDGE_HOME", dir.path().join("home"))
        .env("TERM", "xterm")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::from(slave));
    let mut child = crate::support::foreground(&mut command).spawn().unwrap();
    // The terminal's last writer is the child now: once it ends, reading gives an error.
    drop(command);
    let terminal = std::fs::File::from(master);
    let (status, output) = interrupt_at(&mut child, terminal, "/100000 steps");
    assert_eq!(status.signal(), Some(libc::SIGINT));
    let shown = screen(&output, COLUMNS.into());
    let said = shown.join("\n");
    // Top to bottom: the synthesis done, the stop said, the training bar where it stopped (one,
    // no copy left above), where its work is.
    let done = shown
        .iter()
        .position(|line| line.starts_with("synthesis: 3 conversations in "))
        .unwrap_or_else(|| panic!("no synthesis line: {said}"));
    assert_eq!(
        shown[done + 1],
        "stopping where the run's work is kept (Ctrl-C again stops at once)",
        "{said}"
    );
    assert!(shown[done + 2].starts_with("training  ["), "{said}");
    assert!(shown[done + 3].starts_with("stopped at step "), "{said}");
    let bars = shown.iter().filter(|line| line.contains("] ")).count();
    assert_eq!(bars, 1, "{said}");
}

/// A pseudo-terminal `columns` wide: its controlling side and the side a command writes to,
/// both closed on exec (another test's command must not hold it open).
fn terminal(columns: u16) -> (std::os::fd::OwnedFd, std::os::fd::OwnedFd) {
    use rustix::fs::{Mode, OFlags};
    use rustix::pty::{OpenptFlags, grantpt, openpt, ptsname, unlockpt};
    let master = openpt(OpenptFlags::RDWR | OpenptFlags::NOCTTY | OpenptFlags::CLOEXEC).unwrap();
    grantpt(&master).unwrap();
    unlockpt(&master).unwrap();
    let name = ptsname(&master, Vec::new()).unwrap();
    let flags = OFlags::RDWR | OFlags::NOCTTY | OFlags::CLOEXEC;
    let slave = rustix::fs::open(name.as_c_str(), flags, Mode::empty()).unwrap();
    let size = rustix::termios::Winsize {
        ws_row: 40,
        ws_col: columns,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    rustix::termios::tcsetwinsize(&master, size).unwrap();
    (master, slave)
}

/// What a terminal `width` columns wide shows of `output`, its lines that are not blank, with
/// no trailing blanks. It knows what the bars and the log write: carriage returns, line feeds,
/// erasing a line, moving up and down, colours (dropped), and a full line's wrap.
fn screen(output: &str, width: usize) -> Vec<String> {
    let mut lines: Vec<Vec<char>> = Vec::new();
    let (mut row, mut column) = (0usize, 0usize);
    let mut chars = output.chars().peekable();
    while let Some(c) = chars.next() {
        if lines.len() <= row {
            lines.resize(row + 1, Vec::new());
        }
        match c {
            '\r' => column = 0,
            '\n' => row += 1,
            '\x1b' if chars.next_if_eq(&'[').is_some() => {
                let mut argument = String::new();
                while let Some(digit) = chars.next_if(|d| d.is_ascii_digit() || *d == ';') {
                    argument.push(digit);
                }
                let n = argument.parse().unwrap_or(1);
                match chars.next() {
                    Some('A') => row = row.saturating_sub(n),
                    Some('B') => row += n,
                    Some('K') if argument == "2" => lines[row].clear(),
                    Some('K') => lines[row].truncate(column),
                    _ => {}
                }
            }
            c => {
                if column == width {
                    row += 1;
                    column = 0;
                    if lines.len() <= row {
                        lines.resize(row + 1, Vec::new());
                    }
                }
                let line = &mut lines[row];
                if line.len() <= column {
                    line.resize(column + 1, ' ');
                }
                line[column] = c;
                column += 1;
            }
        }
    }
    lines
        .iter()
        .map(|line| line.iter().collect::<String>().trim_end().to_owned())
        .filter(|line| !line.is_empty())
        .collect()
}
