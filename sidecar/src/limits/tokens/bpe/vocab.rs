//! A BPE encoding's token → rank table, a few MB instead of tiktoken's ~40.
//!
//! The token lengths and bytes stay where they are, in the binary's read-only data (the table
//! written by `scripts/bpe-tables`: ranks implicit in the order, one length byte each, then
//! all bytes). The heap holds only where every 16th token starts and an open-addressing
//! index of ranks, about 2 MB for o200k. The index never changes after it is built, so a
//! lookup probes at most the longest cluster the real tokens formed: crafted input cannot
//! make lookups slower.

use super::TableError;

const MAGIC: &[u8; 4] = b"BPE1";
/// An index slot holds a rank in its low bits and hash bits above, which rule out most
/// non-matching slots without touching the token's bytes.
const RANK_BITS: u32 = 18;
const RANK_MASK: u32 = (1 << RANK_BITS) - 1;
const EMPTY: u32 = u32::MAX;
/// Tokens whose start is kept: the others' starts are found by adding up to this many
/// lengths, which costs less than the memory a start per token would.
const STRIDE: usize = 16;

pub struct Vocab {
    lengths: &'static [u8],
    bytes: &'static [u8],
    /// Where tokens 0, STRIDE, 2 × STRIDE... start in `bytes`.
    block_starts: Vec<u32>,
    /// A power of two, at most half full: most lookups while merging are misses, which stop
    /// at the first empty slot (1.8 probes on average at o200k's 38%; at 76% they took 9
    /// and counting o200k took 60% more instructions). The fingerprints settle nearly every
    /// probe without touching a token.
    slots: Vec<u32>,
}

impl Vocab {
    pub fn parse(table: &'static [u8]) -> Result<Vocab, TableError> {
        let header = table.get(..8).ok_or(TableError::Truncated)?;
        if &header[..4] != MAGIC {
            return Err(TableError::Magic);
        }
        let count = u32::from_le_bytes([header[4], header[5], header[6], header[7]]);
        // Ranks must fit beside the hash bits, and EMPTY must not be a rank.
        if count >= RANK_MASK {
            return Err(TableError::TooManyTokens(count));
        }
        let count = count as usize;
        let lengths = table.get(8..8 + count).ok_or(TableError::Truncated)?;
        let bytes = table.get(8 + count..).ok_or(TableError::Truncated)?;
        let mut block_starts = Vec::with_capacity(count.div_ceil(STRIDE));
        let mut offset = 0u32;
        for (rank, &length) in lengths.iter().enumerate() {
            if length == 0 {
                return Err(TableError::EmptyToken);
            }
            if rank % STRIDE == 0 {
                block_starts.push(offset);
            }
            offset += u32::from(length);
        }
        if offset as usize != bytes.len() {
            return Err(TableError::Truncated);
        }
        let mut vocab = Vocab {
            lengths,
            bytes,
            block_starts,
            slots: vec![EMPTY; (count * 2 + 1).next_power_of_two()],
        };
        vocab.index_all()?;
        Ok(vocab)
    }

    fn index_all(&mut self) -> Result<(), TableError> {
        let mask = self.slots.len() - 1;
        for rank in 0..self.len() as u32 {
            let token = self.token(rank).ok_or(TableError::Truncated)?;
            let hash = hash(token);
            let mut slot = hash as usize & mask;
            loop {
                match self.slots.get(slot).copied() {
                    Some(EMPTY) => break,
                    Some(other) if self.token(other & RANK_MASK) == Some(token) => {
                        return Err(TableError::Duplicate(rank));
                    }
                    _ => slot = (slot + 1) & mask,
                }
            }
            self.slots[slot] = fingerprint(hash) | rank;
        }
        Ok(())
    }

    pub fn len(&self) -> usize {
        self.lengths.len()
    }

