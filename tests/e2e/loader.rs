//! The real `cartridge-loader` against a real registry (host-memory path, as CI has no GPU).

use std::path::Path;
use std::time::Duration;

use cartridge_schemas::file::Cartridge;
use serde_json::{Value, json};

use crate::support::{
    LoaderProcess, Registry, composed_payload, exchange, http_json, payload, random_cartridge,
    raw_http, workspace_binary,
};

/// The model fingerprint the test cartridges are made for.
fn model(dir: &Path, name: &str) -> Value {
    let cartridge = Cartridge::open(&dir.join(name)).unwrap();
    serde_json::to_value(&cartridge.header().model).unwrap()
}

fn load(loader: &LoaderProcess, model: &Value, refs: &[&str]) -> (u16, Value) {
    http_json(
        &loader.url,
        "POST",
        "/v1/load",
        Some(&json!({"model": model, "cartridges": refs})),
    )
}

fn shared_bytes(response: &Value) -> Vec<u8> {
    std::fs::read(response["path"].as_str().unwrap()).unwrap()
}

/// Loads `reference` and checks its buffer holds `file`'s payload byte for byte; the answer.
fn loads_exactly(loader: &LoaderProcess, model: &Value, reference: &str, file: &Path) -> Value {
    let (status, body) = load(loader, model, &[reference]);
    assert_eq!(status, 200, "{body}");
    assert_eq!(shared_bytes(&body), payload(file), "{reference}");
    body
}

fn metric(loader: &LoaderProcess, name: &str) -> f64 {
    crate::support::metric(&loader.url, name)
}

/// The device tier's bytes counted against its budget, the bytes of its resident entries, and
/// the status they come from.
fn device_usage(loader: &LoaderProcess) -> (u64, u64, Value) {
    let status: Value = http_json(&loader.url, "GET", "/v1/status", None).1;
    let used = status["device"]["used"].as_u64().unwrap();
    let resident = status["device"]["entries"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["bytes"].as_u64().unwrap())
        .sum();
    (used, resident, status)
}

/// A registry holding cartridges `a`, `b`, `c` (4 layers, `tokens` tokens each), and a loader.
fn setup(dir: &Path, tokens: u64, loader_args: &[&str]) -> (Registry, LoaderProcess, Value) {
    let registry = Registry::start(dir);
    let token = registry.token(&["team/*:push"]);
    for name in ["a", "b", "c"] {
        let file = format!("{name}.safetensors");
        random_cartridge(&dir.join(&file), 4, tokens, name, None);
        registry
            .cartridge(
                dir,
                &token,
                &[
                    "push",
                    &format!("team/{name}@v1"),
                    &file,
                    "--chunk-size",
                    "64KiB",
                ],
            )
            .ok();
    }
    let loader = LoaderProcess::start(dir, &registry.url, &token, loader_args);
    let model = model(dir, "a.safetensors");
    (registry, loader, model)
}

