//! tiktoken's pre-tokenizers, the regexes that cut text into the pieces BPE works on,
//! written out as scanners.
//!
//! tiktoken runs its patterns with fancy-regex, a backtracking engine: compiled, the o200k
//! pattern and its per-thread copies cost MBs, and it is the slowest part of counting. Each
//! alternative below finds the match that backtracking would (the first alternative that
//! matches at a position wins; greedy runs give back one character at a time), so the
//! pieces are identical. The character classes come from `regex-syntax`, the parser
//! fancy-regex itself uses, so they agree with tiktoken's on every Unicode character.
//!
//! o200k_base:
//! ```text
//! [^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?
//! |[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?
//! |\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+
//! ```
//! cl100k_base:
//! ```text
//! '(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}++|\p{N}{1,3}+| ?[^\s\p{L}\p{N}]++[\r\n]*+
//! |\s++$|\s*[\r\n]|\s+(?!\S)|\s
//! ```

use regex_syntax::hir::{Class, HirKind};

use super::TableError;

/// Which pattern to cut with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pattern {
    O200k,
    Cl100k,
}

const LETTER: u8 = 1;
const NUMBER: u8 = 1 << 1;
const SPACE: u8 = 1 << 2;
/// o200k's `[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]`: what may start a word.
const UPPER: u8 = 1 << 3;
/// o200k's `[\p{Ll}\p{Lm}\p{Lo}\p{M}]`: what may continue it.
const LOWER: u8 = 1 << 4;

const CLASSES: [(&str, u8); 5] = [
    (r"\p{L}", LETTER),
    (r"\p{N}", NUMBER),
    (r"\s", SPACE),
    (r"[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]", UPPER),
    (r"[\p{Ll}\p{Lm}\p{Lo}\p{M}]", LOWER),
];

/// Each character's classes: ASCII from a table, the rest from sorted ranges.
pub struct Classes {
    ascii: [u8; 128],
    /// Range `i` starts at `starts[i]` and runs up to the next start; its classes are `flags[i]`.
    starts: Vec<u32>,
    flags: Vec<u8>,
}

impl Classes {
    pub fn new() -> Result<Classes, TableError> {
        let classes = CLASSES
            .iter()
            .map(|&(pattern, flag)| Ok((unicode_ranges(pattern)?, flag)))
            .collect::<Result<Vec<_>, TableError>>()?;
        let mut boundaries: Vec<u32> = classes
            .iter()
            .flat_map(|(ranges, _)| ranges.iter().flat_map(|&(lo, hi)| [lo, hi + 1]))
            .chain([0])
            .collect();
        boundaries.sort_unstable();
        boundaries.dedup();
        let flags_at = |c: u32| {
            classes
                .iter()
                .filter(|(ranges, _)| contains(ranges, c))
                .fold(0, |flags, (_, flag)| flags | flag)
        };
        let (mut starts, mut flags) = (Vec::new(), Vec::new());
        for start in boundaries {
            let here = flags_at(start);
            if flags.last() != Some(&here) {
                starts.push(start);
                flags.push(here);
            }
        }
        let mut ascii = [0; 128];
        for (c, slot) in ascii.iter_mut().enumerate() {
            *slot = flags_at(c as u32);
        }
        Ok(Classes {
            ascii,
            starts,
            flags,
        })
    }

    fn of(&self, c: char) -> u8 {
        if let Some(&flags) = self.ascii.get(c as usize) {
            return flags;
        }
        let range = self.starts.partition_point(|&start| start <= c as u32);
        range
            .checked_sub(1)
            .and_then(|i| self.flags.get(i))
            .copied()
            .unwrap_or(0)
    }
}

fn unicode_ranges(pattern: &str) -> Result<Vec<(u32, u32)>, TableError> {
    let hir = regex_syntax::parse(pattern).map_err(|e| TableError::Class(e.to_string()))?;
    match hir.kind() {
        HirKind::Class(Class::Unicode(class)) => Ok(class
            .ranges()
            .iter()
            .map(|r| (r.start() as u32, r.end() as u32))
            .collect()),
        _ => Err(TableError::Class(format!("{pattern} is not a class"))),
    }
}

fn contains(ranges: &[(u32, u32)], c: u32) -> bool {
    let i = ranges.partition_point(|&(_, hi)| hi < c);
    ranges.get(i).is_some_and(|&(lo, _)| lo <= c)
}

/// The pieces of `text`, in order; together they are all of it.
pub struct Pieces<'a> {
    text: &'a str,
    pos: usize,
    pattern: Pattern,
    classes: &'a Classes,
}

impl<'a> Pieces<'a> {
    pub fn new(text: &'a str, pattern: Pattern, classes: &'a Classes) -> Self {
        Pieces {
            text,
            pos: 0,
            pattern,
            classes,
        }
    }
}

impl<'a> Iterator for Pieces<'a> {
    type Item = &'a str;

