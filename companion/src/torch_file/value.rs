//! The Python values a torch checkpoint holds, as read and written here.

/// A Python value as `torch.save` pickles it.
#[derive(Debug, Clone, PartialEq)]
pub enum PyValue {
    None,
    Bool(bool),
    Int(i64),
    Float(f64),
    Str(String),
    List(Vec<PyValue>),
    Tuple(Vec<PyValue>),
    /// A dict, in insertion order.
    Dict(Vec<(PyValue, PyValue)>),
    Tensor(TorchTensor),
    /// A tensor read from a file, its bytes still in the file.
    Stored(StoredTensor),
    /// A module attribute by name (pickle's GLOBAL): `torch.float16`.
    Global {
        module: String,
        name: String,
    },
    /// `module.name(*args)` (pickle's REDUCE): `torch.Size`, enums,
    /// `collections.OrderedDict([...])`.
    Reduce {
        module: String,
        name: String,
        args: Vec<PyValue>,
    },
    /// An instance made by `cls.__new__(cls)` and given its `__dict__`
    /// (pickle's NEWOBJ then BUILD): plain classes and dataclasses.
    Object {
        module: String,
        name: String,
        state: Box<PyValue>,
    },
}

impl PyValue {
    pub fn str(s: &str) -> PyValue {
        PyValue::Str(s.into())
    }

    /// A JSON value as Python's `json.load` gives it.
    pub fn from_json(v: &serde_json::Value) -> PyValue {
        use serde_json::Value as J;
        match v {
            J::Null => PyValue::None,
            J::Bool(b) => PyValue::Bool(*b),
            J::Number(n) => match n.as_i64() {
                Some(i) => PyValue::Int(i),
                None => PyValue::Float(n.as_f64().unwrap_or(f64::NAN)),
            },
            J::String(s) => PyValue::Str(s.clone()),
            J::Array(xs) => PyValue::List(xs.iter().map(PyValue::from_json).collect()),
            J::Object(kv) => PyValue::Dict(
                kv.iter()
                    .map(|(k, x)| (PyValue::Str(k.clone()), PyValue::from_json(x)))
                    .collect(),
            ),
        }
    }

    /// `d[key]` for a dict with string keys, mutable.
    pub fn get_mut(&mut self, key: &str) -> Option<&mut PyValue> {
        match self {
            PyValue::Dict(items) => items
                .iter_mut()
                .find(|(k, _)| matches!(k, PyValue::Str(s) if s == key))
                .map(|(_, v)| v),
            PyValue::Object { state, .. } => state.get_mut(key),
            _ => None,
        }
    }

    /// `d[key]` of a dict with string keys.
    pub fn get(&self, key: &str) -> Option<&PyValue> {
        match self {
            PyValue::Dict(items) => items
                .iter()
                .find(|(k, _)| matches!(k, PyValue::Str(s) if s == key))
                .map(|(_, v)| v),
            PyValue::Object { state, .. } => state.get(key),
            _ => None,
        }
    }

    pub fn as_int(&self) -> Option<i64> {
        match self {
            PyValue::Int(i) => Some(*i),
            PyValue::Bool(b) => Some(*b as i64),
            // Enums (IntEnum) and the like pickle as a call with their value.
            PyValue::Reduce { args, .. } if args.len() == 1 => args[0].as_int(),
            _ => None,
        }
    }

    pub fn as_float(&self) -> Option<f64> {
        match self {
            PyValue::Float(f) => Some(*f),
            PyValue::Int(i) => Some(*i as f64),
            _ => None,
        }
    }

    /// The items of a list or a tuple.
    pub fn items(&self) -> Option<&[PyValue]> {
        match self {
            PyValue::List(v) | PyValue::Tuple(v) => Some(v),
            _ => None,
        }
    }

    /// The (key, value) pairs of a dict (an `OrderedDict` read back is one).
    pub fn pairs(&self) -> Option<&[(PyValue, PyValue)]> {
        match self {
            PyValue::Dict(v) => Some(v),
            _ => None,
        }
    }
}

/// A dense, contiguous CPU tensor.
#[derive(Debug, Clone, PartialEq)]
pub struct TorchTensor {
    pub dtype: TorchDtype,
    pub shape: Vec<usize>,
    /// Little-endian element bytes, row-major.
    pub bytes: Vec<u8>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TorchDtype {
    F32,
    F64,
    I64,
    U8,
    F16,
    BF16,
}

impl TorchDtype {
    const STORAGES: [(TorchDtype, &'static str); 6] = [
        (TorchDtype::F32, "FloatStorage"),
        (TorchDtype::F64, "DoubleStorage"),
        (TorchDtype::I64, "LongStorage"),
        (TorchDtype::U8, "ByteStorage"),
        (TorchDtype::F16, "HalfStorage"),
        (TorchDtype::BF16, "BFloat16Storage"),
    ];

    /// torch's storage class for the dtype (what a pickle names).
    pub(super) fn storage(self) -> &'static str {
        Self::STORAGES
            .iter()
            .find(|(d, _)| *d == self)
            .expect("every dtype")
            .1
    }

    pub(super) fn from_storage(name: &str) -> Option<Self> {
        Self::STORAGES
            .iter()
            .find(|(_, n)| *n == name)
            .map(|(d, _)| *d)
    }

    pub fn size(self) -> usize {
        match self {
            TorchDtype::F64 | TorchDtype::I64 => 8,
            TorchDtype::F32 => 4,
            TorchDtype::F16 | TorchDtype::BF16 => 2,
            TorchDtype::U8 => 1,
        }
    }
}

impl TorchTensor {
    pub fn f32(shape: Vec<usize>, values: &[f32]) -> Self {
        let bytes = values.iter().flat_map(|v| v.to_le_bytes()).collect();
        TorchTensor {
            dtype: TorchDtype::F32,
            shape,
            bytes,
        }
    }

    pub fn u8(values: &[u8]) -> Self {
        TorchTensor {
            dtype: TorchDtype::U8,
            shape: vec![values.len()],
            bytes: values.to_vec(),
        }
    }

    pub(super) fn numel(&self) -> usize {
        self.bytes.len() / self.dtype.size()
    }
}

/// Where a tensor's elements lie in the file.
#[derive(Debug, Clone, PartialEq)]
pub struct StoredTensor {
    pub dtype: TorchDtype,
    pub shape: Vec<usize>,
    /// Byte offset of the first element in the file.
    pub(super) offset: usize,
}

impl StoredTensor {
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }
}
