//! The reader: a `torch.save` file opened, its pickle turned into a
//! [`PyValue`] tree whose tensors are [`StoredTensor`]s (where their bytes
//! lie in the file), read only when asked for. Only dense CPU tensors with
//! row-major strides are accepted; anything else is refused by name.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::pickle::Object;

use super::value::{PyValue, StoredTensor, TorchDtype, TorchTensor};

/// An opened `torch.save` file: its value, and the file its tensors are read from.
pub struct TorchFile {
    pub path: PathBuf,
    pub value: PyValue,
    file: std::fs::File,
    /// The file's length, to check every tensor lies inside it.
    len: u64,
}

fn refuse(path: &Path, msg: impl std::fmt::Display) -> std::io::Error {
    std::io::Error::new(
        std::io::ErrorKind::InvalidData,
        format!("{}: {msg}", path.display()),
    )
}

/// `torch.load(path)` for the values [`PyValue`] holds.
pub fn load(path: &Path) -> std::io::Result<TorchFile> {
    let file = std::fs::File::open(path).map_err(|e| refuse(path, e))?;
    let len = file.metadata().map_err(|e| refuse(path, e))?.len();
    // Read with positioned reads, not mapped: a reader of one tensor holds
    // one tensor (mapped pages would count as the process's memory).
    let mut zip = zip::ZipArchive::new(std::io::BufReader::new(&file))
        .map_err(|e| refuse(path, format!("not a torch.save file (a zip archive): {e}")))?;
    let pkl_name = zip
        .file_names()
        .filter_map(|n| n.ok().map(|n| n.to_string()))
        .find(|n| n.ends_with("/data.pkl") || n == "data.pkl")
        .ok_or_else(|| refuse(path, "no data.pkl: not a file torch.save wrote"))?;
    let prefix = pkl_name.trim_end_matches("data.pkl").to_string();
    let mut pickle = Vec::new();
    {
        use std::io::Read;
        let f = zip.by_name(&pkl_name).map_err(|e| refuse(path, e))?;
        // A checkpoint's pickle is its structure, not its tensors: small.
        const MAX_PICKLE: u64 = 256 << 20;
        if f.size() > MAX_PICKLE {
            return Err(refuse(path, format!("{pkl_name} is {} bytes, more than the {MAX_PICKLE} a checkpoint's structure takes", f.size())));
        }
        f.take(MAX_PICKLE)
            .read_to_end(&mut pickle)
            .map_err(|e| refuse(path, e))?;
    }
    let root =
        super::unpickle::unpickle(&pickle).map_err(|e| refuse(path, format!("{pkl_name}: {e}")))?;
    let mut storages = HashMap::new();
    let mut reader = Reader {
        path,
        zip: &mut zip,
        prefix: &prefix,
        storages: &mut storages,
    };
    let value = reader.value(root)?;
    Ok(TorchFile {
        path: path.to_path_buf(),
        value,
        file,
        len,
    })
}

impl TorchFile {
    /// Elements `range` of the tensor, as raw little-endian bytes.
    fn read(&self, t: &StoredTensor, range: std::ops::Range<usize>) -> std::io::Result<Vec<u8>> {
        use std::os::unix::fs::FileExt;
        let size = t.dtype.size();
        let start = (t.offset + range.start * size) as u64;
        let n = range.len() * size;
        if start + n as u64 > self.len {
            return Err(refuse(&self.path, "a tensor runs past the end of the file"));
        }
        let mut b = vec![0u8; n];
        self.file
            .read_exact_at(&mut b, start)
            .map_err(|e| refuse(&self.path, e))?;
        Ok(b)
    }

    /// The tensor's raw little-endian bytes.
    pub fn bytes(&self, t: &StoredTensor) -> std::io::Result<Vec<u8>> {
        self.read(t, 0..t.numel())
    }

