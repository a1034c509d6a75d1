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
    /// Reads files and, recursively, directories (in name order). Every file must be UTF-8 text.
    pub fn read(paths: &[PathBuf]) -> Result<Self> {
        let mut files = Vec::new();
        for path in paths {
            // Named from the argument's last component down, so `docs`, `./docs` and
            // `/home/me/docs` make the same corpus (and no home folder reaches a provenance).
            let last = |path: &Path| path.file_name().map(|n| n.to_string_lossy().into_owned());
            let name = last(path)
                .or_else(|| last(&std::fs::canonicalize(path).ok()?))
                .unwrap_or_else(|| "corpus".to_owned());
            collect(path, name, &mut Vec::new(), &mut files)?;
        }
        if files.is_empty() {
            return Err(Error::Data("the corpus is empty: no files given".into()));
        }
        let mut documents = Vec::with_capacity(files.len());
        let mut hasher = blake3::Hasher::new();
        for (file, name) in files {
            let bytes = std::fs::read(&file).map_err(|e| Error::io(&file, e))?;
            let mut text = String::from_utf8(bytes)
                .map_err(|e| Error::Data(format!("{}: not UTF-8 text ({e})", file.display())))?;
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

/// The files under `path`, each with its name in the corpus (`name` for `path` itself).
/// `within` holds the directories `path` lies in, as their real paths: a link back to one of
/// them is a loop, skipped.
fn collect(
    path: &Path,
    name: String,
    within: &mut Vec<PathBuf>,
    files: &mut Vec<(PathBuf, String)>,
) -> Result<()> {
    let metadata = std::fs::metadata(path).map_err(|e| Error::io(path, e))?;
    if metadata.is_file() {
        files.push((path.to_owned(), name));
        return Ok(());
    }
    let real = std::fs::canonicalize(path).map_err(|e| Error::io(path, e))?;
    if within.contains(&real) {
        tracing::warn!(path = %path.display(), "skipped: a link back to a folder it is in");
        return Ok(());
    }
    within.push(real);
    let mut entries: Vec<PathBuf> = std::fs::read_dir(path)
        .map_err(|e| Error::io(path, e))?
        .flatten()
        .map(|e| e.path())
        .collect();
    entries.sort();
    for entry in entries {
        let Some(file_name) = entry.file_name().map(|n| n.to_string_lossy().into_owned()) else {
            continue;
        };
        // Hidden files and directories (.git, editor state) are not corpus.
        if file_name.starts_with('.') {
            continue;
        }
        collect(&entry, format!("{name}/{file_name}"), within, files)?;
    }
    within.pop();
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
        let corpus = Corpus::read(&[docs]).unwrap();
        let names: Vec<&str> = corpus.documents.iter().map(|d| d.name.as_str()).collect();
        assert_eq!(names, ["docs/a.txt", "docs/b.txt", "docs/sub/c.txt"]);
        assert_eq!(corpus.documents[0].text, "first");
    }
}
