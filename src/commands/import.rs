//! `cartridge import`: convert a cache saved by the reference PyTorch training code.
//!
//! The reference `TrainableCache.save` calls `torch.save` on a plain dict of four
//! `nn.ParameterList`s — `trainable_keys`, `trainable_values`, `frozen_keys`, `frozen_values`
//! (`fixed_*` before August 2025) — one `[1, kv_heads, tokens, head_dim]` bf16 Parameter per layer,
//! frozen tokens first. No configuration is saved, so the model comes from `--model`.
//!
//! candle's pickle reader parses the file but its tensor listing only looks at a flat state dict,
//! so the ParameterLists are walked here: each is `BUILD(NEWOBJ(ParameterList), state)` whose
//! `state["_parameters"]` maps "0", "1", … to `_rebuild_parameter(_rebuild_tensor_v2(…))`.

use std::io::{BufReader, Read};
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail, ensure};
use candle_core::DType;
use candle_core::pickle::{Object, Stack, TensorInfo};
use cartridge_schemas::file::{self, LayerData, NewCartridge};
use cartridge_schemas::{Digest, Dtype, ModelFingerprint};
use cartridge_trainer::model::ModelSource;
use clap::Args;
use serde_json::json;

use super::{Input, check_outputs};
use crate::output::human_bytes;
use cartridge_schemas::paths::Paths;

/// Convert a cartridge saved by the paper's reference PyTorch code (a `torch.save` of
/// trainable/frozen key and value ParameterLists) into a cartridge file.
#[derive(Debug, Args)]
pub struct ImportArgs {
    /// The .pt file written by the reference code's `TrainableCache.save`.
    pub file: PathBuf,
    /// The model it was trained for: a GGUF file, a Hugging Face checkpoint directory, a
    /// fingerprint JSON file, or an installed alias.
    #[arg(long)]
    pub model: String,
    /// Where to write the cartridge.
    #[arg(short, long)]
    pub output: PathBuf,
    /// Print the written header as JSON.
    #[arg(long)]
    pub json: bool,
}

pub fn run(args: ImportArgs) -> Result<()> {
    let source = ModelSource::resolve(&args.model, &Paths::from_env()?.models())?;
    let inputs: Vec<(Input, &Path)> = std::iter::once((Input::File, args.file.as_path()))
        // A fingerprint names no model file, but is read from one.
        .chain(Some((
            Input::Model,
            source.path().unwrap_or(Path::new(&args.model)),
        )))
        .collect();
    cartridge_schemas::file::check_destination(&args.output)
        .with_context(|| format!("cannot write {}", args.output.display()))?;
    check_outputs(&[("output", &args.output)], &inputs)?;
    let model = source.fingerprint()?;
    let cache = ReferenceCache::read(&args.file)
        .with_context(|| format!("importing {}", args.file.display()))?;
    let header = cache.write(&args.file, model, &args.output)?;
    if args.json {
        let report = json!({"output": args.output.display().to_string(), "header": header});
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        println!(
            "wrote {}: {} layers, {} tokens ({} frozen), {}, {}",
            args.output.display(),
            header.model.layers,
            header.tokens,
            header.frozen_tokens,
            header.dtype,
            human_bytes(header.payload_bytes())
        );
    }
    Ok(())
}

/// A reference cache's pickle is a few kilobytes per layer; its tensors are stored beside it.
const MAX_PICKLE_BYTES: u64 = 1 << 20;

/// Most objects a pickle may build or put in one another (tuples, lists, dicts, reductions, and
/// each append or item set): a reference cache takes about a dozen a tensor, four tensors a
/// layer, so this is some 400 layers. The cap also bounds how deeply objects nest, which
/// dropping or printing them walks on the stack.
const MAX_BUILT: usize = 20_000;

/// How many bytes of objects the pickle's memo may copy in all. candle's reader copies an object
/// each time it is memoized and each time it is reused, so forty nested pairs of one object, a
/// few hundred bytes of pickle, would expand to 2^40 objects, a list memoized after each of its
/// appends grows quadratically, and a long string reused a thousand times is a thousand copies;
/// a reference cache memoizes and reuses only small objects (a few thousand in all for 30
/// layers, well under a megabyte).
const MAX_COPIED_BYTES: usize = 64 << 20;

