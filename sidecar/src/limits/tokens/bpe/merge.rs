//! Byte-pair merging of one piece, counting the tokens it ends as.
//!
//! tiktoken's rule: start from single bytes and, while some adjacent pair of parts is a
//! token, merge the pair with the lowest rank (the leftmost of equals). The pairs wait in a
//! min-heap, so a long piece (a run of spaces, say) costs n log n rather than n².

use std::cmp::Reverse;
use std::collections::BinaryHeap;

use super::vocab::Vocab;

const NO_PAIR: u32 = u32::MAX;

/// The working memory of merging, kept from piece to piece.
#[derive(Default)]
pub struct Merger {
    /// Where the part after the one starting at `i` starts (`len` for the last part).
    next: Vec<u32>,
    /// Where the part before the one starting at `i` starts.
    prev: Vec<u32>,
    /// The rank of the part starting at `i` merged with the next one, or NO_PAIR; entries of
    /// the heap that no longer agree with it are stale and skipped.
    pair: Vec<u32>,
    heap: BinaryHeap<Reverse<(u32, u32)>>,
}

impl Merger {
    /// Tokens `piece` encodes to.
    pub fn count(&mut self, vocab: &Vocab, piece: &[u8]) -> usize {
        if piece.len() <= 1 || vocab.rank(piece).is_some() {
            return piece.len().min(1);
        }
        // Pieces come from prompts held in memory; u32 positions cover far more than a body.
        let Ok(len) = u32::try_from(piece.len()) else {
            return piece.len();
        };
        self.start(vocab, piece, len);
        let mut parts = piece.len();
        while let Some(Reverse((rank, start))) = self.heap.pop() {
            if self.pair_at(start) == rank && self.merge(vocab, piece, start) {
                parts -= 1;
            }
        }
        parts
    }

    fn start(&mut self, vocab: &Vocab, piece: &[u8], len: u32) {
        self.next.clear();
        self.next.extend(1..=len);
        self.prev.clear();
        self.prev.extend((0..len).map(|i| i.saturating_sub(1)));
        self.pair.clear();
        self.pair.resize(piece.len(), NO_PAIR);
        self.heap.clear();
        for (i, two) in (0..len).zip(piece.windows(2)) {
            self.set_pair(i, vocab.rank(two));
        }
    }

    /// Joins the part at `start` with the next one, then ranks the new pairs on both sides.
    fn merge(&mut self, vocab: &Vocab, piece: &[u8], start: u32) -> bool {
        let Some(right) = self.next_of(start) else {
            return false;
        };
        let Some(after) = self.next_of(right) else {
            return false;
        };
        self.set_next(start, after);
        self.set_pair_raw(right, NO_PAIR);
        let following = self.next_of(after);
        let rank = following.and_then(|end| rank_of(vocab, piece, start, end));
        self.set_pair(start, rank);
        if start > 0 {
            let before = self.prev.get(start as usize).copied().unwrap_or(0);
            self.set_pair(before, rank_of(vocab, piece, before, after));
        }
        true
    }

    fn next_of(&self, start: u32) -> Option<u32> {
        self.next.get(start as usize).copied()
    }

    fn set_next(&mut self, start: u32, after: u32) {
        if let Some(next) = self.next.get_mut(start as usize) {
            *next = after;
        }
        if let Some(prev) = self.prev.get_mut(after as usize) {
            *prev = start;
        }
    }

    fn pair_at(&self, start: u32) -> u32 {
        self.pair.get(start as usize).copied().unwrap_or(NO_PAIR)
    }

    fn set_pair(&mut self, start: u32, rank: Option<u32>) {
        let rank = rank.unwrap_or(NO_PAIR);
        self.set_pair_raw(start, rank);
        if rank != NO_PAIR {
            self.heap.push(Reverse((rank, start)));
        }
    }

    fn set_pair_raw(&mut self, start: u32, rank: u32) {
        if let Some(pair) = self.pair.get_mut(start as usize) {
            *pair = rank;
        }
    }
}

fn rank_of(vocab: &Vocab, piece: &[u8], start: u32, end: u32) -> Option<u32> {
    vocab.rank(piece.get(start as usize..end as usize)?)
}
