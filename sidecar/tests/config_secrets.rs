//! A key written into the configuration by mistake, in any of the likely ways, is refused
//! without being printed or logged: at start, with `--check`, and on hot reload.

mod common;

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use common::{client, eventually, replace_file, Sidecar};

const REJECTED: &str = "rejected new configuration; keeping the last good one";

const KEY: &str = "sk-proj-Hn4xTestKeyThatMustNeverBePrinted";
/// What must not appear anywhere: the key without the `sk-proj-` that any error might say.
const KEY_BODY: &str = "Hn4xTestKeyThatMustNeverBePrinted";

/// Each way a key ends up in a config, with the field the error must name.
fn hostile_configs() -> Vec<(&'static str, String)> {
    let endpoint = "name: chat\n    provider: openai-compatible\n    model: m\n";
    vec![
        (
            "endpoints[0].credential",
            format!("endpoints:\n  - {endpoint}    credential: {KEY}\n"),
        ),
        (
            "endpoints[0].credential",
            format!("endpoints:\n  - {endpoint}    credential: |\n      {KEY}\n"),
        ),
        (
            "endpoints[0].credential.file",
            format!("endpoints:\n  - {endpoint}    baseUrl: http://127.0.0.1:9/v1\n    credential: {{file: {KEY}}}\n"),
        ),
        (
            "endpoints[0].baseUrl",
            format!("endpoints:\n  - {endpoint}    baseUrl: https://user:{KEY}@api.example.com/v1\n"),
        ),
        (
            "endpoints[0].credential.header",
            format!("endpoints:\n  - {endpoint}    baseUrl: http://127.0.0.1:9/v1\n    credential: {{file: /k, header: 'Authorization: Bearer {KEY}'}}\n"),
        ),
        (
            "endpoints[0].provider",
            format!("endpoints:\n  - name: chat\n    provider: {KEY}\n    model: m\n"),
        ),
        (
            "endpoints[0]: unknown field",
            format!("endpoints:\n  - {endpoint}    {KEY}: true\n"),
        ),
        (
            "not valid YAML",
            format!("endpoints:\n  - {endpoint}    credential: \"{KEY}\n"),
        ),
        ("is it a key file?", format!("{KEY}\n")),
    ]
}

fn run(args: &[&str]) -> (bool, String) {
    let out = Command::new(common::BIN).args(args).output().unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

fn path_str(path: &Path) -> &str {
    path.to_str().unwrap()
}

#[test]
fn check_on_a_key_file_names_the_problem_without_printing_the_key() {
    let dir = tempfile::tempdir().unwrap();
    let key_file = dir.path().join("apiKey");
    std::fs::write(&key_file, format!("{KEY}\n")).unwrap();

    let (ok, output) = run(&["--check", "--config", path_str(&key_file)]);
    assert!(!ok, "{output}");
    assert!(!output.contains(KEY_BODY), "{output}");
    assert!(output.contains("is it a key file?"), "{output}");

    // A key file among the endpoint files of a `--config-dir`.
    let config_dir = dir.path().join("config");
    std::fs::create_dir(&config_dir).unwrap();
    std::fs::write(config_dir.join("chat.yaml"), format!("{KEY}\n")).unwrap();
    let (ok, output) = run(&["--check", "--config-dir", path_str(&config_dir)]);
    assert!(!ok, "{output}");
    assert!(!output.contains(KEY_BODY), "{output}");
    assert!(output.contains("chat.yaml"), "{output}");
}

#[test]
fn a_key_in_the_config_stops_the_start_and_is_not_printed() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("config.yaml");
    for (field, yaml) in hostile_configs() {
        std::fs::write(&config, &yaml).unwrap();
        for check in [true, false] {
            let mut args = vec!["--config", path_str(&config), "--listen", "127.0.0.1:0"];
            args.extend(["--admin-listen", "127.0.0.1:0"]);
            if check {
                args.push("--check");
            }
            let (ok, output) = run(&args);
            assert!(!ok, "{yaml}\n{output}");
            assert!(!output.contains(KEY_BODY), "{yaml}\n{output}");
            assert!(output.contains(field), "{field} not named:\n{output}");
        }
    }
}

#[tokio::test]
async fn a_reload_with_a_key_in_the_config_is_rejected_and_the_key_never_logged() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("config.yaml");
    let good = "endpoints: [{name: chat, provider: mock, model: m}]\n";
    std::fs::write(&config, good).unwrap();
    let sidecar = Sidecar::start_with(dir, &["--config", path_str(&config)]);

    let hostile = hostile_configs();
    for (i, (field, yaml)) in hostile.iter().enumerate() {
        replace_file(&config, yaml);
        let rejected = eventually(Duration::from_secs(5), || async {
            sidecar.log_events(REJECTED).len() == i + 1
        })
        .await;
        assert!(rejected, "{yaml} was not rejected:\n{}", sidecar.logs());
        let events = sidecar.log_events(REJECTED);
        let error = events[i]["error"].as_str().unwrap_or_default();
        assert!(error.contains(field), "{field} not named: {error}");
    }
    replace_file(&config, good);

    // The last good config kept serving throughout.
    let r = client()
        .post(sidecar.url("/v1/chat/completions"))
        .json(&serde_json::json!({"model": "chat", "messages": []}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let ready = client()
        .get(sidecar.admin_url("/readyz"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let metrics = sidecar.metrics_text().await;
    for (what, text) in [
        ("logs", sidecar.logs()),
        ("/readyz", ready),
        ("/metrics", metrics),
    ] {
        assert!(
            !text.contains(KEY_BODY),
            "the key is in the {what}:\n{text}"
        );
    }
}
