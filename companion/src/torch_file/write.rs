//! The writer: `torch.save`'s bytes for the subset of Python values
//! [`PyValue`] holds. With no `Reduce`/`Object` values in it, a file opens
//! with `torch.load(..., weights_only=True)`; DeepSpeed's files hold a few
//! of its own classes and need `weights_only=False`, as DeepSpeed loads them.

use std::io::Write;
use std::path::Path;

use super::value::{PyValue, TorchTensor};

/// Pickle protocol 2 opcodes used here.
mod op {
    pub const PROTO: u8 = 0x80;
    pub const STOP: u8 = b'.';
    pub const NONE: u8 = b'N';
    pub const NEWTRUE: u8 = 0x88;
    pub const NEWFALSE: u8 = 0x89;
    pub const BININT: u8 = b'J';
    pub const LONG1: u8 = 0x8a;
    pub const BINFLOAT: u8 = b'G';
    pub const BINUNICODE: u8 = b'X';
    pub const EMPTY_LIST: u8 = b']';
    pub const APPENDS: u8 = b'e';
    pub const EMPTY_DICT: u8 = b'}';
    pub const SETITEMS: u8 = b'u';
    pub const MARK: u8 = b'(';
    pub const TUPLE: u8 = b't';
    pub const EMPTY_TUPLE: u8 = b')';
    pub const GLOBAL: u8 = b'c';
    pub const REDUCE: u8 = b'R';
    pub const BINPERSID: u8 = b'Q';
    pub const NEWOBJ: u8 = 0x81;
    pub const BUILD: u8 = b'b';
}

/// The pickle and the tensors' storages (borrowed), numbered as written.
struct Pickler<'a> {
    out: Vec<u8>,
    storages: Vec<&'a [u8]>,
    /// Set when a value cannot be written.
    refused: Option<String>,
}

impl<'a> Pickler<'a> {
    fn global(&mut self, module: &str, name: &str) {
        self.out.push(op::GLOBAL);
        self.out
            .extend_from_slice(format!("{module}\n{name}\n").as_bytes());
    }

    fn str(&mut self, s: &str) {
        self.out.push(op::BINUNICODE);
        self.out.extend_from_slice(&(s.len() as u32).to_le_bytes());
        self.out.extend_from_slice(s.as_bytes());
    }

    fn int(&mut self, v: i64) {
        if let Ok(small) = i32::try_from(v) {
            self.out.push(op::BININT);
            self.out.extend_from_slice(&small.to_le_bytes());
        } else {
            self.out.push(op::LONG1);
            self.out.push(8);
            self.out.extend_from_slice(&v.to_le_bytes());
        }
    }

    fn tuple(&mut self, items: impl FnOnce(&mut Self)) {
        self.out.push(op::MARK);
        items(self);
        self.out.push(op::TUPLE);
    }

    /// A tuple of sizes (`()` for a scalar's shape).
    fn int_tuple(&mut self, xs: &[usize]) {
        if xs.is_empty() {
            self.out.push(op::EMPTY_TUPLE);
        } else {
            self.tuple(|p| xs.iter().for_each(|&x| p.int(x as i64)));
        }
    }

    fn value_tuple(&mut self, items: &'a [PyValue]) {
        if items.is_empty() {
            self.out.push(op::EMPTY_TUPLE);
        } else {
            self.tuple(|p| items.iter().for_each(|x| p.value(x)));
        }
    }

    fn value(&mut self, v: &'a PyValue) {
        match v {
            PyValue::None => self.out.push(op::NONE),
            PyValue::Bool(b) => self.out.push(if *b { op::NEWTRUE } else { op::NEWFALSE }),
            PyValue::Int(i) => self.int(*i),
            PyValue::Float(f) => {
                self.out.push(op::BINFLOAT);
                self.out.extend_from_slice(&f.to_be_bytes());
            }
            PyValue::Str(s) => self.str(s),
            PyValue::List(items) => {
                self.out.push(op::EMPTY_LIST);
                if !items.is_empty() {
                    self.out.push(op::MARK);
                    items.iter().for_each(|x| self.value(x));
                    self.out.push(op::APPENDS);
                }
            }
            PyValue::Tuple(items) => self.value_tuple(items),
            PyValue::Dict(items) => {
                self.out.push(op::EMPTY_DICT);
                if !items.is_empty() {
                    self.out.push(op::MARK);
                    for (k, x) in items {
                        self.value(k);
                        self.value(x);
                    }
                    self.out.push(op::SETITEMS);
                }
            }
            PyValue::Tensor(t) => self.tensor(t),
            PyValue::Stored(_) => {
                self.refused = Some("a tensor still in the file it was read from".into())
            }
            PyValue::Global { module, name } => self.global(module, name),
            PyValue::Reduce { module, name, args } => {
                self.global(module, name);
                self.value_tuple(args);
                self.out.push(op::REDUCE);
            }
            PyValue::Object {
                module,
                name,
                state,
            } => {
                self.global(module, name);
                self.out.push(op::EMPTY_TUPLE);
                self.out.push(op::NEWOBJ);
                self.value(state);
                self.out.push(op::BUILD);
            }
        }
    }