/// Reads a pickle, weighing what each memo operation candle reads copies (`BINPUT`,
/// `LONG_BINPUT`, `BINGET`, `LONG_BINGET`): every object is then built from the file's own
/// bytes or from copies within the budget, so memory and time stay bounded.
fn read_pickle<R: std::io::BufRead>(reader: &mut R) -> Result<Object> {
    let malformed = "malformed pickle in data.pkl";
    let mut stack = Stack::empty();
    let (mut copied, mut built) = (0, 0);
    loop {
        let opcode = reader.fill_buf().context(malformed)?.first().copied();
        // TUPLE, TUPLE1-3, EMPTY_TUPLE, LIST, EMPTY_LIST, DICT, EMPTY_DICT, REDUCE, BUILD,
        // NEWOBJ, BINPERSID, APPEND, APPENDS, SETITEM, SETITEMS: every step that makes an
        // object or puts one inside another.
        if let Some(
            b't'
            | 0x85..=0x87
            | b')'
            | b'l'
            | b']'
            | b'd'
            | b'}'
            | b'R'
            | b'b'
            | 0x81
            | b'Q'
            | b'a'
            | b'e'
            | b's'
            | b'u',
        ) = opcode
        {
            built += 1;
            ensure!(
                built <= MAX_BUILT,
                "data.pkl builds more than {MAX_BUILT} objects: not a reference cache"
            );
        }
        if stack.read(reader).context(malformed)? {
            break;
        }
        if let (Some(b'q' | b'r' | b'h' | b'j'), Some(top)) = (opcode, stack.stack().last()) {
            copied += weight(top, MAX_COPIED_BYTES + 1 - copied);
            ensure!(
                copied <= MAX_COPIED_BYTES,
                "data.pkl copies more than {} of its objects over: not a reference cache",
                human_bytes(MAX_COPIED_BYTES as u64)
            );
        }
    }
    stack.finalize().context(malformed)
}

/// `object` as Debug prints it, cut after 200 characters: a file's object may be huge, and
/// printing it whole would flood the error (and walk all of it).
fn shown(object: &Object) -> String {
    use std::fmt::Write;
    struct Capped(String);
    impl Write for Capped {
        fn write_str(&mut self, text: &str) -> std::fmt::Result {
            let room = 200usize.saturating_sub(self.0.len());
            if text.len() <= room {
                self.0.push_str(text);
                return Ok(());
            }
            let cut = (0..=room)
                .rev()
                .find(|&i| text.is_char_boundary(i))
                .unwrap_or(0);
            self.0.push_str(&text[..cut]);
            Err(std::fmt::Error)
        }
    }
    let mut capped = Capped(String::new());
    if write!(capped, "{object:?}").is_err() {
        capped.0.push('…');
    }
    capped.0
}

/// About the bytes `object` takes in memory (each object, and its text), counted up to `limit`.
fn weight(object: &Object, limit: usize) -> usize {
    const OBJECT: usize = std::mem::size_of::<Object>();
    let mut pending = vec![object];
    let mut total = 0;
    while let Some(object) = pending.pop() {
        total += OBJECT;
        match object {
            Object::Tuple(items) | Object::List(items) => pending.extend(items),
            Object::Dict(entries) => pending.extend(entries.iter().flat_map(|(k, v)| [k, v])),
            Object::Reduce { callable, args } | Object::Build { callable, args } => {
                pending.extend([&**callable, &**args]);
            }
            Object::PersistentLoad(inner) => pending.push(inner),
            Object::Unicode(text) => total += text.len(),
            Object::Class {
                module_name,
                class_name,
            } => total += module_name.len() + class_name.len(),
            _ => {}
        }
        if total >= limit {
            break;
        }
    }
    total
}

/// The first `keep` bytes of an archive entry, read on to the entry's end: the zip reader checks
/// an entry's CRC only there. What is past `keep` is not held, so an entry that expands without
/// end costs time, not memory.
fn read_whole(mut entry: impl Read, keep: u64) -> std::io::Result<Vec<u8>> {
    let mut kept = Vec::new();
    (&mut entry).take(keep).read_to_end(&mut kept)?;
    std::io::copy(&mut entry, &mut std::io::sink())?;
    Ok(kept)
}

/// One ParameterList: per layer, the tensor's bytes and its `[1, kv_heads, tokens, head_dim]` shape.
struct TensorList {
    tensors: Vec<(Vec<u8>, [usize; 4])>,
}

struct ReferenceCache {
    dtype: Dtype,
    /// "frozen" or "fixed": which naming the file used.
    naming: &'static str,
    trainable_keys: TensorList,
    trainable_values: TensorList,
    frozen_keys: TensorList,
    frozen_values: TensorList,
}

