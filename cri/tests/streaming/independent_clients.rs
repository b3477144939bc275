//! The independent clients (node's spdy-transport, Python's websockets), run as child
//! processes on the scripts in tests/clients/; each prints its result as JSON.

use std::path::PathBuf;
use std::time::Duration;

fn clients_dir() -> PathBuf {
    let root = std::env::var("HUSK_CACHE").unwrap_or_else(|_| "/var/cache/husk".into());
    PathBuf::from(root).join("stream-clients")
}

/// Runs a client script and parses its JSON; panics (fails the test) if the client is not
/// installed or fails.
async fn run_client(
    program: PathBuf,
    script: &str,
    args: &[&str],
    env: &[(&str, PathBuf)],
) -> serde_json::Value {
    assert!(
        program.exists(),
        "{} is missing: run scripts/setup-stream-clients (scripts/setup does)",
        program.display()
    );
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/clients")
        .join(script);
    let mut c = tokio::process::Command::new(&program);
    c.arg(&script).args(args);
    for (k, v) in env {
        c.env(k, v);
    }
    let out = tokio::time::timeout(Duration::from_secs(30), c.output())
        .await
        .expect("client finishes in 30 s")
        .unwrap();
    assert!(
        out.status.success(),
        "{} failed: {}\n{}",
        script.display(),
        String::from_utf8_lossy(&out.stderr),
        String::from_utf8_lossy(&out.stdout)
    );
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "client printed no JSON ({e}): {}",
            String::from_utf8_lossy(&out.stdout)
        )
    })
}

pub async fn node(args: &[&str]) -> serde_json::Value {
    let module = clients_dir().join("node/node_modules/spdy-transport");
    assert!(
        module.join("package.json").exists(),
        "spdy-transport is missing from {}: run scripts/setup-stream-clients",
        module.display()
    );
    run_client(
        PathBuf::from("/usr/bin/node"),
        "spdy_client.js",
        args,
        &[("SPDY_TRANSPORT", module)],
    )
    .await
}

pub async fn python(args: &[&str]) -> serde_json::Value {
    run_client(
        clients_dir().join("venv/bin/python"),
        "ws_client.py",
        args,
        &[],
    )
    .await
}

pub fn status(v: &serde_json::Value) -> serde_json::Value {
    serde_json::from_str(v["error"].as_str().unwrap())
        .unwrap_or_else(|e| panic!("error stream is not a Status ({e}): {v}"))
}
