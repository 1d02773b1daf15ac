//! Sandbox costs: a call on a fresh instance, a Stripe webhook through the
//! component against the same work in native Rust, and the memory a loaded
//! connector holds. Needs `make connectors` (the hostile guest; the Stripe
//! connector is measured when built).
//!
//! `cargo bench -p ferry --bench sandbox` prints per-call percentiles first
//! (criterion reports means), then criterion's figures.

use std::collections::BTreeMap;
use std::hint::black_box;
use std::sync::Arc;
use std::time::{Duration, Instant};

use criterion::Criterion;
use ferry_runtime::{
    Connector, ConnectorConfig, Operation, PushRequest, Runtime, RuntimeConfig, WebhookRequest,
};
use hmac::{Hmac, Mac};
use secrecy::SecretString;
use serde::Deserialize;
use sha2::Sha256;

const WEBHOOK_SECRET: &str = "whsec_bench_0123456789abcdef";

fn component(name: &str) -> Option<Vec<u8>> {
    std::fs::read(ferry_test_support::wasm::release_component(name)).ok()
}

fn runtime() -> Runtime {
    Runtime::new(RuntimeConfig::default()).expect("runtime")
}

fn tokio_rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("tokio")
}

fn empty_webhook() -> WebhookRequest {
    WebhookRequest {
        headers: Vec::new(),
        body: Vec::new(),
    }
}

fn ok_push() -> PushRequest {
    PushRequest {
        entity: "customer".into(),
        operation: Operation::Create,
        local_id: "cus_1".into(),
        remote_id: None,
        version: 1,
        idempotency_key: "k".into(),
        record: r#"{"do":"ok"}"#.into(),
    }
}

/// A Stripe `customer.updated` event of about 1 KB, signed as Stripe does.
fn stripe_webhook() -> WebhookRequest {
    let body = serde_json::json!({
        "id": "evt_1QbenchAbCdEfGhIjKlMnOp",
        "object": "event",
        "api_version": "2024-06-20",
        "created": 1_732_230_000,
        "type": "customer.updated",
        "livemode": false,
        "pending_webhooks": 1,
        "request": {"id": "req_benchAbCdEf", "idempotency_key": "ferry-cus_1-v7-stripe"},
        "data": {"object": {
            "id": "cus_QbenchAbCdEfGh",
            "object": "customer",
            "name": "Ada Lovelace",
            "email": "ada@example.com",
            "phone": "+44 20 7946 0000",
            "description": "Analytical Engine programme author",
            "address": {"line1": "12 St James's Square", "line2": null, "city": "London",
                "postal_code": "SW1Y 4JH", "state": null, "country": "GB"},
            "metadata": {"ferry_id": "0193a1b2-c3d4-7e5f-8a9b-0c1d2e3f4a5b", "segment": "enterprise"},
            "created": 1_732_000_000,
            "currency": "gbp",
            "balance": 0,
            "delinquent": false,
            "invoice_prefix": "ADA0001",
            "preferred_locales": ["en-GB"],
            "tax_exempt": "none",
            "livemode": false
        }},
        "previous_attributes": {"email": "ada@analytical.example", "phone": null}
    })
    .to_string()
    .into_bytes();
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let sig = hex::encode(stripe_mac(t, &body));
    WebhookRequest {
        headers: vec![("stripe-signature".into(), format!("t={t},v1={sig}"))],
        body,
    }
}

fn stripe_mac(t: u64, body: &[u8]) -> Vec<u8> {
    let mut mac = Hmac::<Sha256>::new_from_slice(WEBHOOK_SECRET.as_bytes()).unwrap();
    mac.update(t.to_string().as_bytes());
    mac.update(b".");
    mac.update(body);
    mac.finalize().into_bytes().to_vec()
}

#[derive(Deserialize)]
struct NativeEvent {
    id: String,
    #[serde(rename = "type")]
    kind: String,
    created: i64,
    data: NativeData,
}

#[derive(Deserialize)]
struct NativeData {
    object: NativeCustomer,
}

#[derive(Deserialize)]
struct NativeCustomer {
    id: String,
    name: Option<String>,
    email: Option<String>,
    phone: Option<String>,
    address: Option<serde_json::Value>,
    metadata: Option<BTreeMap<String, serde_json::Value>>,
}

