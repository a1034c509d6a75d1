//! The offline commands: import, inspect, verify, compose.

use std::path::{Path, PathBuf};

use cartridge_schemas::Dtype;
use cartridge_schemas::file::{self, Cartridge, LayerData, NewCartridge};
use serde_json::Value;

use crate::support::{cartridge, composed_payload, fixture, path_str, payload};

const KV_HEADS: usize = 2;
const HEAD_DIM: usize = 8;

/// The element the fixtures' generator (`tests/fixtures/reference/make_fixtures.py`) put at
/// `[layer, head, token, dim]` of the full cache, as bf16 bytes.
fn fixture_element(keys: bool, layer: usize, head: usize, token: usize, dim: usize) -> [u8; 2] {
    let magnitude = (((layer * KV_HEADS + head) * 4 + token) * HEAD_DIM + dim + 1) as f32;
    half::bf16::from_f32(if keys { magnitude } else { -magnitude }).to_le_bytes()
}

fn expected_tensor(keys: bool, layer: usize, tokens: usize) -> Vec<u8> {
    let mut out = Vec::new();
    for head in 0..KV_HEADS {
        for token in 0..tokens {
            for dim in 0..HEAD_DIM {
                out.extend(fixture_element(keys, layer, head, token, dim));
            }
        }
    }
    out
}

fn tiny_model() -> String {
    path_str(&fixture("reference/tiny-model.json")).to_owned()
}

/// Imports a reference fixture into `dir/<output>`.
fn import(dir: &Path, fixture_name: &str, output: &str) -> PathBuf {
    let source = fixture(&format!("reference/{fixture_name}"));
    cartridge(
        dir,
        &[
            "import",
            path_str(&source),
            "--model",
            &tiny_model(),
            "-o",
            output,
        ],
    )
    .ok();
    dir.join(output)
}

#[test]
fn import_reads_torch_saved_reference_caches_exactly() {
    let dir = tempfile::tempdir().unwrap();
    // (fixture, frozen tokens, total tokens)
    for (name, frozen, tokens) in [
        ("cache-step1.pt", 1, 4),
        ("fixed-names.pt", 1, 3),
        ("nofrozen.pt", 0, 3),
    ] {
        let path = import(dir.path(), name, &format!("{name}.safetensors"));
        let imported = Cartridge::open(&path).unwrap();
        let header = imported.header();
        assert_eq!(
            (header.frozen_tokens, header.tokens),
            (frozen, tokens),
            "{name}"
        );
        assert_eq!(header.dtype, Dtype::Bf16);
        assert_eq!(header.tensor_shape(), [KV_HEADS, tokens as usize, HEAD_DIM]);
        for layer in 0..2 {
            assert_eq!(
                imported.keys(layer),
                expected_tensor(true, layer, tokens as usize),
                "{name} layer {layer} keys"
            );
            assert_eq!(
                imported.values(layer),
                expected_tensor(false, layer, tokens as usize),
                "{name} values"
            );
        }
        let source = &header.provenance["imported_from"];
        assert_eq!(source["file"], name);
        assert!(source["digest"].as_str().unwrap().starts_with("blake3:"));
    }
}

#[test]
fn import_refuses_the_wrong_model_and_non_caches() {
    let dir = tempfile::tempdir().unwrap();
    let source = fixture("reference/cache-step1.pt");
    let mut model: Value =
        serde_json::from_str(&std::fs::read_to_string(tiny_model()).unwrap()).unwrap();
    model["kv_heads"] = 3.into();
    let wrong = dir.path().join("wrong-model.json");
    std::fs::write(&wrong, model.to_string()).unwrap();
    let err = cartridge(
        dir.path(),
        &[
            "import",
            path_str(&source),
            "--model",
            path_str(&wrong),
            "-o",
            "x.safetensors",
        ],
    )
    .fails();
    assert!(
        err.contains("layer 0 has 2 kv heads of dim 8, the model has 3 of dim 8"),
        "{err}"
    );
    assert!(!dir.path().join("x.safetensors").exists());

    // A byte flipped in a tensor's storage: the archive's checksum no longer matches.
    let mut bytes = std::fs::read(&source).unwrap();
    let start = {
        let mut archive = zip::ZipArchive::new(std::io::Cursor::new(&bytes)).unwrap();
        let name = archive
            .file_names()
            .map(|name| name.unwrap().into_owned())
            .find(|name| name.ends_with("/data/0"))
            .unwrap();
        archive.by_name(&name).unwrap().data_start().unwrap() as usize
    };
    bytes[start] ^= 1;
    std::fs::write(dir.path().join("flipped.pt"), bytes).unwrap();
    let err = cartridge(
        dir.path(),
        &[
            "import",
            "flipped.pt",
            "--model",
            &tiny_model(),
            "-o",
            "x.safetensors",
        ],
    )
    .fails();
    assert!(err.contains("is corrupted: Invalid checksum"), "{err}");
    assert!(!dir.path().join("x.safetensors").exists());

    let not_zip = fixture("reference/make_fixtures.py");
    let err = cartridge(
        dir.path(),
        &[
            "import",
            path_str(&not_zip),
            "--model",
            &tiny_model(),
            "-o",
            "x.safetensors",
        ],
    )
    .fails();
    assert!(err.contains("not a torch.save zip archive"), "{err}");

    let err = cartridge(
        dir.path(),
        &[
            "import",
            path_str(&source),
            "--model",
            "no-such-model",
            "-o",
            "x",
        ],
    )
    .fails();
    assert!(err.contains("neither a file nor a known alias"), "{err}");
}