    pub fn token(&self, rank: u32) -> Option<&'static [u8]> {
        let rank = rank as usize;
        let block = rank / STRIDE;
        let before: usize = self
            .lengths
            .get(block * STRIDE..rank)?
            .iter()
            .map(|&length| usize::from(length))
            .sum();
        let start = *self.block_starts.get(block)? as usize + before;
        let length = usize::from(*self.lengths.get(rank)?);
        self.bytes.get(start..start + length)
    }

    pub fn rank(&self, bytes: &[u8]) -> Option<u32> {
        let mask = self.slots.len() - 1;
        let hash = hash(bytes);
        let wanted = fingerprint(hash);
        let mut slot = hash as usize & mask;
        loop {
            let entry = *self.slots.get(slot)?;
            if entry == EMPTY {
                return None;
            }
            if entry & !RANK_MASK == wanted && self.token(entry & RANK_MASK) == Some(bytes) {
                return Some(entry & RANK_MASK);
            }
            slot = (slot + 1) & mask;
        }
    }

    /// Heap bytes the table holds (the token bytes themselves are in the binary).
    #[cfg(test)]
    pub fn heap_bytes(&self) -> usize {
        (self.block_starts.capacity() + self.slots.capacity()) * std::mem::size_of::<u32>()
    }
}

fn fingerprint(hash: u64) -> u32 {
    (hash >> (64 - (32 - RANK_BITS))) as u32 & !RANK_MASK
}

/// A fast hash of a short byte string (tokens are at most 255 bytes, most under 8); the
/// table is fixed, so it needs no key against flooding.
fn hash(bytes: &[u8]) -> u64 {
    const MULTIPLIER: u64 = 0x9E37_79B9_7F4A_7C15;
    let mut chunks = bytes.chunks_exact(8);
    let mut state = (bytes.len() as u64).wrapping_mul(MULTIPLIER);
    for chunk in &mut chunks {
        let word = chunk.try_into().map_or(0, u64::from_le_bytes);
        state = (state ^ word).wrapping_mul(MULTIPLIER).rotate_left(31);
    }
    let tail = chunks
        .remainder()
        .iter()
        .rev()
        .fold(0u64, |word, &byte| (word << 8) | u64::from(byte));
    state = (state ^ tail).wrapping_mul(MULTIPLIER);
    state ^ (state >> 29)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn table(tokens: &[&[u8]]) -> &'static [u8] {
        let mut data = MAGIC.to_vec();
        data.extend((tokens.len() as u32).to_le_bytes());
        data.extend(tokens.iter().map(|t| t.len() as u8));
        tokens.iter().for_each(|t| data.extend(*t));
        Box::leak(data.into_boxed_slice())
    }

    #[test]
    fn tokens_are_found_by_their_bytes_and_others_are_not() {
        let vocab = Vocab::parse(table(&[
            b"a",
            b"b",
            b"ab",
            b"hello world!",
            b""[..0].as_ref(),
        ]))
        .err();
        assert!(matches!(vocab, Some(TableError::EmptyToken)));
        let vocab = Vocab::parse(table(&[b"a", b"b", b"ab", b"hello world!"])).unwrap();
        assert_eq!(vocab.len(), 4);
        assert_eq!(vocab.rank(b"ab"), Some(2));
        assert_eq!(vocab.rank(b"hello world!"), Some(3));
        assert_eq!(vocab.rank(b"hello world"), None);
        assert_eq!(vocab.rank(b""), None);
        assert_eq!(vocab.token(1), Some(&b"b"[..]));
        assert_eq!(vocab.token(4), None);
    }

    #[test]
    fn damaged_tables_are_refused() {
        assert!(matches!(Vocab::parse(b"BPE"), Err(TableError::Truncated)));
        assert!(matches!(
            Vocab::parse(b"XPE1\0\0\0\0"),
            Err(TableError::Magic)
        ));
        let mut short = table(&[b"ab", b"cd"]).to_vec();
        short.pop();
        let short: &'static [u8] = Box::leak(short.into_boxed_slice());
        assert!(matches!(Vocab::parse(short), Err(TableError::Truncated)));
        assert!(matches!(
            Vocab::parse(table(&[b"ab", b"ab"])),
            Err(TableError::Duplicate(1))
        ));
    }
}
