//! `cartridge serve` on the real small model: OpenAI's chat completions with cartridges from a
//! real registry, fetched by the loader in the server.

use std::path::Path;
use std::process::{Child, Command, Stdio};

use serde_json::{Value, json};

use crate::chat::{KELL, KELL_QUESTION, QUESTION};
use crate::support::{
    Registry, Run, cartridge, exchange, exit_within, foreground, http_json, listening, path_str,
    random_cartridge, raw_http, smollm2_gguf,
};
use crate::trainer::CORPUS;

/// A real `cartridge serve`, killed when dropped.
struct Server {
    child: Child,
    url: String,
}

impl Server {
    fn start(mut command: Command) -> Self {
        let mut child = foreground(&mut command)
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("cartridge serve starts");
        let url = listening(&mut child);
        Self { child, url }
    }

    fn ask(&self, body: &Value) -> (u16, Value) {
        http_json(&self.url, "POST", "/v1/chat/completions", Some(body))
    }

    /// Asks with `"stream": true`; the data of each event.
    fn stream(&self, path: &str, body: &Value) -> Vec<String> {
        let raw = exchange(
            &self.url,
            "HTTP/1.1",
            "POST",
            path,
            &[("Content-Type", "application/json")],
            body.to_string().as_bytes(),
        );
        let (head, body) = raw.split_once("\r\n\r\n").unwrap();
        assert!(head.starts_with("HTTP/1.1 200"), "{raw}");
        assert!(head.contains("text/event-stream"), "{head}");
        assert!(head.contains("chunked"), "{head}");
        unchunk(body)
            .split("\n\n")
            .filter_map(|event| event.strip_prefix("data: "))
            .map(str::to_owned)
            .collect()
    }

