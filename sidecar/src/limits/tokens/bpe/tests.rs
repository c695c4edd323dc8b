//! The compact encodings against tiktoken-rs, the implementation the sidecar used before:
//! the same tokens and ranks, and the same count on a varied generated corpus.

use super::*;
use std::sync::OnceLock;
use tiktoken_rs::CoreBPE;

fn o200k() -> &'static Bpe {
    static BPE: OnceLock<Bpe> = OnceLock::new();
    BPE.get_or_init(|| Bpe::o200k().unwrap())
}

fn cl100k() -> &'static Bpe {
    static BPE: OnceLock<Bpe> = OnceLock::new();
    BPE.get_or_init(|| Bpe::cl100k().unwrap())
}

fn pairs() -> [(&'static Bpe, &'static CoreBPE, usize); 2] {
    [
        (o200k(), tiktoken_rs::o200k_base_singleton(), 199_998),
        (cl100k(), tiktoken_rs::cl100k_base_singleton(), 100_256),
    ]
}

#[test]
fn the_tables_hold_tiktokens_tokens_at_their_ranks() {
    for (bpe, reference, tokens) in pairs() {
        assert_eq!(bpe.vocab.len(), tokens);
        for rank in 0..tokens as u32 {
            let token = bpe.vocab.token(rank).unwrap();
            assert_eq!(
                reference.decode_bytes(&[rank]).unwrap(),
                token,
                "rank {rank}"
            );
            assert_eq!(bpe.vocab.rank(token), Some(rank));
        }
    }
}

#[test]
fn the_o200k_table_costs_about_two_mb_of_heap() {
    assert!(o200k().vocab.heap_bytes() <= 9 << 18);
}

#[test]
fn counts_equal_tiktokens_on_a_varied_corpus() {
    let corpus = corpus(0x5eed, 1500);
    assert!(corpus.iter().map(String::len).sum::<usize>() > 300_000);
    for (bpe, reference, _) in pairs() {
        for text in &corpus {
            let expected = reference.encode_ordinary(text).len();
            assert_eq!(bpe.count(text), expected, "{:?}: {text:?}", bpe.pattern);
        }
    }
}

#[test]
fn counts_equal_tiktokens_on_edge_cases() {
    let cases = [
        "",
        " ",
        "\n",
        "  \n  ",
        "a  \n  ",
        "x\u{3000}\u{3000}y",
        "it'ſ IT'S it's 'sa 'LL 've",
        "HTTPResponse getX JSONParser ǅungla ǅ",
        "e\u{301}\u{301}x \u{301}abc",
        "1234567 ١٢٣٤٥ Ⅻ ½¾",
        "!!!///\n\n/ ?!",
        " \u{85}\u{a0}x",
    ];
    let long_spaces = " ".repeat(5000) + "x";
    let long_word = "pneumonoultramicroscopicsilicovolcanoconiosis".repeat(5);
    for (bpe, reference, _) in pairs() {
        for text in cases.iter().copied().chain([&*long_spaces, &*long_word]) {
            assert_eq!(
                bpe.count(text),
                reference.encode_ordinary(text).len(),
                "{:?}: {text:?}",
                bpe.pattern
            );
        }
    }
}

/// Counts every line (a JSON string) of the file `LLMESH_BPE_CORPUS` into
/// `LLMESH_BPE_COUNTS` ("o200k cl100k" a line), for `scripts/bpe-check-tiktoken`, which
/// compares them with Python's tiktoken.
#[test]
#[ignore = "run by scripts/bpe-check-tiktoken"]
fn count_a_corpus_file() {
    let corpus = std::fs::read_to_string(std::env::var("LLMESH_BPE_CORPUS").unwrap()).unwrap();
    let mut out = String::new();
    for line in corpus.lines() {
        let text: String = serde_json::from_str(line).unwrap();
        out.push_str(&format!(
            "{} {}\n",
            o200k().count(&text),
            cl100k().count(&text)
        ));
    }
    std::fs::write(std::env::var("LLMESH_BPE_COUNTS").unwrap(), out).unwrap();
}

/// Texts of every kind a prompt holds, and junk: prose in many scripts, code, JSON,
/// contractions in every case, marks, emoji, numbers, runs of odd white space, long words,
/// random code points and random bytes.
fn corpus(seed: u64, texts: usize) -> Vec<String> {
    let mut rng = fastrand::Rng::with_seed(seed);
    (0..texts)
        .map(|_| {
            let mut text = String::new();
            for _ in 0..rng.usize(1..40) {
                push_fragment(&mut rng, &mut text);
            }
            text
        })
        .collect()
}

