//! Weight files → `VarBuilder`, with a ledger of which tensors the network took.
//!
//! candle's `VarBuilder` fails on a missing or misshapen tensor but silently ignores tensors
//! nobody asked for, so a config that drops a feature (say, a block type read as another)
//! would still "load". The backend here records every tensor the network reads; after
//! building, any tensor left over is an error naming it.
//!
//! Safetensors files are memory-mapped; each tensor is copied out of the mapping and its pages
//! are released right away (`MADV_DONTNEED`), so loading never holds the file and the weights in
//! memory at once — a 3.4 GB UNet peaks at 3.4 GB, not 6.8. diffusers' older `.bin` (torch
//! pickle) files are read through candle's pickle reader when no safetensors file exists (some
//! MagicBrush ports ship only those).

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use std::collections::HashMap;

use candle_core::pickle::PthTensors;
use candle_core::{DType, Device, Shape, Tensor};
use candle_nn::var_builder::SimpleBackend;
use candle_nn::{Init, VarBuilder};

use crate::error::ModelError;

/// One memory-mapped safetensors file and its header.
struct MappedFile {
    path: PathBuf,
    map: memmap2::Mmap,
    /// Start of the data section (after the 8-byte length and the JSON header).
    data_start: usize,
    tensors: HashMap<String, safetensors::tensor::TensorInfo>,
}

impl MappedFile {
    fn open(path: &Path) -> Result<Self, String> {
        let file = std::fs::File::open(path).map_err(|e| format!("{}: {e}", path.display()))?;
        // SAFETY: the mapped files belong to a model directory that is not modified while a
        // model is loaded from it (the contract of every mmap-based loader).
        #[allow(unsafe_code)]
        let map = unsafe { memmap2::Mmap::map(&file) }.map_err(|e| format!("{}: {e}", path.display()))?;
        let (header_len, metadata) = safetensors::SafeTensors::read_metadata(&map)
            .map_err(|e| format!("{}: not a safetensors file: {e}", path.display()))?;
        let tensors = metadata.tensors().into_iter().map(|(name, info)| (name, info.clone())).collect();
        Ok(Self { path: path.to_path_buf(), map, data_start: 8 + header_len, tensors })
    }

    /// Copies a tensor out of the mapping, then drops the mapping's pages for that range.
    fn load(&self, name: &str, dev: &Device) -> candle_core::Result<Tensor> {
        let info = &self.tensors[name];
        let (begin, end) = (self.data_start + info.data_offsets.0, self.data_start + info.data_offsets.1);
        let bytes = self.map.get(begin..end).ok_or_else(|| {
            candle_core::Error::Msg(format!("{}: tensor {name} lies outside the file", self.path.display()))
        })?;
        let dtype = DType::try_from(info.dtype)?;
        let tensor = Tensor::from_raw_buffer(bytes, dtype, &info.shape, dev)?;
        // The copy is made: the pages can go. Only whole pages inside the range are released
        // (4 KiB on x86-64; 16 or 64 KiB on some arm64 kernels).
        // SAFETY: sysconf only reads a process constant.
        #[allow(unsafe_code)]
        let page = usize::try_from(unsafe { libc::sysconf(libc::_SC_PAGESIZE) }).unwrap_or(4096).max(1);
        let (lo, hi) = (begin.div_ceil(page) * page, end / page * page);
        if hi > lo {
            // SAFETY: the mapping is read-only and file-backed, so MADV_DONTNEED only drops
            // pages from this process (a later read would fault them back in from the file);
            // no reference into the range outlives this call.
            #[allow(unsafe_code)]
            let _ = unsafe { self.map.unchecked_advise_range(memmap2::UncheckedAdvice::DontNeed, lo, hi - lo) };
        }
        Ok(tensor)
    }
}

enum Store {
    Safetensors(Vec<MappedFile>),
    Pickle(Vec<PthTensors>),
}

impl Store {
    fn names(&self) -> BTreeSet<String> {
        match self {
            Store::Safetensors(files) => files.iter().flat_map(|f| f.tensors.keys().cloned()).collect(),
            Store::Pickle(files) => files.iter().flat_map(|f| f.tensor_infos().keys().cloned()).collect(),
        }
    }

    fn load(&self, name: &str, dev: &Device) -> candle_core::Result<Tensor> {
        match self {
            Store::Safetensors(files) => match files.iter().rev().find(|f| f.tensors.contains_key(name)) {
                Some(file) => file.load(name, dev),
                None => Err(candle_core::Error::CannotFindTensor { path: name.to_string() }.bt()),
            },
            Store::Pickle(files) => {
                for f in files {
                    if let Some(t) = f.get(name)? {
                        return t.to_device(dev);
                    }
                }
                Err(candle_core::Error::CannotFindTensor { path: name.to_string() }.bt())
            }
        }
    }
}

/// A component's weight files with a record of the tensors read so far.
struct Ledger {
    store: Store,
    names: BTreeSet<String>,
    used: Mutex<BTreeSet<String>>,
}

/// The `SimpleBackend` handed to candle: shares the ledger with [`load_component`].
struct LedgerBackend(Arc<Ledger>);

impl SimpleBackend for LedgerBackend {
    fn get(&self, s: Shape, name: &str, _: Init, dtype: DType, dev: &Device) -> candle_core::Result<Tensor> {
        let tensor = self.get_unchecked(name, dtype, dev)?;
        if tensor.shape() != &s {
            return Err(candle_core::Error::UnexpectedShape {
                msg: format!("shape mismatch for {name}"),
                expected: s,
                got: tensor.shape().clone(),
            }
            .bt());
        }
        Ok(tensor)
    }