#[test]
fn cold_warm_and_composed_loads_are_byte_exact() {
    let dir = tempfile::tempdir().unwrap();
    let (registry, loader, model) = setup(dir.path(), 64, &[]);

    let (status, cold) = load(&loader, &model, &["team/a@v1"]);
    assert_eq!(status, 200, "{cold}");
    assert_eq!(cold["tier"], "registry");
    assert_eq!(cold["tokens"], 64);
    // Keys and values are the corpus in another form: not for every local user.
    {
        use std::os::unix::fs::PermissionsExt;
        let path = Path::new(cold["path"].as_str().unwrap());
        for shared in [path, path.parent().unwrap()] {
            let mode = std::fs::metadata(shared).unwrap().permissions().mode();
            assert_eq!(mode & 0o007, 0, "{} is {mode:o}", shared.display());
        }
    }
    assert_eq!(
        shared_bytes(&cold),
        payload(&dir.path().join("a.safetensors"))
    );
    let (_, warm) = load(&loader, &model, &["team/a@v1"]);
    assert_eq!(warm["tier"], "device");
    assert_eq!(
        warm["path"], cold["path"],
        "a warm load shares the resident buffer"
    );
    // Handles are not counted out (one consumer must not guess another's) and are exact in JSON.
    let handles = [&cold, &warm].map(|r| r["handle"].as_u64().unwrap());
    assert!(handles[0].abs_diff(handles[1]) > 1, "{handles:?}");
    assert!(handles.iter().all(|h| *h < 1 << 53), "{handles:?}");

    // Parts of different lengths, so each part's rows must be sized by its own token count.
    random_cartridge(&dir.path().join("d.safetensors"), 4, 16, "d", None);
    registry
        .cartridge(
            dir.path(),
            &registry.token(&["team/*:push"]),
            &["push", "team/d@v1", "d.safetensors"],
        )
        .ok();
    let order = ["team/b@v1", "team/d@v1", "team/a@v1"];
    let (status, composed) = load(&loader, &model, &order);
    assert_eq!(status, 200, "{composed}");
    assert_eq!(composed["tokens"], 144);
    let parts: Vec<&str> = composed["parts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["reference"].as_str().unwrap())
        .collect();
    assert_eq!(parts, order);
    let files = ["b", "d", "a"].map(|name| dir.path().join(format!("{name}.safetensors")));
    assert_eq!(
        shared_bytes(&composed),
        composed_payload(&files.each_ref().map(|p| p.as_path()))
    );
    // Each layer's keys then values, `[kv_heads, tokens, head_dim]` of bf16 each.
    let tensor = 2 * 144 * 64 * 2;
    let layout: Vec<(u64, u64)> = composed["layout"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| (l["keys"].as_u64().unwrap(), l["values"].as_u64().unwrap()))
        .collect();
    assert_eq!(
        layout,
        (0..4)
            .map(|l| (2 * l * tensor, (2 * l + 1) * tensor))
            .collect::<Vec<_>>()
    );

    let status: Value = http_json(&loader.url, "GET", "/v1/status", None).1;
    assert_eq!(status["handles"], 3);
    // Load latencies are histograms, which add up across a fleet.
    let metrics = exchange(&loader.url, "HTTP/1.1", "GET", "/metrics", &[], b"");
    assert!(
        metrics.contains("loader_load_seconds_bucket{tier=\"registry\",le=\"0.1\"}"),
        "{metrics}"
    );
    for response in [&cold, &warm, &composed] {
        let (code, _) = http_json(
            &loader.url,
            "POST",
            "/v1/release",
            Some(&json!({"handle": response["handle"]})),
        );
        assert_eq!(code, 200);
    }
    let (code, body) = http_json(
        &loader.url,
        "POST",
        "/v1/release",
        Some(&json!({"handle": cold["handle"]})),
    );
    assert_eq!(code, 404, "{body}");
    let status: Value = http_json(&loader.url, "GET", "/v1/status", None).1;
    assert!(
        status["device"]["entries"]
            .as_array()
            .unwrap()
            .iter()
            .all(|e| e["refs"] == 0),
        "{status}"
    );
}

#[test]
fn bad_requests_are_named() {
    let dir = tempfile::tempdir().unwrap();
    let (registry, loader, model) = setup(dir.path(), 16, &[]);
    let (status, body) = load(&loader, &model, &["team/nope@v1"]);
    assert_eq!(status, 404);
    assert!(
        body["message"].as_str().unwrap().contains("team/nope@v1"),
        "{body}"
    );
    let mut other = model.clone();
    other["kv_heads"] = 8.into();
    let (status, body) = load(&loader, &other, &["team/a@v1"]);
    assert_eq!(status, 409);
    assert!(
        body["message"]
            .as_str()
            .unwrap()
            .contains("kv_heads differs"),
        "{body}"
    );
    let (status, body) = load(&loader, &model, &["Team/a@v1"]);
    assert_eq!(status, 400);
    assert!(
        body["message"]
            .as_str()
            .unwrap()
            .contains("namespace must be lowercase"),
        "{body}"
    );
    let (status, _) = load(&loader, &model, &[]);
    assert_eq!(status, 400);
    // Each named cartridge costs a resolution and a manifest in memory: a request is bounded.
    let (status, body) = load(&loader, &model, &["team/a@v1"; 65]);
    assert_eq!(status, 400);
    assert!(
        body["message"].as_str().unwrap().contains("at most 64"),
        "{body}"
    );
    let (status, _) = http_json(
        &loader.url,
        "POST",
        "/v1/load",
        Some(&json!({"cartridges": "x"})),
    );
    assert_eq!(status, 400);
    // A reference naming another registry is not served from this one.
    let (status, body) = load(&loader, &model, &["elsewhere.example.com/team/a@v1"]);
    assert_eq!(status, 400);
    assert!(
        body["message"]
            .as_str()
            .unwrap()
            .contains("names the registry elsewhere.example.com"),
        "{body}"
    );
    let own = format!("{}/team/a@v1", registry.url.trim_start_matches("http://"));
    let (status, body) = load(&loader, &model, &[&own]);
    assert_eq!(status, 200, "{body}");
    // A misspelt field is refused, not ignored (a `lease` that was not read never lapses).
    let body = json!({"model": model, "cartridges": ["team/a@v1"], "leas": 5});
    let (status, answer) = http_json(&loader.url, "POST", "/v1/load", Some(&body));
    assert_eq!(status, 400, "{answer}");
    assert!(
        answer["message"]
            .as_str()
            .unwrap()
            .contains("unknown field `leas`"),
        "{answer}"
    );
    // An unknown endpoint, and a body over the limit, get their own status.
    let (status, answer) = http_json(&loader.url, "GET", "/v1/nope", None);
    assert_eq!((status, &answer["code"]), (404, &json!("not_found")));
    let (status, answer) = http_json(&loader.url, "GET", "/v1/load", None);
    assert_eq!(
        (status, &answer["code"]),
        (405, &json!("method_not_allowed"))
    );
    let big = vec![b' '; 3 << 20];
    let answer = exchange(
        &loader.url,
        "HTTP/1.1",
        "POST",
        "/v1/load",
        &[("Content-Type", "application/json")],
        &big,
    );
    assert!(answer.starts_with("HTTP/1.1 413"), "{answer:.200}");
}

#[test]
fn a_hundred_concurrent_loads_share_one_fetch() {
    let dir = tempfile::tempdir().unwrap();
    // Slowed to a few seconds, so every request arrives while the one fetch runs.
    let (_registry, loader, model) = setup(dir.path(), 256, &["--limit-rate", "128KiB"]);
    let responses: Vec<(u16, Value)> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..100)
            .map(|_| scope.spawn(|| load(&loader, &model, &["team/c@v1"])))
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    assert!(responses.iter().all(|(status, _)| *status == 200));
    assert_eq!(metric(&loader, "loader_fetches_total"), 1.0);
    // Each waited on that fetch: none found the blobs already on disk or resident.
    let tiers: std::collections::BTreeSet<&str> = responses
        .iter()
        .map(|(_, r)| r["tier"].as_str().unwrap())
        .collect();
    assert_eq!(tiers, ["registry"].into(), "a load did not join the fetch");
    let paths: std::collections::HashSet<&str> = responses
        .iter()
        .map(|(_, r)| r["path"].as_str().unwrap())
        .collect();
    assert_eq!(paths.len(), 1, "one resident copy");
    assert_eq!(
        shared_bytes(&responses[0].1),
        payload(&dir.path().join("c.safetensors"))
    );
}

