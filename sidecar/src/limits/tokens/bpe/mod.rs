//! Counting tokens exactly as tiktoken's `o200k_base` and `cl100k_base` encode them, in a
//! few MB: the sidecar never decodes, so it needs no reverse table, no regex engine and no
//! per-thread copies, only a compact token → rank table, a pre-tokenizer and the merge.
//!
//! The tables are `sidecar/assets/*.bpe`, written by `scripts/bpe-tables` from tiktoken's
//! published rank files; `tests.rs` checks them, and the counts, against tiktoken-rs.

mod merge;
mod pretokenize;
mod vocab;

#[cfg(test)]
mod tests;

use merge::Merger;
use pretokenize::{Classes, Pattern, Pieces};
use vocab::Vocab;

const O200K_TABLE: &[u8] = include_bytes!("../../../../assets/o200k_base.bpe");
const CL100K_TABLE: &[u8] = include_bytes!("../../../../assets/cl100k_base.bpe");

#[derive(Debug, thiserror::Error)]
pub enum TableError {
    #[error("the rank table is cut short")]
    Truncated,
    #[error("the rank table does not start with BPE1")]
    Magic,
    #[error("the rank table has {0} tokens, more than ranks can number")]
    TooManyTokens(u32),
    #[error("the rank table has an empty token")]
    EmptyToken,
    #[error("token {0} of the rank table repeats an earlier one")]
    Duplicate(u32),
    #[error("character class: {0}")]
    Class(String),
}

/// One encoding, ready to count; shared by every thread.
pub struct Bpe {
    vocab: Vocab,
    pattern: Pattern,
    classes: Classes,
}

impl Bpe {
    pub fn o200k() -> Result<Bpe, TableError> {
        Self::load(O200K_TABLE, Pattern::O200k)
    }

    pub fn cl100k() -> Result<Bpe, TableError> {
        Self::load(CL100K_TABLE, Pattern::Cl100k)
    }

    fn load(table: &'static [u8], pattern: Pattern) -> Result<Bpe, TableError> {
        Ok(Bpe {
            vocab: Vocab::parse(table)?,
            pattern,
            classes: Classes::new()?,
        })
    }

    /// Tokens `text` encodes to, with no special tokens (tiktoken's `encode_ordinary`).
    pub fn count(&self, text: &str) -> usize {
        let mut merger = Merger::default();
        Pieces::new(text, self.pattern, &self.classes)
            .map(|piece| merger.count(&self.vocab, piece.as_bytes()))
            .sum()
    }
}
