//! PyTorch's own checkpoint files (`optimizer.pt`, `scheduler.pt`,
//! DeepSpeed's `*_model_states.pt` / `*_optim_states.pt`): a zip archive,
//! stored uncompressed, holding `<name>/data.pkl` (a pickle, protocol 2),
//! one `<name>/data/N` file of raw little-endian bytes per tensor storage,
//! `<name>/byteorder` and `<name>/version`.
//!
//! [`write`] writes what `torch.save` writes; [`load`] reads what it wrote
//! (tensors stay in the file until asked for, so a reader of
//! one tensor never holds the whole checkpoint).
//!
//! Written by hand: no crate writes PyTorch's pickles (`serde-pickle` has no
//! persistent ids, which tensors need); the unpickler is ours too
//! (`unpickle`, why there), its object tree candle's; the zip container is
//! the `zip` crate's.

mod load;
mod unpickle;
mod value;
mod write;

pub use load::{load, TorchFile};
pub use value::{PyValue, StoredTensor, TorchDtype, TorchTensor};
pub use write::{save, to_bytes};