impl ReferenceCache {
    fn read(path: &Path) -> Result<Self> {
        let file = std::fs::File::open(path)?;
        let mut zip =
            zip::ZipArchive::new(BufReader::new(file)).context("not a torch.save zip archive")?;
        // The archive's folder is named after the file it was first saved as, so find data.pkl.
        let names = zip
            .file_names()
            .map(|name| name.map(|n| n.into_owned()))
            .collect::<Result<Vec<_>, _>>()?;
        let pickle_name = names
            .into_iter()
            .find(|name| name.ends_with("/data.pkl") || name == "data.pkl")
            .context("the archive has no data.pkl: not a torch.save file")?;
        let data_dir = PathBuf::from(pickle_name.strip_suffix(".pkl").unwrap_or("data"));
        let pickle = zip.by_name(&pickle_name)?;
        ensure!(
            pickle.size() <= MAX_PICKLE_BYTES,
            "data.pkl holds {} bytes, more than a reference cache's (at most {MAX_PICKLE_BYTES})",
            pickle.size()
        );
        let pickle = read_whole(pickle, MAX_PICKLE_BYTES).context("data.pkl is corrupted")?;
        let Object::Dict(entries) = read_pickle(&mut pickle.as_slice())? else {
            bail!("data.pkl does not hold a dict: not a reference cartridge");
        };
        let mut lists: Vec<(String, Object)> = entries
            .into_iter()
            .filter_map(|(key, value)| Some((key.unicode().ok()?, value)))
            .collect();
        let mut take = |name: &str| {
            lists
                .iter()
                .position(|(key, _)| key == name)
                .map(|i| lists.remove(i).1)
        };
        let trainable_keys = take("trainable_keys");
        let trainable_values = take("trainable_values");
        let (naming, frozen_keys, frozen_values) = match (
            take("frozen_keys"),
            take("frozen_values"),
        ) {
            (Some(keys), Some(values)) => ("frozen", keys, values),
            (None, None) => match (take("fixed_keys"), take("fixed_values")) {
                (Some(keys), Some(values)) => ("fixed", keys, values),
                _ => bail!(
                    "no frozen_keys/frozen_values (or older fixed_keys/fixed_values): not a reference cartridge"
                ),
            },
            _ => bail!("only one of frozen_keys and frozen_values is present"),
        };
        let (Some(trainable_keys), Some(trainable_values)) = (trainable_keys, trainable_values)
        else {
            bail!("no trainable_keys/trainable_values: not a reference cartridge");
        };

        let mut dtype = None;
        let mut read_list = |name: &str, object: Object| -> Result<TensorList> {
            let infos =
                parameter_list(object, &data_dir).with_context(|| format!("reading {name}"))?;
            let mut tensors = Vec::with_capacity(infos.len());
            for (index, info) in infos.into_iter().enumerate() {
                let what = || format!("{name}[{index}]");
                let this = match info.dtype {
                    DType::BF16 => Dtype::Bf16,
                    DType::F16 => Dtype::F16,
                    DType::F32 => Dtype::F32,
                    other => bail!("{} is {other:?}; cartridges hold bf16, f16 or f32", what()),
                };
                ensure!(
                    *dtype.get_or_insert(this) == this,
                    "{} is {this}, earlier tensors are {}",
                    what(),
                    dtype.unwrap_or(this)
                );
                let dims = info.layout.dims();
                let shape: [usize; 4] = dims
                    .try_into()
                    .ok()
                    .filter(|s: &[usize; 4]| s[0] == 1)
                    .with_context(|| {
                        format!(
                            "{} has shape {dims:?}, expected [1, kv_heads, tokens, head_dim]",
                            what()
                        )
                    })?;
                ensure!(info.layout.is_contiguous(), "{} is not contiguous", what());
                // Sizes come from the file: checked, and no more is held than they span (a
                // compressed entry could expand without end; the rest is read only for its CRC).
                let start = info.layout.start_offset();
                let end = shape
                    .iter()
                    .try_fold(this.size(), |bytes, &dim| bytes.checked_mul(dim))
                    .and_then(|len| start.checked_add(len))
                    .with_context(|| format!("{} has shape {dims:?}: too large", what()))?;
                let entry = zip
                    .by_name(&info.path)
                    .with_context(|| format!("{}: storage {} is missing", what(), info.path))?;
                let storage = read_whole(entry, end as u64)
                    .with_context(|| format!("{}: storage {} is corrupted", what(), info.path))?;
                let bytes = storage.get(start..end).with_context(|| {
                    format!(
                        "{}: storage {} is truncated ({} bytes)",
                        what(),
                        info.path,
                        storage.len()
                    )
                })?;
                tensors.push((bytes.to_vec(), shape));
            }
            Ok(TensorList { tensors })
        };
        let cache = Self {
            trainable_keys: read_list("trainable_keys", trainable_keys)?,
            trainable_values: read_list("trainable_values", trainable_values)?,
            frozen_keys: read_list(&format!("{naming}_keys"), frozen_keys)?,
            frozen_values: read_list(&format!("{naming}_values"), frozen_values)?,
            dtype: dtype.context("the file holds no tensors")?,
            naming,
        };
        Ok(cache)
    }

