//! 4.3.4's data side, in the order the data flows: corpus files →
//! `dataset.map(tokenize, batched=True)` and run_clm's `group_texts`
//! (dataset), or streamed into memory-mapped token shards in the cache
//! (prepare, shards) → `DataCollatorForLanguageModeling`
//! (collator) → a seeded, sharded loader.

pub mod arrow_folder;
pub mod collator;
pub mod corpus;
pub mod dataset;
pub mod documents;
pub mod loader;
pub mod parquet_file;
pub mod prepare;
pub mod shards;

mod error;

pub use collator::{Batch, DataCollatorForLanguageModeling, IGNORE_INDEX};
pub use dataset::{group_texts, tokenize_and_pack, Dataset, GroupStream, Packing, TokenizeOptions};
pub use error::{DataError, Result};
pub use loader::DataLoader;
pub use prepare::{cache_dir, prepare, PrepareOptions, Prepared};
pub use shards::TokenShards;
