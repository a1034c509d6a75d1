//! The corpus a cartridge is trained on: text files (or directories of them), read whole, named
//! by a digest so a run can tell whether stored work belongs to it.

use std::path::{Path, PathBuf};

use cartridge_schemas::Digest;
use serde::Serialize;

use crate::error::{Error, Result};

#[derive(Debug, Clone, Serialize)]
pub struct Document {
    pub name: String,
    #[serde(skip)]
    pub text: String,
}

#[derive(Debug, Clone, Serialize)]
pub struct Corpus {
    pub documents: Vec<Document>,
    /// blake3 over every document's name and text, in order.
    pub digest: Digest,
}

impl Corpus {
    /// Reads files and, recursively, folders (in name order). In a folder, what its own
    /// `.gitignore` and `.ignore` files (those in it and below) leave out is skipped (build
    /// outputs, dependencies), and so are hidden files (`.git`); a file in it that is not
    /// UTF-8 text (an image in a codebase), a broken link or a special file is skipped with a
    /// warning. A file named is read whatever a folder ignores, and must be text. A file
    /// reached twice is read once.
    pub fn read(paths: &[PathBuf]) -> Result<Self> {
        let mut files = Vec::new();
        for path in paths {
            // Named from the argument's last component down, so `docs`, `./docs` and
            // `/home/me/docs` make the same corpus (and no home folder reaches a provenance).
            let last = |path: &Path| path.file_name().map(|n| n.to_string_lossy().into_owned());
            let name = last(path)
                .or_else(|| last(&std::fs::canonicalize(path).ok()?))
                .unwrap_or_else(|| "corpus".to_owned());
            collect(path, name, &mut files)?;
        }
        // The first place a file is reached names it; named on the command line anywhere, it
        // must be text.
        let mut first_at: std::collections::HashMap<PathBuf, usize> = Default::default();
        let mut kept: Vec<(PathBuf, String, bool)> = Vec::with_capacity(files.len());
        for (file, name, named) in files {
            let real = std::fs::canonicalize(&file).unwrap_or_else(|_| file.clone());
            match first_at.get(&real) {
                Some(&at) => {
                    tracing::warn!(file = %file.display(), "skipped: already in the corpus");
                    kept[at].2 |= named;
                }
                None => {
                    first_at.insert(real, kept.len());
                    kept.push((file, name, named));
                }
            }
        }
        let files = kept;
        let mut documents = Vec::with_capacity(files.len());
        let mut hasher = blake3::Hasher::new();
        for (file, name, named) in files {
            let bytes = std::fs::read(&file).map_err(|e| Error::io(&file, e))?;
            let mut text = match String::from_utf8(bytes) {
                Ok(text) => text,
                Err(error) if named => {
                    return Err(Error::Data(format!(
                        "{}: not UTF-8 text ({error})",
                        file.display()
                    )));
                }
                Err(_) => {
                    tracing::warn!(file = %file.display(), "skipped: not UTF-8 text");
                    continue;
                }
            };
            // A byte-order mark is no text.
            if text.starts_with('\u{feff}') {
                text.drain(..'\u{feff}'.len_utf8());
            }
            hasher
                .update(&(name.len() as u64).to_le_bytes())
                .update(name.as_bytes());
            hasher
                .update(&(text.len() as u64).to_le_bytes())
                .update(text.as_bytes());
            documents.push(Document { name, text });
        }
        if documents.is_empty() {
            return Err(Error::Data(
                "the corpus is empty: no text files in what was given (in a folder, hidden files and what its .gitignore and .ignore files leave out are skipped)".into(),
            ));
        }
        if documents.iter().all(|d| d.text.trim().is_empty()) {
            return Err(Error::Data("the corpus holds no text".into()));
        }
        Ok(Self {
            documents,
            digest: hasher.finalize().into(),
        })
    }

    /// All documents as one text, each under a line naming it.
    pub fn text(&self) -> String {
        if self.documents.len() == 1 {
            return self.documents[0].text.clone();
        }
        self.documents
            .iter()
            .map(|d| format!("# {}\n\n{}", d.name, d.text.trim_end()))
            .collect::<Vec<_>>()
            .join("\n\n")
    }
}