/// Pickles of a few hundred bytes that nest forty pairs of one object (2^40 copies in candle's
/// reader), that memoizes a list after each of its appends (quadratic), that reuse a long
/// string hundreds of times, or that nest objects without end, are refused, not read until
/// memory or the stack runs out.
#[test]
fn import_refuses_a_pickle_that_expands_without_end() {
    use std::io::Write;
    let dir = tempfile::tempdir().unwrap();
    // PROTO 2, None memoized as 0; then each level i: BINGET i, BINGET i, TUPLE2, BINPUT i+1.
    let mut nested = vec![0x80, 2, b'N', b'q', 0];
    for level in 0..40u8 {
        nested.extend([b'h', level, b'h', level, 0x86, b'q', level + 1]);
    }
    nested.push(b'.');
    // EMPTY_LIST, then 100 000 times: NONE, APPEND, LONG_BINPUT i.
    let mut appended = vec![0x80, 2, b']'];
    for i in 0..100_000u32 {
        appended.extend([b'N', b'a', b'r']);
        appended.extend(i.to_le_bytes());
    }
    appended.push(b'.');
    // A 512 KiB string memoized, then reused 300 times (150 MB of copies).
    let mut reused = vec![0x80, 2, b'X'];
    reused.extend((512u32 << 10).to_le_bytes());
    reused.extend(std::iter::repeat_n(b'a', 512 << 10));
    reused.extend([b'q', 0]);
    for _ in 0..300 {
        reused.extend([b'h', 0]);
    }
    reused.push(b'.');
    // None wrapped in 300 000 one-tuples (TUPLE1): dropping it alone would overflow the stack.
    let mut deep = vec![0x80, 2, b'N'];
    deep.extend(std::iter::repeat_n(0x85, 300_000));
    deep.push(b'.');
    // An empty list memoized, 300 000 copies of it, each appended into the one below it.
    let mut appended_deep = vec![0x80, 2, b']', b'q', 0];
    appended_deep.extend(std::iter::repeat_n([b'h', 0], 300_000).flatten());
    appended_deep.extend(std::iter::repeat_n(b'a', 300_000));
    appended_deep.push(b'.');
    for (name, pickle, refusal) in [
        ("nested", nested, "of its objects over"),
        ("appended", appended, "of its objects over"),
        ("reused", reused, "of its objects over"),
        ("deep", deep, "builds more than 20000 objects"),
        (
            "appended_deep",
            appended_deep,
            "builds more than 20000 objects",
        ),
    ] {
        let file = format!("{name}.pt");
        let mut zip = zip::ZipWriter::new(std::fs::File::create(dir.path().join(&file)).unwrap());
        let stored = zip::write::SimpleFileOptions::default()
            .compression_method(zip::CompressionMethod::Stored);
        zip.start_file(format!("{name}/data.pkl"), stored).unwrap();
        zip.write_all(&pickle).unwrap();
        zip.finish().unwrap();
        let err = cartridge(
            dir.path(),
            &[
                "import",
                &file,
                "--model",
                &tiny_model(),
                "-o",
                "x.safetensors",
            ],
        )
        .fails();
        assert!(err.contains(refusal), "{name}: {err}");
    }
}

