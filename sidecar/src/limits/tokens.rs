//! Counting a request's tokens before it is sent, for the tokens-per-minute reservation.
//!
//! Prompts are counted with the model's own BPE (tiktoken's `o200k_base` or `cl100k_base`,
//! counted exactly as tiktoken does by the compact implementation in `bpe`) when the model is
//! known to use one, else estimated at four bytes a token. An encoding still costs a few MB
//! and tens of milliseconds to load, so one is loaded only for an endpoint with a
//! tokens-per-minute limit, once per process, on a background thread; requests arriving
//! before it is ready are estimated rather than delayed.
//!
//! Chat apps send the same system prompt, and re-send the whole conversation, on every
//! turn; so each message's count is cached (per worker thread, without a lock), and a
//! request costs BPE work only for what is new in it.

use std::cell::RefCell;
use std::collections::HashMap;
use std::hash::BuildHasher;

use foldhash::quality::RandomState;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::OnceLock;

mod bpe;
mod prompt_text;

use bpe::Bpe;

/// A request whose prompt text is larger than this is counted on the blocking pool, so that
/// one huge prompt does not stall the other connections of its worker.
const INLINE_TEXT_BYTES: usize = 32 * 1024;
/// OpenAI's count for an image at "high" detail in a 512×512 tile layout: a fair middle.
const IMAGE_TOKENS: u64 = 765;
/// Each chat message costs a few tokens of framing beyond its text.
const MESSAGE_OVERHEAD_TOKENS: u64 = 4;
/// Runs of non-whitespace longer than this (base64 blobs, minified data, one character
/// repeated) are estimated instead of tokenized: BPE's cost grows with the square of a
/// piece's length, so one such run could hold a worker for seconds.
const LONG_RUN_BYTES: usize = 256;
/// Such runs tokenize worse than prose; three bytes a token errs on the side of reserving more.
const LONG_RUN_BYTES_PER_TOKEN: u64 = 3;
/// Messages shorter than this are counted, not looked up: BPE on them costs about what
/// hashing and a lookup do.
const CACHED_PIECE_MIN_BYTES: usize = 128;
/// Counts kept per thread and generation: at most twice this, about 100 KiB a thread.
const CACHE_GENERATION_ENTRIES: usize = 4096;

thread_local! {
    static COUNTS: RefCell<CountCache> = RefCell::new(CountCache::default());
}

static O200K_READY: AtomicBool = AtomicBool::new(false);
static CL100K_READY: AtomicBool = AtomicBool::new(false);
static O200K: OnceLock<Option<Bpe>> = OnceLock::new();
static CL100K: OnceLock<Option<Bpe>> = OnceLock::new();

/// OpenAI's model names, by encoding: exact names, then prefixes of dated or sized variants.
/// (gpt-oss's o200k_harmony adds only special tokens, which prompts are not counted with.)
const O200K_MODELS: &[&str] = &["o1", "o3", "o4-mini", "gpt-5", "gpt-4.1", "gpt-4o"];
const O200K_PREFIXES: &[&str] = &[
    "o1-",
    "o3-",
    "o4-mini-",
    "gpt-5",
    "gpt-4.5-",
    "gpt-4.1-",
    "chatgpt-4o-",
    "gpt-4o-",
    "gpt-oss-",
    "codex-mini",
];
const CL100K_MODELS: &[&str] = &[
    "gpt-4",
    "gpt-3.5-turbo",
    "gpt-3.5",
    "gpt-35-turbo",
    "davinci-002",
    "babbage-002",
    "text-embedding-ada-002",
    "text-embedding-3-small",
    "text-embedding-3-large",
];
const CL100K_PREFIXES: &[&str] = &["gpt-4-", "gpt-3.5-turbo-", "gpt-35-turbo-"];

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Encoding {
    O200k,
    Cl100k,
    /// No known tokenizer: four bytes a token.
    Estimate,
}

impl Encoding {
    pub fn for_model(model: &str) -> Self {
        // A fine-tuned model ("ft:gpt-4o-mini:org::id") uses its base model's encoding.
        let model = match model.strip_prefix("ft:") {
            Some(tuned) => tuned.split(':').next().unwrap_or(tuned),
            None => model,
        };
        let known = |names: &[&str], prefixes: &[&str]| {
            names.contains(&model) || prefixes.iter().any(|p| model.starts_with(p))
        };
        if known(O200K_MODELS, O200K_PREFIXES) {
            Self::O200k
        } else if known(CL100K_MODELS, CL100K_PREFIXES) {
            Self::Cl100k
        } else {
            Self::Estimate
        }
    }