#[test]
fn the_device_budget_is_never_exceeded() {
    let dir = tempfile::tempdir().unwrap();
    let size = 4 * 2 * (2 * 64 * 64 * 2); // one cartridge's payload: 4 layers, 64 tokens
    // Room for a composition with its two parts, and a little more: loads sometimes fit only
    // after evicting, sometimes not at all.
    let budget = size * 9 / 2;
    let (_registry, loader, model) =
        setup(dir.path(), 64, &["--gpu-budget", &format!("{budget}B")]);
    let file = |name: &str| dir.path().join(format!("{name}.safetensors"));
    // What each choice loads, and the bytes it must hold.
    let choices: Vec<(Vec<String>, Vec<u8>)> =
        [&["a"][..], &["b"], &["c"], &["a", "b"], &["c", "a"]]
            .iter()
            .map(|names| {
                let files: Vec<_> = names.iter().map(|n| file(n)).collect();
                (
                    names.iter().map(|n| format!("team/{n}@v1")).collect(),
                    composed_payload(&files.iter().map(|p| p.as_path()).collect::<Vec<_>>()),
                )
            })
            .collect();
    let release = |handle: &Value| {
        http_json(
            &loader.url,
            "POST",
            "/v1/release",
            Some(&json!({"handle": handle})),
        )
        .0
    };
    // Four clients at once, each holding what it loaded and checking it is intact after every
    // step: a buffer in use is never evicted or overwritten.
    let (loaded, refused): (Vec<u32>, Vec<u32>) = std::thread::scope(|scope| {
        let clients: Vec<_> = (0..4u64)
            .map(|client| {
                let (loader, model, choices, release) = (&loader, &model, &choices, &release);
                scope.spawn(move || {
                    let mut held: Vec<(Value, &[u8])> = Vec::new();
                    let mut state = client + 7;
                    let (mut loaded, mut refused) = (0, 0);
                    for _ in 0..25 {
                        state = state
                            .wrapping_mul(6364136223846793005)
                            .wrapping_add(1442695040888963407);
                        if state >> 62 == 0 && !held.is_empty() {
                            let (body, _) = held.remove((state >> 32) as usize % held.len());
                            assert_eq!(release(&body["handle"]), 200);
                        } else {
                            let (refs, expected) = &choices[(state >> 40) as usize % choices.len()];
                            let refs: Vec<&str> = refs.iter().map(String::as_str).collect();
                            let (status, body) = load(loader, model, &refs);
                            match status {
                                200 => {
                                    loaded += 1;
                                    held.push((body, expected));
                                }
                                507 => {
                                    refused += 1;
                                    let message = body["message"].as_str().unwrap();
                                    assert!(message.contains("do not fit"), "{body}");
                                    // Let go of the oldest, so the clients do not starve.
                                    if !held.is_empty() {
                                        assert_eq!(release(&held.remove(0).0["handle"]), 200);
                                    }
                                }
                                other => panic!("unexpected {other}: {body}"),
                            }
                        }
                        for (body, expected) in &held {
                            assert!(shared_bytes(body) == *expected, "a held buffer changed");
                        }
                        let (used, resident, status) = device_usage(loader);
                        assert!(
                            used <= budget as u64 && resident <= used,
                            "used {used}, resident {resident}: {status}"
                        );
                    }
                    for (body, _) in held {
                        assert_eq!(release(&body["handle"]), 200);
                    }
                    (loaded, refused)
                })
            })
            .collect();
        clients.into_iter().map(|c| c.join().unwrap()).unzip()
    });
    let (loaded, refused) = (loaded.iter().sum::<u32>(), refused.iter().sum::<u32>());
    assert!(
        loaded > 20 && refused > 0,
        "loaded {loaded}, refused {refused}"
    );
    // Once idle, what the budget counts is exactly what is resident: no reservation leaked.
    let (used, resident, status) = device_usage(&loader);
    assert_eq!(used, resident, "{status}");
    assert!(
        status["device"]["entries"]
            .as_array()
            .unwrap()
            .iter()
            .all(|e| e["refs"] == 0),
        "{status}"
    );
}

