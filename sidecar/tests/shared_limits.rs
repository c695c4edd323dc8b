//! Limits shared through a real Redis (Debian's `redis-server`, started here on a free
//! loopback port) by two real sidecar processes.

mod common;

use std::time::{Duration, Instant};

use common::redis::{free_port, Redis};
use common::{client, eventually, Sidecar};
use serde_json::json;

/// The level of endpoint `chat`'s shared requests bucket, if Redis holds one.
async fn shared_requests_bucket(redis_url: &str) -> Option<String> {
    let mut connection = redis::Client::open(redis_url)
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    redis::cmd("HGET")
        .arg("llmesh:chat:requests")
        .arg("level")
        .query_async(&mut connection)
        .await
        .unwrap()
}

fn shared_sidecar(redis_port: u16, limits: &str, policy: &str) -> Sidecar {
    Sidecar::start(&format!(
        "endpoints:
  - name: chat
    provider: mock
    model: mock-model
    limits:
      {limits}
      scope: global
      redis: {{url: 'redis://127.0.0.1:{redis_port}', onUnavailable: {policy}}}
"
    ))
}

/// Sends `n` calls with `concurrency` at a time; returns (admitted, rate-limited, other).
async fn load(sidecar: &Sidecar, n: usize, concurrency: usize) -> (usize, usize, Vec<u16>) {
    use futures::StreamExt;
    let url = sidecar.url("/v1/chat/completions");
    let statuses: Vec<u16> = futures::stream::iter(0..n)
        .map(|_| {
            let url = url.clone();
            async move {
                client()
                    .post(url)
                    .json(
                        &json!({"model": "chat", "messages": [{"role": "user", "content": "hi"}]}),
                    )
                    .timeout(Duration::from_secs(10))
                    .send()
                    .await
                    .map(|r| r.status().as_u16())
                    .unwrap_or(0)
            }
        })
        .buffer_unordered(concurrency)
        .collect()
        .await;
    let ok = statuses.iter().filter(|s| **s == 200).count();
    let limited = statuses.iter().filter(|s| **s == 429).count();
    let other = statuses
        .into_iter()
        .filter(|s| *s != 200 && *s != 429)
        .collect();
    (ok, limited, other)
}

#[tokio::test]
async fn two_sidecars_share_one_budget() {
    let redis = Redis::start();
    let limits = "requestsPerMinute: 120\n      queueTimeout: 300ms";
    let a = shared_sidecar(redis.port, limits, "failOpen");
    let b = shared_sidecar(redis.port, limits, "failOpen");
    let started = Instant::now();
    let (ra, rb) = tokio::join!(load(&a, 200, 8), load(&b, 200, 8));
    let elapsed = started.elapsed().as_secs_f64();
    assert!(ra.2.is_empty() && rb.2.is_empty(), "{ra:?} {rb:?}");
    let admitted = ra.0 + rb.0;
    // A full bucket of 120, plus 2 a second refilled while the test ran.
    let expected = 120.0 + 2.0 * elapsed;
    let error = (admitted as f64 - expected).abs() / expected;
    assert!(
        error <= 0.10,
        "admitted {admitted} (a {} + b {}), expected {expected:.0} in {elapsed:.1}s",
        ra.0,
        rb.0
    );
    assert!(
        ra.0 > 0 && rb.0 > 0,
        "both sidecars served: {} {}",
        ra.0,
        rb.0
    );
    assert!(ra.1 + rb.1 > 0, "some requests were over the limit");
}

#[tokio::test]
async fn redis_going_away_follows_the_policy_and_coming_back_resumes_sharing() {
    let mut redis = Redis::start();
    let port = redis.port;
    let open = shared_sidecar(port, "requestsPerMinute: 6000", "failOpen");
    let closed = shared_sidecar(port, "requestsPerMinute: 600", "failClosed");
    for sidecar in [&open, &closed] {
        let (ok, _, other) = load(sidecar, 20, 4).await;
        assert_eq!((ok, other.len()), (20, 0));
    }

    redis.stop();
    let started = Instant::now();
    // failOpen keeps serving (from its leased slice, then under a local share of the
    // limit); no request hangs.
    let (ok, limited, other) = load(&open, 20, 4).await;
    assert_eq!((ok, limited, other.len()), (20, 0, 0));
    // failClosed refuses, clearly and fast.
    let response = client()
        .post(closed.url("/v1/chat/completions"))
        .json(&json!({"model": "chat", "messages": []}))
        .send()
        .await
        .unwrap();
    // The first call may still be served from the slice leased before Redis went away.
    let mut status = response.status().as_u16();
    let mut body: serde_json::Value = response.json().await.unwrap();
    for _ in 0..200 {
        if status == 503 {
            break;
        }
        let response = client()
            .post(closed.url("/v1/chat/completions"))
            .json(&json!({"model": "chat", "messages": []}))
            .send()
            .await
            .unwrap();
        status = response.status().as_u16();
        body = response.json().await.unwrap();
    }
    assert_eq!(status, 503, "{body}");
    assert_eq!(body["error"]["code"], "rate_limiter_unavailable");
    assert!(started.elapsed() < Duration::from_secs(5));
    for sidecar in [&open, &closed] {
        assert!(
            sidecar
                .wait_for_log("Redis is unreachable", Duration::from_secs(5))
                .await
        );
    }
    assert_eq!(
        open.logs().matches("Redis is unreachable").count(),
        1,
        "logged once per change"
    );

    let _redis = Redis::start_on(port);
    for sidecar in [&open, &closed] {
        assert!(
            sidecar
                .wait_for_log("Redis is reachable again", Duration::from_secs(5))
                .await
        );
    }
    let recovered = eventually(Duration::from_secs(5), || async {
        let (ok, _, _) = load(&closed, 5, 1).await;
        ok == 5
    })
    .await;
    assert!(recovered, "failClosed did not resume once Redis was back");
    // Sharing resumed: the budget lives in Redis again.
    assert!(
        shared_requests_bucket(&format!("redis://127.0.0.1:{port}"))
            .await
            .is_some(),
        "no shared bucket in Redis after recovery"
    );
}