    /// Elements `range` of a floating-point tensor, as f32 (f64, f16 and
    /// bf16 converted).
    pub fn f32_range(
        &self,
        t: &StoredTensor,
        range: std::ops::Range<usize>,
    ) -> std::io::Result<Vec<f32>> {
        if range.end > t.numel() {
            return Err(refuse(
                &self.path,
                format!("elements {range:?} of a tensor of {} elements", t.numel()),
            ));
        }
        let b = self.read(t, range)?;
        let out = match t.dtype {
            TorchDtype::F32 => b
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes(c.try_into().expect("4 bytes")))
                .collect(),
            TorchDtype::F64 => b
                .chunks_exact(8)
                .map(|c| f64::from_le_bytes(c.try_into().expect("8 bytes")) as f32)
                .collect(),
            TorchDtype::F16 => b
                .chunks_exact(2)
                .map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f32())
                .collect(),
            TorchDtype::BF16 => b
                .chunks_exact(2)
                .map(|c| half::bf16::from_le_bytes([c[0], c[1]]).to_f32())
                .collect(),
            other => {
                return Err(refuse(
                    &self.path,
                    format!("expected a floating-point tensor, found {other:?}"),
                ))
            }
        };
        Ok(out)
    }

    /// The value with every tensor's bytes copied out of the file (to
    /// change it and write it again).
    pub fn to_owned_value(&self) -> std::io::Result<PyValue> {
        fn own(f: &TorchFile, v: &PyValue) -> std::io::Result<PyValue> {
            let all = |xs: &[PyValue]| xs.iter().map(|x| own(f, x)).collect::<std::io::Result<_>>();
            Ok(match v {
                PyValue::Stored(t) => PyValue::Tensor(TorchTensor {
                    dtype: t.dtype,
                    shape: t.shape.clone(),
                    bytes: f.bytes(t)?,
                }),
                PyValue::List(xs) => PyValue::List(all(xs)?),
                PyValue::Tuple(xs) => PyValue::Tuple(all(xs)?),
                PyValue::Dict(kv) => PyValue::Dict(
                    kv.iter()
                        .map(|(k, x)| Ok((own(f, k)?, own(f, x)?)))
                        .collect::<std::io::Result<_>>()?,
                ),
                PyValue::Reduce { module, name, args } => PyValue::Reduce {
                    module: module.clone(),
                    name: name.clone(),
                    args: all(args)?,
                },
                PyValue::Object {
                    module,
                    name,
                    state,
                } => PyValue::Object {
                    module: module.clone(),
                    name: name.clone(),
                    state: Box::new(own(f, state)?),
                },
                other => other.clone(),
            })
        }
        own(self, &self.value)
    }

    /// The whole tensor as f32.
    pub fn f32s(&self, t: &StoredTensor) -> std::io::Result<Vec<f32>> {
        self.f32_range(t, 0..t.numel())
    }
}

struct Reader<'a, 'z> {
    path: &'a Path,
    zip: &'a mut zip::ZipArchive<std::io::BufReader<&'z std::fs::File>>,
    prefix: &'a str,
    /// Storage key → (byte offset in the file, byte length).
    storages: &'a mut HashMap<String, (usize, usize)>,
}

