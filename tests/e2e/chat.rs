//! `cartridge chat` on the real small model: a question answered with a cartridge in context.

use std::io::Write;
use std::path::Path;
use std::process::{Command, Stdio};

use serde_json::Value;

use crate::support::{Registry, Run, cartridge, path_str, random_cartridge, smollm2_gguf};
use crate::trainer::{CORPUS, QA};

pub(crate) const QUESTION: &str = "Who built the lighthouse on Varn Island?";

pub(crate) const KELL: &str = "The harbour wall at Kell was raised in 1790 by the mason Ansel Drury, with \
granite brought by barge from the quarries of Tennock. It shelters forty fishing boats, and its \
lamp is lit by the harbour master at dusk. In 1851 a second wall was added to the east, and the \
old fish market beside it became the customs house, where tolls are paid in silver.";

pub(crate) const KELL_QUESTION: &str = "Who raised the harbour wall at Kell?";

/// `chat` with `args`, reading `stdin`.
fn chat(dir: &Path, args: &[&str], stdin: &str) -> Run {
    let mut child = Command::new(env!("CARGO_BIN_EXE_cartridge"))
        .arg("chat")
        .args(args)
        .current_dir(dir)
        .env("CARTRIDGE_HOME", dir.join("home"))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("the cartridge binary runs");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(stdin.as_bytes())
        .unwrap();
    Run::from(child.wait_with_output().unwrap())
}