#[test]
fn a_resident_composition_is_served_without_its_parts() {
    let dir = tempfile::tempdir().unwrap();
    let size = 4 * 2 * (2 * 64 * 64 * 2); // one cartridge's payload: 4 layers, 64 tokens
    let budget = format!("{}B", size * 4);
    let (_registry, loader, model) = setup(dir.path(), 64, &["--gpu-budget", &budget]);
    let (status, composed) = load(&loader, &model, &["team/a@v1", "team/b@v1"]);
    assert_eq!(status, 200, "{composed}");
    // The budget is full (a, b and their composition); c takes the place of a.
    let (status, body) = load(&loader, &model, &["team/c@v1"]);
    assert_eq!(status, 200, "{body}");
    let a = composed["parts"][0]["digest"].as_str().unwrap();
    let resident: Vec<String> = device_usage(&loader).2["device"]["entries"]
        .as_array()
        .unwrap()
        .iter()
        .map(|entry| entry["key"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(resident.len(), 3, "{resident:?}");
    assert!(!resident.iter().any(|key| key == a), "{resident:?}");
    // Loading the parts again would need room held by c and the composition.
    let (status, again) = load(&loader, &model, &["team/a@v1", "team/b@v1"]);
    assert_eq!(status, 200, "{again}");
    assert_eq!(again["tier"], "device");
    assert_eq!(again["path"], composed["path"]);
    assert_eq!(
        shared_bytes(&again),
        shared_bytes(&composed),
        "the composition itself"
    );
}

#[test]
fn a_corrupted_disk_cache_blob_is_refetched_and_the_disk_cache_survives_restarts() {
    let dir = tempfile::tempdir().unwrap();
    let (mut registry, mut loader, model) = setup(dir.path(), 64, &[]);
    let (_, first) = load(&loader, &model, &["team/a@v1"]);
    assert_eq!(first["tier"], "registry");
    loader.stop();

    // Damage one cached blob; a restarted loader finds out on read and fetches it again.
    let blobs = dir.path().join("loader-cache/blobs");
    let blob = std::fs::read_dir(&blobs)
        .unwrap()
        .next()
        .unwrap()
        .unwrap()
        .path();
    let mut bytes = std::fs::read(&blob).unwrap();
    bytes[10] ^= 0xff;
    std::fs::write(&blob, bytes).unwrap();
    let token = registry.token(&["team/*:pull"]);
    let loader = LoaderProcess::start(dir.path(), &registry.url, &token, &[]);
    loads_exactly(
        &loader,
        &model,
        "team/a@v1",
        &dir.path().join("a.safetensors"),
    );
    assert_eq!(metric(&loader, "loader_corrupt_blobs_total"), 1.0);
    drop(loader);

    // With the registry gone, a restarted loader still serves what its disk holds.
    registry.kill();
    let loader = LoaderProcess::start(dir.path(), &registry.url, &token, &["--retries", "0"]);
    let offline = loads_exactly(
        &loader,
        &model,
        "team/a@v1",
        &dir.path().join("a.safetensors"),
    );
    assert_eq!(offline["tier"], "disk");
    let (status, body) = load(&loader, &model, &["team/b@v1"]);
    assert_eq!(status, 503, "never seen, and the registry is down: {body}");
    let message = body["message"].as_str().unwrap();
    assert!(
        message.contains("resolving team/b@v1 failed: cannot reach http://"),
        "the cause: {body}"
    );
    // Back, the registry serves what was missing, to the same loader.
    registry.restart_in_place(dir.path());
    loads_exactly(
        &loader,
        &model,
        "team/b@v1",
        &dir.path().join("b.safetensors"),
    );
}

/// Prefetch fills the disk cache without taking memory: a later load needs no registry.
#[test]
fn prefetched_cartridges_load_from_disk_with_the_registry_gone() {
    let dir = tempfile::tempdir().unwrap();
    let (mut registry, loader, model) = setup(dir.path(), 64, &[]);
    let body = json!({"cartridges": ["team/a@v1", "team/b@v1"]});
    let (status, parts) = http_json(&loader.url, "POST", "/v1/prefetch", Some(&body));
    assert_eq!(status, 200, "{parts}");
    let named: Vec<&str> = parts
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["reference"].as_str().unwrap())
        .collect();
    assert_eq!(named, ["team/a@v1", "team/b@v1"]);
    assert_eq!(metric(&loader, "loader_fetches_total"), 2.0);
    let (used, _, status) = device_usage(&loader);
    assert_eq!(used, 0, "prefetch holds no memory: {status}");

    registry.kill();
    for name in ["a", "b"] {
        let file = dir.path().join(format!("{name}.safetensors"));
        let body = loads_exactly(&loader, &model, &format!("team/{name}@v1"), &file);
        assert_eq!(body["tier"], "disk");
    }
    let body = json!({"cartridges": ["team/c@v1"]});
    let (status, answer) = http_json(&loader.url, "POST", "/v1/prefetch", Some(&body));
    assert_eq!(status, 503, "{answer}");
}

/// A manifest whose chunks are all real but in the wrong places (made by hand: every chunk
/// checks out) decodes to a payload its header's digest refuses, as a pull refuses it.
#[test]
fn a_manifest_with_chunks_in_the_wrong_places_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let (registry, loader, model) = setup(dir.path(), 64, &[]);
    let token = registry.token(&["team/*:push"]);
    let bearer = format!("Bearer {token}");
    let answer = exchange(
        &registry.url,
        "HTTP/1.0",
        "GET",
        "/v1/repos/team/a/resolve/v1",
        &[("Authorization", &bearer)],
        b"",
    );
    let resolved: Value = serde_json::from_str(answer.split_once("\r\n\r\n").unwrap().1).unwrap();
    let mut manifest = resolved["manifest"].clone();
    let chunks = manifest["chunks"].as_array_mut().unwrap();
    assert!(chunks.len() >= 2, "{chunks:?}");
    assert_eq!(chunks[0]["raw"]["size"], chunks[1]["raw"]["size"]);
    // Layers stay where they are; the bytes that fill them trade places.
    for part in ["stored", "raw", "codec"] {
        let first = chunks[0][part].take();
        chunks[0][part] = chunks[1][part].take();
        chunks[1][part] = first;
    }
    let status = raw_http(
        &registry.url,
        "PUT",
        "/v1/repos/team/a/versions/v9",
        &[
            ("Authorization", &bearer),
            ("Content-Type", "application/json"),
        ],
        manifest.to_string().as_bytes(),
    );
    assert_eq!(status, 201);
    let (status, answer) = load(&loader, &model, &["team/a@v9"]);
    assert_eq!(status, 500, "{answer}");
    assert!(
        answer["message"]
            .as_str()
            .unwrap()
            .contains("is inconsistent: its chunks decode to a payload whose digest is"),
        "{answer}"
    );
    // The consistent version still loads, byte for byte.
    loads_exactly(
        &loader,
        &model,
        "team/a@v1",
        &dir.path().join("a.safetensors"),
    );
}

/// Loads of one reference at once share one ask of the registry and all see its answer: a tag
/// moved since it was last resolved is served stale to none of them.
#[test]
fn concurrent_loads_of_a_moved_tag_all_see_it_moved() {
    let dir = tempfile::tempdir().unwrap();
    let (registry, loader, model) = setup(dir.path(), 16, &["--resolve-ttl", "0s"]);
    let token = registry.token(&["team/*:push"]);
    let cli = |args: &[&str]| registry.cartridge(dir.path(), &token, args).ok();
    cli(&["push", "team/a@v2", "c.safetensors"]);
    cli(&["tag", "team/a@v1", "stable"]);
    let digest = |answer: &Value| answer["parts"][0]["digest"].as_str().unwrap().to_owned();
    let (_, v1) = load(&loader, &model, &["team/a@v1"]);
    let (_, v2) = load(&loader, &model, &["team/a@v2"]);
    let (_, first) = load(&loader, &model, &["team/a@stable"]);
    assert_eq!(digest(&first), digest(&v1));
    cli(&["tag", "team/a@v2", "stable"]);
    let seen: Vec<String> = std::thread::scope(|threads| {
        let loads: Vec<_> = (0..8)
            .map(|_| threads.spawn(|| digest(&load(&loader, &model, &["team/a@stable"]).1)))
            .collect();
        loads.into_iter().map(|l| l.join().unwrap()).collect()
    });
    assert!(seen.iter().all(|d| *d == digest(&v2)), "{seen:?}");
}

/// A reference the registry said is gone is not served from the loader's memory once the
/// registry is unreachable.
#[test]
fn a_deleted_tag_is_not_served_from_memory() {
    let dir = tempfile::tempdir().unwrap();
    let (mut registry, loader, model) = setup(dir.path(), 16, &["--resolve-ttl", "0s"]);
    let token = registry.token(&["team/*:push"]);
    let cli = |args: &[&str]| registry.cartridge(dir.path(), &token, args).ok();
    cli(&["tag", "team/a@v1", "gone"]);
    let (status, answer) = load(&loader, &model, &["team/a@gone"]);
    assert_eq!(status, 200, "{answer}");
    cli(&["rm", "team/a@gone"]);
    let (status, answer) = load(&loader, &model, &["team/a@gone"]);
    assert_eq!(status, 404, "{answer}");
    registry.kill();
    let (status, answer) = load(&loader, &model, &["team/a@gone"]);
    assert_eq!(status, 503, "{answer}");
}