#[test]
fn compose_concatenates_in_order_and_inspect_shows_the_parts() {
    let dir = tempfile::tempdir().unwrap();
    let a = import(dir.path(), "cache-step1.pt", "a.safetensors");
    let b = import(dir.path(), "fixed-names.pt", "b.safetensors");
    let written = cartridge(
        dir.path(),
        &[
            "compose",
            "a.safetensors",
            "b.safetensors",
            "-o",
            "ab.safetensors",
            "--json",
        ],
    )
    .json();
    assert_eq!(written["output"], "ab.safetensors");

    let report = cartridge(dir.path(), &["inspect", "--json", "ab.safetensors"]).json();
    assert_eq!(report["header"], written["header"]);
    assert_eq!(report["header"]["tokens"], 7);
    assert_eq!(report["header"]["frozen_tokens"], 1);
    assert_eq!(report["tensor_shape"], serde_json::json!([2, 7, 8]));
    let parts = report["header"]["provenance"]["composed_of"]
        .as_array()
        .unwrap();
    let sources: Vec<&str> = parts
        .iter()
        .map(|p| p["source"].as_str().unwrap())
        .collect();
    assert_eq!(sources, ["a.safetensors", "b.safetensors"]);
    assert_eq!(parts[0]["tokens"], 4);
    assert_eq!(parts[1]["tokens"], 3);

    let table = cartridge(dir.path(), &["inspect", "ab.safetensors"]).ok();
    assert!(table.contains("7 (1 frozen)"), "{table}");
    assert!(
        table.contains("1. a.safetensors: 4 tokens")
            && table.contains("2. b.safetensors: 3 tokens"),
        "{table}"
    );
    // A mistyped path reads as a reference too: the error says the file is missing first.
    let err = cartridge(dir.path(), &["inspect", "out/ab.safetensors"]).fails();
    assert!(
        err.contains("there is no file out/ab.safetensors; as a reference: "),
        "{err}"
    );

    // Keys and values alike: per head, a's rows, then b's rows.
    assert_eq!(
        payload(&dir.path().join("ab.safetensors")),
        composed_payload(&[&a, &b])
    );
}

fn write_f32_copy(from: &Path, to: &Path) {
    let source = Cartridge::open(from).unwrap();
    let header = source.header();
    let widen = |bytes: &[u8]| -> Vec<u8> {
        bytes
            .chunks_exact(2)
            .flat_map(|b| {
                half::bf16::from_le_bytes([b[0], b[1]])
                    .to_f32()
                    .to_le_bytes()
            })
            .collect()
    };
    let tensors: Vec<[Vec<u8>; 2]> = (0..source.layer_count())
        .map(|l| [widen(source.keys(l)), widen(source.values(l))])
        .collect();
    let layers: Vec<LayerData<'_>> = tensors
        .iter()
        .map(|[k, v]| LayerData { keys: k, values: v })
        .collect();
    let new = NewCartridge {
        model: header.model.clone(),
        dtype: Dtype::F32,
        tokens: header.tokens,
        frozen_tokens: header.frozen_tokens,
        provenance: Value::Null,
    };
    file::write(to, new, &layers).unwrap();
}