    fn next(&mut self) -> Option<&'a str> {
        let scan = Scan {
            text: self.text,
            classes: self.classes,
        };
        let first = scan.char_at(self.pos)?;
        let end = match self.pattern {
            Pattern::O200k => scan.o200k_piece(self.pos, first),
            Pattern::Cl100k => scan.cl100k_piece(self.pos, first),
        }
        // Every character matches some alternative; never stall if that were ever untrue.
        .filter(|&end| end > self.pos)
        .unwrap_or(self.pos + first.len_utf8());
        let piece = self.text.get(self.pos..end);
        self.pos = end;
        piece
    }
}

struct Scan<'a> {
    text: &'a str,
    classes: &'a Classes,
}

impl Scan<'_> {
    fn char_at(&self, pos: usize) -> Option<char> {
        self.text.get(pos..)?.chars().next()
    }

    fn flags_at(&self, pos: usize) -> u8 {
        self.char_at(pos).map_or(0, |c| self.classes.of(c))
    }

    fn is(&self, pos: usize, class: u8) -> bool {
        self.flags_at(pos) & class != 0
    }

    /// Where the run of characters `accept`s, starting at `pos`, ends.
    fn run_end(&self, pos: usize, accept: impl Fn(char, u8) -> bool) -> usize {
        let rest = self.text.get(pos..).unwrap_or("");
        let run: usize = rest
            .chars()
            .take_while(|&c| accept(c, self.classes.of(c)))
            .map(char::len_utf8)
            .sum();
        pos + run
    }

    fn class_run_end(&self, pos: usize, class: u8) -> usize {
        self.run_end(pos, |_, flags| flags & class != 0)
    }

    /// `[^\r\n\p{L}\p{N}]`: the one character a word may carry in front (a space, a quote...).
    fn is_word_prefix(&self, c: char) -> bool {
        c != '\r' && c != '\n' && self.classes.of(c) & (LETTER | NUMBER) == 0
    }

    fn is_symbol_at(&self, pos: usize) -> bool {
        self.char_at(pos)
            .is_some_and(|c| is_symbol(self.classes.of(c)))
    }

    fn o200k_piece(&self, pos: usize, first: char) -> Option<usize> {
        let after_prefix = self.is_word_prefix(first).then_some(pos + first.len_utf8());
        after_prefix
            .and_then(|start| self.o200k_lower_word(start))
            .or_else(|| self.o200k_lower_word(pos))
            .or_else(|| after_prefix.and_then(|start| self.o200k_upper_word(start)))
            .or_else(|| self.o200k_upper_word(pos))
            .or_else(|| self.digits(pos))
            .or_else(|| self.symbols(pos, &['\r', '\n', '/']))
            .or_else(|| self.o200k_spaces(pos))
    }

    /// `[U]*[L]+` and a contraction, U and L being o200k's UPPER and LOWER classes, which
    /// overlap: the greedy `[U]*` gives back characters until `[L]+` can start.
    fn o200k_lower_word(&self, start: usize) -> Option<usize> {
        let upper_end = self.class_run_end(start, UPPER);
        let lower_start = if self.is(upper_end, LOWER) {
            upper_end
        } else {
            let upper = self.text.get(start..upper_end)?;
            let (i, _) = upper
                .char_indices()
                .rev()
                .find(|&(_, c)| self.classes.of(c) & LOWER != 0)?;
            start + i
        };
        let end = self.class_run_end(lower_start, LOWER);
        Some(self.contraction_end(end))
    }

    /// `[U]+[L]*` and a contraction.
    fn o200k_upper_word(&self, start: usize) -> Option<usize> {
        let upper_end = self.class_run_end(start, UPPER);
        if upper_end == start {
            return None;
        }
        let end = self.class_run_end(upper_end, LOWER);
        Some(self.contraction_end(end))
    }

    /// `(?i:'s|'t|'re|'ve|'m|'ll|'d)?` at `pos`: where it ends, or `pos`.
    fn contraction_end(&self, pos: usize) -> usize {
        self.contraction(pos, &["s", "t", "re", "ve", "m", "ll", "d"])
            .unwrap_or(pos)
    }

    /// An apostrophe and one of `suffixes`, ignoring case the way the regex does.
    fn contraction(&self, pos: usize, suffixes: &[&str]) -> Option<usize> {
        let rest = self.text.get(pos..)?.strip_prefix('\'')?;
        suffixes.iter().find_map(|suffix| {
            let mut chars = rest.chars();
            let mut len = 1;
            for wanted in suffix.chars() {
                let c = chars.next()?;
                if !folds_to(c, wanted) {
                    return None;
                }
                len += c.len_utf8();
            }
            Some(pos + len)
        })
    }

    /// `\p{N}{1,3}`.
    fn digits(&self, pos: usize) -> Option<usize> {
        let rest = self.text.get(pos..)?;
        let len: usize = rest
            .chars()
            .take(3)
            .take_while(|&c| self.classes.of(c) & NUMBER != 0)
            .map(char::len_utf8)
            .sum();
        (len > 0).then_some(pos + len)
    }

    /// ` ?[^\s\p{L}\p{N}]+` followed by any run of `trailing`.
    fn symbols(&self, pos: usize, trailing: &[char]) -> Option<usize> {
        let start = if self.char_at(pos) == Some(' ') && self.is_symbol_at(pos + 1) {
            pos + 1
        } else if self.is_symbol_at(pos) {
            pos
        } else {
            return None;
        };
        let end = self.run_end(start, |_, flags| is_symbol(flags));
        Some(self.run_end(end, |c, _| trailing.contains(&c)))
    }

    /// `\s*[\r\n]+|\s+(?!\S)|\s+`.
    fn o200k_spaces(&self, pos: usize) -> Option<usize> {
        let end = self.class_run_end(pos, SPACE);
        let run = self.text.get(pos..end).filter(|run| !run.is_empty())?;
        Some(after_last_newline(pos, run).unwrap_or_else(|| self.spaces_before_non_space(pos, run)))
    }

    /// `\s+(?!\S)|\s+` on a run with no line break: the last space is left to the word
    /// after the run (unless it is the only one).
    fn spaces_before_non_space(&self, pos: usize, run: &str) -> usize {
        let end = pos + run.len();
        match run.char_indices().next_back() {
            Some((last, _)) if last > 0 && end < self.text.len() => pos + last,
            _ => end,
        }
    }

    fn cl100k_piece(&self, pos: usize, first: char) -> Option<usize> {
        self.contraction(pos, &["s", "d", "m", "t", "ll", "ve", "re"])
            .or_else(|| self.cl100k_word(pos, first))
            .or_else(|| self.digits(pos))
            .or_else(|| self.symbols(pos, &['\r', '\n']))
            .or_else(|| self.cl100k_spaces(pos))
    }

    /// `[^\r\n\p{L}\p{N}]?+\p{L}++`.
    fn cl100k_word(&self, pos: usize, first: char) -> Option<usize> {
        let start = if self.is_word_prefix(first) {
            pos + first.len_utf8()
        } else {
            pos
        };
        let end = self.class_run_end(start, LETTER);
        (end > start).then_some(end)
    }

    /// `\s++$|\s*[\r\n]|\s+(?!\S)|\s`.
    fn cl100k_spaces(&self, pos: usize) -> Option<usize> {
        let end = self.class_run_end(pos, SPACE);
        let run = self.text.get(pos..end).filter(|run| !run.is_empty())?;
        if end == self.text.len() {
            return Some(end);
        }
        Some(after_last_newline(pos, run).unwrap_or_else(|| self.spaces_before_non_space(pos, run)))
    }
}

