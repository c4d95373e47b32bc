//! 4.3.4's data side, in the order the data flows: corpus files →
//! `dataset.map(tokenize, batched=True)` and run_clm's `group_texts`
//! (dataset) → a tokenized-dataset cache → `DataCollatorForLanguageModeling`
//! (collator) → a seeded, sharded loader.

pub mod cache;
pub mod collator;
pub mod corpus;
pub mod dataset;
pub mod loader;

mod error;

pub use cache::{cache_dir, load_tokenized};
pub use collator::{Batch, DataCollatorForLanguageModeling, IGNORE_INDEX};
pub use dataset::{group_texts, tokenize_and_pack, Dataset, Packing, TokenizeOptions};
pub use error::{DataError, Result};
pub use loader::DataLoader;