    fn get_unchecked(&self, name: &str, dtype: DType, dev: &Device) -> candle_core::Result<Tensor> {
        let tensor = self.0.store.load(name, dev)?.to_dtype(dtype)?;
        self.0.used.lock().unwrap_or_else(|p| p.into_inner()).insert(name.to_string());
        Ok(tensor)
    }

    fn contains_tensor(&self, name: &str) -> bool {
        self.0.names.contains(name)
    }
}

/// Where a component's weights live on disk.
#[derive(Clone, Debug)]
pub enum WeightFiles {
    /// One or more safetensors files (shards).
    Safetensors(Vec<PathBuf>),
    /// One or more torch pickle files (`.bin`).
    Pickle(Vec<PathBuf>),
}

impl WeightFiles {
    /// The files.
    pub fn paths(&self) -> &[PathBuf] {
        match self {
            Self::Safetensors(p) | Self::Pickle(p) => p,
        }
    }
}

/// Opens `files`, builds a network with `build`, then checks that it read every tensor except
/// those matching `ignorable` (names of buffers that never affect inference).
///
/// # Errors
/// [`ModelError::Weights`] for unreadable files, missing or misshapen tensors, and tensors
/// the network did not use.
pub fn load_component<T>(
    component: &'static str,
    files: &WeightFiles,
    dtype: DType,
    device: &Device,
    ignorable: &[&str],
    build: impl FnOnce(VarBuilder<'static>) -> candle_core::Result<T>,
) -> Result<T, ModelError> {
    let weights_err = |message: String| ModelError::Weights { component, message };
    let store = match files {
        WeightFiles::Safetensors(paths) => Store::Safetensors(
            paths.iter().map(|p| MappedFile::open(p)).collect::<Result<_, _>>().map_err(weights_err)?,
        ),
        WeightFiles::Pickle(paths) => Store::Pickle(
            paths
                .iter()
                .map(|p| PthTensors::new(p, None).map_err(|e| weights_err(format!("{}: {e}", p.display()))))
                .collect::<Result<_, _>>()?,
        ),
    };
    let names = store.names();
    let ledger = Arc::new(Ledger { store, names, used: Mutex::new(BTreeSet::new()) });
    let vb = VarBuilder::from_backend(Box::new(LedgerBackend(ledger.clone())), dtype, device.clone());
    let network = build(vb).map_err(|e| weights_err(e.to_string()))?;

    let used = ledger.used.lock().unwrap_or_else(|p| p.into_inner());
    let unused: Vec<&String> = ledger
        .names
        .iter()
        .filter(|n| !used.contains(*n) && !ignorable.iter().any(|suffix| n.ends_with(suffix)))
        .collect();
    if !unused.is_empty() {
        let shown: Vec<&str> = unused.iter().take(5).map(|s| s.as_str()).collect();
        return Err(weights_err(format!(
            "{} tensor(s) in {} are not used by the network built from its config, e.g. {}; \
             the config does not describe these weights",
            unused.len(),
            files.paths().iter().map(|p| p.display().to_string()).collect::<Vec<_>>().join(", "),
            shown.join(", ")
        )));
    }
    Ok(network)
}

/// Finds a component's weight files in `dir`: `<stem>[.<variant>].safetensors`, its sharded
/// form (`….safetensors.index.json`), else the `.bin` equivalents.
///
/// # Errors
/// [`ModelError::MissingFile`] when none exists.
pub fn find_weight_files(dir: &Path, stem: &str, variant: Option<&str>) -> Result<WeightFiles, ModelError> {
    let name = |ext: &str| match variant {
        Some(v) => format!("{stem}.{v}.{ext}"),
        None => format!("{stem}.{ext}"),
    };
    for (ext, pickle) in [("safetensors", false), ("bin", true)] {
        let single = dir.join(name(ext));
        if single.is_file() {
            return Ok(if pickle { WeightFiles::Pickle(vec![single]) } else { WeightFiles::Safetensors(vec![single]) });
        }
        let index = dir.join(format!("{}.index.json", name(ext)));
        if index.is_file() {
            let shards = shard_files(&index)?;
            return Ok(if pickle { WeightFiles::Pickle(shards) } else { WeightFiles::Safetensors(shards) });
        }
    }
    Err(ModelError::MissingFile(dir.join(name("safetensors"))))
}

fn shard_files(index: &Path) -> Result<Vec<PathBuf>, ModelError> {
    let map = crate::config::read_json_object(index)?;
    let invalid = |message: &str| ModelError::InvalidConfig { path: index.to_path_buf(), message: message.into() };
    let weight_map = map.get("weight_map").and_then(|v| v.as_object()).ok_or_else(|| invalid("no weight_map"))?;
    let dir = index.parent().unwrap_or(Path::new("."));
    let files: BTreeSet<&str> = weight_map.values().filter_map(|v| v.as_str()).collect();
    if files.is_empty() {
        return Err(invalid("empty weight_map"));
    }
    files
        .into_iter()
        .map(|f| {
            let p = dir.join(f);
            if p.is_file() { Ok(p) } else { Err(ModelError::MissingFile(p)) }
        })
        .collect()
}
