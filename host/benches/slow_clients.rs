//! Memory under slow clients: `FERRY_BENCH_CONNECTIONS` (default 700)
//! connections each send a webhook's head announcing a 200 KiB body, then
//! dribble it at 4 KiB/s, the attack that once took an unbounded ferry from
//! 207 MB to 1 GB. With the default limits (256 KiB per webhook body,
//! 10 s header and stalled-body timeouts, 60 s per request) each connection
//! costs at most what it sent before it is answered or cut.
//! Needs `make connectors`.
//!
//! `cargo bench -p ferry --bench slow_clients` prints the process's resident
//! memory before, its peak while the connections are open, and after they
//! are gone, with how the server answered them.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ferry::app::App;
use ferry::config::Config;
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

fn main() {
    let connections: usize = std::env::var("FERRY_BENCH_CONNECTIONS")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(700);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    runtime.block_on(bench(connections));
}

async fn bench(connections: usize) {
    let dir = tempfile::tempdir().expect("temp dir");
    let components = ferry_test_support::bench::stripe_connectors_dir(dir.path());
    let config = Config::from_overrides(json!({
        "listen": "127.0.0.1:0",
        "database_url": format!("sqlite://{}", dir.path().join("ferry.db").display()),
        "connectors_dir": components,
        "connectors": {"stripe": {"secrets": {"api_key": "sk_test_x", "webhook_secret": "whsec_x"}}},
    }))
    .expect("config");
    let app = App::build(config).await.expect("app");
    let address = app.address();
    let cancel = app.cancellation_token();
    let server = tokio::spawn(app.run_until_stopped());
    tokio::time::sleep(Duration::from_millis(500)).await;

    let before = ferry_test_support::rss_mib();
    let answers: Arc<Mutex<BTreeMap<String, usize>>> = Arc::default();
    let started = Instant::now();
    let mut clients = Vec::new();
    for _ in 0..connections {
        let answers = answers.clone();
        clients.push(tokio::spawn(async move {
            let Ok(mut stream) = tokio::net::TcpStream::connect(address).await else {
                *answers.lock().unwrap().entry("refused".into()).or_default() += 1;
                return;
            };
            let head = "POST /webhooks/stripe HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\ncontent-length: 204800\r\nstripe-signature: t=1,v1=00\r\n\r\n";
            let _ = stream.write_all(head.as_bytes()).await;
            let chunk = vec![b'x'; 1024];
            let (mut reader, mut writer) = stream.into_split();
            let dribble = async {
                loop {
                    if writer.write_all(&chunk).await.is_err() {
                        return;
                    }
                    tokio::time::sleep(Duration::from_millis(250)).await;
                }
            };
            let mut reply = [0u8; 12];
            let answer = tokio::select! {
                () = dribble => "closed".to_owned(),
                read = reader.read(&mut reply) => match read {
                    Ok(n) if n >= 12 => String::from_utf8_lossy(&reply[9..12]).into_owned(),
                    _ => "closed".to_owned(),
                },
            };
            *answers.lock().unwrap().entry(answer).or_default() += 1;
        }));
    }
    let mut peak = before;
    while clients.iter().any(|c| !c.is_finished()) && started.elapsed() < Duration::from_secs(120) {
        tokio::time::sleep(Duration::from_millis(500)).await;
        peak = peak.max(ferry_test_support::rss_mib());
    }
    let held = started.elapsed();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let after = ferry_test_support::rss_mib();
    println!("slow webhook clients: {connections} connections announcing 200 KiB, sending 4 KiB/s");
    println!(
        "  RSS: {before:.0} MiB before, peak {peak:.0} MiB while connected, {after:.0} MiB after"
    );
    println!(
        "  growth at peak: {:.0} MiB, {:.0} KiB per connection; all answered or cut within {:.0} s",
        peak - before,
        (peak - before) * 1024.0 / connections as f64,
        held.as_secs_f64()
    );
    println!("  answers: {:?}", answers.lock().unwrap());
    cancel.cancel();
    let _ = server.await;
}