    fn ready_flag(self) -> Option<&'static AtomicBool> {
        match self {
            Self::O200k => Some(&O200K_READY),
            Self::Cl100k => Some(&CL100K_READY),
            Self::Estimate => None,
        }
    }

    fn bpe(self) -> Option<&'static Bpe> {
        let (cell, load): (_, fn() -> Result<Bpe, bpe::TableError>) = match self {
            Self::O200k => (&O200K, Bpe::o200k),
            Self::Cl100k => (&CL100K, Bpe::cl100k),
            Self::Estimate => return None,
        };
        cell.get_or_init(|| {
            load()
                .inspect_err(
                    |e| tracing::error!(encoding = ?self, "prompts will be estimated: {e}"),
                )
                .ok()
        })
        .as_ref()
    }

    /// Loads the encoding on a background thread (once per process).
    pub fn warm_up(self) {
        let Some(flag) = self.ready_flag() else {
            return;
        };
        static STARTED: [AtomicBool; 2] = [AtomicBool::new(false), AtomicBool::new(false)];
        let started = &STARTED[usize::from(self == Self::Cl100k)];
        if started.swap(true, Ordering::Relaxed) {
            return;
        }
        let spawned = std::thread::Builder::new()
            .name("llmesh-tokenizer".to_string())
            .spawn(move || {
                let _ = self.bpe();
                flag.store(true, Ordering::Release);
            });
        if spawned.is_err() {
            started.store(false, Ordering::Relaxed);
        }
    }

    fn loaded_bpe(self) -> Option<&'static Bpe> {
        self.ready_flag()
            .filter(|f| f.load(Ordering::Acquire))
            .and_then(|_| self.bpe())
    }
}

/// The text and fixed costs of a request's prompt.
#[derive(Debug, Default, PartialEq)]
pub struct Prompt {
    text: String,
    /// Where each message (or other string of the prompt) ends in `text`: the unit of caching.
    piece_ends: Vec<usize>,
    fixed_tokens: u64,
    /// Completion tokens the request may generate: `max_tokens` (or its newer names) × `n`.
    pub max_output: Option<u64>,
    pub choices: u64,
}

impl Prompt {
    /// Prompt tokens: counted with `encoding` if it is loaded, else estimated.
    pub async fn count(&self, encoding: Encoding) -> u64 {
        let Some(bpe) = encoding.loaded_bpe() else {
            return self.fixed_tokens + estimate_bytes(self.text.len());
        };
        if self.text.len() <= INLINE_TEXT_BYTES {
            return self.fixed_tokens + count_pieces(encoding, bpe, &self.text, &self.piece_ends);
        }
        let (text, ends) = (self.text.clone(), self.piece_ends.clone());
        let counted =
            tokio::task::spawn_blocking(move || count_pieces(encoding, bpe, &text, &ends)).await;
        self.fixed_tokens + counted.unwrap_or_else(|_| estimate_bytes(self.text.len()))
    }
}

/// Tokens of `text`, whose pieces end at `piece_ends` (and at its end). Pieces long enough
/// to be worth it are counted once and then looked up; runs of short ones are counted
/// together in one call.
fn count_pieces(encoding: Encoding, bpe: &Bpe, text: &str, piece_ends: &[usize]) -> u64 {
    let mut total = 0;
    let mut short_run_start = 0;
    let mut start = 0;
    for end in piece_ends.iter().copied().chain([text.len()]) {
        let Some(piece) = text.get(start..end) else {
            break;
        };
        if piece.len() >= CACHED_PIECE_MIN_BYTES {
            total += count_bounded(bpe, &text[short_run_start..start]);
            total += COUNTS.with_borrow_mut(|cache| cache.count(encoding, bpe, piece));
            short_run_start = end;
        }
        start = end;
    }
    total + count_bounded(bpe, &text[short_run_start..])
}

/// Recently counted pieces of one thread, in two generations: when the current one is
/// full it becomes the previous one (dropping the one before), and a piece found in the
/// previous one moves back up. So what recurs stays, with no per-entry bookkeeping.
#[derive(Default)]
struct CountCache {
    keys: RandomState,
    current: HashMap<u64, u64>,
    previous: HashMap<u64, u64>,
}

impl CountCache {
    fn count(&mut self, encoding: Encoding, bpe: &Bpe, piece: &str) -> u64 {
        // 64 bits of a keyed hash: a collision would only misjudge one reservation, which
        // the response's real usage settles anyway.
        let key = self.keys.hash_one((encoding, piece));
        if let Some(&tokens) = self.current.get(&key) {
            return tokens;
        }
        let tokens = match self.previous.remove(&key) {
            Some(tokens) => tokens,
            None => count_bounded(bpe, piece),
        };
        if self.current.len() >= CACHE_GENERATION_ENTRIES {
            self.previous = std::mem::take(&mut self.current);
        }
        self.current.insert(key, tokens);
        tokens
    }
}