/// The same work done natively: parse the header, check the HMAC in
/// constant time, parse the event and build the canonical JSON.
fn native_verify_and_parse(req: &WebhookRequest) -> String {
    use subtle::ConstantTimeEq;
    let header = &req.headers[0].1;
    let (t, sig) = header.split_once(",v1=").unwrap();
    let t: u64 = t.trim_start_matches("t=").parse().unwrap();
    let expected = stripe_mac(t, &req.body);
    let given = hex::decode(sig).unwrap();
    assert!(bool::from(expected.ct_eq(&given)));
    let event: NativeEvent = serde_json::from_slice(&req.body).unwrap();
    let c = event.data.object;
    serde_json::json!({
        "event": event.id, "type": event.kind, "at": event.created * 1000, "id": c.id,
        "name": c.name, "email": c.email, "phone": c.phone, "address": c.address,
        "metadata": c.metadata,
    })
    .to_string()
}

fn stripe_config() -> ConnectorConfig {
    ConnectorConfig {
        settings: BTreeMap::new(),
        secrets: BTreeMap::from([
            (
                "webhook_secret".to_owned(),
                SecretString::from(WEBHOOK_SECRET),
            ),
            ("api_key".to_owned(), SecretString::from("sk_test_bench")),
        ]),
    }
}

/// Runs `f` `n` times and prints p50/p90/p99 of single calls.
fn percentiles<F, Fut>(rt: &tokio::runtime::Runtime, label: &str, n: usize, mut f: F) -> Duration
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    let mut samples = Vec::with_capacity(n);
    rt.block_on(async {
        for _ in 0..n / 10 {
            f().await; // warm the pool's slots and caches
        }
        for _ in 0..n {
            let start = Instant::now();
            f().await;
            samples.push(start.elapsed());
        }
    });
    samples.sort();
    let p = |q: f64| samples[((samples.len() as f64 * q) as usize).min(samples.len() - 1)];
    println!(
        "{label:<48} p50 {:>8.2?}  p90 {:>8.2?}  p99 {:>8.2?}",
        p(0.5),
        p(0.9),
        p(0.99)
    );
    p(0.5)
}

fn rss_bytes() -> Option<usize> {
    let statm = std::fs::read_to_string("/proc/self/statm").ok()?;
    let pages: usize = statm.split_whitespace().nth(1)?.parse().ok()?;
    Some(pages * 4096)
}

fn summary(
    rt: &tokio::runtime::Runtime,
    hostile: &Arc<Connector>,
    stripe: Option<&Arc<Connector>>,
) {
    println!("\n== per-call percentiles (single thread) ==");
    let cfg = ConnectorConfig::default();
    let p50 = percentiles(
        rt,
        "fresh instance: verify-webhook (no-op guest)",
        20_000,
        || async {
            black_box(hostile.verify_webhook(&cfg, empty_webhook()).await).unwrap();
        },
    );
    println!(
        "{:<48} {:.0} instances/s per core",
        "=> throughput",
        1.0 / p50.as_secs_f64()
    );
    percentiles(
        rt,
        "fresh instance: push {\"do\":\"ok\"} (JSON in guest)",
        20_000,
        || async {
            black_box(hostile.push(&cfg, ok_push()).await).unwrap();
        },
    );
    if let Some(stripe) = stripe {
        let scfg = stripe_config();
        let req = stripe_webhook();
        println!("stripe webhook body: {} bytes", req.body.len());
        percentiles(
            rt,
            "stripe component: verify + parse (2 instances)",
            10_000,
            || async {
                stripe.verify_webhook(&scfg, req.clone()).await.unwrap();
                black_box(stripe.parse_webhook(&scfg, req.clone()).await.unwrap());
            },
        );
        percentiles(
            rt,
            "stripe component: receive_webhook (1 instance)",
            10_000,
            || async {
                black_box(stripe.receive_webhook(&scfg, req.clone()).await.unwrap());
            },
        );
        percentiles(
            rt,
            "native Rust: HMAC verify + serde_json parse",
            10_000,
            || async {
                black_box(native_verify_and_parse(&req));
            },
        );
    } else {
        println!("(stripe connector not built: skipping the webhook comparison)");
    }

    println!("\n== memory per idle connector ==");
    for c in std::iter::once(hostile).chain(stripe) {
        println!(
            "{:<10} compiled code {:>7} KiB",
            c.name(),
            c.code_size() / 1024
        );
    }
    let before = rss_bytes();
    let extra: Vec<_> = rt.block_on(async {
        let mut v = Vec::new();
        // Distinct connectors need distinct bytes: append a custom section.
        for i in 0..20u8 {
            let mut bytes = component("ferry_test_hostile").unwrap();
            bytes.extend_from_slice(&[0, 3, 2, b'x', i]);
            v.push(runtime_shared().load(&bytes).await.unwrap());
        }
        v
    });
    if let (Some(b), Some(a)) = (before, rss_bytes()) {
        println!(
            "RSS growth per extra loaded hostile connector (incl. compile caches): {} KiB",
            a.saturating_sub(b) / extra.len() / 1024
        );
    }
    println!(
        "pool slot: {} MiB linear memory max (virtual address space only)\n",
        RuntimeConfig::default().memory_limit_bytes >> 20
    );
}

