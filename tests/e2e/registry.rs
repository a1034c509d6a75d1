//! The real `cartridge-registry` and `cartridge` binaries against each other on loopback.

use std::path::Path;
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::moto::Moto;
use crate::support::{Registry, exchange, metric, random_cartridge, raw_http};

fn wait_until(what: &str, limit: Duration, mut done: impl FnMut() -> bool) {
    let started = Instant::now();
    while !done() {
        assert!(started.elapsed() < limit, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn dir_bytes(dir: &Path) -> u64 {
    std::fs::read_dir(dir).map_or(0, |entries| {
        entries
            .flatten()
            .filter_map(|e| e.metadata().ok())
            .map(|m| m.len())
            .sum()
    })
}

/// Files in a directory, not counting the staging files (`name#n`) the local store writes first.
fn files_in(dir: &Path) -> usize {
    std::fs::read_dir(dir).map_or(0, |entries| {
        entries
            .flatten()
            .filter(|e| !e.file_name().to_string_lossy().contains('#'))
            .count()
    })
}

/// Some file in a directory.
fn a_file_in(dir: &Path) -> std::path::PathBuf {
    std::fs::read_dir(dir)
        .unwrap()
        .next()
        .expect("a file")
        .unwrap()
        .path()
}

#[test]
fn push_then_pull_is_byte_identical_and_cached() {
    let dir = tempfile::tempdir().unwrap();
    let registry = Registry::start(dir.path());
    let token = registry.token(&["legal/*:push"]);
    random_cartridge(&dir.path().join("a.safetensors"), 8, 64, "a", None);

    let report: Value = registry
        .cartridge(
            dir.path(),
            &token,
            &[
                "push",
                "legal/contracts@v3",
                "a.safetensors",
                "--chunk-size",
                "64KiB",
                "--json",
            ],
        )
        .json();
    assert_eq!(report["reference"], "legal/contracts@v3");
    assert_eq!(report["chunks"], 4);
    assert_eq!(report["uploaded_blobs"], 4);
    let blob_bytes = |direction: &str| {
        metric(
            &registry.url,
            &format!("registry_blob_bytes_total{{direction=\"{direction}\"}}"),
        )
    };
    assert_eq!(blob_bytes("in"), report["uploaded_bytes"].as_f64().unwrap());
    assert_eq!(blob_bytes("out"), 0.0);

    // A file that happens to share the output's stem is not the pull's to touch.
    std::fs::write(dir.path().join("b.partial"), "mine").unwrap();
    let path = registry
        .cartridge(
            dir.path(),
            &token,
            &["pull", "legal/contracts@v3", "-o", "b.safetensors"],
        )
        .ok();
    assert_eq!(path.trim(), "b.safetensors");
    assert_eq!(blob_bytes("out"), report["stored_bytes"].as_f64().unwrap());
    assert_eq!(
        std::fs::read_to_string(dir.path().join("b.partial")).unwrap(),
        "mine"
    );
    let pull_to = |output: &str| {
        registry.cartridge(
            dir.path(),
            &token,
            &["pull", "legal/contracts@v3", "-o", output],
        )
    };
    // Again to the same file: it is already the pulled file (a link to the cached one).
    pull_to("b.safetensors").ok();
    std::fs::create_dir(dir.path().join("folder")).unwrap();
    let err = pull_to("folder/").fails();
    assert!(err.contains("is a folder"), "{err}");
    let err = pull_to("missing/b.safetensors").fails();
    assert!(err.contains("missing does not exist"), "{err}");
    // Nothing of the pull is left beside its outputs.
    let mut names: Vec<String> = std::fs::read_dir(dir.path())
        .unwrap()
        .chain(std::fs::read_dir(dir.path().join("folder")).unwrap())
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with('.'))
        .collect();
    names.sort();
    assert!(names.is_empty(), "{names:?}");
    assert_eq!(
        std::fs::read(dir.path().join("a.safetensors")).unwrap(),
        std::fs::read(dir.path().join("b.safetensors")).unwrap()
    );
    // The output shares its file with the cache; rewritten in place (as `cp` does), the cache
    // entry no longer matches the manifest and is not handed out again.
    random_cartridge(&dir.path().join("other.safetensors"), 4, 64, "other", None);
    std::fs::write(
        dir.path().join("b.safetensors"),
        std::fs::read(dir.path().join("other.safetensors")).unwrap(),
    )
    .unwrap();
    let cached = registry
        .cartridge(dir.path(), &token, &["pull", "legal/contracts@v3"])
        .ok();
    assert_eq!(
        std::fs::read(cached.trim()).unwrap(),
        std::fs::read(dir.path().join("a.safetensors")).unwrap()
    );
    // `latest` followed the push; a second pull comes from the local cache.
    let again: Value = registry
        .cartridge(dir.path(), &token, &["pull", "legal/contracts", "--json"])
        .json();
    assert_eq!(again["downloaded_bytes"], 0);
    assert_eq!(again["digest"], report["digest"]);
    let cached = again["path"].as_str().unwrap();
    assert_eq!(
        std::fs::read(cached).unwrap(),
        std::fs::read(dir.path().join("a.safetensors")).unwrap()
    );
    // A pipe (or a device: `-o /dev/null` as root) is refused, not replaced by a plain file.
    let pipe = dir.path().join("pipe");
    crate::support::fifo(&pipe);
    let err = registry
        .cartridge(
            dir.path(),
            &token,
            &["pull", "legal/contracts", "-o", "pipe"],
        )
        .fails();
    assert!(err.contains("not a regular file"), "{err}");
    use std::os::unix::fs::FileTypeExt;
    assert!(
        std::fs::symlink_metadata(&pipe)
            .unwrap()
            .file_type()
            .is_fifo()
    );

    let remote: Value = registry
        .cartridge(
            dir.path(),
            &token,
            &["inspect", "legal/contracts@v3", "--json"],
        )
        .json();
    assert_eq!(remote["manifest"]["cartridge"]["tokens"], 64);
    let listing = registry
        .cartridge(dir.path(), &token, &["ls", "legal/contracts"])
        .ok();
    assert!(
        listing.contains("legal/contracts@v3") && listing.contains("legal/contracts@latest"),
        "{listing}"
    );
    // The registry named in the reference, as push and pull take it.
    let named = format!(
        "{}/legal/contracts",
        registry.url.trim_start_matches("http://")
    );
    let listing = registry.cartridge(dir.path(), &token, &["ls", &named]).ok();
    assert!(listing.contains("legal/contracts@v3"), "{listing}");
}

#[test]
fn a_published_version_never_changes() {
    let dir = tempfile::tempdir().unwrap();
    let registry = Registry::start(dir.path());
    let token = registry.token(&["*:admin"]);
    random_cartridge(&dir.path().join("first.safetensors"), 4, 32, "first", None);
    random_cartridge(
        &dir.path().join("second.safetensors"),
        4,
        32,
        "second",
        None,
    );
    registry
        .cartridge(
            dir.path(),
            &token,
            &["push", "legal/x@v1", "first.safetensors", "--no-latest"],
        )
        .ok();
    let err = registry
        .cartridge(
            dir.path(),
            &token,
            &["push", "legal/x@v1", "second.safetensors"],
        )
        .fails();
    assert!(
        err.contains("legal/x@v1 already exists") && err.contains("HTTP 409"),
        "{err}"
    );
    // The same cartridge again (a push stopped before its tags moved, run once more) finds it
    // published and moves the tags.
    let again = registry
        .cartridge(
            dir.path(),
            &token,
            &["push", "legal/x@v1", "first.safetensors", "--tag", "stable"],
        )
        .ok();
    assert!(
        again.contains("legal/x@v1 already holds this cartridge"),
        "{again}"
    );
    let listing = registry
        .cartridge(dir.path(), &token, &["ls", "legal/x"])
        .ok();
    assert!(
        listing.contains("legal/x@stable") && listing.contains("legal/x@latest"),
        "{listing}"
    );
    // Once a later version holds `latest`, pushing the earlier one again leaves it there.
    registry
        .cartridge(
            dir.path(),
            &token,
            &["push", "legal/x@v2", "second.safetensors"],
        )
        .ok();
    let again = registry
        .cartridge(
            dir.path(),
            &token,
            &["push", "legal/x@v1", "first.safetensors"],
        )
        .ok();
    assert!(again.contains("left legal/x@latest"), "{again}");
    registry
        .cartridge(
            dir.path(),
            &token,
            &["pull", "legal/x@latest", "-o", "latest.safetensors"],
        )
        .ok();
    assert_eq!(
        std::fs::read(dir.path().join("latest.safetensors")).unwrap(),
        std::fs::read(dir.path().join("second.safetensors")).unwrap()
    );
    registry
        .cartridge(
            dir.path(),
            &token,
            &["pull", "legal/x@v1", "-o", "check.safetensors"],
        )
        .ok();
    assert_eq!(
        std::fs::read(dir.path().join("check.safetensors")).unwrap(),
        std::fs::read(dir.path().join("first.safetensors")).unwrap()
    );
    // A compare-and-swap moves a tag only from the manifest it names.
    let tag = |args: &[&str]| registry.cartridge(dir.path(), &token, args);
    let first: Value = tag(&["tag", "legal/x@v1", "cas", "--json"]).json();
    let second: Value = tag(&["tag", "legal/x@v2", "other", "--json"]).json();
    let (v1, v2) = (
        first["manifest"].as_str().unwrap(),
        second["manifest"].as_str().unwrap(),
    );
    let lost = tag(&["tag", "legal/x@v2", "cas", "--if-matches", v2]);
    // Its own exit status: a script tells a lost compare-and-swap from a failure.
    assert_eq!(lost.code, Some(3));
    let err = lost.fails();
    assert!(
        err.contains(&format!("legal/x@cas points at {v1}, not {v2}: not moved")),
        "{err}"
    );
    let moved: Value = tag(&["tag", "legal/x@v2", "cas", "--if-matches", v1, "--json"]).json();
    assert_eq!(
        (moved["manifest"].as_str(), moved["generation"].as_u64()),
        (Some(v2), Some(2))
    );
}

#[test]
fn twenty_concurrent_publishes_of_one_version_have_one_winner() {
    let dir = tempfile::tempdir().unwrap();
    let registry = Registry::start(dir.path());
    let token = registry.token(&["race/*:push"]);
    let children: Vec<_> = (0..20)
        .map(|i| {
            let name = format!("c{i}.safetensors");
            random_cartridge(&dir.path().join(&name), 2, 16, &name, None);
            registry
                .command(
                    dir.path(),
                    &token,
                    &["push", "race/one@v1", &name, "--no-latest"],
                )
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    let mut winners = Vec::new();
    for (i, child) in children.into_iter().enumerate() {
        let output = child.wait_with_output().unwrap();
        if output.status.success() {
            winners.push(i);
        } else {
            let err = String::from_utf8_lossy(&output.stderr);
            assert!(err.contains("already exists"), "{err}");
        }
    }
    assert_eq!(winners.len(), 1, "winners: {winners:?}");
    registry
        .cartridge(
            dir.path(),
            &token,
            &["pull", "race/one@v1", "-o", "won.safetensors"],
        )
        .ok();
    let winner = format!("c{}.safetensors", winners[0]);
    assert_eq!(
        std::fs::read(dir.path().join("won.safetensors")).unwrap(),
        std::fs::read(dir.path().join(winner)).unwrap()
    );
}

#[test]
fn a_new_version_uploads_only_its_new_chunks() {
    let dir = tempfile::tempdir().unwrap();
    let registry = Registry::start(dir.path());
    let token = registry.token(&["legal/*:push"]);
    random_cartridge(&dir.path().join("v3.safetensors"), 8, 64, "base", None);
    random_cartridge(&dir.path().join("v4.safetensors"), 8, 64, "base", Some(7));
    let first: Value = registry
        .cartridge(
            dir.path(),
            &token,
            &[
                "push",
                "legal/c@v3",
                "v3.safetensors",
                "--chunk-size",
                "64KiB",
                "--json",
            ],
        )
        .json();
    assert_eq!(first["uploaded_blobs"], 4);
    let second: Value = registry
        .cartridge(
            dir.path(),
            &token,
            &[
                "push",
                "legal/c@v4",
                "v4.safetensors",
                "--chunk-size",
                "64KiB",
                "--json",
            ],
        )
        .json();
    assert_eq!(
        second["uploaded_blobs"], 1,
        "only the chunk holding layer 7 is new: {second}"
    );
    assert_eq!(second["reused_blobs"], 3);
    registry
        .cartridge(
            dir.path(),
            &token,
            &["pull", "legal/c@v4", "-o", "got.safetensors"],
        )
        .ok();
    assert_eq!(
        std::fs::read(dir.path().join("got.safetensors")).unwrap(),
        std::fs::read(dir.path().join("v4.safetensors")).unwrap()
    );
}

#[test]
fn a_server_killed_mid_push_leaves_nothing_partial_and_the_retry_succeeds() {
    let dir = tempfile::tempdir().unwrap();
    let mut registry = Registry::start(dir.path());
    let token = registry.token(&["legal/*:push"]);
    random_cartridge(&dir.path().join("big.safetensors"), 16, 2048, "big", None);
    let mut push = registry
        .command(
            dir.path(),
            &token,
            &[
                "push",
                "legal/big@v1",
                "big.safetensors",
                "--chunk-size",
                "1MiB",
                "--limit-rate",
                "4MiB",
                "--jobs",
                "2",
            ],
        )
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let blobs = dir.path().join("store/blobs");
    let links = dir.path().join("store/repos/legal/big/links/blobs");
    wait_until("the first blobs to land", Duration::from_secs(60), || {
        files_in(&links) >= 1
    });
    registry.kill();
    let _ = push.kill();
    let _ = push.wait();
    let landed = files_in(&blobs);
    assert!(
        landed < 16,
        "the push was interrupted part way ({landed} of 16 blobs)"
    );
    // What landed is whole: each blob hashes to its name (`#` marks the store's staging files).
    for entry in std::fs::read_dir(&blobs).unwrap().flatten() {
        let name = entry.file_name().into_string().unwrap();
        if !name.contains('#') {
            let digest = blake3::hash(&std::fs::read(entry.path()).unwrap());
            assert_eq!(name, digest.to_hex().as_str());
        }
    }

    // What the retry finds sent: the blobs stored and linked to the repository (one stored
    // as the server was killed, before its link, is sent again).
    let linked = files_in(&links);
    assert!(
        linked >= 1 && linked <= landed,
        "{linked} linked of {landed}"
    );
    registry.restart(dir.path());
    let err = registry
        .cartridge(dir.path(), &token, &["pull", "legal/big@v1"])
        .fails();
    assert!(
        err.contains("not found"),
        "nothing of the interrupted push is visible: {err}"
    );
    // The blobs that landed are the repository's (sent to it), but no version or tag is.
    for published in ["versions", "tags", "links/manifests"] {
        assert!(
            !dir.path()
                .join("store/repos/legal/big")
                .join(published)
                .exists()
        );
    }

    let retry: Value = registry
        .cartridge(
            dir.path(),
            &token,
            &[
                "push",
                "legal/big@v1",
                "big.safetensors",
                "--chunk-size",
                "1MiB",
                "--json",
            ],
        )
        .json();
    assert_eq!(
        retry["reused_blobs"].as_u64().unwrap() as usize,
        linked,
        "the retry uploads only what is missing"
    );
    registry
        .cartridge(
            dir.path(),
            &token,
            &["pull", "legal/big@v1", "-o", "back.safetensors"],
        )
        .ok();
    assert_eq!(
        std::fs::read(dir.path().join("back.safetensors")).unwrap(),
        std::fs::read(dir.path().join("big.safetensors")).unwrap()
    );
}

#[test]
fn a_killed_pull_resumes_where_it_stopped() {
    let dir = tempfile::tempdir().unwrap();
    let registry = Registry::start(dir.path());
    let token = registry.token(&["legal/*:push"]);
    random_cartridge(&dir.path().join("big.safetensors"), 4, 4096, "resume", None);
    registry
        .cartridge(
            dir.path(),
            &token,
            &[
                "push",
                "legal/big@v1",
                "big.safetensors",
                "--chunk-size",
                "8MiB",
            ],
        )
        .ok();

    let slow_pull = || {
        let mut command = registry.command(
            dir.path(),
            &token,
            &[
                "pull",
                "legal/big@v1",
                "--limit-rate",
                "2MiB",
                "--jobs",
                "1",
            ],
        );
        crate::support::foreground(&mut command)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap()
    };
    let partial = dir.path().join("home/cache/partial");
    let cartridges = dir.path().join("home/cache/cartridges");
    let entries = || -> Vec<std::path::PathBuf> {
        std::fs::read_dir(&cartridges)
            .unwrap()
            .map(|e| e.unwrap().path())
            .collect()
    };
    // Interrupted (Ctrl-C), a pull keeps what it downloaded and removes what it was building.
    let mut pull = slow_pull();
    wait_until("a first MiB to arrive", Duration::from_secs(60), || {
        dir_bytes(&partial) > 1 << 20
    });
    let interrupted = std::process::Command::new("kill")
        .args(["-INT", &pull.id().to_string()])
        .status()
        .unwrap();
    assert!(interrupted.success());
    let status = crate::support::exit_within(&mut pull, Duration::from_secs(30))
        .expect("an interrupted pull did not stop");
    // It ends as Ctrl-C's default would (a shell script running it stops too).
    assert_eq!(
        std::os::unix::process::ExitStatusExt::signal(&status),
        Some(libc::SIGINT)
    );
    assert_eq!(entries(), Vec::<std::path::PathBuf>::new());
    let downloaded = dir_bytes(&partial);
    assert!(downloaded > 1 << 20);
    // Killed outright, it leaves its half-built file to a later pull's sweep.
    let mut pull = slow_pull();
    wait_until(
        "more of the blob to arrive",
        Duration::from_secs(60),
        || dir_bytes(&partial) > downloaded + (1 << 20),
    );
    pull.kill().unwrap();
    pull.wait().unwrap();
    let kept = dir_bytes(&partial);
    // Aged past the moment a new one stays unlocked.
    let left = entries();
    assert_eq!(left.len(), 1, "{left:?}");
    let aged = std::time::SystemTime::now() - Duration::from_secs(60);
    std::fs::File::options()
        .write(true)
        .open(&left[0])
        .unwrap()
        .set_modified(aged)
        .unwrap();

    let report: Value = registry
        .cartridge(
            dir.path(),
            &token,
            &["pull", "legal/big@v1", "--json", "-o", "back.safetensors"],
        )
        .json();
    assert_eq!(report["output"], "back.safetensors");
    let resumed = report["resumed_bytes"].as_u64().unwrap();
    assert!(
        resumed >= 1 << 20 && resumed <= kept,
        "resumed {resumed} of the {kept} bytes kept"
    );
    assert_eq!(
        std::fs::read(dir.path().join("back.safetensors")).unwrap(),
        std::fs::read(dir.path().join("big.safetensors")).unwrap()
    );
    assert_eq!(files_in(&partial), 0);
    // What the killed pull left was swept; the cartridge is all that is there.
    let now = entries();
    assert!(
        now.len() == 1 && now[0].extension().is_some_and(|e| e == "safetensors"),
        "{now:?}"
    );
    // A pull of what is cached sweeps too, once a leftover is some seconds old.
    let leftover = cartridges.join("x.partial-1-0");
    std::fs::write(&leftover, b"left").unwrap();
    std::fs::File::options()
        .write(true)
        .open(&leftover)
        .unwrap()
        .set_modified(std::time::SystemTime::now() - Duration::from_secs(15))
        .unwrap();
    registry
        .cartridge(dir.path(), &token, &["pull", "legal/big@v1"])
        .ok();
    assert!(!leftover.exists());
}

#[test]
fn a_flipped_byte_in_a_stored_blob_is_caught_on_pull() {
    let dir = tempfile::tempdir().unwrap();
    let registry = Registry::start(dir.path());
    let token = registry.token(&["legal/*:push"]);
    random_cartridge(&dir.path().join("a.safetensors"), 4, 64, "flip", None);
    registry
        .cartridge(dir.path(), &token, &["push", "legal/a@v1", "a.safetensors"])
        .ok();
    let blob = a_file_in(&dir.path().join("store/blobs"));
    let original = std::fs::read(&blob).unwrap();
    let mut bytes = original.clone();
    let middle = bytes.len() / 2;
    bytes[middle] ^= 0x01;
    std::fs::write(&blob, bytes).unwrap();
    let digest = blob.file_name().unwrap().to_str().unwrap();
    let err = registry
        .cartridge(dir.path(), &token, &["pull", "legal/a@v1"])
        .fails();
    assert!(
        err.contains(&format!("blob blake3:{digest} is corrupt")),
        "{err}"
    );
    let cache = dir.path().join("home/cache");
    assert!(
        !cache.join("blobs").join(digest).exists(),
        "nothing corrupt is cached"
    );
    assert!(
        !cache.join("partial").join(digest).exists(),
        "no later pull resumes from the corrupt bytes"
    );
    // Repaired at the source, the next pull succeeds.
    std::fs::write(&blob, original).unwrap();
    registry
        .cartridge(
            dir.path(),
            &token,
            &["pull", "legal/a@v1", "-o", "back.safetensors"],
        )
        .ok();
    assert_eq!(
        std::fs::read(dir.path().join("back.safetensors")).unwrap(),
        std::fs::read(dir.path().join("a.safetensors")).unwrap()
    );
}

#[test]
fn a_torn_blob_in_the_local_cache_is_fetched_again() {
    let dir = tempfile::tempdir().unwrap();
    let registry = Registry::start(dir.path());
    let token = registry.token(&["legal/*:push"]);
    random_cartridge(&dir.path().join("a.safetensors"), 4, 64, "torn", None);
    registry
        .cartridge(dir.path(), &token, &["push", "legal/a@v1", "a.safetensors"])
        .ok();
    let pull = || {
        registry
            .cartridge(dir.path(), &token, &["pull", "legal/a@v1"])
            .ok()
    };
    let path = std::path::PathBuf::from(pull().trim());
    // A crash tore a cached blob, and the assembled file is gone.
    let blob = a_file_in(&dir.path().join("home/cache/blobs"));
    let bytes = std::fs::read(&blob).unwrap();
    std::fs::write(&blob, &bytes[..bytes.len() / 2]).unwrap();
    std::fs::remove_file(&path).unwrap();
    assert_eq!(pull().trim(), path.to_str().unwrap());
    assert_eq!(
        std::fs::read(&path).unwrap(),
        std::fs::read(dir.path().join("a.safetensors")).unwrap()
    );
    assert_eq!(std::fs::read(&blob).unwrap(), bytes);
}

#[test]
fn garbage_collection_during_a_push_loses_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let registry = Registry::start(dir.path());
    let token = registry.token(&["legal/*:push"]);
    // Garbage from a push abandoned an hour ago, which collection should remove.
    let garbage = b"a blob of a push abandoned long ago";
    let garbage_hex = blake3::hash(garbage).to_hex().to_string();
    let blobs = dir.path().join("store/blobs");
    std::fs::create_dir_all(&blobs).unwrap();
    std::fs::write(blobs.join(&garbage_hex), garbage).unwrap();
    std::fs::File::options()
        .write(true)
        .open(blobs.join(&garbage_hex))
        .unwrap()
        .set_modified(std::time::SystemTime::now() - Duration::from_secs(3600))
        .unwrap();
    random_cartridge(&dir.path().join("kept.safetensors"), 8, 1024, "kept", None);
    let mut push = registry
        .command(
            dir.path(),
            &token,
            &[
                "push",
                "legal/kept@v1",
                "kept.safetensors",
                "--chunk-size",
                "256KiB",
                "--limit-rate",
                "2MiB",
                "--jobs",
                "1",
            ],
        )
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let gc = |grace: &str| {
        let output = std::process::Command::new(crate::support::registry_binary())
            .args([
                "gc",
                "--storage",
                &registry.storage,
                "--grace",
                grace,
                "--json",
            ])
            .env("RUST_LOG", "warn")
            .output()
            .unwrap();
        assert!(
            output.status.success(),
            "{}",
            String::from_utf8_lossy(&output.stderr)
        );
        serde_json::from_slice::<Value>(&output.stdout).unwrap()
    };
    let mut collections = 0;
    let mut deleted = Vec::new();
    while push.try_wait().unwrap().is_none() {
        let report = gc("10m");
        deleted.extend(report["blobs_deleted"].as_array().unwrap().clone());
        collections += 1;
    }
    assert!(push.wait().unwrap().success());
    assert!(
        collections >= 2,
        "collection ran during the push ({collections} times)"
    );
    // The old garbage went; the push's own blobs, in flight and young, all stayed.
    assert_eq!(deleted, [json!(format!("blake3:{garbage_hex}"))]);
    // No grace at all could delete what a publish in progress has checked: refused (the
    // storage tests show a collection without grace keeps everything a version references).
    let output = std::process::Command::new(crate::support::registry_binary())
        .args(["gc", "--storage", &registry.storage, "--grace", "0s"])
        .output()
        .unwrap();
    assert!(!output.status.success());
    assert!(
        String::from_utf8_lossy(&output.stderr).contains("use at least 10m"),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    registry
        .cartridge(
            dir.path(),
            &token,
            &["pull", "legal/kept@v1", "-o", "back.safetensors"],
        )
        .ok();
    assert_eq!(
        std::fs::read(dir.path().join("back.safetensors")).unwrap(),
        std::fs::read(dir.path().join("kept.safetensors")).unwrap()
    );
    // A mistyped storage location is named, neither created nor reported collected.
    let typo = dir.path().join("registyr");
    let output = std::process::Command::new(crate::support::registry_binary())
        .args(["gc", "--storage", &format!("file://{}", typo.display())])
        .output()
        .unwrap();
    assert!(!output.status.success());
    assert!(
        String::from_utf8_lossy(&output.stderr).contains("nothing is stored at"),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(!typo.exists());
}

#[test]
fn tokens_are_checked() {
    let dir = tempfile::tempdir().unwrap();
    let registry = Registry::start(dir.path());
    let admin = registry.token(&["*:admin"]);
    random_cartridge(&dir.path().join("a.safetensors"), 2, 16, "auth", None);
    registry
        .cartridge(dir.path(), &admin, &["push", "legal/a@v1", "a.safetensors"])
        .ok();

    let other = tempfile::tempdir().unwrap();
    let stranger = Registry::start(other.path());
    let forged = stranger.token(&["*:admin"]);
    let err = registry
        .cartridge(dir.path(), &forged, &["pull", "legal/a@v1"])
        .fails();
    assert!(
        err.contains("HTTP 401"),
        "a token from another keyring: {err}"
    );

    // A lifetime past any use is refused when minting (an extreme one overflowed the clock).
    let err = registry
        .admin(&["token", "create", "--scope", "*:admin", "--ttl", "11years"])
        .fails();
    assert!(err.contains("at most 10 years"), "{err}");
    let expired = registry.token_with(&["*:admin"], "1s");
    std::thread::sleep(Duration::from_millis(2100));
    let err = registry
        .cartridge(dir.path(), &expired, &["pull", "legal/a@v1"])
        .fails();
    assert!(
        err.contains("token expired") && err.contains("HTTP 401"),
        "{err}"
    );

    let reader = registry.token(&["hr/*:pull"]);
    let err = registry
        .cartridge(dir.path(), &reader, &["pull", "legal/a@v1"])
        .fails();
    assert!(err.contains("HTTP 403"), "{err}");
    let puller = registry.token(&["legal/a:pull"]);
    let err = registry
        .cartridge(
            dir.path(),
            &puller,
            &["push", "legal/a@v2", "a.safetensors"],
        )
        .fails();
    assert!(
        err.contains("does not grant push") && err.contains("HTTP 403"),
        "{err}"
    );
    let err = registry
        .cartridge(dir.path(), &puller, &["rm", "legal/a@v1"])
        .fails();
    assert!(err.contains("HTTP 403"), "{err}");
    // A deletion names what it deletes: without a selector the reference means `latest`.
    let err = registry
        .cartridge(dir.path(), &puller, &["rm", "legal/a"])
        .fails();
    assert!(err.contains("name the version or tag to remove"), "{err}");
    let err = registry
        .cartridge(dir.path(), "", &["pull", "legal/a@v1"])
        .fails();
    assert!(
        err.contains("HTTP 401") && err.contains("no token was sent to http://127.0.0.1:"),
        "{err}"
    );
    // One that was sent and refused is not said missing.
    let err = registry
        .cartridge(dir.path(), &expired, &["pull", "legal/a@v1"])
        .fails();
    assert!(!err.contains("no token was sent"), "{err}");

    // Anonymous pull, once an admin turns it on for the namespace.
    let set = registry.cartridge(
        dir.path(),
        &admin,
        &["namespace", "set", "legal", "--anonymous-pull", "true"],
    );
    assert!(!set.stderr.contains("warning"), "{}", set.stderr);
    assert_eq!(set.ok(), "legal: anonymous pull on\n");
    let shown = registry
        .cartridge(dir.path(), "", &["namespace", "get", "legal"])
        .ok();
    assert_eq!(shown, "legal: anonymous pull on\n");
    // A namespace without cartridges (a typo?) takes the setting, with a warning.
    let typo = registry.cartridge(
        dir.path(),
        &admin,
        &["namespace", "set", "legl", "--anonymous-pull", "false"],
    );
    assert!(
        typo.stderr.contains("legl holds no cartridges yet"),
        "{}",
        typo.stderr
    );
    typo.ok();
    registry
        .cartridge(dir.path(), "", &["pull", "legal/a@v1"])
        .ok();
    let err = registry
        .cartridge(dir.path(), "", &["push", "legal/a@v2", "a.safetensors"])
        .fails();
    assert!(err.contains("HTTP 401"), "{err}");

    // A key removed while the registry serves: its tokens are refused within seconds, tokens of
    // the key that replaced it are accepted, without a restart.
    let keyring: Value = serde_json::from_slice(&std::fs::read(&registry.keys).unwrap()).unwrap();
    let old = keyring["signing"].as_str().unwrap().to_owned();
    registry.admin(&["keys", "rotate"]).ok();
    registry.admin(&["keys", "remove", &old]).ok();
    let fresh = registry.token(&["*:admin"]);
    let refused = (0..60).any(|_| {
        std::thread::sleep(Duration::from_millis(250));
        let run = registry.cartridge(dir.path(), &admin, &["ls", "legal/a"]);
        !run.success && run.stderr.contains("HTTP 401")
    });
    assert!(refused, "a removed key's token still works after 15 s");
    registry
        .cartridge(dir.path(), &fresh, &["ls", "legal/a"])
        .ok();
}

#[test]
fn bad_names_and_bodies_get_4xx_never_500() {
    let dir = tempfile::tempdir().unwrap();
    let registry = Registry::start(dir.path());
    let token = registry.token(&["*:admin"]);
    let auth = format!("Bearer {token}");
    let headers = [("Authorization", auth.as_str())];
    for path in [
        "/v1/repos/legal/../etc",
        "/v1/repos/legal/%2e%2e/resolve/v1",
        "/v1/repos/legal/a%2Fb/resolve/v1",
        "/v1/repos/Legal/x/resolve/v1",
        "/v1/repos/legal/x%00y",
        "/v1/repos/legal/x%1by/resolve/v1",
        "/v1/repos/legal/x/resolve/..%2f..",
        "/v1/repos/legal/x/manifests/blake3:..",
    ] {
        let status = raw_http(&registry.url, "GET", path, &headers, b"");
        assert!((400..500).contains(&status), "{path}: {status}");
    }
    let long = format!("/v1/repos/legal/{}", "n".repeat(5000));
    assert!((400..500).contains(&raw_http(&registry.url, "GET", &long, &headers, b"")));
    let huge = vec![b'x'; 5 << 20];
    let status = raw_http(
        &registry.url,
        "PUT",
        "/v1/repos/legal/x/versions/v1",
        &headers,
        &huge,
    );
    assert_eq!(status, 413);
    let status = raw_http(
        &registry.url,
        "POST",
        "/v1/repos/legal/x/blobs/missing",
        &[
            ("Authorization", &auth),
            ("Content-Type", "application/json"),
        ],
        b"{\"digests\": [1, 2",
    );
    assert_eq!(status, 400);
    // The CLI refuses malformed references before sending anything.
    let err = registry
        .cartridge(dir.path(), &token, &["pull", "legal/../x@v1"])
        .fails();
    assert!(err.contains("must not contain '..'"), "{err}");
}

#[test]
fn s3_storage_moves_blobs_through_presigned_urls() {
    let dir = tempfile::tempdir().unwrap();
    let moto = Moto::start();
    moto.create_bucket("registry");
    let registry = Registry::start_with(dir.path(), "s3://registry/prod", moto.environment());
    let token = registry.token(&["legal/*:push"]);
    random_cartridge(&dir.path().join("a.safetensors"), 8, 64, "s3", None);
    let report: Value = registry
        .cartridge(
            dir.path(),
            &token,
            &[
                "push",
                "legal/s3@v1",
                "a.safetensors",
                "--chunk-size",
                "64KiB",
                "--json",
            ],
        )
        .json();
    assert_eq!(report["uploaded_blobs"], 4);
    // A blob's GET is a redirect to the object store, and its HEAD is answered from the
    // metadata (the URL is signed for GET alone, so a HEAD sent after it would be refused).
    let remote: Value = registry
        .cartridge(dir.path(), &token, &["inspect", "legal/s3@v1", "--json"])
        .json();
    let chunk = &remote["manifest"]["chunks"][0]["stored"];
    let path = format!(
        "/v1/repos/legal/s3/blobs/{}",
        chunk["digest"].as_str().unwrap()
    );
    let bearer = format!("Bearer {token}");
    let auth = [("Authorization", bearer.as_str())];
    let get = exchange(&registry.url, "HTTP/1.1", "GET", &path, &auth, b"");
    assert!(get.starts_with("HTTP/1.1 307"), "{get}");
    let location = format!("\r\nlocation: {}/", moto.endpoint);
    assert!(get.to_lowercase().contains(&location), "{get}");
    let head = exchange(&registry.url, "HTTP/1.1", "HEAD", &path, &auth, b"");
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    let length = format!("\r\ncontent-length: {}\r\n", chunk["size"]);
    assert!(head.to_lowercase().contains(&length), "{head}");
    registry
        .cartridge(
            dir.path(),
            &token,
            &["pull", "legal/s3@v1", "-o", "b.safetensors"],
        )
        .ok();
    // No blob byte passed through the registry.
    let metrics = exchange(&registry.url, "HTTP/1.1", "GET", "/metrics", &[], b"");
    assert!(
        !metrics
            .lines()
            .any(|line| line.starts_with("registry_blob_bytes")),
        "{metrics}"
    );
    assert_eq!(
        std::fs::read(dir.path().join("a.safetensors")).unwrap(),
        std::fs::read(dir.path().join("b.safetensors")).unwrap()
    );
}

/// Ctrl-C at the token prompt, which reads a terminal without echo, ends the command as an
/// interrupt does and gives the terminal back as it was: echo, line editing and signals on.
#[test]
#[allow(unsafe_code)]
fn ctrl_c_at_the_token_prompt_gives_the_terminal_back() {
    use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
    use std::os::unix::process::{CommandExt, ExitStatusExt};
    let dir = tempfile::tempdir().unwrap();
    let (mut master, mut slave) = (0, 0);
    // SAFETY: openpty writes two new descriptors, owned from here on.
    let (master, slave) = unsafe {
        let opened = libc::openpty(
            &mut master,
            &mut slave,
            std::ptr::null_mut(),
            std::ptr::null(),
            std::ptr::null(),
        );
        assert_eq!(opened, 0, "openpty: {}", std::io::Error::last_os_error());
        (OwnedFd::from_raw_fd(master), OwnedFd::from_raw_fd(slave))
    };
    let modes = |terminal: &OwnedFd| {
        // SAFETY: tcgetattr fills the termios it is given.
        unsafe {
            let mut modes: libc::termios = std::mem::zeroed();
            assert_eq!(libc::tcgetattr(terminal.as_raw_fd(), &mut modes), 0);
            modes.c_lflag & (libc::ECHO | libc::ICANON | libc::ISIG)
        }
    };
    let before = modes(&slave);
    assert_eq!(before, libc::ECHO | libc::ICANON | libc::ISIG);
    let mut command = std::process::Command::new(env!("CARGO_BIN_EXE_cartridge"));
    command
        .args(["login", "http://127.0.0.1:9"])
        .env("CARTRIDGE_HOME", dir.path().join("home"))
        .env_remove("CARTRIDGE_TOKEN")
        .stdin(slave.try_clone().unwrap())
        .stdout(slave.try_clone().unwrap())
        .stderr(slave.try_clone().unwrap());
    // The terminal is the command's controlling one, and SIGINT's action the default, as in a
    // shell's foreground (a test run in the background inherits SIGINT ignored): the prompt
    // reads /dev/tty.
    // SAFETY: setsid, ioctl and signal are async-signal-safe, as pre_exec asks.
    unsafe {
        command.pre_exec(|| {
            if libc::setsid() < 0
                || libc::ioctl(0, libc::TIOCSCTTY, 0) < 0
                || libc::signal(libc::SIGINT, libc::SIG_DFL) == libc::SIG_ERR
            {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let mut child = command.spawn().unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    // Ctrl-C once the prompt has turned echo off (typed, it reaches the prompt as a character).
    while modes(&slave) & libc::ECHO != 0 {
        assert!(
            Instant::now() < deadline,
            "the prompt never turned echo off"
        );
        assert!(
            child.try_wait().unwrap().is_none(),
            "login ended before its prompt"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    // (Held open until the end: the terminal's last close would hang the command up.)
    let mut master = std::fs::File::from(master);
    std::io::Write::write_all(&mut master, b"\x03").unwrap();
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        assert!(Instant::now() < deadline, "login went on after Ctrl-C");
        std::thread::sleep(Duration::from_millis(10));
    };
    assert_eq!(status.signal(), Some(libc::SIGINT), "{status:?}");
    assert_eq!(
        modes(&slave),
        before,
        "the terminal's echo, line editing and signals"
    );
}

#[test]
fn login_saves_the_registry_and_token_for_later_commands() {
    let dir = tempfile::tempdir().unwrap();
    let registry = Registry::start(dir.path());
    let token = registry.token(&["legal/*:push"]);
    random_cartridge(&dir.path().join("a.safetensors"), 2, 16, "login", None);
    let run = |args: &[&str], stdin: &str| {
        let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_cartridge"))
            .args(args)
            .current_dir(dir.path())
            .env("CARTRIDGE_HOME", dir.path().join("home"))
            .env_remove("CARTRIDGE_TOKEN")
            .env_remove("CARTRIDGE_REGISTRY")
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        std::io::Write::write_all(&mut child.stdin.take().unwrap(), stdin.as_bytes()).unwrap();
        child.wait_with_output().unwrap()
    };
    // A token saved by an older release under another spelling of the registry's URL.
    std::fs::create_dir_all(dir.path().join("home")).unwrap();
    let shouted = registry.url.replace("http://", "HTTP://");
    std::fs::write(
        dir.path().join("home/config.toml"),
        format!("[registries.\"{shouted}/\"]\ntoken = \"stale\"\n"),
    )
    .unwrap();
    let bad = run(&["login", &registry.url], "not-a-token\n");
    assert!(!bad.status.success() && String::from_utf8_lossy(&bad.stderr).contains("HTTP 401"));
    let good = run(&["login", &registry.url], &format!("{token}\n"));
    assert!(
        good.status.success(),
        "{}",
        String::from_utf8_lossy(&good.stderr)
    );
    let config = dir.path().join("home/config.toml");
    let text = std::fs::read_to_string(&config).unwrap();
    assert!(text.contains(&registry.url) && text.contains(&token));
    assert!(
        !text.contains("stale"),
        "the older spelling's entry is replaced: {text}"
    );
    assert_eq!(
        std::os::unix::fs::PermissionsExt::mode(&std::fs::metadata(&config).unwrap().permissions())
            & 0o777,
        0o600
    );
    let push = run(&["push", "legal/a@v1", "a.safetensors"], "");
    assert!(
        push.status.success(),
        "{}",
        String::from_utf8_lossy(&push.stderr)
    );
    // The saved token goes to the registry however a reference names it; ls names it first
    // (over a --registry where nothing listens, so the host named is the one asked).
    let host = registry.url.trim_start_matches("http://");
    let elsewhere = ["--registry", "http://127.0.0.1:9"];
    let ls = |what: &str| run(&[&["ls", what][..], &elsewhere].concat(), "");
    let listing = ls(&format!("{host}/legal"));
    assert_eq!(String::from_utf8_lossy(&listing.stdout).trim(), "legal/a");
    assert_eq!(String::from_utf8_lossy(&ls(host).stdout).trim(), "legal");
}

#[test]
fn the_server_logs_json_and_shuts_down_gracefully() {
    let dir = tempfile::tempdir().unwrap();
    let mut server = std::process::Command::new(crate::support::registry_binary())
        .args([
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--log-format",
            "json",
            "--storage",
        ])
        .arg(format!("file://{}", dir.path().join("store").display()))
        .arg("--keys")
        .arg(dir.path().join("keys.json"))
        // The lines looked for are at info, whatever the caller's environment sets.
        .env("RUST_LOG", "info")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let url = crate::support::listening(&mut server);
    assert_eq!(raw_http(&url, "GET", "/v1/health", &[], b""), 200);
    let status = std::process::Command::new("kill")
        .args(["-TERM", &server.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    let output = server.wait_with_output().unwrap();
    assert!(
        output.status.success(),
        "SIGTERM ends the server cleanly: {:?}",
        output.status
    );
    let logs = String::from_utf8_lossy(&output.stderr);
    let lines: Vec<&str> = logs.lines().collect();
    assert!(lines.len() >= 2, "{logs}");
    for line in lines {
        let record: Value =
            serde_json::from_str(line).unwrap_or_else(|e| panic!("not JSON ({e}): {line}"));
        assert!(record["level"].is_string());
    }
    assert!(logs.contains("shutting down"));
}