const FRAGMENTS: &[&str] = &[
    "The quick brown fox jumps over the lazy dog. ",
    "I'm sure they'll say it's fine; we've done what you'd want, haven't we? ",
    "DON'T SHOUT, IT'S RUDE. We'Re HeRe 'Ve 'M 'D. ",
    "fn main() {\n    let x: Vec<u32> = (0..10).collect();\n    println!(\"{x:?}\");\n}\n",
    "{\"model\": \"gpt-4o\", \"messages\": [{\"role\": \"user\", \"content\": \"hi\"}], \"n\": 2}",
    "def f(a, b=3):\n\treturn a**b  # power\n\n\n",
    "SELECT id, name FROM users WHERE age >= 21 ORDER BY name;\r\n",
    "Größenordnung, Straße, über Ärger. Ça va? Déjà vu, naïve café. ",
    "Привет, как дела? Всё хорошо. Γειά σου κόσμε. ",
    "中文分词测试，这是一个句子。日本語のテキスト、カタカナとひらがな。",
    "한국어 문장입니다. مرحبا بالعالم ١٢٣ שלום עולם ",
    "हिन्दी में वाक्य। ภาษาไทยไม่มีช่องว่าง ",
    "🙂👍🏽👨‍👩‍👧‍👦🇵🇹 ✨🔥 ",
    "1234567890 3.14159 -42 1e10 0x1F 1,000,000 ",
    "getHTTPResponseCode XMLHttpRequest camelCase snake_case SCREAMING_CASE ",
    "it'ſ ſtrange 'S 'T 'Re 'VE 'm 'LL 'd 'x ",
    "e\u{301}\u{302} a\u{20dd} \u{301}\u{301}start ǅ ǈ ",
    "path/to/file.rs // comment\n/* block */ https://example.com/a/b?c=d ",
    "<div class=\"x\">&amp; &lt;tag&gt;</div>\n",
    "    indented\n        more\n\n\n\t\tTabs\u{a0}nbsp\u{3000}ideographic ",
];

const SPACES: &[char] = &[
    ' ', ' ', ' ', '\t', '\n', '\n', '\r', '\u{a0}', '\u{3000}', '\u{2028}', '\u{85}', '\u{b}',
    '\u{c}', '\u{2009}',
];

/// Code point ranges to draw from: ASCII, Latin and the rest of the BMP's scripts, CJK,
/// Hangul, emoji, and anything.
const RANGES: &[(u32, u32)] = &[
    (0x20, 0x7f),
    (0x80, 0x800),
    (0x800, 0x3000),
    (0x3000, 0xa000),
    (0xac00, 0xd7a4),
    (0x1f300, 0x1fb00),
    (0, 0x11_0000),
];

fn push_fragment(rng: &mut fastrand::Rng, text: &mut String) {
    match rng.u8(0..10) {
        0..=3 => text.push_str(FRAGMENTS[rng.usize(..FRAGMENTS.len())]),
        4 => (0..rng.usize(1..40)).for_each(|_| text.push(SPACES[rng.usize(..SPACES.len())])),
        5 => (0..rng.usize(1..12)).for_each(|_| text.push(char::from(rng.u8(b'0'..=b'9')))),
        6 => {
            let (lo, hi) = RANGES[rng.usize(..RANGES.len())];
            for _ in 0..rng.usize(1..30) {
                text.extend(char::from_u32(rng.u32(lo..hi)));
            }
        }
        7 => {
            let bytes: Vec<u8> = (0..rng.usize(1..60)).map(|_| rng.u8(..)).collect();
            text.push_str(&String::from_utf8_lossy(&bytes));
        }
        8 => {
            // Long words take tiktoken's other merge path (pieces of 100 bytes or more).
            let letters = &b"etaoinshrdlucmfwypvbgkqjxz"[..rng.usize(6..26)];
            (0..rng.usize(1..300))
                .for_each(|_| text.push(char::from(letters[rng.usize(..letters.len())])));
        }
        _ => {
            let symbols = b"!?.,;:'\"/\\()[]{}<>-_=+*&^%$#@~`|";
            (0..rng.usize(1..20))
                .for_each(|_| text.push(char::from(symbols[rng.usize(..symbols.len())])));
        }
    }
}