impl Reader<'_, '_> {
    fn value(&mut self, o: Object) -> std::io::Result<PyValue> {
        Ok(match o {
            Object::Int(i) => PyValue::Int(i as i64),
            Object::Long(i) => PyValue::Int(i),
            Object::Float(f) => PyValue::Float(f),
            Object::Unicode(s) => PyValue::Str(s),
            Object::Bool(b) => PyValue::Bool(b),
            Object::None => PyValue::None,
            Object::Tuple(v) => PyValue::Tuple(self.values(v)?),
            Object::List(v) => PyValue::List(self.values(v)?),
            Object::Dict(v) => PyValue::Dict(
                v.into_iter()
                    .map(|(k, x)| Ok((self.value(k)?, self.value(x)?)))
                    .collect::<std::io::Result<_>>()?,
            ),
            Object::Class {
                module_name,
                class_name,
            } => PyValue::Global {
                module: module_name,
                name: class_name,
            },
            Object::Reduce { callable, args } => match *callable {
                Object::Class {
                    module_name,
                    class_name,
                } => match (module_name.as_str(), class_name.as_str()) {
                    ("torch._utils", "_rebuild_tensor_v2") => self.tensor(*args)?,
                    // A tensor subclass (DeepSpeed's flat partitions are
                    // Parameters): (rebuild function, type, its args, state).
                    ("torch._tensor", "_rebuild_from_type_v2") => match *args {
                        Object::Tuple(mut v) if v.len() >= 3 => {
                            let inner = v.swap_remove(2);
                            match v.swap_remove(0) {
                                Object::Class {
                                    module_name,
                                    class_name,
                                } if module_name == "torch._utils"
                                    && class_name == "_rebuild_tensor_v2" =>
                                {
                                    self.tensor(inner)?
                                }
                                other => {
                                    return Err(
                                        self.bad("a tensor rebuilt by _rebuild_tensor_v2", &other)
                                    )
                                }
                            }
                        }
                        other => return Err(self.bad("a tensor subclass's arguments", &other)),
                    },
                    ("torch._utils", "_rebuild_parameter") => {
                        let first = match *args {
                            Object::Tuple(mut v) if !v.is_empty() => v.remove(0),
                            other => return Err(self.bad("a parameter", &other)),
                        };
                        self.value(first)?
                    }
                    _ => PyValue::Reduce {
                        module: module_name,
                        name: class_name,
                        args: match *args {
                            Object::Tuple(v) => self.values(v)?,
                            other => return Err(self.bad("a call's arguments", &other)),
                        },
                    },
                },
                other => return Err(self.bad("a call", &other)),
            },
            Object::Build { callable, args } => match *callable {
                // A dict subclass with attributes (a state_dict's
                // OrderedDict and its `_metadata`): the items are the value.
                d @ Object::Dict(_) => self.value(d)?,
                Object::Reduce { callable, .. } => match *callable {
                    Object::Class {
                        module_name,
                        class_name,
                    } => PyValue::Object {
                        module: module_name,
                        name: class_name,
                        state: Box::new(self.value(*args)?),
                    },
                    other => return Err(self.bad("an object's class", &other)),
                },
                other => return Err(self.bad("an object", &other)),
            },
            other => return Err(self.bad("a value", &other)),
        })
    }

    fn values(&mut self, v: Vec<Object>) -> std::io::Result<Vec<PyValue>> {
        v.into_iter().map(|x| self.value(x)).collect()
    }

    fn bad(&self, what: &str, o: &Object) -> std::io::Error {
        let mut shown = format!("{o:?}");
        shown.truncate(120);
        refuse(self.path, format!("expected {what}, found {shown}"))
    }

    /// `_rebuild_tensor_v2(storage, offset, size, stride, ...)`.
    fn tensor(&mut self, args: Object) -> std::io::Result<PyValue> {
        let Object::Tuple(mut a) = args else {
            return Err(self.bad("a tensor's arguments", &args));
        };
        if a.len() < 4 {
            return Err(refuse(self.path, "a tensor with fewer than 4 arguments"));
        }
        let ints = |o: Object| -> Option<Vec<usize>> {
            match o {
                Object::Tuple(v) => v
                    .into_iter()
                    .map(|x| x.int_or_long().ok().and_then(|i| usize::try_from(i).ok()))
                    .collect(),
                _ => None,
            }
        };
        let stride = ints(a.remove(3));
        let shape = ints(a.remove(2));
        let offset = a
            .remove(1)
            .int_or_long()
            .ok()
            .and_then(|i| usize::try_from(i).ok());
        let (Some(stride), Some(shape), Some(offset)) = (stride, shape, offset) else {
            return Err(refuse(
                self.path,
                "a tensor's offset, size or stride is not made of non-negative integers",
            ));
        };
        if stride.len() != shape.len() {
            return Err(refuse(
                self.path,
                format!("a tensor of shape {shape:?} with {} strides", stride.len()),
            ));
        }
        let id = match a.remove(0) {
            Object::PersistentLoad(id) => *id,
            other => return Err(self.bad("a tensor storage", &other)),
        };
        let Object::Tuple(mut id) = id else {
            return Err(self.bad("a storage id", &id));
        };
        if id.len() < 5 {
            return Err(refuse(self.path, "a storage id of fewer than 5 items"));
        }
        let class = id.remove(1).class().ok();
        let key = id.remove(1).unicode().ok();
        let (Some((_, class)), Some(key)) = (class, key) else {
            return Err(refuse(self.path, "a storage id without its class and key"));
        };
        let dtype = TorchDtype::from_storage(&class)
            .ok_or_else(|| refuse(self.path, format!("tensors of {class} are not read here")))?;
        // Row-major strides only (a checkpoint's tensors are contiguous).
        let mut want = 1usize;
        for (d, s) in shape.iter().zip(&stride).rev() {
            if *d > 1 && *s != want {
                return Err(refuse(
                    self.path,
                    format!("a tensor of shape {shape:?} with strides {stride:?} (not contiguous)"),
                ));
            }
            want = want.saturating_mul(*d);
        }
        let numel = shape
            .iter()
            .try_fold(1usize, |a, &d| a.checked_mul(d))
            .ok_or_else(|| refuse(self.path, format!("shape {shape:?} overflows")))?;
        let (start, len) = self.storage(&key)?;
        offset
            .checked_add(numel)
            .and_then(|n| n.checked_mul(dtype.size()))
            .filter(|&n| n <= len)
            .ok_or_else(|| {
                refuse(
                    self.path,
                    format!(
                        "storage {key} holds {len} bytes, fewer than a tensor of shape {shape:?} at offset {offset} needs"
                    ),
                )
            })?;
        Ok(PyValue::Stored(StoredTensor {
            dtype,
            shape,
            offset: start + offset * dtype.size(),
        }))
    }