#[tokio::test]
async fn the_redis_password_comes_from_a_file_and_a_rotated_one_is_used_on_reconnect() {
    const PASSWORD: &str = "redis-pw-7c1e5b";
    let redis = Redis::start_with(free_port(), &["--requirepass", PASSWORD]);
    let secrets = tempfile::tempdir().unwrap();
    let password_file = secrets.path().join("redisPassword");
    std::fs::write(&password_file, "not-the-password\n").unwrap();
    let sidecar = Sidecar::start(&format!(
        "endpoints:
  - name: chat
    provider: mock
    model: mock-model
    limits:
      requestsPerMinute: 600
      scope: global
      redis:
        url: 'redis://127.0.0.1:{}'
        passwordFile: {}
        onUnavailable: failClosed
",
        redis.port,
        password_file.display()
    ));

    // A wrong password is Redis refusing us: the policy applies, and the log says why
    // without the password.
    let (ok, _, other) = load(&sidecar, 3, 1).await;
    assert_eq!((ok, other.clone()), (0, vec![503, 503, 503]));
    assert!(
        sidecar
            .wait_for_log("Redis is unreachable", Duration::from_secs(5))
            .await
    );

    // The Secret is rotated to the right password (with kubelet's trailing newline): the
    // next reconnect reads it and shared limiting starts.
    common::replace_file(&password_file, &format!("{PASSWORD}\n"));
    let recovered = eventually(Duration::from_secs(10), || async {
        let (ok, _, _) = load(&sidecar, 2, 1).await;
        ok == 2
    })
    .await;
    assert!(recovered, "{}", sidecar.logs());
    assert!(
        shared_requests_bucket(&format!("redis://:{PASSWORD}@127.0.0.1:{}", redis.port))
            .await
            .is_some(),
        "no shared bucket in Redis"
    );
    let logs = sidecar.logs();
    assert!(logs.contains("Redis is reachable again"));
    assert!(!logs.contains(PASSWORD) && !logs.contains("not-the-password"));
    let metrics = sidecar.metrics_text().await;
    assert!(!metrics.contains(PASSWORD));
}

#[tokio::test]
async fn a_redis_outage_is_noticed_while_a_large_lease_lasts() {
    let mut redis = Redis::start();
    let port = redis.port;
    // One slice of this limit is 10,000 requests, far more than this test sends: after the
    // first lease the sidecar needs nothing more from Redis, so only its own probe can tell
    // that Redis went away.
    let sidecar = shared_sidecar(port, "requestsPerMinute: 600000", "failClosed");
    let (ok, _, other) = load(&sidecar, 10, 2).await;
    assert_eq!((ok, other.len()), (10, 0));

    redis.stop();
    let stopped = Instant::now();
    // Requests keep coming, so the lease never sits idle long enough to be given back (which
    // would also reveal the outage).
    let body = loop {
        let response = client()
            .post(sidecar.url("/v1/chat/completions"))
            .json(&json!({"model": "chat", "messages": []}))
            .send()
            .await
            .unwrap();
        let status = response.status().as_u16();
        let body: serde_json::Value = response.json().await.unwrap();
        if status == 503 {
            break body;
        }
        assert_eq!(status, 200, "{body}");
        assert!(
            stopped.elapsed() < Duration::from_secs(3),
            "still admitting {:?} after Redis stopped",
            stopped.elapsed()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(body["error"]["code"], "rate_limiter_unavailable");
    assert_eq!(sidecar.logs().matches("Redis is unreachable").count(), 1);

    let _redis = Redis::start_on(port);
    let recovered = eventually(Duration::from_secs(5), || async {
        let (ok, _, _) = load(&sidecar, 3, 1).await;
        ok == 3
    })
    .await;
    assert!(recovered, "failClosed did not resume once Redis was back");
    assert_eq!(
        sidecar.logs().matches("Redis is reachable again").count(),
        1,
        "{}",
        sidecar.logs()
    );
}