/// Store data for the raw pool comparison: WASI only.
struct RawState {
    wasi: wasmtime_wasi::WasiCtx,
    table: wasmtime::component::ResourceTable,
}

impl wasmtime_wasi::WasiView for RawState {
    fn ctx(&mut self) -> wasmtime_wasi::WasiCtxView<'_> {
        wasmtime_wasi::WasiCtxView {
            ctx: &mut self.wasi,
            table: &mut self.table,
        }
    }
}

/// Instantiate + one `verify-webhook` call of the hostile guest on a bare
/// engine per linear-memory reset strategy of the pool, to justify the
/// runtime's choice (`pagemap_scan` needs Linux >= 6.7).
fn pool_reset_strategies(rt: &tokio::runtime::Runtime, wasm: &[u8]) {
    use wasmtime::component::{Component, Linker};
    use wasmtime::{Config, Enabled, InstanceAllocationStrategy, PoolingAllocationConfig, Store};

    println!("== pool reset strategies (bare engine, hostile verify-webhook) ==");
    let variants: [(&str, Enabled, usize); 4] = [
        ("madvise only (keep_resident 0)", Enabled::No, 0),
        ("memset 128 KiB + madvise", Enabled::No, 128 << 10),
        ("pagemap_scan, keep_resident 1 MiB", Enabled::Auto, 1 << 20),
        ("pagemap_scan, keep_resident 2 MiB", Enabled::Auto, 2 << 20),
    ];
    for (label, pagemap, keep) in variants {
        let mut pool = PoolingAllocationConfig::default();
        pool.total_component_instances(16)
            .total_core_instances(256)
            .total_memories(16)
            .total_tables(64)
            .total_stacks(16)
            .max_memory_size(64 << 20)
            .pagemap_scan(pagemap)
            .linear_memory_keep_resident(keep)
            .table_keep_resident(64 << 10);
        let mut config = Config::new();
        config
            .epoch_interruption(true)
            .allocation_strategy(InstanceAllocationStrategy::Pooling(pool))
            .memory_init_cow(true)
            .wasm_backtrace_max_frames(None);
        let engine = wasmtime::Engine::new(&config).unwrap();
        let component = Component::new(&engine, wasm).unwrap();
        let mut linker: Linker<RawState> = Linker::new(&engine);
        wasmtime_wasi::p2::add_to_linker_async(&mut linker).unwrap();
        linker.define_unknown_imports_as_traps(&component).unwrap();
        let pre = linker.instantiate_pre(&component).unwrap();
        let iface = component
            .get_export_index(None, "ferry:connector/handler@0.1.0")
            .unwrap();
        let verify = component
            .get_export_index(Some(&iface), "verify-webhook")
            .unwrap();
        let req = empty_webhook();
        percentiles(rt, label, 20_000, || async {
            let mut store = Store::new(
                &engine,
                RawState {
                    wasi: wasmtime_wasi::WasiCtx::builder().build(),
                    table: wasmtime::component::ResourceTable::new(),
                },
            );
            store.set_epoch_deadline(u64::MAX / 2);
            let instance = pre.instantiate_async(&mut store).await.unwrap();
            let f = instance
                .get_typed_func::<(&WebhookRequest,), (Result<(), ferry_runtime::ConnectorError>,)>(
                    &mut store, &verify,
                )
                .unwrap();
            let (verdict,) = f.call_async(&mut store, (&req,)).await.unwrap();
            black_box(verdict).unwrap();
        });
    }
    println!();
}