    /// The byte range of storage `key` in the file (stored uncompressed, as
    /// torch writes them).
    fn storage(&mut self, key: &str) -> std::io::Result<(usize, usize)> {
        if let Some(&r) = self.storages.get(key) {
            return Ok(r);
        }
        let name = format!("{}data/{key}", self.prefix);
        let f = self
            .zip
            .by_name(&name)
            .map_err(|e| refuse(self.path, format!("{name}: {e}")))?;
        if f.compression() != zip::CompressionMethod::Stored {
            return Err(refuse(
                self.path,
                format!("{name} is compressed (torch stores tensors uncompressed)"),
            ));
        }
        let start = f
            .data_start()
            .ok_or_else(|| refuse(self.path, format!("{name}: no data offset")))?;
        let r = (start as usize, f.size() as usize);
        self.storages.insert(key.to_string(), r);
        Ok(r)
    }
}

#[cfg(test)]
mod tests {
    use super::super::{save, PyValue, TorchTensor};
    use super::*;

    #[test]
    fn what_is_written_reads_back() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("x.pt");
        let a: Vec<f32> = (0..300).map(|i| i as f32 * 0.5).collect();
        let b: Vec<f32> = (0..7).map(|i| -(i as f32)).collect();
        let v = PyValue::Dict(vec![
            (
                PyValue::str("a"),
                PyValue::Tensor(TorchTensor::f32(vec![3, 100], &a)),
            ),
            (
                PyValue::Int(4),
                PyValue::List(vec![PyValue::Float(1.5), PyValue::None]),
            ),
            (
                PyValue::str("b"),
                PyValue::Tensor(TorchTensor::f32(vec![7], &b)),
            ),
            (
                PyValue::str("size"),
                PyValue::Reduce {
                    module: "torch".into(),
                    name: "Size".into(),
                    args: vec![PyValue::Tuple(vec![PyValue::Int(3)])],
                },
            ),
        ]);
        save(&v, &f).unwrap();
        let t = load(&f).unwrap();
        let get = |k: &str| match t.value.get(k) {
            Some(PyValue::Stored(s)) => s.clone(),
            other => panic!("{k}: {other:?}"),
        };
        assert_eq!(get("a").shape, vec![3, 100]);
        assert_eq!(t.f32s(&get("a")).unwrap(), a);
        assert_eq!(t.f32s(&get("b")).unwrap(), b);
        assert_eq!(
            t.f32_range(&get("a"), 250..253).unwrap(),
            vec![125.0, 125.5, 126.0]
        );
        assert_eq!(t.to_owned_value().unwrap(), v);
    }
}
