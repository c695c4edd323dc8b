use std::sync::atomic::{AtomicU64, Ordering};

use http::HeaderValue;

use super::*;
use crate::config::Duration as ConfigDuration;

fn limits(yaml: &str) -> LimitsConfig {
    serde_yaml_ng::from_str(yaml).unwrap()
}

fn far() -> Instant {
    Instant::now() + Duration::from_secs(3600)
}

/// Saturates a limiter with `clients` loops for `minutes`, each admitted request settling
/// `tokens`; returns admissions per minute.
async fn admitted_per_minute(limiter: Arc<Limiter>, tokens: u64, minutes: u64) -> Vec<u64> {
    let counts: Arc<Vec<AtomicU64>> = Arc::new((0..minutes).map(|_| AtomicU64::new(0)).collect());
    let start = Instant::now();
    let end = start + Duration::from_secs(60 * minutes);
    let mut tasks = Vec::new();
    for _ in 0..8 {
        let limiter = Arc::clone(&limiter);
        let counts = Arc::clone(&counts);
        tasks.push(tokio::spawn(async move {
            while Instant::now() < end {
                if let Ok(permit) = limiter.acquire(tokens, end).await {
                    let minute = (Instant::now() - start).as_secs() / 60;
                    if let Some(c) = counts.get(minute as usize) {
                        c.fetch_add(1, Ordering::Relaxed);
                    }
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    permit.settle(Some(tokens));
                }
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    counts.iter().map(|c| c.load(Ordering::Relaxed)).collect()
}

#[tokio::test(start_paused = true)]
async fn requests_per_minute_hold_within_five_percent() {
    let limiter = Limiter::new("chat", &limits("requestsPerMinute: 600\nqueueTimeout: 1h"));
    let per_minute = admitted_per_minute(limiter, 0, 4).await;
    // The first minute also spends the full bucket a fresh limiter starts with.
    assert!((1150..=1210).contains(&per_minute[0]), "{per_minute:?}");
    for n in &per_minute[1..] {
        assert!((570..=630).contains(n), "{per_minute:?}");
    }
}

#[tokio::test(start_paused = true)]
async fn tokens_per_minute_hold_within_five_percent() {
    let limiter = Limiter::new("chat", &limits("tokensPerMinute: 10000\nqueueTimeout: 1h"));
    // 250 tokens a request: 40 requests a minute once the first minute's burst is spent.
    let per_minute = admitted_per_minute(limiter, 250, 4).await;
    for n in &per_minute[1..] {
        assert!((38..=42).contains(n), "{per_minute:?}");
    }
}

#[tokio::test(start_paused = true)]
async fn waiters_are_admitted_in_arrival_order() {
    let limiter = Limiter::new("chat", &limits("maxConcurrent: 1"));
    let first = limiter.acquire(0, far()).await.unwrap();
    let order = Arc::new(Mutex::new(Vec::new()));
    let mut tasks = Vec::new();
    for i in 0..5 {
        let limiter = Arc::clone(&limiter);
        let order = Arc::clone(&order);
        tasks.push(tokio::spawn(async move {
            let permit = limiter.acquire(0, far()).await.unwrap();
            order.lock().unwrap().push(i);
            tokio::time::sleep(Duration::from_millis(5)).await;
            drop(permit);
        }));
        // Let each waiter reach the queue before the next one starts.
        tokio::task::yield_now().await;
    }
    drop(first);
    for t in tasks {
        t.await.unwrap();
    }
    assert_eq!(*order.lock().unwrap(), vec![0, 1, 2, 3, 4]);
}

#[tokio::test(start_paused = true)]
async fn a_large_request_at_the_head_is_not_overtaken() {
    let limiter = Limiter::new("chat", &limits("tokensPerMinute: 600\nqueueTimeout: 10m"));
    let spent = limiter.acquire(600, far()).await.unwrap();
    spent.settle(Some(600));
    let big = {
        let limiter = Arc::clone(&limiter);
        tokio::spawn(async move {
            limiter.acquire(300, far()).await.unwrap();
            Instant::now()
        })
    };
    tokio::task::yield_now().await;
    let small = {
        let limiter = Arc::clone(&limiter);
        tokio::spawn(async move {
            limiter.acquire(10, far()).await.unwrap();
            Instant::now()
        })
    };
    let (big, small) = (big.await.unwrap(), small.await.unwrap());
    assert!(big <= small, "the small request went first");
}

#[tokio::test(start_paused = true)]
async fn the_queue_times_out_with_the_limit_that_blocked() {
    let limiter = Limiter::new("chat", &limits("maxConcurrent: 1\nqueueTimeout: 2s"));
    let _held = limiter.acquire(0, far()).await.unwrap();
    let start = Instant::now();
    let error = limiter.acquire(0, far()).await.err().unwrap();
    assert_eq!(Instant::now() - start, Duration::from_secs(2));
    match error {
        LimitError::RateLimited {
            limit,
            value,
            retry_after,
        } => {
            assert_eq!(limit, LimitKind::Concurrency);
            assert_eq!(value, Some(1));
            assert!(retry_after >= Duration::from_secs(1));
        }
        other => panic!("{other:?}"),
    }
}

#[tokio::test(start_paused = true)]
async fn a_wait_longer_than_the_queue_allows_is_refused_at_once_with_retry_after() {
    let limiter = Limiter::new("chat", &limits("requestsPerMinute: 6\nqueueTimeout: 1s"));
    for _ in 0..6 {
        limiter.acquire(0, far()).await.unwrap().settle(None);
    }
    let start = Instant::now();
    match limiter.acquire(0, far()).await.err().unwrap() {
        LimitError::RateLimited {
            limit, retry_after, ..
        } => {
            assert_eq!(limit, LimitKind::RequestsPerMinute);
            assert_eq!(retry_after, Duration::from_secs(10));
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(Instant::now(), start, "refused without waiting");
}

#[tokio::test(start_paused = true)]
async fn a_full_queue_refuses_at_once() {
    let limiter = Limiter::new("chat", &limits("maxConcurrent: 1\nmaxQueued: 1"));
    let _held = limiter.acquire(0, far()).await.unwrap();
    let waiter = {
        let limiter = Arc::clone(&limiter);
        tokio::spawn(async move { limiter.acquire(0, far()).await.is_ok() })
    };
    tokio::task::yield_now().await;
    match limiter.acquire(0, far()).await.err().unwrap() {
        LimitError::RateLimited { limit, .. } => assert_eq!(limit, LimitKind::Queue),
        other => panic!("{other:?}"),
    }
    waiter.abort();
}

#[tokio::test(start_paused = true)]
async fn unused_reservations_come_back_and_overruns_are_charged() {
    let limiter = Limiter::new("chat", &limits("tokensPerMinute: 1000\nqueueTimeout: 0ms"));
    limiter.acquire(900, far()).await.unwrap().settle(Some(100));
    // 900 left: another 900 fits now.
    limiter
        .acquire(900, far())
        .await
        .unwrap()
        .settle(Some(1000));
    // 900 - 1000 = -100 left: even 1 token waits.
    assert!(limiter.acquire(1, far()).await.is_err());
    // A request that never got an answer returns its whole reservation.
    // 66 s refill the -100 to full.
    tokio::time::advance(Duration::from_secs(66)).await;
    drop(limiter.acquire(1000, far()).await.unwrap());
    assert!(limiter.acquire(1000, far()).await.is_ok());
}

#[tokio::test(start_paused = true)]
async fn a_waiter_that_goes_away_leaves_the_queue() {
    let limiter = Limiter::new("chat", &limits("maxConcurrent: 1"));
    let held = limiter.acquire(0, far()).await.unwrap();
    let gone = {
        let limiter = Arc::clone(&limiter);
        tokio::spawn(async move { limiter.acquire(0, far()).await.is_ok() })
    };
    tokio::task::yield_now().await;
    gone.abort();
    let _ = gone.await;
    drop(held);
    let admitted = tokio::time::timeout(Duration::from_secs(1), limiter.acquire(0, far())).await;
    assert!(
        admitted.is_ok(),
        "the cancelled waiter still blocked the queue"
    );
}

#[tokio::test(start_paused = true)]
async fn provider_headers_hold_requests_until_the_reset() {
    let limiter = Limiter::new("chat", &LimitsConfig::default());
    let mut headers = HeaderMap::new();
    headers.insert(
        "x-ratelimit-remaining-requests",
        HeaderValue::from_static("1"),
    );
    headers.insert("x-ratelimit-reset-requests", HeaderValue::from_static("2s"));
    limiter.observe_upstream(&headers);
    let start = Instant::now();
    limiter.acquire(0, far()).await.unwrap().settle(None);
    assert_eq!(Instant::now(), start, "one request was left");
    limiter.acquire(0, far()).await.unwrap().settle(None);
    assert_eq!(Instant::now() - start, Duration::from_secs(2));
}

#[tokio::test(start_paused = true)]
async fn no_limits_admit_at_once() {
    let limiter = Limiter::new("chat", &LimitsConfig::default());
    let permits: Vec<_> = futures_lite_join(&limiter, 1000).await;
    assert_eq!(permits.len(), 1000);
    let config = LimitsConfig {
        queue_timeout: ConfigDuration::from_millis(0),
        ..LimitsConfig::default()
    };
    assert!(Limiter::new("chat", &config)
        .acquire(10, far())
        .await
        .is_ok());
}

async fn futures_lite_join(limiter: &Arc<Limiter>, n: usize) -> Vec<Permit> {
    let mut permits = Vec::with_capacity(n);
    for _ in 0..n {
        permits.push(limiter.acquire(100, far()).await.unwrap());
    }
    permits
}

#[test]
fn reset_durations_in_openai_format() {
    assert_eq!(parse_reset("1s"), Some(Duration::from_secs(1)));
    assert_eq!(parse_reset("20ms"), Some(Duration::from_millis(20)));
    assert_eq!(parse_reset("6m0s"), Some(Duration::from_secs(360)));
    assert_eq!(parse_reset("2m3.5s"), Some(Duration::from_secs_f64(123.5)));
    assert_eq!(parse_reset("7"), Some(Duration::from_secs(7)));
    assert_eq!(parse_reset("soon"), None);
    assert_eq!(parse_reset("5x"), None);
    assert_eq!(parse_reset("NaN"), None);
    assert_eq!(parse_reset("-1"), None);
}

#[test]
fn anthropic_reset_instants_become_waits() {
    let now = std::time::UNIX_EPOCH + Duration::from_secs(1_700_000_000);
    // 2023-11-14T22:13:20Z is the unix second 1_700_000_000.
    assert_eq!(
        parse_reset_at("2023-11-14T22:13:30Z", now),
        Some(Duration::from_secs(10))
    );
    assert_eq!(
        parse_reset_at("2023-11-14T23:13:25+01:00", now),
        Some(Duration::from_secs(5))
    );
    assert_eq!(
        parse_reset_at("2023-11-14T22:00:00Z", now),
        Some(Duration::ZERO)
    );
    assert_eq!(
        parse_reset_at("2999-01-01T00:00:00Z", now),
        Some(wait::MAX_WAIT)
    );
    assert_eq!(parse_reset_at("in a minute", now), None);
}

#[tokio::test]
async fn anthropic_rate_limit_headers_are_observed() {
    let limiter = Limiter::new("claude", &LimitsConfig::default());
    let mut headers = HeaderMap::new();
    headers.insert(
        "anthropic-ratelimit-requests-remaining",
        "0".parse().unwrap(),
    );
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let soon = time::OffsetDateTime::from_unix_timestamp(now as i64 + 30).unwrap();
    let soon = format!(
        "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}Z",
        soon.year(),
        u8::from(soon.month()),
        soon.day(),
        soon.hour(),
        soon.minute(),
        soon.second()
    );
    headers.insert("anthropic-ratelimit-requests-reset", soon.parse().unwrap());
    limiter.observe_upstream(&headers);
    assert!(limiter.lock().upstream_requests.is_some());
}

#[test]
fn reset_durations_that_would_overflow_are_capped() {
    let huge_digits = "9".repeat(400);
    for huge in [
        "1h2m3.5s",
        "1e300",
        "inf",
        "9300000000000000000",
        "18446744073709551616s",
        huge_digits.as_str(),
        &format!("{huge_digits}h"),
    ] {
        assert_eq!(parse_reset(huge), Some(crate::wait::MAX_WAIT), "{huge}");
    }
}

#[tokio::test(start_paused = true)]
async fn hostile_reset_headers_tighten_admission_without_a_panic() {
    let limiter = Limiter::new("chat", &LimitsConfig::default());
    for (remaining, reset) in [("0", "1e300"), ("0", "9300000000000000000"), ("NaN", "1s")] {
        let mut headers = http::HeaderMap::new();
        headers.insert("x-ratelimit-remaining-requests", remaining.parse().unwrap());
        headers.insert("x-ratelimit-reset-requests", reset.parse().unwrap());
        limiter.observe_upstream(&headers);
    }
    // The provider said 0 requests are left for "forever": capped, so a request waits
    // (and times out at its deadline) instead of crashing the process.
    let deadline = Instant::now() + Duration::from_secs(2);
    let refused = limiter.acquire(1, deadline).await;
    assert!(matches!(refused, Err(LimitError::RateLimited { .. })));
}

#[tokio::test(start_paused = true)]
async fn an_absurd_max_tokens_cannot_wedge_or_crash_the_limiter() {
    let config = LimitsConfig {
        tokens_per_minute: Some(100),
        ..LimitsConfig::default()
    };
    let limiter = Limiter::new("chat", &config);
    let huge = Reservation {
        prompt: 10,
        output: 18_000_000_000_000_000_000,
    };
    let permit = limiter.acquire_for(huge, far()).await.unwrap();
    // Another request behind it is told a bounded wait instead of overflowing an Instant.
    let deadline = Instant::now() + Duration::from_secs(1);
    match limiter.acquire(1, deadline).await {
        Err(LimitError::RateLimited { retry_after, .. }) => {
            assert!(retry_after <= crate::wait::MAX_WAIT)
        }
        other => panic!("expected a 429, got {:?}", other.map(|_| ())),
    }
    permit.settle(Some(20));
}