/// What scrubbing a remote's answer of a connector's secrets and tokens
/// costs: a 4 MiB body and a hundred headers, against eight values, each
/// value's forms searched for one by one (what each response cost before
/// round 56, the forms made again for the body and for each header)
/// beside one automaton made once for the call.
fn redaction() {
    use ferry_runtime::{encoded_forms, Redactor};
    println!("\n== a 4 MiB answer and 100 headers scrubbed of 8 secrets ==");
    let body = br#"{"id":"cus_0123456789","name":"Ada Lovelace","email":"ada@example.com"},"#
        .repeat(4 * 1024 * 1024 / 72);
    let headers: Vec<Vec<u8>> = (0..100)
        .map(|n| format!("x-header-{n}: value-{n}-0123456789abcdef").into_bytes())
        .collect();
    let secrets: BTreeMap<String, SecretString> = (0..8)
        .map(|n| {
            (
                format!("secret_{n}"),
                SecretString::from(format!("sk_live_{n:02}_0123456789abcdefghijklmnop")),
            )
        })
        .collect();
    let rt = tokio_rt();
    let by_form = |data: &mut Vec<u8>| {
        use secrecy::ExposeSecret as _;
        for (name, value) in &secrets {
            let placeholder = format!("{{{{secret:{name}}}}}");
            for form in encoded_forms(value.expose_secret().as_bytes()) {
                let finder = memchr::memmem::Finder::new(&form);
                if finder.find(data).is_some() {
                    let text = String::from_utf8_lossy(data)
                        .replace(std::str::from_utf8(&form).unwrap_or_default(), &placeholder);
                    *data = text.into_bytes();
                }
            }
        }
    };
    let before = percentiles(&rt, "form by form, forms made per text", 20, || async {
        let mut data = body.clone();
        by_form(&mut data);
        for header in &headers {
            let mut value = header.clone();
            by_form(&mut value);
        }
        black_box(data);
    });
    let after = percentiles(&rt, "one automaton for the call", 20, || async {
        let redactor = Redactor::default().secrets(&secrets);
        let mut data = body.clone();
        redactor.redact(&mut data);
        for header in &headers {
            let mut value = header.clone();
            redactor.redact(&mut value);
        }
        black_box(data);
    });
    println!(
        "{:<48} x{:.1}",
        "=> automaton against form by form",
        before.as_secs_f64() / after.as_secs_f64()
    );
}

fn runtime_shared() -> &'static Runtime {
    static RT: std::sync::OnceLock<Runtime> = std::sync::OnceLock::new();
    RT.get_or_init(runtime)
}

fn main() {
    let rt = tokio_rt();
    let Some(hostile_bytes) = component("ferry_test_hostile") else {
        eprintln!("build the guests first: make connectors");
        return;
    };
    let runtime = runtime_shared();
    let hostile = rt
        .block_on(runtime.load(&hostile_bytes))
        .expect("load hostile");
    let stripe = component("ferry_connector_stripe")
        .map(|bytes| rt.block_on(runtime.load(&bytes)).expect("load stripe"));

    summary(&rt, &hostile, stripe.as_ref());
    pool_reset_strategies(&rt, &hostile_bytes);
    redaction();

    let mut c = Criterion::default().configure_from_args();
    let cfg = ConnectorConfig::default();
    c.bench_function("fresh_instance_verify_webhook_noop", |b| {
        b.iter_custom(|iters| {
            rt.block_on(async {
                let start = Instant::now();
                for _ in 0..iters {
                    black_box(hostile.verify_webhook(&cfg, empty_webhook()).await).unwrap();
                }
                start.elapsed()
            })
        })
    });
    if let Some(stripe) = &stripe {
        let scfg = stripe_config();
        let req = stripe_webhook();
        c.bench_function("stripe_webhook_component_verify_parse", |b| {
            b.iter_custom(|iters| {
                rt.block_on(async {
                    let start = Instant::now();
                    for _ in 0..iters {
                        stripe.verify_webhook(&scfg, req.clone()).await.unwrap();
                        black_box(stripe.parse_webhook(&scfg, req.clone()).await.unwrap());
                    }
                    start.elapsed()
                })
            })
        });
        c.bench_function("stripe_webhook_component_receive_webhook", |b| {
            b.iter_custom(|iters| {
                rt.block_on(async {
                    let start = Instant::now();
                    for _ in 0..iters {
                        black_box(stripe.receive_webhook(&scfg, req.clone()).await.unwrap());
                    }
                    start.elapsed()
                })
            })
        });
        c.bench_function("stripe_webhook_native_verify_parse", |b| {
            b.iter(|| black_box(native_verify_and_parse(&req)))
        });
    }
    c.final_summary();
}