/// A prefetch that cannot fit the disk cache is refused rather than reported done with its
/// early cartridges evicted by its later ones.
#[test]
fn a_prefetch_over_the_disk_cap_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let (_registry, loader, _model) = setup(dir.path(), 64, &["--disk-cap", "1KiB"]);
    let body = json!({"cartridges": ["team/a@v1", "team/b@v1"]});
    let (status, answer) = http_json(&loader.url, "POST", "/v1/prefetch", Some(&body));
    assert_eq!(status, 507, "{answer}");
    assert!(
        answer["message"]
            .as_str()
            .unwrap()
            .contains("over the cache's cap of 1024"),
        "{answer}"
    );
    assert_eq!(metric(&loader, "loader_fetches_total"), 0.0);
}

/// A registry that takes connections and never answers holds no load of a cartridge resolved
/// before: after a short wait, its remembered resolution serves.
#[test]
fn a_hung_registry_does_not_hold_loads_of_known_cartridges() {
    let dir = tempfile::tempdir().unwrap();
    let (registry, loader, model) = setup(dir.path(), 16, &["--resolve-ttl", "0s"]);
    let file = dir.path().join("a.safetensors");
    let body = loads_exactly(&loader, &model, "team/a@v1", &file);
    assert_eq!(body["tier"], "registry");
    registry.signal("STOP");
    let body = loads_exactly(&loader, &model, "team/a@v1", &file);
    registry.signal("CONT");
    assert_eq!(body["tier"], "device");
}

