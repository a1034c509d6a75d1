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
            collect(path, &mut files)?;
        }
        if files.is_empty() {
            return Err(Error::Data("the corpus is empty: no files given".into()));
        }
        let mut documents = Vec::with_capacity(files.len());
        let mut hasher = blake3::Hasher::new();
        for file in files {
            let bytes = std::fs::read(&file).map_err(|e| Error::io(&file, e))?;
            let text = String::from_utf8(bytes)
                .map_err(|e| Error::Data(format!("{}: not UTF-8 text ({e})", file.display())))?;
            let name = file.display().to_string();
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

fn collect(path: &Path, files: &mut Vec<PathBuf>) -> Result<()> {
    let metadata = std::fs::metadata(path).map_err(|e| Error::io(path, e))?;
    if metadata.is_file() {
        files.push(path.to_owned());
        return Ok(());
    }
    let mut entries: Vec<PathBuf> = std::fs::read_dir(path)
        .map_err(|e| Error::io(path, e))?
        .flatten()
        .map(|e| e.path())
        .collect();
    entries.sort();
    for entry in entries {
        // Hidden files and directories (.git, editor state) are not corpus.
        if entry
            .file_name()
            .is_some_and(|n| n.to_string_lossy().starts_with('.'))
        {
            continue;
        }
        collect(&entry, files)?;
    }
    Ok(())
}