#[test]
fn compose_refuses_other_models_and_dtypes() {
    let dir = tempfile::tempdir().unwrap();
    import(dir.path(), "cache-step1.pt", "a.safetensors");
    let mut model: Value =
        serde_json::from_str(&std::fs::read_to_string(tiny_model()).unwrap()).unwrap();
    model["weights"] = format!("blake3:{}", "2".repeat(64)).into();
    std::fs::write(dir.path().join("other.json"), model.to_string()).unwrap();
    let source = fixture("reference/cache-step1.pt");
    cartridge(
        dir.path(),
        &[
            "import",
            path_str(&source),
            "--model",
            "other.json",
            "-o",
            "other.safetensors",
        ],
    )
    .ok();

    let err = cartridge(
        dir.path(),
        &[
            "compose",
            "a.safetensors",
            "other.safetensors",
            "-o",
            "x.safetensors",
        ],
    )
    .fails();
    assert!(
        err.contains("other.safetensors was made for another model than a.safetensors"),
        "{err}"
    );
    assert!(err.contains("weights differs"), "{err}");

    write_f32_copy(
        &dir.path().join("a.safetensors"),
        &dir.path().join("wide.safetensors"),
    );
    let err = cartridge(
        dir.path(),
        &[
            "compose",
            "a.safetensors",
            "wide.safetensors",
            "-o",
            "x.safetensors",
        ],
    )
    .fails();
    assert!(
        err.contains("wide.safetensors holds f32 but a.safetensors holds bf16"),
        "{err}"
    );
    assert!(!dir.path().join("x.safetensors").exists());

    let err = cartridge(
        dir.path(),
        &["compose", "a.safetensors", "-o", "x.safetensors"],
    )
    .fails();
    assert!(err.contains("2 values required"), "{err}");

    // Neither compose nor import writes over what it reads.
    let before = std::fs::read(dir.path().join("a.safetensors")).unwrap();
    let err = cartridge(
        dir.path(),
        &[
            "compose",
            "a.safetensors",
            "other.safetensors",
            "-o",
            "./a.safetensors",
        ],
    )
    .fails();
    assert!(err.contains("is the input file"), "{err}");
    assert_eq!(
        std::fs::read(dir.path().join("a.safetensors")).unwrap(),
        before
    );
    // `..` after a symbolic link leads out of the link's target: `link/../a.safetensors` is
    // `kept/a.safetensors` here.
    std::fs::create_dir_all(dir.path().join("kept/inner")).unwrap();
    std::fs::copy(
        dir.path().join("a.safetensors"),
        dir.path().join("kept/a.safetensors"),
    )
    .unwrap();
    std::os::unix::fs::symlink("kept/inner", dir.path().join("link")).unwrap();
    let err = cartridge(
        dir.path(),
        &[
            "compose",
            "kept/a.safetensors",
            "other.safetensors",
            "-o",
            "link/../a.safetensors",
        ],
    )
    .fails();
    assert!(err.contains("is the input file"), "{err}");
    assert_eq!(
        std::fs::read(dir.path().join("kept/a.safetensors")).unwrap(),
        before
    );
    std::fs::copy(&source, dir.path().join("cache.pt")).unwrap();
    for (output, expected) in [
        ("cache.pt", "is the input file"),
        ("other.json", "is the model file"),
    ] {
        let err = cartridge(
            dir.path(),
            &["import", "cache.pt", "--model", "other.json", "-o", output],
        )
        .fails();
        assert!(err.contains(expected), "{output}: {err}");
    }
    assert_eq!(
        std::fs::read(dir.path().join("cache.pt")).unwrap(),
        std::fs::read(&source).unwrap()
    );
}

/// Writes `bytes` to a file in `dir` and returns what `verify` printed on stderr.
fn verify_fails(dir: &Path, name: &str, bytes: &[u8]) -> String {
    std::fs::write(dir.join(name), bytes).unwrap();
    let err = cartridge(dir, &["verify", name]).fails();
    // inspect refuses a defective file the same way.
    cartridge(dir, &["inspect", name]).fails();
    err
}