#[test]
fn chat_answers_from_a_cartridge() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("corpus.txt"), CORPUS).unwrap();
    std::fs::write(dir.path().join("qa.jsonl"), QA).unwrap();
    let gguf = smollm2_gguf();
    let model = path_str(&gguf);
    // The initialization alone: the keys and values of the corpus's first sentences in a
    // system turn, which name the builder.
    let args = [
        "train",
        "--model",
        model,
        "--corpus",
        "corpus.txt",
        "--tokens",
        "64",
        "--steps",
        "0",
        "-o",
        "varn.safetensors",
    ];
    cartridge(dir.path(), &args).ok();

    let greedy = ["--model", model, "--temperature", "0", "--max-tokens", "40"];
    let asked = |extra: &[&str], stdin: &str| {
        let args = [&["varn.safetensors"][..], extra, &greedy].concat();
        chat(dir.path(), &args, stdin)
    };
    let answer = asked(&[QUESTION], "").ok();
    assert!(answer.contains("Edda Morrow"), "{answer}");
    assert!(
        answer.ends_with('\n') && !answer.ends_with("\n\n"),
        "{answer:?}"
    );

    // Streamed, the answer reads as `eval` generates it with that cartridge.
    let report = cartridge(
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
            "--samples",
            "1",
            "--max-answer-tokens",
            "40",
            "--json",
        ],
    )
    .json();
    let modes = report["modes"].as_array().unwrap();
    let with_cartridge = modes
        .iter()
        .find(|m| m["mode"] == "cartridge: varn.safetensors")
        .unwrap();
    let sample = &with_cartridge["samples"][0];
    assert_eq!(sample["question"], QUESTION);
    assert_eq!(answer.trim_end(), sample["generated"]);

    // Without a question, each line is a turn of one conversation; --json writes a line each.
    let follow_up = "When was it built?";
    let turns = asked(&["--json"], &format!("{QUESTION}\n{follow_up}\n")).ok();
    let turns: Vec<Value> = turns
        .lines()
        .map(|line| serde_json::from_str(line).unwrap())
        .collect();
    assert_eq!(turns.len(), 2, "{turns:?}");
    assert_eq!(turns[0]["question"], QUESTION);
    // Streamed, the answer is the whole answer and a line break, byte for byte.
    assert_eq!(
        format!("{}\n", turns[0]["answer"].as_str().unwrap()),
        answer
    );
    // The second answer reads the first turn: alone, the question is answered otherwise.
    let alone = asked(&["--json", follow_up], "").json();
    assert_eq!(turns[1]["question"], follow_up);
    assert_ne!(turns[1]["answer"], alone["answer"], "{turns:?}");
    // An empty line ends the conversation.
    let ended = asked(&["--json"], &format!("{QUESTION}\n\n{follow_up}\n")).ok();
    assert_eq!(ended.lines().count(), 1, "{ended}");

    // Without --model: the installed alias the cartridge was trained for.
    let defaulted = ["varn.safetensors", QUESTION, "--temperature", "0"];
    let err = chat(dir.path(), &defaulted, "").fails();
    assert!(
        err.contains("varn.safetensors is for smollm2-135m, which is not installed: run `cartridge model install smollm2-135m`"),
        "{err}"
    );
    let models = dir.path().join("home/cache/models");
    std::fs::create_dir_all(&models).unwrap();
    let package = gguf.parent().unwrap().parent().unwrap();
    std::os::unix::fs::symlink(package, models.join(package.file_name().unwrap())).unwrap();
    let defaulted = chat(
        dir.path(),
        &[&defaulted[..], &["--max-tokens", "40"]].concat(),
        "",
    );
    assert_eq!(defaulted.ok(), answer);

    // Composed: a cartridge of another corpus follows the first.
    std::fs::write(dir.path().join("kell.txt"), KELL).unwrap();
    let mut kell = args;
    kell[4] = "kell.txt";
    kell[10] = "kell.safetensors";
    cartridge(dir.path(), &kell).ok();
    let composed = asked(&[KELL_QUESTION, "--with", "kell.safetensors"], "").ok();
    // As the two composed into one file answer. (Two initializations compose poorly, unlike
    // trained cartridges: the answer need not name the mason.)
    let both = [
        "compose",
        "varn.safetensors",
        "kell.safetensors",
        "-o",
        "both.safetensors",
    ];
    cartridge(dir.path(), &both).ok();
    let args = [&["both.safetensors", KELL_QUESTION][..], &greedy].concat();
    assert_eq!(chat(dir.path(), &args, "").ok(), composed);

    // A cartridge of another model is refused, named.
    random_cartridge(&dir.path().join("other.safetensors"), 30, 8, "other", None);
    let err = asked(&[QUESTION, "--with", "other.safetensors"], "").fails();
    assert!(
        err.contains("other.safetensors: this cartridge is for another model"),
        "{err}"
    );
    let err = chat(dir.path(), &["other.safetensors", QUESTION], "").fails();
    assert!(
        err.contains("other.safetensors is for a model with weights blake3:"),
        "{err}"
    );
    assert!(err.contains("name it with --model"), "{err}");
    // A path that is no file and no reference, and one that reads as a mistyped path.
    let err = chat(dir.path(), &["no such.safetensors", QUESTION], "").fails();
    assert!(
        err.contains("no such.safetensors is not a file, and not a reference"),
        "{err}"
    );
    let err = chat(dir.path(), &["missing/varn.safetensors", QUESTION], "").fails();
    assert!(
        err.contains("there is no file missing/varn.safetensors; as a reference: "),
        "{err}"
    );
    let err = asked(&["  "], "").fails();
    assert!(err.contains("the question is empty"), "{err}");
    let long = "lighthouse ".repeat(9000);
    let err = asked(&[&long], "").fails();
    assert!(
        err.contains(
            "the question does not fit in the model's 8192 positions after the cartridges' 64"
        ),
        "{err}"
    );
    let err = asked(&[QUESTION, "--top-p", "0"], "").fails();
    assert!(
        err.contains("expected a number above 0 and at most 1"),
        "{err}"
    );

    // From a registry: pulled into the cache, then answered.
    let registry = Registry::start(dir.path());
    let token = registry.token(&["lore/*:push"]);
    registry
        .cartridge(
            dir.path(),
            &token,
            &["push", "lore/varn@v1", "varn.safetensors"],
        )
        .ok();
    let mut command = registry.command(dir.path(), &token, &["chat", "lore/varn@v1", QUESTION]);
    command.args(greedy);
    let pulled = Run::from(command.output().unwrap());
    assert_eq!(pulled.ok(), answer);
}
