//! `ferry status`: a running instance's sync health (`GET /api/v1/health`)
//! as a table, or as JSON.

use std::fmt::Write as _;

use anyhow::{bail, Context};
use serde_json::Value;

/// Where and how to ask.
#[derive(Debug, Clone)]
pub struct StatusOptions {
    /// The instance, e.g. `http://127.0.0.1:8080`.
    pub url: String,
    /// The admin token, if the instance has one.
    pub token: Option<String>,
    /// Print the JSON as the API returns it.
    pub json: bool,
}

/// The URL `ferry status` asks by default: `FERRY_LISTEN`'s address.
/// An address that listens everywhere is asked on its loopback. (A text
/// replace turned `10.0.0.0:80` into `1127.0.0.1:80`.)
pub fn default_url(listen: Option<&str>) -> String {
    let listen = listen.unwrap_or("127.0.0.1:8080").trim();
    match listen.parse::<std::net::SocketAddr>() {
        Ok(mut address) => {
            if address.ip().is_unspecified() {
                address.set_ip(match address {
                    std::net::SocketAddr::V4(_) => std::net::Ipv4Addr::LOCALHOST.into(),
                    std::net::SocketAddr::V6(_) => std::net::Ipv6Addr::LOCALHOST.into(),
                });
            }
            format!("http://{address}")
        }
        Err(_) => format!("http://{listen}"),
    }
}

/// Fetches the health summary and renders it.
pub async fn status(options: &StatusOptions) -> anyhow::Result<String> {
    let url = format!("{}/api/v1/health", options.url.trim_end_matches('/'));
    let client = reqwest::Client::builder()
        .timeout(std::time::Duration::from_secs(10))
        .build()
        .context("creating the HTTP client")?;
    let mut request = client.get(&url);
    if let Some(token) = &options.token {
        request = request.bearer_auth(token);
    }
    let response = request
        .send()
        .await
        .with_context(|| format!("asking {url}"))?;
    let status = response.status();
    let text = response
        .text()
        .await
        .with_context(|| format!("reading the answer of {url}"))?;
    let body: Result<Value, _> = serde_json::from_str(&text);
    if !status.is_success() {
        // A problem's detail, or the start of whatever else answered (a
        // proxy's error page).
        let detail = match &body {
            Ok(problem) => problem["detail"]
                .as_str()
                .or(problem["title"].as_str())
                .unwrap_or("")
                .to_owned(),
            Err(_) => text.chars().take(200).collect(),
        };
        bail!("{url} answered {status}: {detail}");
    }
    let body = body.with_context(|| format!("reading the answer of {url}"))?;
    if options.json {
        return Ok(serde_json::to_string_pretty(&body)? + "\n");
    }
    Ok(table(&options.url, &body))
}

/// The summary as a table, one row per connector.
pub fn table(url: &str, health: &Value) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "ferry at {url}: outbox {} unpublished (oldest {:.0} s)\n",
        health["outbox_unpublished"].as_i64().unwrap_or(0),
        health["outbox_oldest_age_seconds"].as_f64().unwrap_or(0.0),
    );
    let header = [
        "CONNECTOR",
        "SWITCH",
        "SYNCED",
        "PENDING",
        "RETRYING",
        "DEAD",
        "DEAD LETTERS",
        "CONFLICTS",
        "INBOX",
        "HELD",
        "INBOX AGE",
        "BREAKER",
        "LAST SUCCESS",
        "LAST ERROR",
    ];
    let mut rows = vec![header.map(str::to_owned).to_vec()];
    for c in health["connectors"].as_array().into_iter().flatten() {
        let n = |v: &Value| v.as_i64().unwrap_or(0).to_string();
        rows.push(vec![
            c["connector"].as_str().unwrap_or("?").to_owned(),
            c["switch"].as_str().unwrap_or("?").to_owned(),
            n(&c["links"]["synced"]),
            n(&c["links"]["pending"]),
            n(&c["links"]["retrying"]),
            n(&c["links"]["dead"]),
            n(&c["dead_letters"]),
            n(&c["conflicts_open"]),
            n(&c["inbox"]["unapplied"]),
            n(&c["inbox"]["held"]),
            format!(
                "{:.0} s",
                c["inbox"]["oldest_age_seconds"].as_f64().unwrap_or(0.0)
            ),
            c["breaker"]["state"].as_str().unwrap_or("?").to_owned(),
            c["last_success_at"].as_str().unwrap_or("-").to_owned(),
            match (c["last_error_at"].as_str(), c["last_error"].as_str()) {
                (Some(at), Some(error)) => format!("{at} {}", one_line(error, 60)),
                _ => "-".to_owned(),
            },
        ]);
    }
    let widths: Vec<usize> = (0..header.len())
        .map(|i| rows.iter().map(|r| r[i].chars().count()).max().unwrap_or(0))
        .collect();
    for row in rows {
        let line: Vec<String> = row
            .iter()
            .zip(&widths)
            .map(|(cell, width)| format!("{cell:<width$}"))
            .collect();
        let _ = writeln!(out, "{}", line.join("  ").trim_end());
    }
    out
}

fn one_line(text: &str, max: usize) -> String {
    let flat: String = text
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect();
    if flat.chars().count() > max {
        flat.chars().take(max).collect::<String>() + "…"
    } else {
        flat
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_url_follows_the_listen_address() {
        assert_eq!(default_url(None), "http://127.0.0.1:8080");
        assert_eq!(default_url(Some("0.0.0.0:9000")), "http://127.0.0.1:9000");
        assert_eq!(default_url(Some("[::]:9000")), "http://[::1]:9000");
        // An address that merely contains `0.0.0.0` is asked as it is.
        assert_eq!(default_url(Some("10.0.0.0:80")), "http://10.0.0.0:80");
        assert_eq!(default_url(Some("10.20.0.0:80")), "http://10.20.0.0:80");
    }

    #[test]
    fn table_has_a_row_per_connector() {
        let health = serde_json::json!({
            "outbox_unpublished": 2, "outbox_oldest_age_seconds": 1.5,
            "connectors": [{
                "connector": "stripe", "switch": "enabled",
                "links": {"synced": 3, "pending": 0, "retrying": 1, "dead": 1},
                "inbox": {"unapplied": 2, "held": 1, "oldest_age_seconds": 0.0},
                "dead_letters": 1, "conflicts_open": 0,
                "breaker": {"state": "closed"},
                "last_error_at": "2026-11-30T00:00:00Z", "last_error": "HTTP 500\nboom",
            }]
        });
        let text = table("http://x", &health);
        assert!(text.contains("outbox 2 unpublished"), "{text}");
        let row = text.lines().find(|l| l.starts_with("stripe")).expect(&text);
        assert!(
            row.contains("enabled") && row.contains("HTTP 500 boom"),
            "{row}"
        );
    }
}