    /// Asks for something the server refuses: its status and error (`message`, `param`, …).
    fn refuses(&self, body: &Value) -> (u16, Value) {
        let (status, answer) = self.ask(body);
        assert!(status >= 400, "{status}: {answer}");
        let kind = if status < 500 {
            "invalid_request_error"
        } else {
            "server_error"
        };
        assert_eq!(answer["error"]["type"], kind, "{answer}");
        (status, answer["error"].clone())
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A body sent with `Transfer-Encoding: chunked`, put back together.
fn unchunk(mut body: &str) -> String {
    let mut whole = String::new();
    loop {
        let (size, rest) = body.split_once("\r\n").expect("a chunk size");
        let size = usize::from_str_radix(size.trim(), 16).expect("a hex chunk size");
        if size == 0 {
            return whole;
        }
        whole.push_str(&rest[..size]);
        body = rest[size..].strip_prefix("\r\n").expect("a chunk's end");
    }
}

fn question(text: &str) -> Value {
    json!([{"role": "user", "content": text}])
}

fn content(answer: &Value, index: usize) -> &str {
    answer["choices"][index]["message"]["content"]
        .as_str()
        .unwrap_or_else(|| panic!("no content in {answer}"))
}

/// A streamed answer put together, checked against OpenAI's chunk format: each answer's text,
/// each one's finish_reason, and the usage if it came.
fn streamed_answers(mut events: Vec<String>, choices: usize) -> (Vec<String>, Vec<Value>, Value) {
    assert_eq!(events.pop().as_deref(), Some("[DONE]"), "{events:?}");
    let chunks: Vec<Value> = events
        .iter()
        .map(|e| serde_json::from_str(e).unwrap())
        .collect();
    assert!(chunks.iter().all(|c| c["object"] == "chat.completion.chunk"
        && c["id"] == chunks[0]["id"]
        && c["created"] == chunks[0]["created"]));
    for (index, choice) in chunks[0]["choices"].as_array().unwrap().iter().enumerate() {
        assert_eq!(choice["index"], index);
        assert_eq!(choice["delta"]["role"], "assistant");
    }
    let (mut texts, mut reasons) = (vec![String::new(); choices], vec![Value::Null; choices]);
    let mut usage = Value::Null;
    for chunk in &chunks[1..] {
        if let Some(counted) = chunk.get("usage") {
            assert_eq!(chunk["choices"], json!([]));
            usage = counted.clone();
        }
        for choice in chunk["choices"].as_array().unwrap() {
            let index = choice["index"].as_u64().unwrap() as usize;
            // Nothing after an answer's end.
            assert!(reasons[index].is_null(), "{chunk}");
            texts[index].push_str(choice["delta"]["content"].as_str().unwrap_or_default());
            reasons[index] = choice["finish_reason"].clone();
        }
    }
    assert!(reasons.iter().all(Value::is_string), "{reasons:?}");
    (texts, reasons, usage)
}

/// `cartridge chat`'s greedy answer, for the server's to match.
fn chat(dir: &Path, model: &str, args: &[&str]) -> String {
    let greedy = ["--model", model, "--temperature", "0", "--max-tokens", "40"];
    let args = [&["chat"][..], args, &greedy].concat();
    cartridge(dir, &args).ok().trim().to_owned()
}

#[test]
fn serve_answers_with_cartridges_from_a_registry() {
    let dir = tempfile::tempdir().unwrap();
    let at = dir.path();
    std::fs::write(at.join("varn.txt"), CORPUS).unwrap();
    std::fs::write(at.join("kell.txt"), KELL).unwrap();
    let gguf = smollm2_gguf();
    let model = path_str(&gguf);
    // Initialization cartridges: the keys and values of each corpus's first sentences.
    for name in ["varn", "kell"] {
        let (corpus, out) = (format!("{name}.txt"), format!("{name}.safetensors"));
        let args = [
            "train", "--model", model, "--corpus", &corpus, "--tokens", "64",
        ];
        cartridge(at, &[&args[..], &["--steps", "0", "-o", &out]].concat()).ok();
    }
    random_cartridge(&at.join("other.safetensors"), 30, 8, "other", None);
    let registry = Registry::start(at);
    let token = registry.token(&["lore/*:push"]);
    for (reference, file) in [
        ("lore/varn@v1", "varn.safetensors"),
        ("lore/kell@v1", "kell.safetensors"),
        ("lore/other@v1", "other.safetensors"),
    ] {
        registry
            .cartridge(at, &token, &["push", reference, file])
            .ok();
    }

    // Listening where other machines reach it takes saying so.
    let remote = cartridge(at, &["serve", "--model", model, "--listen", "0.0.0.0:0"]).fails();
    assert!(remote.contains("pass --allow-remote"), "{remote}");

    let mut command = registry.command(at, &token, &["serve", "--model", model]);
    command.args(["--listen", "127.0.0.1:0", "--max-tokens", "64", "--shm-dir"]);
    command.arg(at.join("shm"));
    let mut server = Server::start(command);

    let (status, models) = http_json(&server.url, "GET", "/v1/models", None);
    assert_eq!(status, 200, "{models}");
    assert_eq!(models["data"][0]["id"], model, "{models}");

    // A cartridge from the registry answers as `cartridge chat` answers with its file.
    let expected = chat(at, model, &["varn.safetensors", QUESTION]);
    assert!(expected.contains("Edda Morrow"), "{expected}");
    let asked = json!({
        "model": model,
        "messages": question(QUESTION),
        "cartridges": [{"id": "lore/varn@v1"}],
        "temperature": 0,
        "max_tokens": 40,
    });
    let (status, answer) = server.ask(&asked);
    assert_eq!(status, 200, "{answer}");
    assert_eq!(answer["object"], "chat.completion");
    assert_eq!(answer["model"], model);
    assert_eq!(answer["choices"][0]["message"]["role"], "assistant");
    assert_eq!(content(&answer, 0).trim(), expected);
    let usage = &answer["usage"];
    assert_eq!(usage["cartridge_tokens"], 64, "{usage}");
    let prompt = usage["prompt_tokens"].as_u64().unwrap();
    let completion = usage["completion_tokens"].as_u64().unwrap();
    assert!(prompt > 5, "{usage}");
    assert_eq!(usage["total_tokens"].as_u64(), Some(prompt + completion));
    let reason = answer["choices"][0]["finish_reason"].as_str().unwrap();
    match reason {
        // The stop token counts.
        "stop" => assert!(completion <= 40),
        "length" => assert_eq!(completion, 40),
        other => panic!("finish_reason {other}"),
    }
    // Asked again (the cartridge now in memory), the same.
    assert_eq!(server.ask(&asked).1["choices"], answer["choices"]);

    // Streamed, on Tokasaurus's route, a cartridge named by its id alone: the same text in
    // OpenAI's chunks, the usage after the last, then [DONE].
    let mut streamed = asked.clone();
    streamed["stream"] = json!(true);
    streamed["stream_options"] = json!({"include_usage": true});
    streamed["cartridges"] = json!(["lore/varn@v1"]);
    let events = server.stream("/v1/cartridge/chat/completions", &streamed);
    assert!(events.len() >= 6, "{events:?}");
    let (texts, reasons, usage) = streamed_answers(events, 1);
    assert_eq!(texts, [content(&answer, 0)]);
    assert_eq!(reasons, [reason]);
    assert_eq!(usage, answer["usage"]);

    // scripts/ask.py, the demo's client, prints the streamed answer; and a refusal's message.
    let ask = |args: &[&str]| {
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/ask.py");
        Run::from(
            Command::new("python3")
                .arg(script)
                .arg(&server.url)
                .args(args)
                .args(["--max-tokens", "40"])
                .output()
                .unwrap(),
        )
    };
    let printed = ask(&[QUESTION, "--cartridge", "lore/varn@v1"]).ok();
    assert_eq!(printed, format!("{}\n", content(&answer, 0)));
    let err = ask(&[QUESTION, "--cartridge", "lore/none@v1"]).fails();
    assert!(
        err.starts_with("error: ") && err.contains("lore/none@v1"),
        "{err}"
    );

    // Composed in request order, as `chat --with` composes files.
    let expected = chat(
        at,
        model,
        &[
            "varn.safetensors",
            KELL_QUESTION,
            "--with",
            "kell.safetensors",
        ],
    );
    let both = json!({
        "messages": question(KELL_QUESTION),
        "cartridges": [
            {"id": "lore/varn@v1", "force_redownload": false},
            {"id": "lore/kell@v1", "source": null},
        ],
        "temperature": 0,
        "max_tokens": 40,
    });
    let (status, answer) = server.ask(&both);
    assert_eq!(status, 200, "{answer}");
    assert_eq!(content(&answer, 0).trim(), expected);
    assert_eq!(answer["usage"]["cartridge_tokens"], 128);

    // Without cartridges, the model alone; a developer's turn and content in text parts.
    let plain = json!({"messages": question("What is the capital of France?"), "temperature": 0});
    let (status, answer) = server.ask(&plain);
    assert_eq!(status, 200, "{answer}");
    assert!(content(&answer, 0).contains("Paris"), "{answer}");
    assert_eq!(answer["usage"]["cartridge_tokens"], 0);
    let parts = json!({
        "messages": [
            {"role": "developer", "content": "You are a helpful assistant."},
            {"role": "user", "content": [
                {"type": "text", "text": "What is the capital"},
                {"type": "text", "text": " of France?"},
            ]},
        ],
        "temperature": 0,
        "max_completion_tokens": 20,
    });
    let (status, answer) = server.ask(&parts);
    assert_eq!(status, 200, "{answer}");
    assert!(content(&answer, 0).contains("Paris"), "{answer}");

    // A stop string ends the answer before it; a short max_tokens cuts it.
    let mut stopped = asked.clone();
    stopped["stop"] = json!("Morrow");
    let (status, answer) = server.ask(&stopped);
    assert_eq!(status, 200, "{answer}");
    let full = server.ask(&asked).1;
    let cut = content(&answer, 0);
    assert!(
        content(&full, 0).starts_with(cut) && !cut.contains("Morrow"),
        "{cut}"
    );
    assert!(cut.contains("Edda"), "{cut}");
    assert_eq!(answer["choices"][0]["finish_reason"], "stop");
    // Streamed, the same: held back where the answer might reach the stop string, it ends
    // where the model stopped writing the unstreamed one.
    let mut streamed = stopped.clone();
    streamed["stream"] = json!(true);
    streamed["stream_options"] = json!({"include_usage": true});
    let events = server.stream("/v1/chat/completions", &streamed);
    let (texts, reasons, usage) = streamed_answers(events, 1);
    assert_eq!(
        (texts, reasons),
        (vec![cut.to_owned()], vec![json!("stop")])
    );
    assert_eq!(usage, answer["usage"]);
    assert!(usage["completion_tokens"].as_u64() < full["usage"]["completion_tokens"].as_u64());
    let mut short = asked.clone();
    short["max_completion_tokens"] = json!(3);
    let answer = server.ask(&short).1;
    assert_eq!(answer["choices"][0]["finish_reason"], "length", "{answer}");
    assert_eq!(answer["usage"]["completion_tokens"], 3);

    // Several answers, sampled: a seed repeats them.
    let sampled = json!({
        "messages": question(QUESTION),
        "cartridges": ["lore/varn@v1"],
        "n": 3,
        "seed": 7,
        "max_tokens": 12,
    });
    let (status, answer) = server.ask(&sampled);
    assert_eq!(status, 200, "{answer}");
    assert_eq!(answer["choices"].as_array().unwrap().len(), 3);
    assert_eq!(answer["choices"][2]["index"], 2);
    assert_eq!(server.ask(&sampled).1["choices"], answer["choices"]);
    let drawn: Vec<&str> = (0..3).map(|i| content(&answer, i)).collect();
    assert!(drawn.iter().any(|d| *d != drawn[0]), "{drawn:?}");
    let mut reseeded = sampled.clone();
    reseeded["seed"] = json!(8);
    assert_ne!(server.ask(&reseeded).1["choices"], answer["choices"]);
    // Streamed, each answer's chunks carry its index, and add up to the same answers.
    let mut streamed = sampled.clone();
    streamed["stream"] = json!(true);
    let events = server.stream("/v1/chat/completions", &streamed);
    let (texts, reasons, _) = streamed_answers(events, 3);
    assert_eq!(texts, drawn);
    let finished: Vec<&Value> = (0..3)
        .map(|i| &answer["choices"][i]["finish_reason"])
        .collect();
    assert_eq!(reasons.iter().collect::<Vec<_>>(), finished);
    // top_p 0 leaves the most likely token alone.
    let mut narrowest = asked.clone();
    narrowest["temperature"] = json!(1);
    narrowest["top_p"] = json!(0);
    assert_eq!(server.ask(&narrowest).1["choices"], full["choices"]);

    // Bad requests: named, with OpenAI's error shape and a fitting status.
    let with = |field: &str, value: Value| {
        let mut body = asked.clone();
        body[field] = value;
        body
    };
    let cases = [
        (
            with("cartridges", json!(["lore/none@v1"])),
            404,
            "lore/none@v1",
        ),
        (with("cartridges", json!(["no ref"])), 400, "no ref"),
        (
            with(
                "cartridges",
                json!([{"id": "lore/varn@v1", "source": "wandb"}]),
            ),
            400,
            "cartridges[0]: the source \"wandb\" is not taken",
        ),
        (
            with("cartridges", json!(["lore/other@v1"])),
            409,
            "lore/other@v1",
        ),
        (
            with("model", json!("gpt-4o")),
            404,
            "the model \"gpt-4o\" is not served here",
        ),
        (with("temperature", json!(3)), 400, "temperature is 3"),
        (with("top_p", json!(1.5)), 400, "top_p is 1.5"),
        (with("n", json!(-1)), 400, "n: invalid value: integer `-1`"),
        (
            with("max_tokens", json!("10")),
            400,
            "max_tokens: invalid type: string",
        ),
        (with("messages", json!(null)), 400, "there are no messages"),
        (
            with(
                "messages",
                json!([{"role": "user", "content": "Hi", "tool_calls": [{"id": "1"}]}]),
            ),
            400,
            "messages[0].tool_calls is not supported",
        ),
        (with("n", json!(0)), 400, "n is 0"),
        (with("max_tokens", json!(0)), 400, "max_tokens is 0"),
        (
            with("max_tokens", json!(65)),
            400,
            "over this server's limit of 64",
        ),
        (
            with("stop", json!(["a", "b", "c", "d", "e"])),
            400,
            "at most 4",
        ),
        (with("messages", json!([])), 400, "messages is empty"),
        (
            with(
                "messages",
                json!([{"role": "assistant", "content": "Hello"}]),
            ),
            400,
            "the last message is not the user's",
        ),
        (
            with("messages", json!([{"role": "tool", "content": "42"}])),
            400,
            "the role \"tool\" is not supported",
        ),
        (
            with(
                "messages",
                json!([{"role": "user", "content": [{"type": "image_url"}]}]),
            ),
            400,
            "content of type \"image_url\" is not supported",
        ),
        (
            with("logprobs", json!(true)),
            400,
            "logprobs is not supported",
        ),
        (with("top_k", json!(5)), 400, "top_k is not supported"),
        (
            with("reasoning_effort", json!("high")),
            400,
            "reasoning_effort is not supported",
        ),
        (
            with("stop", json!(5)),
            400,
            "stop: expected a string or a list",
        ),
        (
            with("messages", json!([{"role": "user", "content": 42}])),
            400,
            "messages[0].content is neither text nor a list of text parts",
        ),
        (
            with("messages", question(&"lighthouse ".repeat(9000))),
            400,
            "does not fit in the model's 8192 positions after the cartridges' 64",
        ),
    ];
    for (body, status, message) in cases {
        let (got, error) = server.refuses(&body);
        let said = error["message"].as_str().unwrap();
        assert_eq!((got, said.contains(message)), (status, true), "{said}");
    }
    // The field at fault is named.
    let (_, error) = server.refuses(&with("temperature", json!(3)));
    assert_eq!(error["param"], "temperature");
    let (_, error) = server.refuses(&with("n", json!("two")));
    assert_eq!(error["param"], "n");
    let (_, error) = server.refuses(&with("model", json!("gpt-4o")));
    assert_eq!(
        (&error["param"], &error["code"]),
        (&json!("model"), &json!("model_not_found"))
    );
    let (_, error) = server.refuses(&with("cartridges", json!(["lore/other@v1"])));
    assert_eq!(
        (&error["param"], &error["code"]),
        (&json!("cartridges"), &json!("model_mismatch"))
    );
    // A conversation that leaves fewer positions than max_tokens asks for: its length found
    // from what two shorter ones take.
    let prompt_tokens = |words: usize| {
        let mut body = with("messages", question(&"lighthouse ".repeat(words)));
        body["max_tokens"] = json!(1);
        let (status, answer) = server.ask(&body);
        assert_eq!(status, 200, "{answer}");
        answer["usage"]["prompt_tokens"].as_u64().unwrap() as usize
    };
    let (hundred, two_hundred) = (prompt_tokens(100), prompt_tokens(200));
    let per_word = (two_hundred - hundred) / 100;
    let around = hundred - 100 * per_word;
    // Some 20 positions left.
    let words = (8192 - 64 - around - 20) / per_word;
    let mut long = with("messages", question(&"lighthouse ".repeat(words)));
    long["max_tokens"] = json!(64);
    let (status, error) = server.refuses(&long);
    let said = error["message"].as_str().unwrap();
    assert_eq!((status, &error["param"]), (400, &json!("max_tokens")));
    assert!(
        said.contains("positions are left after the cartridges' 64"),
        "{said}"
    );
    // Options that ask for nothing, or nothing of the answer, are taken; so is any seed.
    let mut taken = with("logprobs", json!(false));
    taken["user"] = json!("alice");
    taken["stream"] = json!(null);
    taken["seed"] = json!(-3);
    let (status, answer) = server.ask(&taken);
    assert_eq!(status, 200, "{answer}");

    let malformed = raw_http(
        &server.url,
        "POST",
        "/v1/chat/completions",
        &[("Content-Type", "application/json")],
        b"{\"messages\": ",
    );
    assert_eq!(malformed, 400);
    let huge = vec![b' '; 5 << 20];
    let status = raw_http(
        &server.url,
        "POST",
        "/v1/chat/completions",
        &[("Content-Type", "application/json")],
        &huge,
    );
    assert_eq!(status, 413);
    let (status, answer) = http_json(&server.url, "GET", "/v1/chat/completions", None);
    assert_eq!(status, 405, "{answer}");
    assert!(
        answer["error"]["message"]
            .as_str()
            .unwrap()
            .contains("does not take GET")
    );
    let (status, answer) = http_json(&server.url, "GET", "/v1/completions", None);
    assert_eq!(status, 404, "{answer}");
    assert!(
        answer["error"]["message"]
            .as_str()
            .unwrap()
            .contains("/v1/completions")
    );

    // The registry gone, cartridges the server has already fetched still answer.
    drop(registry);
    let (status, again) = server.ask(&asked);
    assert_eq!(status, 200, "{again}");
    assert_eq!(content(&again, 0).trim(), content(&full, 0).trim());

    // A signal stops it.
    let _ = Command::new("kill")
        .args(["-TERM", &server.child.id().to_string()])
        .status();
    let exited = exit_within(&mut server.child, std::time::Duration::from_secs(15));
    assert!(exited.is_some_and(|s| s.success()), "{exited:?}");

    // Without a registry it answers, and says why it cannot fetch cartridges.
    let mut command = Command::new(env!("CARGO_BIN_EXE_cartridge"));
    command
        .args([
            "serve",
            "--model",
            model,
            "--listen",
            "127.0.0.1:0",
            "--queue",
            "1",
        ])
        .current_dir(at)
        .env("CARTRIDGE_HOME", at.join("home"))
        .env_remove("CARTRIDGE_REGISTRY");
    let alone = Server::start(command);
    let (status, error) = alone.refuses(&asked);
    let said = error["message"].as_str().unwrap();
    assert_eq!(status, 400);
    assert!(said.contains("reaches no registry"), "{said}");
    let (status, _) = alone.ask(&plain);
    assert_eq!(status, 200);

    // One answered and one waiting, a third is turned away; once their readers go, the server
    // takes requests again.
    let long = json!({
        "messages": question("Tell me a long story about the sea."),
        "max_tokens": 512,
        "seed": 1,
        "stream": true,
    });
    let answering = open_stream(&alone.url, &long);
    let waiting = open_stream(&alone.url, &long);
    let (status, error) = alone.refuses(&plain);
    assert_eq!(status, 503, "{error}");
    assert!(
        error["message"]
            .as_str()
            .unwrap()
            .contains("the server is busy: the model's queue (its --queue, 1) is full"),
        "{error}"
    );
    drop((answering, waiting));
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(120);
    let status = loop {
        let (status, _) = alone.ask(&plain);
        if status != 503 || std::time::Instant::now() > deadline {
            break status;
        }
        std::thread::sleep(std::time::Duration::from_millis(200));
    };
    assert_eq!(status, 200);
}

/// A streamed request taken in: its connection, once the first event came.
fn open_stream(url: &str, body: &Value) -> std::net::TcpStream {
    use std::io::{Read, Write};
    let address = url.trim_start_matches("http://");
    let mut stream = std::net::TcpStream::connect(address).unwrap();
    stream
        .set_read_timeout(Some(std::time::Duration::from_secs(120)))
        .unwrap();
    let body = body.to_string();
    write!(
        stream,
        "POST /v1/chat/completions HTTP/1.1\r\nHost: {address}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let mut read = Vec::new();
    let mut buffer = [0; 4096];
    while !String::from_utf8_lossy(&read).contains("data: ") {
        let n = stream.read(&mut buffer).unwrap();
        assert!(n > 0, "closed: {}", String::from_utf8_lossy(&read));
        read.extend_from_slice(&buffer[..n]);
    }
    stream
}
