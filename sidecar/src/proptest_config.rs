//! How many cases the property tests run.

use proptest::test_runner::Config;

/// Enough to catch a regression on every `cargo test` and still take well under a second
/// per property.
const QUICK_CASES: u32 = 64;

/// [`QUICK_CASES`], unless `PROPTEST_CASES` asks for a longer bounded pass (as `scripts/test`
/// does): proptest reads that variable into its default config, which an explicit case count
/// would override.
pub fn config() -> Config {
    if std::env::var_os("PROPTEST_CASES").is_some() {
        Config::default()
    } else {
        Config::with_cases(QUICK_CASES)
    }
}