/// The files under `path`, named on the command line, each with its name in the corpus (`name`
/// for `path` itself) and whether it is `path` itself.
fn collect(path: &Path, name: String, files: &mut Vec<(PathBuf, String, bool)>) -> Result<()> {
    let metadata = std::fs::metadata(path).map_err(|e| Error::io(path, e))?;
    if metadata.is_file() {
        files.push((path.to_owned(), name, true));
        return Ok(());
    }
    if !metadata.is_dir() {
        return Err(Error::Data(format!(
            "{}: not a regular file or folder",
            path.display()
        )));
    }
    // Only the folder's own ignore files, in a git checkout or not: a corpus (and its digest)
    // is what the folder holds, the same on every machine, whatever lies above it (a home
    // folder's `.gitignore` of `*`) or a user's global excludes say. Links are followed, a loop
    // back up skipped. ("-" would be read as standard input.)
    let root = if path == Path::new("-") {
        Path::new("./-")
    } else {
        path
    };
    let walk = ignore::WalkBuilder::new(root)
        .parents(false)
        .require_git(false)
        .git_global(false)
        .git_exclude(false)
        .follow_links(true)
        .sort_by_file_name(|a, b| a.cmp(b))
        .build();
    for entry in walk {
        let entry = match entry {
            Ok(entry) => entry,
            // A folder that cannot be read would leave the corpus short.
            Err(error)
                if error
                    .io_error()
                    .is_some_and(|e| e.kind() != std::io::ErrorKind::NotFound) =>
            {
                return Err(Error::Data(format!("reading the corpus: {error}")));
            }
            Err(error) => {
                tracing::warn!(%error, "skipped (a broken link, a loop, a bad ignore line?)");
                continue;
            }
        };
        let Some(kind) = entry.file_type() else {
            continue;
        };
        if kind.is_dir() {
            continue;
        }
        if !kind.is_file() {
            let path = entry.path();
            tracing::warn!(path = %path.display(), "skipped: not a regular file or folder");
            continue;
        }
        let within = entry.path().strip_prefix(root).unwrap_or(entry.path());
        let within: Vec<_> = within
            .components()
            .map(|c| c.as_os_str().to_string_lossy().into_owned())
            .collect();
        files.push((
            entry.into_path(),
            format!("{name}/{}", within.join("/")),
            false,
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn folders_are_read_in_name_order_without_hidden_files_or_loops() {
        let dir = tempfile::tempdir().unwrap();
        let docs = dir.path().join("docs");
        std::fs::create_dir_all(docs.join("sub")).unwrap();
        std::fs::write(docs.join("b.txt"), "second").unwrap();
        std::fs::write(docs.join("a.txt"), "\u{feff}first").unwrap();
        std::fs::write(docs.join("sub/c.txt"), "third").unwrap();
        std::fs::write(docs.join(".notes"), "hidden").unwrap();
        // A link back up (as some checkouts hold) would recurse without end.
        std::os::unix::fs::symlink("..", docs.join("sub/up")).unwrap();
        // What a codebase also holds: binary files and broken links, skipped.
        std::fs::write(
            docs.join("sub/logo.png"),
            [0x89, b'P', b'N', b'G', 0xff, 0xfe],
        )
        .unwrap();
        std::os::unix::fs::symlink("gone.txt", docs.join("sub/dangling")).unwrap();
        // Named again (as a file of the folder given): read once.
        let corpus = Corpus::read(&[docs.clone(), docs.join("b.txt")]).unwrap();
        let names: Vec<&str> = corpus.documents.iter().map(|d| d.name.as_str()).collect();
        assert_eq!(names, ["docs/a.txt", "docs/b.txt", "docs/sub/c.txt"]);
        assert_eq!(corpus.documents[0].text, "first");
        // Named on their own, they are refused, also where a folder given reaches them first.
        let err = Corpus::read(&[docs.join("sub/logo.png")]).unwrap_err();
        assert!(err.to_string().contains("not UTF-8 text"), "{err}");
        let err = Corpus::read(&[docs.clone(), docs.join("sub/logo.png")]).unwrap_err();
        assert!(err.to_string().contains("not UTF-8 text"), "{err}");
        assert!(Corpus::read(&[docs.join("sub/dangling")]).is_err());
    }

    #[test]
    fn what_a_folder_ignores_is_no_corpus_unless_named() {
        let dir = tempfile::tempdir().unwrap();
        let repo = dir.path().join("repo");
        // No checkout needed: the folder's own ignore files count.
        for folder in ["src", "target/debug", "drafts"] {
            std::fs::create_dir_all(repo.join(folder)).unwrap();
        }
        std::fs::write(repo.join(".gitignore"), "target/\n*.log\n").unwrap();
        std::fs::write(repo.join("src/.ignore"), "generated.rs\n").unwrap();
        for (file, text) in [
            ("README.md", "read me"),
            ("run.log", "a log"),
            ("src/lib.rs", "code"),
            ("src/generated.rs", "made by a build"),
            ("src/trace.log", "a log"),
            ("target/debug/out.d", "build output"),
            ("drafts/plan.txt", "a plan"),
        ] {
            std::fs::write(repo.join(file), text).unwrap();
        }
        let corpus = Corpus::read(std::slice::from_ref(&repo)).unwrap();
        let names: Vec<&str> = corpus.documents.iter().map(|d| d.name.as_str()).collect();
        assert_eq!(
            names,
            ["repo/README.md", "repo/drafts/plan.txt", "repo/src/lib.rs"]
        );
        // Read from a folder inside, only its own ignore files count (what lies above a folder
        // would make the corpus differ from one machine to the next).
        let corpus = Corpus::read(&[repo.join("src")]).unwrap();
        let names: Vec<&str> = corpus.documents.iter().map(|d| d.name.as_str()).collect();
        assert_eq!(names, ["src/lib.rs", "src/trace.log"]);
        // Named, an ignored file is read.
        let corpus = Corpus::read(&[repo.clone(), repo.join("run.log")]).unwrap();
        assert_eq!(corpus.documents.len(), 4);
        assert_eq!(corpus.documents[3].name, "run.log");
    }
}