/// Tokens of `text`, with long runs of non-whitespace estimated so that the work stays
/// linear in the text's length.
fn count_bounded(bpe: &Bpe, text: &str) -> u64 {
    let has_long_run = text
        .split(|c: char| c.is_whitespace())
        .any(|run| run.len() > LONG_RUN_BYTES);
    if !has_long_run {
        return bpe.count(text) as u64;
    }
    let mut kept = String::with_capacity(text.len().min(64 * 1024));
    let mut estimated = 0;
    for piece in text.split_inclusive(|c: char| c.is_whitespace()) {
        let run = piece.trim_end_matches(|c: char| c.is_whitespace());
        if run.len() > LONG_RUN_BYTES {
            estimated += (run.len() as u64).div_ceil(LONG_RUN_BYTES_PER_TOKEN);
            kept.push_str(&piece[run.len()..]);
        } else {
            kept.push_str(piece);
        }
    }
    estimated + bpe.count(&kept) as u64
}

/// Four bytes a token: OpenAI's own rule of thumb for English text.
pub fn estimate_bytes(len: usize) -> u64 {
    (len as u64).div_ceil(4)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn wait_until_ready(encoding: Encoding) {
        encoding.warm_up();
        let flag = encoding.ready_flag().unwrap();
        for _ in 0..600 {
            if flag.load(Ordering::Acquire) {
                return;
            }
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
        panic!("{encoding:?} did not load");
    }

    #[test]
    fn models_map_to_their_encodings() {
        assert_eq!(Encoding::for_model("gpt-4o-mini"), Encoding::O200k);
        assert_eq!(Encoding::for_model("gpt-4.1"), Encoding::O200k);
        assert_eq!(Encoding::for_model("gpt-4"), Encoding::Cl100k);
        assert_eq!(
            Encoding::for_model("text-embedding-3-small"),
            Encoding::Cl100k
        );
        assert_eq!(Encoding::for_model("llama-3.1-8b"), Encoding::Estimate);
    }

    #[test]
    fn models_map_as_tiktoken_rs_maps_them() {
        use tiktoken_rs::tokenizer::{get_tokenizer, Tokenizer};
        let models = [
            "o1",
            "o1-mini",
            "o1-preview-2024-09-12",
            "o3",
            "o3-mini",
            "o4-mini",
            "o4-mini-high",
            "gpt-5",
            "gpt-5-mini",
            "gpt-5.1-codex",
            "gpt-4.5-preview",
            "gpt-4.1",
            "gpt-4.1-nano",
            "gpt-4o",
            "gpt-4o-mini",
            "gpt-4o-2024-05-13",
            "chatgpt-4o-latest",
            "gpt-oss-20b",
            "codex-mini-latest",
            "ft:gpt-4o-mini-2024-07-18:org::abc",
            "ft:gpt-3.5-turbo:x:y",
            "gpt-4",
            "gpt-4-turbo",
            "gpt-4-32k",
            "gpt-3.5-turbo",
            "gpt-3.5-turbo-0125",
            "gpt-3.5",
            "gpt-35-turbo",
            "gpt-35-turbo-16k",
            "davinci-002",
            "babbage-002",
            "text-embedding-ada-002",
            "text-embedding-3-small",
            "text-embedding-3-large",
            "text-davinci-003",
            "davinci",
            "gpt2",
            "o2",
            "gpt-4o1",
            "claude-3-5-sonnet",
            "",
        ];
        for model in models {
            let expected = match get_tokenizer(model) {
                Some(Tokenizer::O200kBase | Tokenizer::O200kHarmony) => Encoding::O200k,
                Some(Tokenizer::Cl100kBase) => Encoding::Cl100k,
                _ => Encoding::Estimate,
            };
            assert_eq!(Encoding::for_model(model), expected, "{model}");
        }
    }

    #[tokio::test]
    async fn chat_prompts_are_counted_with_the_real_tokenizer() {
        wait_until_ready(Encoding::Cl100k);
        let body = br#"{"model":"gpt-4","max_tokens":50,"n":2,"messages":[
            {"role":"system","content":"You are a helpful assistant."},
            {"role":"user","content":[{"type":"text","text":"hello world"},{"type":"image_url","image_url":{"url":"data:..."}}]}
        ]}"#;
        let prompt = Prompt::from_request(body);
        assert_eq!(prompt.max_output, Some(50));
        assert_eq!(prompt.choices, 2);
        // cl100k: "You are a helpful assistant.\nhello world\n" is 9 tokens.
        let counted = prompt.count(Encoding::Cl100k).await;
        assert_eq!(counted, 9 + 2 * MESSAGE_OVERHEAD_TOKENS + IMAGE_TOKENS);
    }

    #[test]
    fn long_runs_are_estimated_and_the_rest_counted() {
        wait_until_ready(Encoding::Cl100k);
        let bpe = Encoding::Cl100k.loaded_bpe().unwrap();
        let prose = "You are a helpful assistant.\nhello world\n";
        assert_eq!(count_bounded(bpe, prose), 9);
        // A 300 KB run of one character: tokenized whole, it would take BPE minutes.
        let blob = "x".repeat(300_000);
        let text = format!("{prose}{blob} end");
        let rest = bpe.count(&format!("{prose} end")) as u64;
        assert_eq!(count_bounded(bpe, &text), 100_000 + rest);
    }

    #[tokio::test]
    async fn long_messages_are_counted_once_then_looked_up_and_sum_like_the_whole() {
        wait_until_ready(Encoding::O200k);
        let bpe = Encoding::O200k.loaded_bpe().unwrap();
        let system = "You are the support assistant of a shop. Answer in two sentences, \
                      politely, and never promise a refund before checking the order. "
            .repeat(3);
        let history: Vec<String> = (0..6)
            .map(|i| format!("Turn {i}: where is my order {i}? It has not arrived yet. ").repeat(4))
            .collect();
        let mut messages = vec![json!({"role": "system", "content": system})];
        messages.extend(
            history
                .iter()
                .map(|h| json!({"role": "user", "content": h})),
        );
        messages.push(json!({"role": "user", "content": "ok"}));
        let body = json!({"model": "gpt-4o", "messages": messages}).to_string();
        let prompt = Prompt::from_request(body.as_bytes());

        let cached = |piece: &str| {
            COUNTS.with_borrow(|c| {
                let key = c.keys.hash_one((Encoding::O200k, piece));
                c.current.contains_key(&key) || c.previous.contains_key(&key)
            })
        };
        let first_piece = format!("{system}\n");
        assert!(!cached(&first_piece));
        let first = prompt.count(Encoding::O200k).await;
        // Every long message is now cached; the short last one is not.
        assert!(cached(&first_piece));
        assert!(history.iter().all(|h| cached(&format!("{h}\n"))));
        assert!(!cached("ok\n"));
        assert_eq!(prompt.count(Encoding::O200k).await, first);
        // Counting message by message gives what counting the whole text would.
        let whole = bpe.count(&prompt.text) as u64;
        assert_eq!(first, prompt.fixed_tokens + whole);
    }

    #[test]
    fn the_cache_keeps_what_recurs_within_two_generations() {
        wait_until_ready(Encoding::Cl100k);
        let bpe = Encoding::Cl100k.loaded_bpe().unwrap();
        let mut cache = CountCache::default();
        let recurring = "a system prompt that every request carries ".repeat(4);
        let tokens = cache.count(Encoding::Cl100k, bpe, &recurring);
        for i in 0..3 * CACHE_GENERATION_ENTRIES {
            cache.count(Encoding::Cl100k, bpe, &format!("message {i}"));
            if i % 1000 == 0 {
                assert_eq!(cache.count(Encoding::Cl100k, bpe, &recurring), tokens);
            }
            assert!(cache.current.len() + cache.previous.len() <= 2 * CACHE_GENERATION_ENTRIES);
        }
        let key = cache.keys.hash_one((Encoding::Cl100k, recurring.as_str()));
        assert!(cache.current.contains_key(&key) || cache.previous.contains_key(&key));
        // The same text under another encoding is another entry.
        let other = cache.keys.hash_one((Encoding::O200k, recurring.as_str()));
        assert_ne!(key, other);
    }

    #[tokio::test]
    async fn token_arrays_and_unknown_models() {
        let body = br#"{"model":"x","input":[[1,2,3],[4,5]]}"#;
        assert_eq!(
            Prompt::from_request(body).count(Encoding::Estimate).await,
            5
        );
        let body = br#"{"model":"x","prompt":"abcdefgh"}"#;
        // "abcdefgh\n" is 9 bytes: 3 estimated tokens.
        assert_eq!(
            Prompt::from_request(body).count(Encoding::Estimate).await,
            3
        );
    }
}