/// A signal stops the loader once requests in flight finish, or after a grace however slow they
/// are (an orchestrator would kill it, leaving its buffers behind); its buffers go with it.
#[test]
fn a_signalled_loader_stops_within_its_grace() {
    let dir = tempfile::tempdir().unwrap();
    // 512 KiB at 1 KiB/s: a load that would run for minutes.
    let (_registry, mut loader, model) = setup(dir.path(), 256, &["--limit-rate", "1KiB"]);
    let url = loader.url.clone();
    let body = json!({"model": model, "cartridges": ["team/c@v1"]});
    std::thread::spawn(move || http_json(&url, "POST", "/v1/load", Some(&body)));
    let partial = dir.path().join("loader-cache/partial");
    let started = std::time::Instant::now();
    while std::fs::read_dir(&partial).map_or(0, |d| d.count()) == 0 {
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "the load never began"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(
        loader.stops_within(Duration::from_secs(120)),
        "still running two minutes after the signal"
    );
    let left: Vec<_> = std::fs::read_dir(dir.path().join("shm")).unwrap().collect();
    assert!(left.is_empty(), "{left:?}");
}

#[test]
fn a_registry_killed_mid_load_fails_the_load_then_recovers() {
    let dir = tempfile::tempdir().unwrap();
    let registry_dir = dir.path();
    let mut registry = Registry::start(registry_dir);
    let token = registry.token(&["team/*:push"]);
    random_cartridge(&dir.path().join("big.safetensors"), 16, 2048, "big", None);
    registry
        .cartridge(
            dir.path(),
            &token,
            &[
                "push",
                "team/big@v1",
                "big.safetensors",
                "--chunk-size",
                "1MiB",
            ],
        )
        .ok();
    let loader = LoaderProcess::start(
        dir.path(),
        &registry.url,
        &token,
        &["--limit-rate", "4MiB", "--jobs", "2", "--retries", "1"],
    );
    let model = model(dir.path(), "big.safetensors");

    let loading = std::thread::scope(|scope| {
        let request = scope.spawn(|| load(&loader, &model, &["team/big@v1"]));
        let blobs = dir.path().join("loader-cache/blobs");
        let started = std::time::Instant::now();
        while std::fs::read_dir(&blobs).map_or(0, |d| d.count()) < 2 {
            assert!(
                started.elapsed() < Duration::from_secs(60),
                "no blob arrived"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        registry.kill();
        request.join().unwrap()
    });
    assert_eq!(loading.0, 503, "{}", loading.1);
    // Only verified blobs are in the disk cache: each hashes to its name.
    for entry in std::fs::read_dir(dir.path().join("loader-cache/blobs"))
        .unwrap()
        .flatten()
    {
        let digest = blake3::hash(&std::fs::read(entry.path()).unwrap())
            .to_hex()
            .to_string();
        assert_eq!(entry.file_name().to_str().unwrap(), digest);
    }
    registry.restart_in_place(registry_dir);
    loads_exactly(
        &loader,
        &model,
        "team/big@v1",
        &dir.path().join("big.safetensors"),
    );
}

#[test]
fn buffer_folders_of_dead_loaders_are_removed_and_live_ones_kept() {
    let dir = tempfile::tempdir().unwrap();
    let (registry, mut live, model) = setup(dir.path(), 64, &[]);
    let shm = dir.path().join("shm");
    let shm_arg = shm.to_str().unwrap();
    let (status, body) = load(&live, &model, &["team/a@v1"]);
    assert_eq!(status, 200, "{body}");
    let live_buffer = std::path::PathBuf::from(body["path"].as_str().unwrap());
    let unrelated = shm.join("not-a-loader");
    std::fs::write(&unrelated, b"kept").unwrap();

    // A loader killed outright (SIGKILL) leaves its folder, buffers and all.
    let token = registry.token(&["team/*:pull"]);
    let other = |name: &str| {
        let home = dir.path().join(name);
        LoaderProcess::start(&home, &registry.url, &token, &["--shm-dir", shm_arg])
    };
    let killed = other("killed");
    let (status, body) = load(&killed, &model, &["team/b@v1"]);
    assert_eq!(status, 200, "{body}");
    let killed_buffer = std::path::PathBuf::from(body["path"].as_str().unwrap());
    drop(killed);
    assert!(killed_buffer.exists());
    // One killed after making its folder and before locking it.
    let unlocked = shm.join("cartridge-loader-1-0badf00d");
    std::fs::create_dir(&unlocked).unwrap();

    // The next loader to start removes it, and leaves a running loader's buffers alone.
    let mut next = other("next");
    assert!(!killed_buffer.parent().unwrap().exists());
    assert!(!unlocked.exists());
    assert_eq!(
        std::fs::read(&live_buffer).unwrap(),
        payload(&dir.path().join("a.safetensors"))
    );
    let (status, body) = load(&live, &model, &["team/a@v1"]);
    assert_eq!((status, body["tier"].as_str()), (200, Some("device")));

    // A graceful stop removes the loader's own folder and nothing else.
    next.stop();
    live.stop();
    let left: Vec<_> = std::fs::read_dir(&shm)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    assert_eq!(left, [unrelated]);
}

/// The answer to a load of `team/a@v1` with `lease`, if any.
fn leased(loader: &LoaderProcess, model: &Value, lease: Option<u64>) -> Value {
    let mut body = json!({"model": model, "cartridges": ["team/a@v1"]});
    if let Some(lease) = lease {
        body["lease"] = json!(lease);
    }
    let (status, answer) = http_json(&loader.url, "POST", "/v1/load", Some(&body));
    assert_eq!(status, 200, "{answer}");
    answer
}

/// A consumer that dies holding a handle does not hold the memory for good: a leased handle is
/// released once its lease lapses, unless renewed; one without a lease stays until released.
#[test]
fn a_handle_whose_lease_lapses_is_released() {
    let dir = tempfile::tempdir().unwrap();
    let (_registry, loader, model) = setup(dir.path(), 16, &[]);
    let load = |lease: Option<u64>| leased(&loader, &model, lease)["handle"].clone();
    let call = |path: &str, handle: &Value| {
        http_json(&loader.url, "POST", path, Some(&json!({"handle": handle})))
    };
    // The three handles share one resident entry: one reference each.
    let references = || {
        let (_, status) = http_json(&loader.url, "GET", "/v1/status", None);
        (
            status["handles"].clone(),
            status["device"]["entries"][0]["refs"].clone(),
        )
    };
    let (lapsing, renewed, kept) = (load(Some(1)), load(Some(3)), load(None));
    assert_eq!(references(), (json!(3), json!(3)));
    // Renewed every quarter second for four seconds (more than its own lease, with seconds to
    // spare on a busy machine): the one-second lease lapses meanwhile.
    for _ in 0..16 {
        std::thread::sleep(Duration::from_millis(250));
        let (status, answer) = call("/v1/renew", &renewed);
        assert_eq!((status, &answer["lease"]), (200, &json!(3)), "{answer}");
    }
    assert_eq!(references(), (json!(2), json!(2)));
    assert_eq!(call("/v1/release", &lapsing).0, 404);
    assert_eq!(call("/v1/renew", &lapsing).0, 404);
    let (status, answer) = call("/v1/renew", &kept);
    assert_eq!((status, &answer["lease"]), (200, &Value::Null), "{answer}");
    for handle in [&renewed, &kept] {
        assert_eq!(call("/v1/release", handle).0, 200);
    }
    assert_eq!(references(), (json!(0), json!(0)));
    assert_eq!(metric(&loader, "loader_leases_lapsed_total"), 1.0);
    let body = json!({"model": model, "cartridges": ["team/a@v1"], "lease": 0});
    let (status, answer) = http_json(&loader.url, "POST", "/v1/load", Some(&body));
    assert_eq!(status, 400, "{answer}");
}

/// A loader with `--default-lease` gives it to a load that asks for none, so a consumer that
/// never asked for one does not hold the memory for good either; a lease asked for stands.
#[test]
fn a_default_lease_bounds_a_handle_loaded_without_one() {
    let dir = tempfile::tempdir().unwrap();
    let (_registry, loader, model) = setup(dir.path(), 16, &["--default-lease", "1s"]);
    let (defaulted, asked) = (
        leased(&loader, &model, None),
        leased(&loader, &model, Some(600)),
    );
    assert_eq!(
        (&defaulted["lease"], &asked["lease"]),
        (&json!(1), &json!(600))
    );
    // The defaulted one goes, the other stays (both going at once would never show 1).
    let handles = || http_json(&loader.url, "GET", "/v1/status", None).1["handles"].clone();
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while handles() != 1 {
        assert!(
            std::time::Instant::now() < deadline,
            "the default lease never lapsed"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let release = |answer: &Value| {
        let body = json!({"handle": answer["handle"]});
        http_json(&loader.url, "POST", "/v1/release", Some(&body)).0
    };
    assert_eq!((release(&defaulted), release(&asked)), (404, 200));
    // A default no load could ask for is refused at start, naming the flag.
    for refused in ["0s", "1500ms", "8days"] {
        let mut serve = std::process::Command::new(workspace_binary("cartridge-loader"))
            .args(["serve", "--registry", "http://127.0.0.1:9"])
            .args(["--listen", "127.0.0.1:0", "--default-lease", refused])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let status = crate::support::exit_within(&mut serve, Duration::from_secs(30))
            .unwrap_or_else(|| panic!("--default-lease {refused} was taken"));
        let mut said = String::new();
        std::io::Read::read_to_string(&mut serve.stderr.take().unwrap(), &mut said).unwrap();
        assert!(
            !status.success() && said.contains("--default-lease") && said.contains("a week"),
            "{refused}: {said}"
        );
    }
}

/// The Python client (loader/python) against the real loader serving host memory: streamed and
/// plain loads, the buffer byte for byte against the file (and a composition against both
/// files), release, and the errors it raises.
/// CI has no torch and no GPU: the tensors and the CUDA IPC handoff are checked on the GPU
/// machine (bench/gpu/loader).
#[test]
fn the_python_client_reads_what_the_loader_serves() {
    let dir = tempfile::tempdir().unwrap();
    let (_registry, loader, _model) = setup(dir.path(), 64, &[]);
    let client = Path::new(env!("CARGO_MANIFEST_DIR")).join("loader/python");
    let output = std::process::Command::new("python3")
        .arg(client.join("test_client.py"))
        .env("PYTHONPATH", &client)
        .env("LOADER_URL", &loader.url)
        .env("CARTRIDGE", "team/a@v1")
        .env("CARTRIDGE_OTHER", "team/b@v1")
        .env("CARTRIDGE_FILE", dir.path().join("a.safetensors"))
        .env("CARTRIDGE_OTHER_FILE", dir.path().join("b.safetensors"))
        .output()
        .unwrap();
    let (stdout, stderr) = (
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr),
    );
    assert!(output.status.success(), "{stdout}{stderr}");
    assert!(
        stdout.contains("4 layers match the file byte for byte, from a shared-memory file"),
        "{stdout}"
    );
    assert!(!stdout.contains("came whole"), "{stdout}");
    assert!(
        stdout.contains("composed with the other: 4 layers match the two files side by side"),
        "{stdout}"
    );
}

#[test]
fn the_api_serves_on_a_unix_socket() {
    use std::io::{Read, Write};
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("loader.sock");
    let serve = |socket: &Path| {
        std::process::Command::new(crate::support::workspace_binary("cartridge-loader"))
            .args(["serve", "--registry", "http://127.0.0.1:9", "--socket"])
            .arg(socket)
            .arg("--cache-dir")
            .arg(dir.path().join("cache"))
            .arg("--shm-dir")
            .arg(dir.path().join("shm"))
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap()
    };
    let listening = |child: &mut std::process::Child| {
        let mut line = String::new();
        std::io::BufRead::read_line(
            &mut std::io::BufReader::new(child.stdout.take().unwrap()),
            &mut line,
        )
        .unwrap();
        assert!(line.starts_with("listening on unix:"), "{line}");
    };
    let refused = |socket: &Path| {
        let output = serve(socket).wait_with_output().unwrap();
        assert!(!output.status.success());
        String::from_utf8_lossy(&output.stderr).into_owned()
    };
    let mut child = serve(&socket);
    listening(&mut child);
    let mut stream = std::os::unix::net::UnixStream::connect(&socket).unwrap();
    stream
        .write_all(b"GET /v1/status HTTP/1.1\r\nHost: loader\r\nConnection: close\r\n\r\n")
        .unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).unwrap();
    assert!(response.starts_with("HTTP/1.1 200"), "{response}");
    assert!(response.contains("\"handles\":0"), "{response}");

    // TCP is loopback unless asked otherwise: the API has no authentication.
    let mut remote =
        std::process::Command::new(crate::support::workspace_binary("cartridge-loader"))
            .args([
                "serve",
                "--registry",
                "http://127.0.0.1:9",
                "--listen",
                "0.0.0.0:0",
            ])
            .arg("--cache-dir")
            .arg(dir.path().join("cache"))
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
    // Refused at once; one that serves instead is stopped, not waited on.
    let status = crate::support::exit_within(&mut remote, Duration::from_secs(30))
        .expect("a loader listening on 0.0.0.0 was not refused");
    let mut error = String::new();
    std::io::Read::read_to_string(&mut remote.stderr.take().unwrap(), &mut error).unwrap();
    assert!(
        !status.success() && error.contains("--allow-remote"),
        "{error}"
    );
    // Consumers in the loader's group may connect, as they may read its buffers.
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&socket).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o660, "{mode:o}");
    }
    // A second loader leaves the live one's socket alone, and nothing but a socket is removed.
    let error = refused(&socket);
    assert!(error.contains("another process listens on it"), "{error}");
    assert!(std::os::unix::net::UnixStream::connect(&socket).is_ok());
    let file = dir.path().join("notes.txt");
    std::fs::write(&file, "kept").unwrap();
    let error = refused(&file);
    assert!(error.contains("is not a socket"), "{error}");
    assert_eq!(std::fs::read_to_string(&file).unwrap(), "kept");

    // A socket left by a loader killed outright is taken over.
    let _ = child.kill();
    let _ = child.wait();
    assert!(socket.exists());
    let mut successor = serve(&socket);
    listening(&mut successor);
    // A loader stopping leaves a socket made at its path since alone: here its own was removed
    // and another loader took the path, as one started while it finishes its requests would.
    std::fs::remove_file(&socket).unwrap();
    let mut next = serve(&socket);
    listening(&mut next);
    let stopped = std::process::Command::new("kill")
        .arg(successor.id().to_string())
        .status()
        .unwrap();
    assert!(stopped.success());
    assert!(crate::support::exit_within(&mut successor, Duration::from_secs(30)).is_some());
    assert!(
        std::os::unix::net::UnixStream::connect(&socket).is_ok(),
        "a stopping loader removed its successor's socket"
    );
    let _ = next.kill();
    let _ = next.wait();
}