/// `[^\s\p{L}\p{N}]`: punctuation and symbols.
fn is_symbol(flags: u8) -> bool {
    flags & (SPACE | LETTER | NUMBER) == 0
}

/// `\s*[\r\n]` (or `+`) on a run of white space at `pos`: up to its last line break.
fn after_last_newline(pos: usize, run: &str) -> Option<usize> {
    run.rfind(['\r', '\n']).map(|i| pos + i + 1)
}

/// Whether `c` matches the ASCII letter `wanted` case-insensitively, as regex-syntax's
/// Unicode simple case folding has it (which adds ſ, U+017F, to s).
fn folds_to(c: char, wanted: char) -> bool {
    c.eq_ignore_ascii_case(&wanted) || (wanted == 's' && c == 'ſ')
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pieces(text: &str, pattern: Pattern) -> Vec<&str> {
        static CLASSES: std::sync::OnceLock<Classes> = std::sync::OnceLock::new();
        let classes = CLASSES.get_or_init(|| Classes::new().unwrap());
        Pieces::new(text, pattern, classes).collect()
    }

    #[test]
    fn o200k_cuts_words_numbers_symbols_and_spaces() {
        assert_eq!(
            pieces("Hello world, it's 12345!\n\n  x  ", Pattern::O200k),
            ["Hello", " world", ",", " it's", " ", "123", "45", "!\n\n", " ", " x", "  "]
        );
        // CamelCase splits before each capital; an all-caps run keeps its last letter's case.
        assert_eq!(
            pieces("getHTTPResponse JSONParser", Pattern::O200k),
            ["get", "HTTPResponse", " JSONParser"]
        );
        assert_eq!(
            pieces("path/to//x\n", Pattern::O200k),
            ["path", "/to", "//", "x", "\n"]
        );
    }

    #[test]
    fn cl100k_cuts_contractions_first_and_keeps_trailing_space() {
        assert_eq!(
            pieces("I'LL see 'sa x\n  \n ", Pattern::Cl100k),
            ["I", "'LL", " see", " '", "sa", " x", "\n  \n "]
        );
        assert_eq!(pieces("a  \n  ", Pattern::Cl100k), ["a", "  \n  "]);
        assert_eq!(pieces("a  \n  ", Pattern::O200k), ["a", "  \n", "  "]);
    }

    #[test]
    fn long_s_folds_to_s_in_contractions() {
        assert_eq!(pieces("it'ſ", Pattern::O200k), ["it'ſ"]);
    }

    #[test]
    fn every_byte_of_the_text_is_in_one_piece() {
        let text = "über 中文 ١٢٣٤ e\u{301}  \t\u{3000}x 🙂🙂 \u{200d}";
        for pattern in [Pattern::O200k, Pattern::Cl100k] {
            assert_eq!(pieces(text, pattern).concat(), text);
        }
    }
}