#[test]
fn verify_names_each_defect() {
    let dir = tempfile::tempdir().unwrap();
    let good = import(dir.path(), "cache-step1.pt", "good.safetensors");
    let out = cartridge(dir.path(), &["verify", "good.safetensors"]).ok();
    assert!(
        out.starts_with("ok: good.safetensors: 2 layers, 4 tokens, bf16"),
        "{out}"
    );
    let report = cartridge(dir.path(), &["verify", "--json", "good.safetensors"]).json();
    assert_eq!(report["ok"], true);
    // What is not a file is named as such.
    let err = cartridge(dir.path(), &["verify", "."]).fails();
    assert!(
        err.contains("it is a folder, not a cartridge file"),
        "{err}"
    );
    let err = cartridge(dir.path(), &["verify", "legal/contracts@v3"]).fails();
    assert!(err.contains("`cartridge pull legal/contracts@v3`"), "{err}");

    let bytes = std::fs::read(&good).unwrap();

    let mut flipped = bytes.clone();
    let position = flipped.len() - 100;
    flipped[position] ^= 0x10;
    let err = verify_fails(dir.path(), "flipped.safetensors", &flipped);
    assert!(
        err.contains("flipped.safetensors: payload digest mismatch"),
        "{err}"
    );

    // A byte of the header flipped (the frozen tokens, 1 to 3) is found by the header's digest.
    let field = br#"\"frozen_tokens\":1"#;
    let at = bytes
        .windows(field.len())
        .position(|w| w == field)
        .expect("the header names its frozen tokens");
    let mut refrozen = bytes.clone();
    refrozen[at + field.len() - 1] = b'3';
    let err = verify_fails(dir.path(), "refrozen.safetensors", &refrozen);
    assert!(
        err.contains("refrozen.safetensors: the cartridge header is corrupt"),
        "{err}"
    );

    let err = verify_fails(
        dir.path(),
        "truncated.safetensors",
        &bytes[..bytes.len() - 7],
    );
    assert!(
        err.contains(
            "truncated: the header declares 512 bytes of tensor data but the file holds 505"
        ),
        "{err}"
    );

    // A consistent safetensors file whose tensors have the wrong shape for the header.
    let source = Cartridge::open(&good).unwrap();
    let header = source.header();
    let transposed = [KV_HEADS, HEAD_DIM, header.tokens as usize];
    let views: Vec<(String, safetensors::tensor::TensorView<'_>)> = (0..2)
        .flat_map(|layer| {
            [
                (format!("layers.{layer}.keys"), source.keys(layer)),
                (format!("layers.{layer}.values"), source.values(layer)),
            ]
        })
        .map(|(name, data)| {
            (
                name,
                safetensors::tensor::TensorView::new(
                    safetensors::Dtype::BF16,
                    transposed.to_vec(),
                    data,
                )
                .unwrap(),
            )
        })
        .collect();
    let metadata = std::collections::HashMap::from([(
        "cartridge".to_owned(),
        cartridge_schemas::file::header_json(header).unwrap(),
    )]);
    let reshaped = safetensors::serialize(views, Some(metadata)).unwrap();
    let err = verify_fails(dir.path(), "shape.safetensors", &reshaped);
    assert!(
        err.contains("tensor 'layers.0.keys' has shape [2, 8, 4], expected [2, 4, 8]"),
        "{err}"
    );

    let report = cartridge(dir.path(), &["verify", "--json", "shape.safetensors"]);
    assert!(!report.success);
    let report: Value = serde_json::from_str(&report.stdout).unwrap();
    assert_eq!(report["ok"], false);
    assert!(report["error"].as_str().unwrap().contains("has shape"));

    let err = verify_fails(
        dir.path(),
        "pickle.safetensors",
        &std::fs::read(fixture("reference/cache-step1.pt")).unwrap(),
    );
    assert!(err.contains("not a valid safetensors file"), "{err}");

    let err = cartridge(dir.path(), &["verify", "missing.safetensors"]).fails();
    assert!(err.contains("cannot read missing.safetensors"), "{err}");
}

#[test]
fn every_command_has_help() {
    let dir = tempfile::tempdir().unwrap();
    for command in [
        &["--help"][..],
        &["inspect", "--help"],
        &["verify", "--help"],
        &["compose", "--help"],
        &["import", "--help"],
        &["model", "--help"],
        &["model", "install", "--help"],
        &["model", "fingerprint", "--help"],
    ] {
        let out = cartridge(dir.path(), command).ok();
        assert!(out.contains("Usage:"), "{command:?}: {out}");
    }
}

#[test]
fn real_model_fingerprint_and_a_cache_of_its_shape() {
    let dir = tempfile::tempdir().unwrap();
    let gguf = crate::support::smollm2_gguf();
    let fingerprint = cartridge(
        dir.path(),
        &["model", "fingerprint", "--json", path_str(&gguf)],
    )
    .json();
    assert_eq!(fingerprint["architecture"], "llama");
    assert_eq!(
        (
            fingerprint["layers"].as_u64(),
            fingerprint["kv_heads"].as_u64()
        ),
        (Some(30), Some(3))
    );
    assert_eq!(fingerprint["head_dim"], 64);
    assert_eq!(fingerprint["rope"]["theta"], 100000.0);

    // A cache in the reference format written without torch, as the demo makes them.
    let generator = Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/reference_cache.py");
    let status = std::process::Command::new("python3")
        .arg(&generator)
        .args([
            "gen.pt",
            "--layers",
            "30",
            "--kv-heads",
            "3",
            "--head-dim",
            "64",
            "--tokens",
            "6",
            "--frozen",
            "2",
        ])
        .current_dir(dir.path())
        .status()
        .unwrap();
    assert!(status.success());
    cartridge(
        dir.path(),
        &[
            "import",
            "gen.pt",
            "--model",
            path_str(&gguf),
            "-o",
            "gen.safetensors",
        ],
    )
    .ok();
    let imported = Cartridge::open(&dir.path().join("gen.safetensors")).unwrap();
    assert_eq!(
        imported.header().model.weights.to_string(),
        fingerprint["weights"]
    );
    assert_eq!(
        (imported.header().tokens, imported.header().frozen_tokens),
        (6, 2)
    );
}