/// A streamed load: its newline-delimited events, read to the end. HTTP/1.0, so the body ends
/// when the connection closes.
fn load_streamed(loader: &LoaderProcess, model: &Value, refs: &[&str]) -> (u16, Vec<Value>) {
    let body = json!({"model": model, "cartridges": refs, "stream": true}).to_string();
    let response = exchange(
        &loader.url,
        "HTTP/1.0",
        "POST",
        "/v1/load",
        &[("Content-Type", "application/json")],
        body.as_bytes(),
    );
    let (head, body) = response.split_once("\r\n\r\n").unwrap();
    let status = head.split_whitespace().nth(1).unwrap().parse().unwrap();
    // A refusal before the stream is one JSON body.
    let streamed = if status == 200 {
        "application/x-ndjson"
    } else {
        "application/json"
    };
    assert!(head.contains(streamed), "{head}");
    let events = body
        .lines()
        .map(|line| serde_json::from_str(line).unwrap())
        .collect();
    (status, events)
}

#[test]
fn a_streamed_load_tells_layers_as_they_land() {
    let dir = tempfile::tempdir().unwrap();
    // 128 KiB layers in 64 KiB chunks: one chunk per layer, four in all, fetched one at a time
    // at 1 MiB/s so they land apart.
    let (registry, loader, model) =
        setup(dir.path(), 256, &["--jobs", "1", "--limit-rate", "1MiB"]);

    let (status, events) = load_streamed(&loader, &model, &["team/a@v1"]);
    assert_eq!(status, 200);
    let (last, progress) = events.split_last().unwrap();
    assert_eq!(last["event"], "loaded", "{last}");
    assert_eq!(last["tier"], "registry");
    assert!(progress.len() >= 2, "layers told as they land: {events:?}");
    let mut ready = 0;
    for event in progress {
        assert_eq!(event["event"], "layers", "{event}");
        assert_eq!(event["path"], last["path"]);
        assert_eq!(event["layers"], 4);
        let now = event["ready"].as_u64().unwrap();
        assert!(now > ready, "ready went from {ready} to {now}");
        ready = now;
    }
    assert_eq!(ready, 4, "the last event covers every layer");
    assert_eq!(
        shared_bytes(last),
        payload(&dir.path().join("a.safetensors"))
    );

    // Resident already, or a composition: the answer comes whole.
    let (_, events) = load_streamed(&loader, &model, &["team/a@v1"]);
    assert_eq!(events.len(), 1, "{events:?}");
    assert_eq!(events[0]["tier"], "device");
    let (_, events) = load_streamed(&loader, &model, &["team/a@v1", "team/b@v1"]);
    assert_eq!(events.last().unwrap()["event"], "loaded");
    assert_eq!(events.last().unwrap()["tokens"], 512);
    assert!(events.iter().all(|e| e["event"] != "layers"), "{events:?}");

    // What is refused before memory is touched has its own status, streamed or not.
    let (status, events) = load_streamed(&loader, &model, &["team/nope@v1"]);
    assert_eq!(status, 404);
    assert!(
        events[0]["message"]
            .as_str()
            .unwrap()
            .contains("team/nope@v1"),
        "{events:?}"
    );
    // A failure once streaming began is the stream's last event.
    let token = registry.token(&["team/*:pull"]);
    let small = LoaderProcess::start(
        dir.path(),
        &registry.url,
        &token,
        &["--gpu-budget", "64KiB"],
    );
    let (status, events) = load_streamed(&small, &model, &["team/a@v1"]);
    assert_eq!(status, 200);
    let last = events.last().unwrap();
    assert_eq!(
        (&last["event"], &last["code"], &last["status"]),
        (&json!("error"), &json!("out_of_memory"), &json!(507))
    );
}