    /// `_rebuild_tensor_v2(storage, 0, size, stride, False, OrderedDict())`,
    /// the storage by persistent id `("storage", FloatStorage, key, "cpu", n)`.
    fn tensor(&mut self, t: &'a TorchTensor) {
        let key = self.storages.len();
        self.storages.push(&t.bytes);
        let mut stride = vec![1usize; t.shape.len()];
        for i in (0..t.shape.len().saturating_sub(1)).rev() {
            stride[i] = stride[i + 1] * t.shape[i + 1];
        }
        self.global("torch._utils", "_rebuild_tensor_v2");
        self.tuple(|p| {
            p.tuple(|p| {
                p.str("storage");
                p.global("torch", t.dtype.storage());
                p.str(&key.to_string());
                p.str("cpu");
                p.int(t.numel() as i64);
            });
            p.out.push(op::BINPERSID);
            p.int(0);
            p.int_tuple(&t.shape);
            p.int_tuple(&stride);
            p.out.push(op::NEWFALSE);
            p.global("collections", "OrderedDict");
            p.out.push(op::EMPTY_TUPLE);
            p.out.push(op::REDUCE);
        });
        self.out.push(op::REDUCE);
    }
}

/// `torch.save(value, path)`, written to a temporary file and renamed into
/// place.
pub fn save(value: &PyValue, path: &Path) -> std::io::Result<()> {
    crate::atomic_write::write_file_atomically(path, &to_bytes(value)?)
}

/// The bytes `torch.save(value, f)` writes.
pub fn to_bytes(value: &PyValue) -> std::io::Result<Vec<u8>> {
    let mut p = Pickler {
        out: vec![op::PROTO, 2],
        storages: Vec::new(),
        refused: None,
    };
    p.value(value);
    if let Some(why) = p.refused {
        return Err(std::io::Error::other(format!("cannot write {why}")));
    }
    p.out.push(op::STOP);
    let mut zip_bytes = std::io::Cursor::new(Vec::new());
    {
        let mut z = zip::ZipWriter::new(&mut zip_bytes);
        // torch aligns each record to 64 bytes so it can map them.
        let opts = zip::write::SimpleFileOptions::default()
            .compression_method(zip::CompressionMethod::Stored)
            .with_alignment(64);
        let mut put = |name: String, bytes: &[u8]| -> std::io::Result<()> {
            // Zip64 for a storage of 4 GiB or more (a large flat partition).
            let opts = opts.large_file(bytes.len() as u64 >= u32::MAX as u64);
            z.start_file(name, opts).map_err(std::io::Error::other)?;
            z.write_all(bytes)
        };
        put("archive/data.pkl".into(), &p.out)?;
        put("archive/byteorder".into(), b"little")?;
        for (i, s) in p.storages.iter().enumerate() {
            put(format!("archive/data/{i}"), s)?;
        }
        put("archive/version".into(), b"3\n")?;
        z.finish().map_err(std::io::Error::other)?;
    }
    Ok(zip_bytes.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pickles_small_values_as_python_does() {
        // pickle.dumps({"a": [1, None, True]}, protocol=2) without its header,
        // its memo opcodes (BINPUT, which we never write) and STOP, and with
        // BININT where Python picks the shorter BININT1 for small ints.
        let mut p = Pickler {
            out: vec![],
            storages: vec![],
            refused: None,
        };
        let v = PyValue::Dict(vec![(
            PyValue::Str("a".into()),
            PyValue::List(vec![PyValue::Int(1), PyValue::None, PyValue::Bool(true)]),
        )]);
        p.value(&v);
        assert_eq!(
            p.out,
            b"}(X\x01\x00\x00\x00a](J\x01\x00\x00\x00N\x88eu".to_vec()
        );
        let mut p = Pickler {
            out: vec![],
            storages: vec![],
            refused: None,
        };
        p.int(1 << 40);
        assert_eq!(
            p.out,
            [&[op::LONG1, 8][..], &(1i64 << 40).to_le_bytes()].concat()
        );
    }
}