    /// Checks the shapes against the model and writes `[kv_heads, frozen + trainable, head_dim]`
    /// tensors, frozen tokens first.
    fn write(self, source: &Path, model: ModelFingerprint, output: &Path) -> Result<file::Header> {
        let layers = self.trainable_keys.tensors.len();
        let naming = self.naming;
        ensure!(
            layers == model.layers as usize,
            "the file has {layers} layers, the model has {}: wrong --model?",
            model.layers
        );
        let lists = [
            ("trainable_keys", &self.trainable_keys),
            ("trainable_values", &self.trainable_values),
            ("frozen_keys", &self.frozen_keys),
            ("frozen_values", &self.frozen_values),
        ];
        for (name, list) in &lists[1..] {
            // A cache trained with nothing frozen saves empty frozen lists.
            let empty_frozen = name.starts_with("frozen") && list.tensors.is_empty();
            ensure!(
                list.tensors.len() == layers || empty_frozen,
                "{name} has {} layers, trainable_keys has {layers}",
                list.tensors.len()
            );
        }
        let tokens_of = |list: &TensorList| -> Result<usize> {
            let Some((_, first)) = list.tensors.first() else {
                return Ok(0);
            };
            for (layer, (_, shape)) in list.tensors.iter().enumerate() {
                ensure!(
                    shape[1] == model.kv_heads as usize && shape[3] == model.head_dim as usize,
                    "layer {layer} has {} kv heads of dim {}, the model has {} of dim {}: wrong --model?",
                    shape[1],
                    shape[3],
                    model.kv_heads,
                    model.head_dim
                );
                ensure!(
                    shape[2] == first[2],
                    "layer {layer} has {} tokens, layer 0 has {}",
                    shape[2],
                    first[2]
                );
            }
            Ok(first[2])
        };
        let trainable = tokens_of(&self.trainable_keys)?;
        let frozen = tokens_of(&self.frozen_keys)?;
        ensure!(
            tokens_of(&self.trainable_values)? == trainable,
            "trainable keys and values differ in tokens"
        );
        ensure!(
            tokens_of(&self.frozen_values)? == frozen,
            "frozen keys and values differ in tokens"
        );

        let kv_heads = model.kv_heads as usize;
        let join =
            |frozen_list: &TensorList, trainable_list: &TensorList, layer: usize| -> Vec<u8> {
                let parts: Vec<&[u8]> = [
                    frozen_list.tensors.get(layer),
                    trainable_list.tensors.get(layer),
                ]
                .into_iter()
                .flatten()
                .map(|(bytes, _)| bytes.as_slice())
                .collect();
                let mut out = Vec::with_capacity(parts.iter().map(|p| p.len()).sum());
                for head in 0..kv_heads {
                    for part in &parts {
                        let per_head = part.len() / kv_heads;
                        out.extend_from_slice(&part[head * per_head..(head + 1) * per_head]);
                    }
                }
                out
            };
        let tensors: Vec<[Vec<u8>; 2]> = (0..layers)
            .map(|layer| {
                [
                    join(&self.frozen_keys, &self.trainable_keys, layer),
                    join(&self.frozen_values, &self.trainable_values, layer),
                ]
            })
            .collect();
        let layer_data: Vec<LayerData<'_>> = tensors
            .iter()
            .map(|[keys, values]| LayerData { keys, values })
            .collect();

        let source_digest = {
            let mut hasher = blake3::Hasher::new();
            hasher.update_mmap_rayon(source)?;
            Digest::from(hasher.finalize())
        };
        let new = NewCartridge {
            model,
            dtype: self.dtype,
            tokens: (frozen + trainable) as u64,
            frozen_tokens: frozen as u64,
            provenance: json!({
                "imported_from": {
                    "file": source.file_name().map(|n| n.to_string_lossy()).unwrap_or_default(),
                    "digest": source_digest,
                    "format": format!("torch.save of TrainableCache ({naming}_* naming)"),
                }
            }),
        };
        file::write(output, new, &layer_data)
            .with_context(|| format!("writing {}", output.display()))
    }
}