#[test]
fn a_moved_tag_is_seen_once_its_resolution_expires() {
    let dir = tempfile::tempdir().unwrap();
    // Long enough that the tag move and the reload below fit in it on a slow machine.
    let ttl = Duration::from_secs(10);
    let (registry, loader, model) = setup(dir.path(), 16, &["--resolve-ttl", "10s"]);
    let token = registry.token(&["team/*:push"]);
    let cli = |args: &[&str]| registry.cartridge(dir.path(), &token, args).ok();
    cli(&["push", "team/a@v2", "c.safetensors"]);
    cli(&["tag", "team/a@v1", "stable"]);
    let digest = |answer: &Value| answer["parts"][0]["digest"].as_str().unwrap().to_owned();
    let (_, v1) = load(&loader, &model, &["team/a@v1"]);
    let (_, v2) = load(&loader, &model, &["team/a@v2"]);
    assert_ne!(digest(&v1), digest(&v2));

    let resolved = std::time::Instant::now();
    let (status, first) = load(&loader, &model, &["team/a@stable"]);
    assert_eq!(status, 200, "{first}");
    assert_eq!(digest(&first), digest(&v1));
    cli(&["tag", "team/a@v2", "stable"]);
    let (_, reused) = load(&loader, &model, &["team/a@stable"]);
    // Within the time-to-live the loader answers from its resolution, without the registry.
    assert!(
        resolved.elapsed() < ttl,
        "the check ran within the time-to-live"
    );
    assert_eq!(digest(&reused), digest(&v1));
    std::thread::sleep(ttl.saturating_sub(resolved.elapsed()) + Duration::from_millis(200));
    let (_, moved) = load(&loader, &model, &["team/a@stable"]);
    assert_eq!(digest(&moved), digest(&v2), "the moved tag is seen");
}

/// `--device cuda` on a machine without a usable GPU is refused at start-up with the cause and
/// the way out; where there is a GPU, loads answer with a CUDA IPC handle instead of a file.
#[test]
fn a_gpu_device_is_used_or_refused_clearly() {
    let dir = tempfile::tempdir().unwrap();
    let loader = crate::support::workspace_binary("cartridge-loader");
    let bad = std::process::Command::new(&loader)
        .args([
            "serve",
            "--registry",
            "http://127.0.0.1:9",
            "--device",
            "gpu0",
        ])
        .output()
        .unwrap();
    assert!(!bad.status.success());
    assert!(
        String::from_utf8_lossy(&bad.stderr).contains("`gpu0` is not host, cuda or cuda:N"),
        "{}",
        String::from_utf8_lossy(&bad.stderr)
    );
    let probe = std::process::Command::new(&loader)
        .args(["bandwidth", "--size", "1MiB"])
        .output()
        .unwrap();
    // Where the system has an NVIDIA device, a failing probe is a fault, not the refusal below.
    assert!(
        probe.status.success() || !Path::new("/dev/nvidia0").exists(),
        "{}",
        String::from_utf8_lossy(&probe.stderr)
    );
    if !probe.status.success() {
        let refused = std::process::Command::new(&loader)
            .args([
                "serve",
                "--registry",
                "http://127.0.0.1:9",
                "--device",
                "cuda",
            ])
            .arg("--cache-dir")
            .arg(dir.path().join("cache"))
            .output()
            .unwrap();
        assert!(!refused.status.success());
        let message = String::from_utf8_lossy(&refused.stderr);
        assert!(
            message.contains("cuda:0 cannot be used") && message.contains("--device host"),
            "{message}"
        );
        return;
    }
    let report: Value = serde_json::from_slice(&probe.stdout).unwrap();
    assert!(report["pinned_host_to_device_gb_per_s"].as_f64().unwrap() > 0.0);
    let (_registry, loader, model) = setup(dir.path(), 64, &["--device", "cuda"]);
    let (status, answer) = load(&loader, &model, &["team/a@v1", "team/b@v1"]);
    assert_eq!(status, 200, "{answer}");
    assert_eq!(answer["cuda"]["ipc_handle"].as_str().unwrap().len(), 128);
    assert!(answer.get("path").is_none());
}