/// The tensors of a pickled `nn.ParameterList` (or a plain list of tensors), in index order.
fn parameter_list(object: Object, data_dir: &Path) -> Result<Vec<TensorInfo>> {
    let items: Vec<(usize, Object)> = match object {
        Object::Build { callable, args } => {
            let Object::Reduce {
                callable: class, ..
            } = *callable
            else {
                bail!("expected a ParameterList object")
            };
            ensure!(
                matches!(&*class, Object::Class { class_name, .. } if class_name == "ParameterList"),
                "expected a ParameterList, found {}",
                shown(&class)
            );
            let Object::Dict(state) = *args else {
                bail!("ParameterList state is not a dict")
            };
            let parameters = state
                .into_iter()
                .find(|(key, _)| matches!(key, Object::Unicode(k) if k == "_parameters"))
                .map(|(_, value)| value)
                .context("ParameterList state has no _parameters")?;
            let Object::Dict(parameters) = parameters else {
                bail!("ParameterList _parameters is not a dict")
            };
            parameters
                .into_iter()
                .map(|(key, value)| {
                    let index = key
                        .unicode()
                        .ok()
                        .and_then(|k| k.parse().ok())
                        .context("parameter names must be 0, 1, …")?;
                    Ok((index, value))
                })
                .collect::<Result<_>>()?
        }
        Object::List(items) => items.into_iter().enumerate().collect(),
        // An empty ParameterList (nothing frozen) can also pickle as an empty dict.
        Object::Dict(entries) if entries.is_empty() => Vec::new(),
        other => bail!("expected a ParameterList, found {}", shown(&other)),
    };
    let mut items = items;
    // SETITEMS pushes pairs in reverse; order by the index the names carry.
    items.sort_by_key(|(index, _)| *index);
    for (position, (index, _)) in items.iter().enumerate() {
        ensure!(
            *index == position,
            "parameters skip from {} to {index}",
            position.saturating_sub(1)
        );
    }
    items
        .into_iter()
        .map(|(index, value)| {
            check_rebuild_args(&value).with_context(|| format!("parameter {index}"))?;
            value
                .into_tensor_info(Object::Unicode(index.to_string()), data_dir)?
                .with_context(|| format!("parameter {index} is not a tensor"))
        })
        .collect()
}

/// candle indexes the rebuild arguments without checking their count (a malformed file would
/// panic there), and a conversion it fails prints the object whole (which a file may make huge
/// or deep), so their count and kinds are checked first.
fn check_rebuild_args(object: &Object) -> Result<()> {
    let mut object = object;
    loop {
        let Object::Reduce { callable, args } = object else {
            bail!("not a tensor")
        };
        let Object::Class { class_name, .. } = &**callable else {
            bail!("not a tensor")
        };
        let Object::Tuple(args) = &**args else {
            bail!("{class_name} arguments are not a tuple")
        };
        match class_name.as_str() {
            "_rebuild_parameter" => {
                object = args
                    .first()
                    .context("_rebuild_parameter has no arguments")?;
            }
            "_rebuild_tensor_v2" => {
                ensure!(
                    args.len() >= 4,
                    "_rebuild_tensor_v2 has {} arguments, expected at least 4",
                    args.len()
                );
                let Object::PersistentLoad(storage) = &args[0] else {
                    bail!("tensor storage is not a persistent id")
                };
                let integer = |o: &Object| matches!(o, Object::Int(_) | Object::Long(_));
                let dimensions = |o: &Object| matches!(o, Object::Tuple(items) if items.iter().all(|i| matches!(i, Object::Int(n) if *n >= 0)));
                ensure!(
                    matches!(&**storage, Object::Tuple(fields) if fields.len() == 5
                        && matches!(fields[1], Object::Class { .. })
                        && matches!(fields[2], Object::Unicode(_))
                        && integer(&fields[4])),
                    "tensor storage id is not ('storage', class, key, location, size)"
                );
                ensure!(
                    integer(&args[1]) && dimensions(&args[2]) && dimensions(&args[3]),
                    "tensor arguments are not (storage, offset, size, stride, …)"
                );
                return Ok(());
            }
            other => bail!("unsupported tensor constructor {other}"),
        }
    }
}
