//! Reconciliation and backfill end to end: records made behind ferry's back
//! in a real localstripe and in the fake Salesforce, found by a run that
//! pages through the connector's `list`, reported, and repaired through
//! the normal inbound and outbound paths. Plus the duplicate-email
//! strategies and field ownership on the webhook path, on both backends.

use std::collections::BTreeMap;
use std::time::Duration;

use ferry_test_support::fake_salesforce::{FakeSalesforce, FakeSalesforceConfig};
use ferry_test_support::fault_proxy::{Fault, FaultProxy, Match};
use ferry_test_support::localstripe::LocalStripe;
use serde_json::{json, Value};

use crate::helpers::{
    email, execute_raw, salesforce_component, spawn_sync_app, stripe_component, stripe_create,
    stripe_customer, stripe_customers_by_email, stripe_write, Backend, ExtraConnector, Setup,
    SyncApp, STRIPE_KEY, WEBHOOK_SECRET,
};
use crate::inbound::{deliver, event, stripe_signature};
use crate::process::FerryProcess;

/// How long a run or its repairs may take to settle.
const SETTLE: Duration = Duration::from_secs(60);

async fn stripe_update(stripe_url: &str, id: &str, form: &[(&str, &str)]) {
    let response = reqwest::Client::new()
        .post(format!("{stripe_url}/v1/customers/{id}"))
        .bearer_auth(STRIPE_KEY)
        .form(form)
        .send()
        .await
        .expect("localstripe answers");
    assert!(
        response.status().is_success(),
        "update {id}: {}",
        response.status()
    );
}

async fn stripe_delete(stripe_url: &str, id: &str) {
    let response = reqwest::Client::new()
        .delete(format!("{stripe_url}/v1/customers/{id}"))
        .bearer_auth(STRIPE_KEY)
        .send()
        .await
        .expect("localstripe answers");
    assert!(
        response.status().is_success(),
        "delete {id}: {}",
        response.status()
    );
}

/// `POST /api/v1/reconciliations`; returns the run (202).
pub(crate) async fn start_run(app: &SyncApp, body: Value) -> Value {
    let (status, run) = app
        .send(reqwest::Method::POST, "/api/v1/reconciliations", Some(body))
        .await;
    assert_eq!(status, 202, "{run}");
    assert_eq!(run["status"], "running", "{run}");
    run
}

async fn get_run(base: &str, id: &str) -> Value {
    reqwest::get(format!("{base}/api/v1/reconciliations/{id}"))
        .await
        .expect("ferry answers")
        .json()
        .await
        .expect("json")
}

/// Waits until run `id` has ended; returns it.
pub(crate) async fn wait_run(base: &str, id: &str) -> Value {
    let deadline = tokio::time::Instant::now() + SETTLE;
    loop {
        let run = get_run(base, id).await;
        if run["status"] != "running" {
            return run;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "run {id} did not end: {run:#}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Starts a run and waits for its end.
pub(crate) async fn run_to_end(app: &SyncApp, body: Value) -> Value {
    let run = start_run(app, body).await;
    wait_run(&app.base, run["id"].as_str().expect("id")).await
}

/// Every finding of a run (all pages), optionally of one kind.
pub(crate) async fn findings(base: &str, run: &str, kind: Option<&str>) -> Vec<Value> {
    let mut all = Vec::new();
    let mut after: Option<String> = None;
    loop {
        let mut url = format!("{base}/api/v1/reconciliations/{run}/mismatches?limit=2");
        if let Some(kind) = kind {
            url.push_str(&format!("&kind={kind}"));
        }
        if let Some(after) = &after {
            url.push_str(&format!("&starting_after={after}"));
        }
        let page: Value = reqwest::get(url)
            .await
            .expect("ferry")
            .json()
            .await
            .expect("json");
        all.extend(page["data"].as_array().cloned().unwrap_or_default());
        match page["next_cursor"].as_str() {
            Some(next) => after = Some(next.to_owned()),
            None => return all,
        }
    }
}

/// The report's counts that are not zero.
fn counts(run: &Value) -> BTreeMap<String, i64> {
    run["counts"]
        .as_object()
        .expect("counts")
        .iter()
        .filter_map(|(k, v)| v.as_i64().filter(|n| *n != 0).map(|n| (k.clone(), n)))
        .collect()
}

fn expect_counts(run: &Value, expected: &[(&str, i64)]) {
    let expected: BTreeMap<String, i64> = expected
        .iter()
        .map(|(k, n)| ((*k).to_owned(), *n))
        .collect();
    assert_eq!(counts(run), expected, "{run:#}");
}

/// Waits until `check` holds, polling.
async fn eventually<F, Fut>(what: &str, check: F)
where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + SETTLE;
    while !check().await {
        assert!(tokio::time::Instant::now() < deadline, "never true: {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// `POST /api/v1/connectors/stripe/{action}` (`disable`, `enable`,
/// `enable?backfill=true`): its status and body.
async fn switch_stripe(app: &SyncApp, action: &str) -> (u16, Value) {
    let path = format!("/api/v1/connectors/stripe/{action}");
    app.send(reqwest::Method::POST, &path, None).await
}

/// Stripe configured through the API (its first enable), for a ferry that
/// ran without it.
async fn configure_stripe(app: &SyncApp, stripe_url: &str) -> Value {
    let (status, connector) = app
        .send(
            reqwest::Method::PUT,
            "/api/v1/connectors/stripe/settings",
            Some(json!({"settings": {"api_base": stripe_url}, "secrets": {"api_key": STRIPE_KEY}})),
        )
        .await;
    assert_eq!(status, 200, "{connector}");
    connector
}

/// A ferry whose Stripe connector was configured through the API, then
/// switched off (its first backfill not run).
async fn stripe_configured_then_off(backend: Backend) -> (LocalStripe, SyncApp) {
    let stripe = LocalStripe::start().expect("localstripe");
    let mut setup = Setup::new(backend, &stripe.url());
    setup.stripe_url = None;
    let app = spawn_sync_app(setup).await;
    configure_stripe(&app, &stripe.url()).await;
    let (status, _) = switch_stripe(&app, "disable").await;
    assert_eq!(status, 200);
    (stripe, app)
}

/// `enable?backfill=true` for Stripe, and its backfill run to completion.
async fn switched_on_with_a_backfill(app: &SyncApp) {
    let (status, connector) = switch_stripe(app, "enable?backfill=true").await;
    assert_eq!(status, 200, "{connector}");
    let run = connector["last_reconciliation"]["id"].as_str().unwrap();
    assert_eq!(wait_run(&app.base, run).await["status"], "completed");
}

/// Waits until customer `id`'s push to Stripe is queued (it waits for the
/// switch).
async fn its_push_waits(app: &SyncApp, id: &str) {
    eventually("its push waits", || async {
        let links = app.store.links_of(id).await.unwrap();
        links.iter().any(|l| l.connector == "stripe")
    })
    .await;
}

/// Customers made while a connector is switched off, before its first
/// backfill, whose emails Stripe has: switched on with a backfill, their
/// creates wait for it, which links each to Stripe's record. The switch
/// released them before the run was stored, and each went out as a second
/// record of its customer.
async fn creates_that_waited_for_the_switch_wait_for_its_backfill(backend: Backend) {
    let (stripe, app) = stripe_configured_then_off(backend).await;
    let url = stripe.url();
    let emails: Vec<String> = (0..8).map(|n| email(&format!("switch-{n}"))).collect();
    for address in &emails {
        stripe_create(&url, &[("email", address), ("name", "There")]).await;
        let customer = app.create(json!({"email": address, "name": "Here"})).await;
        let id = customer["id"].as_str().unwrap().to_owned();
        its_push_waits(&app, &id).await;
    }

    switched_on_with_a_backfill(&app).await;
    for address in &emails {
        let customer = app.wait_customer_by_email(address).await;
        app.wait_synced(customer["id"].as_str().unwrap(), 1).await;
        let there = stripe_customers_by_email(&url, address).await;
        assert_eq!(there.len(), 1, "{address}: {there:?}");
    }
}

/// A customer made while the connector is off (its link waits, with no
/// record) whose email Stripe has: the backfill links Stripe's record onto
/// that link, and the push of the phone Stripe lacked names the fields it
/// changes, the phone alone. The waiting link kept its empty hash, read as
/// a push of unknown outcome, and the push went whole: Stripe's email was
/// rewritten in ferry's form (an edit made there meanwhile pushed over).
async fn a_waiting_link_a_backfill_fills_sends_its_changes_alone(backend: Backend) {
    let (stripe, app) = stripe_configured_then_off(backend).await;
    let url = stripe.url();
    let address = email("waiting-link");
    let upper = address.to_uppercase();
    let remote_id = stripe_create(&url, &[("email", &upper), ("name", "Same Name")]).await;
    let customer = app
        .create(json!({"email": address, "name": "Same Name", "phone": "+15550001111"}))
        .await;
    let id = customer["id"].as_str().unwrap().to_owned();
    its_push_waits(&app, &id).await;

    switched_on_with_a_backfill(&app).await;
    app.wait_link(&id, Duration::from_secs(10), |l| {
        l["remote_id"] == remote_id.as_str() && l["state"] == "synced"
    })
    .await;
    let held = stripe_customer(&url, &remote_id).await.expect("the record");
    assert_eq!(held["phone"], "+15550001111", "{held:#}");
    assert_eq!(held["email"], upper, "only the phone was sent: {held:#}");
}

/// A backfill stored while the connector is off waits for its switch (an
/// `enable?backfill=true` whose switch met a store failure leaves one):
/// asked again, `enable?backfill=true` switches on and runs it, instead of
/// answering 409 while the connector stays off.
async fn a_parked_backfill_goes_with_the_switch(backend: Backend) {
    let (stripe, app) = stripe_configured_then_off(backend).await;
    let url = stripe.url();
    let address = email("parked");
    stripe_create(&url, &[("email", &address), ("name", "Parked")]).await;
    // What an `enable?backfill=true` leaves when the store fails after
    // the run was stored, before the switch (the API starts no run on a
    // connector that is off).
    let parked = app
        .store
        .start_run("stripe", "backfill", "merge", "api")
        .await
        .expect("stored")
        .expect("no run going");
    let (status, connector) = switch_stripe(&app, "enable?backfill=true").await;
    assert_eq!(status, 200, "{connector}");
    assert_eq!(connector["enabled"], true, "{connector}");
    assert_eq!(connector["last_reconciliation"]["id"], parked.id.as_str());
    let run = parked.id.as_str();
    assert_eq!(wait_run(&app.base, run).await["status"], "completed");
    app.wait_customer_by_email(&address).await;
}

/// Backfill on a connector's first enable: a catalog and a Stripe account
/// that grew apart before ferry connected them. Matches by email are
/// linked (the merge takes Stripe's values where ferry had none), Stripe-only
/// records are imported, ferry-only customers pushed, and of two Stripe
/// records with one email only one becomes a customer (the other is a dead
/// letter under the default `reject` strategy). A second backfill finds
/// everything equal and creates nothing on either side.
async fn backfill_links_imports_and_pushes(backend: Backend) {
    let stripe = LocalStripe::start().expect("localstripe");
    let url = stripe.url();
    let mut setup = Setup::new(backend, &url);
    setup.stripe_url = None;
    // A schedule waits for the backfill: it does not take its place.
    setup.extra = json!({"connectors": {"stripe": {"reconcile_every": "1m"}}});
    let app = spawn_sync_app(setup).await;

    let (local_only, matched, remote_only, dup) = (
        email("bf-local"),
        email("bf-match"),
        email("bf-remote"),
        email("bf-dup"),
    );
    let a = app
        .create(json!({"email": local_only, "name": "Only Local"}))
        .await;
    let b = app.create(json!({"email": matched, "name": "Bea"})).await;
    let s_b = stripe_create(
        &url,
        &[("email", &matched), ("name", "Bea"), ("phone", "+15550001")],
    )
    .await;
    let s_r = stripe_create(&url, &[("email", &remote_only), ("name", "Only Remote")]).await;
    let s_d1 = stripe_create(&url, &[("email", &dup), ("name", "Dup One")]).await;
    let s_d2 = stripe_create(&url, &[("email", &dup), ("name", "Dup Two")]).await;
    let s_none = stripe_create(&url, &[("name", "No Email")]).await;

    // The relay has moved both creates while no connector was configured
    // (a create it had not moved yet would be pushed to a connector
    // enabled in between, rightly: it is a change made after).
    for id in [&a["id"], &b["id"]] {
        let id = id.as_str().unwrap();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while app.store.outbox_events(id).await.unwrap()[0].queued {
            assert!(tokio::time::Instant::now() < deadline, "{id} never relayed");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    let connector = configure_stripe(&app, &url).await;
    assert_eq!(connector["enabled"], true, "{connector}");
    assert_eq!(connector["backfill_offered"], true, "{connector}");
    // Nothing flows by itself, nor does the schedule start a run (the
    // reconciler looks every second): the existing data waits for the
    // backfill.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert!(stripe_customers_by_email(&url, &local_only)
        .await
        .is_empty());
    let (_, connector) = app
        .send(reqwest::Method::GET, "/api/v1/connectors/stripe", None)
        .await;
    assert_eq!(connector["backfill_offered"], true, "{connector}");

    let run = start_run(&app, json!({"connector": "stripe", "mode": "backfill"})).await;
    assert_eq!(
        (run["mode"].as_str(), run["repair"].as_str()),
        (Some("backfill"), Some("merge")),
        "{run}"
    );
    let (status, again) = app
        .send(
            reqwest::Method::POST,
            "/api/v1/reconciliations",
            Some(json!({"connector": "stripe"})),
        )
        .await;
    if status == 409 {
        assert_eq!(again["code"], "reconciliation_running", "{again}");
    } else {
        // The backfill was quicker than this request; let the report run end.
        assert_eq!(status, 202, "{again}");
        wait_run(&app.base, again["id"].as_str().unwrap()).await;
    }
    let run = wait_run(&app.base, run["id"].as_str().unwrap()).await;
    assert_eq!(run["status"], "completed", "{run:#}");
    expect_counts(
        &run,
        &[
            ("unlinked", 1),
            ("missing_local", 2),
            ("duplicate", 2),
            ("missing_remote", 1),
            ("repairs", 5),
        ],
    );
    assert_eq!(run["progress"]["listing_complete"], true, "{run}");
    assert_eq!(run["progress"]["records"], 5, "{run}");
    let unlinked = findings(&app.base, run["id"].as_str().unwrap(), Some("unlinked")).await;
    assert_eq!(unlinked[0]["remote_id"], s_b.as_str(), "{unlinked:?}");
    assert_eq!(unlinked[0]["customer_id"], b["id"], "{unlinked:?}");
    assert_eq!(unlinked[0]["state"], "repaired", "{unlinked:?}");
    assert_eq!(
        unlinked[0]["fields"],
        json!([{"field": "phone", "local": null, "remote": "+15550001", "base": null}])
    );

    // Linked by email, and Stripe's phone filled ferry's gap.
    let b_id = b["id"].as_str().unwrap();
    let link = app
        .wait_link(b_id, SETTLE, |l| l["remote_id"] == s_b.as_str())
        .await;
    assert_eq!(link["connector"], "stripe");
    eventually("the matched customer took Stripe's phone", || async {
        app.customer_by_email(&matched)
            .await
            .is_some_and(|c| c["phone"] == "+15550001")
    })
    .await;
    // Imported.
    let imported = app.wait_customer_by_email(&remote_only).await;
    assert_eq!(imported["name"], "Only Remote");
    app.wait_link(imported["id"].as_str().unwrap(), SETTLE, |l| {
        l["remote_id"] == s_r.as_str()
    })
    .await;
    // Pushed.
    let a_link = app
        .wait_link(a["id"].as_str().unwrap(), SETTLE, |l| {
            l["state"] == "synced"
        })
        .await;
    let pushed = stripe_customer(&url, a_link["remote_id"].as_str().unwrap())
        .await
        .unwrap();
    assert_eq!(pushed["email"], local_only.as_str());
    // One customer for the duplicate email, linked to one of its records;
    // the other record is a dead letter that says why.
    let dup_customer = app.wait_customer_by_email(&dup).await;
    let dup_link = app
        .wait_link(dup_customer["id"].as_str().unwrap(), SETTLE, |l| {
            !l["remote_id"].is_null()
        })
        .await;
    let linked = dup_link["remote_id"].as_str().unwrap().to_owned();
    assert!(linked == s_d1 || linked == s_d2, "{dup_link}");
    let other = if linked == s_d1 { &s_d2 } else { &s_d1 };
    eventually("the second duplicate is dead-lettered", || async {
        let events = app.store.inbox_of_remote("stripe", other).await.unwrap();
        events.iter().any(|e| {
            e.state.as_str() == "dead"
                && e.detail
                    .as_deref()
                    .is_some_and(|d| d.contains("duplicate_email policy is reject"))
        })
    })
    .await;

    // Every repair is in the customer's history with the run's id.
    let events = app.store.inbox_of_remote("stripe", &s_r).await.unwrap();
    assert!(
        events.iter().any(|e| e.remote_type == "reconciliation"
            && e.correlation_id.as_deref() == run["id"].as_str()),
        "{events:?}"
    );

    // Idempotent: a second backfill finds the rest equal and makes nothing.
    app.wait_synced(b_id, 1).await;
    let second = run_to_end(&app, json!({"connector": "stripe", "mode": "backfill"})).await;
    assert_eq!(second["status"], "completed", "{second:#}");
    expect_counts(
        &second,
        &[("equal", 4), ("duplicate", 1), ("missing_local", 1)],
    );
    // What can never be imported is not sent to be refused again by each
    // run: the record without an email, and the second duplicate under
    // `reject` (dead-lettered once, by the first run). Their findings stay
    // open for a person.
    assert!(app
        .store
        .inbox_of_remote("stripe", &s_none)
        .await
        .unwrap()
        .is_empty());
    let dead = app.store.inbox_of_remote("stripe", other).await.unwrap();
    assert_eq!(dead.len(), 1, "{dead:?}");
    for address in [&local_only, &matched, &remote_only] {
        assert_eq!(
            stripe_customers_by_email(&url, address).await.len(),
            1,
            "{address} once in Stripe"
        );
    }
    assert_eq!(stripe_customers_by_email(&url, &dup).await.len(), 2);
    let (_, page) = app
        .send(reqwest::Method::GET, "/api/v1/customers?limit=100", None)
        .await;
    assert_eq!(page["data"].as_array().unwrap().len(), 4, "{page:#}");
    let (_, connector) = app
        .send(reqwest::Method::GET, "/api/v1/connectors/stripe", None)
        .await;
    assert_eq!(connector["backfill_offered"], false, "{connector}");
    assert_eq!(
        connector["last_reconciliation"]["id"], second["id"],
        "{connector}"
    );
}

/// A linked record deleted behind ferry's back (no webhook) while another
/// with the customer's email stands unlinked (made by hand; a Salesforce
/// merge deletes the losing Contact): `push_local` does not create a third
/// beside it, by a run or by hand after a report. The orphan was recreated
/// and the remote held two records of one email; which one is the
/// customer's stays the duplicate finding's. Nor does `merge` delete the
/// customer as an orphan.
async fn an_orphan_is_not_recreated_beside_a_record_with_its_email(backend: Backend) {
    let stripe = LocalStripe::start().expect("localstripe");
    let url = stripe.url();
    let app = spawn_sync_app(Setup::new(backend, &url)).await;
    let address = email("orphan-beside");
    let customer = app
        .create(json!({"email": address, "name": "Beside"}))
        .await;
    let id = customer["id"].as_str().unwrap().to_owned();
    let gone = app.wait_synced(&id, 1).await["remote_id"]
        .as_str()
        .unwrap()
        .to_owned();
    stripe_delete(&url, &gone).await;
    let kept = stripe_create(&url, &[("email", &address), ("name", "Made By Hand")]).await;

    // By hand, after a report run (its scratch cleared when it ended).
    let report = run_to_end(&app, json!({"connector": "stripe"})).await;
    let report_id = report["id"].as_str().unwrap().to_owned();
    let orphan = findings(&app.base, &report_id, Some("orphan")).await[0].clone();
    let resolved = resolve_by_hand(&app, &report_id, &orphan, "push_local").await;
    assert!(
        resolved["repair"]
            .as_str()
            .is_some_and(|r| r.contains("no link holds")),
        "{resolved}"
    );
    assert_eq!(stripe_customers_by_email(&url, &address).await.len(), 1);

    let run = run_to_end(&app, json!({"connector": "stripe", "repair": "push_local"})).await;
    assert_eq!(run["status"], "completed", "{run:#}");
    let there = stripe_customers_by_email(&url, &address).await;
    assert_eq!(there.len(), 1, "{there:?}");
    assert_eq!(there[0]["id"], kept.as_str());
    let id = run["id"].as_str().unwrap();
    let orphan = &findings(&app.base, id, Some("orphan")).await[0];
    assert!(
        orphan["repair"]
            .as_str()
            .is_some_and(|r| r.contains("no link holds")),
        "{orphan}"
    );
    let duplicate = &findings(&app.base, id, Some("duplicate")).await[0];
    assert_eq!(duplicate["state"], "open", "{duplicate}");

    // Nor does `merge` delete the customer as an orphan: it lives on in
    // the record no link holds. Deleted, it went from every system, and
    // the next run imported that record as a new customer.
    let run = run_to_end(&app, json!({"connector": "stripe", "repair": "merge"})).await;
    assert_eq!(run["status"], "completed", "{run:#}");
    let run_id = run["id"].as_str().unwrap();
    let orphan = findings(&app.base, run_id, Some("orphan")).await[0].clone();
    assert_eq!(orphan["state"], "open", "{orphan}");
    // Nor by hand: the resolution is refused, naming why, and the finding
    // stays open.
    for action in ["merge", "pull_remote"] {
        let path = format!(
            "/api/v1/reconciliations/{run_id}/mismatches/{}/resolve",
            orphan["id"].as_str().unwrap()
        );
        let (status, problem) = app
            .send(
                reqwest::Method::POST,
                &path,
                Some(json!({"action": action})),
            )
            .await;
        assert_eq!(status, 422, "{action}: {problem}");
        assert!(
            problem["errors"][0]["message"]
                .as_str()
                .is_some_and(|m| m.contains("no link holds")),
            "{problem}"
        );
    }
    let orphan = &findings(&app.base, run_id, Some("orphan")).await[0];
    assert_eq!(orphan["state"], "open", "{orphan}");
    let (status, live) = app
        .send(
            reqwest::Method::GET,
            &format!("/api/v1/customers/{}", customer["id"].as_str().unwrap()),
            None,
        )
        .await;
    assert_eq!(status, 200, "{live}");
    assert!(live["deleted_at"].is_null(), "{live}");
}

/// Drift behind ferry's back (no webhooks): in Stripe a customer is
/// deleted, another renamed, a third added. A report run finds the three
/// and changes nothing; the report survives a restart; one finding is
/// resolved by hand (`push_local`), and a `merge` run repairs the rest.
async fn drift_is_found_reported_and_repaired(backend: Backend) {
    let stripe = LocalStripe::start().expect("localstripe");
    let url = stripe.url();
    // The database outlives the first app (a restart).
    let db_dir = tempfile::tempdir().expect("dir");
    let mut setup = Setup::new(backend, &url);
    if backend == Backend::Sqlite {
        setup.database_url = Some(format!(
            "sqlite://{}",
            db_dir.path().join("ferry.db").display()
        ));
    }
    let app = spawn_sync_app(setup).await;
    let mut ids = Vec::new();
    for tag in ["drift-x", "drift-y", "drift-z", "drift-v"] {
        let customer = app.create(json!({"email": email(tag), "name": tag})).await;
        ids.push(customer["id"].as_str().unwrap().to_owned());
    }
    let mut remote = Vec::new();
    for id in &ids {
        let link = app.wait_synced(id, 1).await;
        remote.push(link["remote_id"].as_str().unwrap().to_owned());
    }
    stripe_delete(&url, &remote[0]).await;
    stripe_update(&url, &remote[1], &[("name", "Renamed In Stripe")]).await;
    stripe_update(&url, &remote[3], &[("phone", "+15550002")]).await;
    let added = email("drift-added");
    let s_w = stripe_create(&url, &[("email", &added), ("name", "Added In Stripe")]).await;

    let report = run_to_end(&app, json!({"connector": "stripe"})).await;
    assert_eq!(
        (report["status"].as_str(), report["repair"].as_str()),
        (Some("completed"), Some("report")),
        "{report:#}"
    );
    expect_counts(
        &report,
        &[
            ("equal", 1),
            ("different", 2),
            ("orphan", 1),
            ("missing_local", 1),
        ],
    );
    let id = report["id"].as_str().unwrap().to_owned();
    let different = findings(&app.base, &id, Some("different")).await;
    let renamed = different
        .iter()
        .find(|m| m["customer_id"] == ids[1].as_str())
        .expect("y differs");
    assert_eq!(
        renamed["fields"],
        json!([{"field": "name", "local": "drift-y", "remote": "Renamed In Stripe", "base": "drift-y"}])
    );
    let orphan = &findings(&app.base, &id, Some("orphan")).await[0];
    assert_eq!(
        (orphan["customer_id"].as_str(), orphan["remote_id"].as_str()),
        (Some(ids[0].as_str()), Some(remote[0].as_str()))
    );
    let missing = &findings(&app.base, &id, Some("missing_local")).await[0];
    assert_eq!(missing["remote_id"], s_w.as_str());
    assert_eq!(missing["record"]["email"], added.as_str());
    // Nothing changed.
    assert!(app.customer_by_email(&added).await.is_none());
    assert_eq!(
        app.sync_status(&ids[0]).await["connectors"][0]["remote_id"],
        remote[0].as_str()
    );

    // The report survives a restart. A resolution whose process died
    // after claiming the finding and before scheduling its repair (long
    // ago) is undone by the restart; one claimed a moment ago on another
    // replica is left to it.
    let database_url = app.database_url.clone();
    drop(app);
    for (finding, repair, at) in [
        (missing, "pull_remote", "2020-01-01T00:00:00Z"),
        (orphan, "push_local", "2999-01-01T00:00:00Z"),
    ] {
        let claimed = format!(
            "UPDATE reconciliation_mismatches SET state = 'resolved', \
             repair = '{repair}: being scheduled', resolved_at = '{at}' WHERE id = '{}'",
            finding["id"].as_str().unwrap()
        );
        execute_raw(&database_url, &claimed, b"").await;
    }
    let mut setup = Setup::new(backend, &url);
    setup.database_url = Some(database_url);
    let app = spawn_sync_app(setup).await;
    let after = get_run(&app.base, &id).await;
    assert_eq!(counts(&after), counts(&report), "{after:#}");
    assert_eq!(findings(&app.base, &id, None).await.len(), 4);
    eventually("the stalled resolution is undone", || async {
        findings(&app.base, &id, Some("missing_local")).await[0]["state"] == "open"
    })
    .await;
    let orphan = &findings(&app.base, &id, Some("orphan")).await[0];
    assert_eq!(
        (orphan["state"].as_str(), orphan["repair"].as_str()),
        (Some("resolved"), Some("push_local: being scheduled")),
        "{orphan}"
    );

    // By hand: make Stripe match ferry for the renamed one.
    let path = format!(
        "/api/v1/reconciliations/{id}/mismatches/{}/resolve",
        renamed["id"].as_str().unwrap()
    );
    let resolved = resolve_by_hand(&app, &id, renamed, "push_local").await;
    assert_eq!(resolved["state"], "resolved", "{resolved}");
    let (status, twice) = app
        .send(
            reqwest::Method::POST,
            &path,
            Some(json!({"action": "push_local"})),
        )
        .await;
    assert_eq!(
        (status, twice["code"].as_str()),
        (409, Some("mismatch_not_open")),
        "{twice}"
    );
    let (status, bad) = app
        .send(
            reqwest::Method::POST,
            &path.replace("/resolve", "x/resolve"),
            Some(json!({"action": "merge"})),
        )
        .await;
    assert_eq!(
        (status, bad["code"].as_str()),
        (404, Some("mismatch_not_found")),
        "{bad}"
    );
    eventually("Stripe has ferry's name again", || async {
        stripe_customer(&url, &remote[1])
            .await
            .is_some_and(|c| c["name"] == "drift-y")
    })
    .await;
    app.wait_link(&ids[1], SETTLE, |l| l["state"] == "synced")
        .await;

    // A merge run repairs the rest: the orphan follows the delete policy
    // (soft delete), the added record is imported, the phone is taken.
    let merge = run_to_end(&app, json!({"connector": "stripe", "repair": "merge"})).await;
    assert_eq!(merge["status"], "completed", "{merge:#}");
    expect_counts(
        &merge,
        &[
            ("equal", 2),
            ("different", 1),
            ("orphan", 1),
            ("missing_local", 1),
            ("repairs", 3),
        ],
    );
    let imported = app.wait_customer_by_email(&added).await;
    assert_eq!(imported["name"], "Added In Stripe");
    eventually("the orphan's customer is deleted", || async {
        app.store
            .get_customer_any(&ids[0])
            .await
            .unwrap()
            .is_some_and(|c| c.deleted_at.is_some())
    })
    .await;
    eventually("the phone set in Stripe reached ferry", || async {
        app.store
            .get_customer_any(&ids[3])
            .await
            .unwrap()
            .is_some_and(|c| c.phone.as_deref() == Some("+15550002"))
    })
    .await;
    // Converged: nothing left to find.
    app.wait_synced(&ids[3], 2).await;
    let clean = run_to_end(&app, json!({"connector": "stripe"})).await;
    expect_counts(&clean, &[("equal", 4)]);
}

/// The Salesforce connector, configured against `salesforce`.
fn salesforce_against(salesforce: &FakeSalesforce) -> ExtraConnector {
    ExtraConnector {
        name: "salesforce".to_owned(),
        component: salesforce_component(),
        config: json!({
            "settings": {"login_url": salesforce.url(), "organization_id": salesforce.org_id()},
            "secrets": {
                "client_id": salesforce.config().client_id,
                "client_secret": salesforce.config().client_secret,
            },
        }),
    }
}

/// The Salesforce connector beside Stripe, against the fake Salesforce.
async fn salesforce_app(backend: Backend, extra: Value) -> (LocalStripe, FakeSalesforce, SyncApp) {
    let stripe = LocalStripe::start().expect("localstripe");
    let salesforce = FakeSalesforce::start(FakeSalesforceConfig::default())
        .await
        .expect("fake salesforce");
    let mut setup = Setup::new(backend, &stripe.url());
    setup.extra = extra;
    setup.extra_connectors.push(salesforce_against(&salesforce));
    let app = spawn_sync_app(setup).await;
    (stripe, salesforce, app)
}

/// Creates `n` customers and waits until each has its Contact; returns
/// `(customer id, contact id)`.
async fn customers_with_contacts(app: &SyncApp, n: usize, tag: &str) -> Vec<(String, String)> {
    let mut created = Vec::new();
    for i in 0..n {
        let customer = app
            .create(json!({"email": email(&format!("{tag}-{i}")), "name": format!("{tag} {i}")}))
            .await;
        created.push(customer["id"].as_str().unwrap().to_owned());
    }
    let mut pairs = Vec::new();
    for id in created {
        let link = app
            .wait_link_of("salesforce", &id, SETTLE, |l| l["state"] == "synced")
            .await;
        pairs.push((id, link["remote_id"].as_str().unwrap().to_owned()));
    }
    pairs
}

/// A Contact deleted in Salesforce (which Outbound Messages never report)
/// is found as an orphan and, under `pull_remote`, handled per the delete
/// policy: the customer is soft-deleted, and the delete fans out to Stripe.
/// Salesforce's request limit slows the listing down; the run still only
/// completes once every page was read.
async fn salesforce_delete_is_an_orphan(backend: Backend) {
    let (stripe, salesforce, app) = salesforce_app(backend, json!({})).await;
    let pairs = customers_with_contacts(&app, 3, "sf-orphan").await;
    let (gone_customer, gone_contact) = pairs[0].clone();
    salesforce.delete_record("Contact", &gone_contact);
    salesforce.fail_with_request_limit(2);

    let run = run_to_end(
        &app,
        json!({"connector": "salesforce", "repair": "pull_remote"}),
    )
    .await;
    assert_eq!(run["status"], "completed", "{run:#}");
    expect_counts(
        &run,
        &[
            ("equal", 2),
            ("orphan", 1),
            ("rate_limited", 2),
            ("repairs", 1),
        ],
    );
    let orphan = &findings(&app.base, run["id"].as_str().unwrap(), Some("orphan")).await[0];
    assert_eq!(
        (orphan["customer_id"].as_str(), orphan["remote_id"].as_str()),
        (Some(gone_customer.as_str()), Some(gone_contact.as_str()))
    );
    eventually("the customer is soft-deleted", || async {
        app.store
            .get_customer_any(&gone_customer)
            .await
            .unwrap()
            .is_some_and(|c| c.deleted_at.is_some())
    })
    .await;
    let stripe_link = app
        .wait_link(&gone_customer, SETTLE, |l| l["remote_deleted"] == true)
        .await;
    assert!(
        stripe_customer(&stripe.url(), stripe_link["remote_id"].as_str().unwrap())
            .await
            .is_none()
    );
    for (id, _) in &pairs[1..] {
        assert!(app
            .store
            .get_customer_any(id)
            .await
            .unwrap()
            .unwrap()
            .deleted_at
            .is_none());
    }
}

/// A Contact a sharing change takes from the integration user (or one
/// purged from the Recycle Bin) is missing from the listing and answers
/// its read with a plain `NOT_FOUND`: no proof of a delete. The orphan's
/// repair is a dead letter that says so; the customer stays, in ferry and
/// at Stripe. Before, both were deleted, and the brake (a share of the
/// links) let a few percent through. So does a Contact a merge in
/// Salesforce deleted (`ENTITY_IS_DELETED`, as any delete): its person
/// lives on in the winner, and the dead letter names it.
async fn a_salesforce_record_out_of_reach_is_not_deleted(backend: Backend) {
    // Two orphans of three links: past the default brake.
    let brake = json!({"reconcile_max_delete_share": 0.7});
    let (stripe, salesforce, app) = salesforce_app(backend, brake).await;
    let pairs = customers_with_contacts(&app, 3, "sf-hidden").await;
    let (hidden_customer, hidden_contact) = pairs[0].clone();
    salesforce.purge_record("Contact", &hidden_contact);
    let (merged_customer, merged_contact) = pairs[2].clone();
    salesforce.merge_records("Contact", &pairs[1].1, &merged_contact);

    let run = run_to_end(&app, json!({"connector": "salesforce", "repair": "merge"})).await;
    assert_eq!(run["status"], "completed", "{run:#}");
    expect_counts(&run, &[("equal", 1), ("orphan", 2), ("repairs", 2)]);
    eventually("the merged record's repair is a dead letter", || async {
        let events = app
            .store
            .inbox_of_remote("salesforce", &merged_contact)
            .await;
        events.unwrap().iter().any(|e| e.state.as_str() == "dead")
    })
    .await;
    let events = app
        .store
        .inbox_of_remote("salesforce", &merged_contact)
        .await
        .unwrap();
    let repair = events
        .iter()
        .find(|e| e.remote_type == "reconciliation")
        .expect("the merged record's repair");
    let merged_into = format!("was merged into {}", pairs[1].1);
    assert!(
        repair
            .detail
            .as_deref()
            .is_some_and(|d| d.contains(&merged_into)),
        "{repair:?}"
    );
    let kept = app
        .store
        .get_customer_any(&merged_customer)
        .await
        .unwrap()
        .unwrap();
    assert!(kept.deleted_at.is_none(), "{kept:?}");
    eventually("the orphan's repair is a dead letter", || async {
        let events = app
            .store
            .inbox_of_remote("salesforce", &hidden_contact)
            .await;
        events.unwrap().iter().any(|e| e.state.as_str() == "dead")
    })
    .await;
    let events = app
        .store
        .inbox_of_remote("salesforce", &hidden_contact)
        .await
        .unwrap();
    let repair = events
        .iter()
        .find(|e| e.remote_type == "reconciliation")
        .expect("the orphan's repair");
    assert_eq!(repair.state.as_str(), "dead", "{repair:?}");
    assert!(
        repair
            .detail
            .as_deref()
            .is_some_and(|d| d.contains("may not see (sharing)")),
        "{repair:?}"
    );
    let customer = app
        .store
        .get_customer_any(&hidden_customer)
        .await
        .unwrap()
        .unwrap();
    assert!(customer.deleted_at.is_none(), "{customer:?}");
    let stripe_link = app
        .wait_link(&hidden_customer, SETTLE, |l| l["state"] == "synced")
        .await;
    assert_eq!(stripe_link["remote_deleted"], false, "{stripe_link}");
    assert!(
        stripe_customer(&stripe.url(), stripe_link["remote_id"].as_str().unwrap())
            .await
            .is_some()
    );
}

/// An orphan the remote still has (the listing missed it: a sharing rule,
/// a narrowed key) is not deleted: its repair reads the record first and
/// is skipped, saying why. Before, the customer was soft-deleted and the
/// delete fanned out.
async fn an_orphan_the_remote_still_has_is_not_deleted(backend: Backend) {
    an_orphan_the_remote_still_has_is_kept(backend, "merge").await;
}

/// An orphan the listing missed, repaired with `push_local`: no second
/// record is created beside the one the remote still has (the create went
/// out, the old record stayed at Stripe unlinked).
async fn an_orphan_the_remote_still_has_is_not_recreated(backend: Backend) {
    an_orphan_the_remote_still_has_is_kept(backend, "push_local").await;
}

/// The same, the record read at once by the run: the finding is closed
/// saying so, and not counted among the run's repairs (nothing was done;
/// the report said one repair).
async fn an_orphan_the_run_finds_there_is_no_repair(backend: Backend) {
    an_orphan_the_remote_still_has_is_kept(backend, "push_local_read").await;
}

async fn an_orphan_the_remote_still_has_is_kept(backend: Backend, repair: &str) {
    let stripe = LocalStripe::start().expect("localstripe");
    let proxy = FaultProxy::start(&stripe.url()).await.expect("proxy");
    let app = spawn_sync_app(Setup::new(backend, &proxy.url())).await;
    let address = email("missed");
    let customer = app
        .create(json!({"email": address, "name": "Missed"}))
        .await;
    let id = customer["id"].as_str().unwrap();
    let link = app.wait_link(id, SETTLE, |l| l["state"] == "synced").await;
    let remote_id = link["remote_id"].as_str().unwrap().to_owned();
    // The listing's one page comes back empty.
    proxy.push(
        Match::request("GET", "/v1/customers"),
        Fault::Respond {
            status: 200,
            headers: vec![("content-type".into(), "application/json".into())],
            body: br#"{"object":"list","data":[],"has_more":false,"url":"/v1/customers"}"#.to_vec(),
        },
    );
    let read = repair == "push_local_read";
    let repair = if read { "push_local" } else { repair };
    if repair == "push_local" && !read {
        // The read of the record fails once: the finding stays open.
        proxy.push(
            Match::request("GET", &format!("/v1/customers/{remote_id}")),
            Fault::status(500),
        );
    }
    let run = run_to_end(&app, json!({"connector": "stripe", "repair": repair})).await;
    assert_eq!(run["status"], "completed", "{run:#}");
    if repair == "merge" {
        expect_counts(&run, &[("orphan", 1), ("repairs", 1)]);
        let events = app.wait_inbox_settled("stripe", &remote_id, 1).await;
        let repair = events
            .iter()
            .find(|e| e.remote_type == "reconciliation")
            .expect("the orphan's repair");
        assert_eq!(repair.state.as_str(), "skipped", "{repair:?}");
        assert!(
            repair
                .detail
                .as_deref()
                .is_some_and(|d| d.contains("the remote has the record")),
            "{repair:?}"
        );
    } else if read {
        // No repair: the counts leave out a zero.
        expect_counts(&run, &[("orphan", 1)]);
        let id = run["id"].as_str().unwrap();
        let orphan = findings(&app.base, id, Some("orphan")).await.remove(0);
        assert_eq!(orphan["state"], "repaired", "{orphan}");
        assert!(
            orphan["repair"]
                .as_str()
                .is_some_and(|r| r.starts_with("nothing: ") && r.contains("the listing missed it")),
            "{orphan}"
        );
    } else {
        expect_counts(&run, &[("orphan", 1)]);
        let id = run["id"].as_str().unwrap();
        let orphan = findings(&app.base, id, Some("orphan")).await.remove(0);
        assert_eq!(orphan["state"], "open", "{orphan}");
        let resolved = resolve_by_hand(&app, id, &orphan, "push_local").await;
        assert!(
            resolved["repair"]
                .as_str()
                .is_some_and(|r| r.contains("the listing missed it")),
            "{resolved}"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let kept = app.store.get_customer_any(id).await.unwrap().unwrap();
    assert!(kept.deleted_at.is_none(), "{kept:?}");
    assert!(stripe_customer(&stripe.url(), &remote_id).await.is_some());
    let link = app.wait_link(id, SETTLE, |l| l["state"] == "synced").await;
    assert_eq!(link["remote_id"], remote_id.as_str(), "{link}");
    assert_eq!(
        stripe_customers_by_email(&stripe.url(), &address)
            .await
            .len(),
        1
    );
}

/// An app, every link an orphan (the mass-delete brake opened), on Stripe
/// behind `proxy`: four customers `{tag}-{n}` linked, then the listing
/// comes back empty, and each record the remote still has is read in
/// 1.5 s. The app and the four remote ids.
async fn four_orphans_read_slowly(
    backend: Backend,
    proxy: &FaultProxy,
    tag: &str,
) -> (SyncApp, Vec<String>) {
    let mut setup = Setup::new(backend, &proxy.url());
    setup.extra = json!({"reconcile_max_delete_share": 1.0});
    let app = spawn_sync_app(setup).await;
    let mut remote_ids = Vec::new();
    for n in 0..4 {
        let address = email(&format!("{tag}-{n}"));
        let customer = app.create(json!({"email": address, "name": tag})).await;
        let id = customer["id"].as_str().unwrap();
        let link = app.wait_link(id, SETTLE, |l| l["state"] == "synced").await;
        remote_ids.push(link["remote_id"].as_str().unwrap().to_owned());
    }
    proxy.push(
        Match::request("GET", "/v1/customers"),
        Fault::Respond {
            status: 200,
            headers: vec![("content-type".into(), "application/json".into())],
            body: br#"{"object":"list","data":[],"has_more":false,"url":"/v1/customers"}"#.to_vec(),
        },
    );
    for _ in &remote_ids {
        proxy.push(
            Match::request("GET", "/v1/customers/"),
            Fault::ForwardThenDelay(Duration::from_millis(1500)),
        );
    }
    proxy.clear_requests();
    (app, remote_ids)
}

/// A step whose orphans' reads outlast the run's lease renews it on the
/// way: each record is read once. Before, the lease ran out mid-step, a
/// second driver took the run over from the step's start while the first
/// still read, and the records were read (and their repairs scheduled)
/// twice.
async fn a_step_of_slow_reads_keeps_its_lease(backend: Backend) {
    let stripe = LocalStripe::start().expect("localstripe");
    let proxy = FaultProxy::start(&stripe.url()).await.expect("proxy");
    // The helpers' lease is 4 s, a call's timeout 2 s. Every link is an
    // orphan: the mass-delete brake is opened.
    let (app, remote_ids) = four_orphans_read_slowly(backend, &proxy, "slow-read").await;
    let run = run_to_end(&app, json!({"connector": "stripe", "repair": "push_local"})).await;
    assert_eq!(run["status"], "completed", "{run:#}");
    // Each read finds its record: closed with nothing to do, no repair.
    expect_counts(&run, &[("orphan", 4)]);
    let id = run["id"].as_str().unwrap();
    let closed = findings(&app.base, id, Some("orphan")).await;
    assert!(
        closed.iter().all(|f| f["state"] == "repaired"
            && f["repair"]
                .as_str()
                .is_some_and(|r| r.starts_with("nothing: "))),
        "{closed:#?}"
    );
    for remote_id in &remote_ids {
        let reads = proxy.requests_to("GET", &format!("/v1/customers/{remote_id}"));
        assert_eq!(reads.len(), 1, "{remote_id} read {} times", reads.len());
    }
}

/// A run whose listing fails after a page reports the findings that page
/// made: its counts said 0 `different` while the finding was listed (and
/// could be resolved by hand), as they were set only once classified.
async fn a_failed_run_counts_its_findings(backend: Backend) {
    let stripe = LocalStripe::start().expect("localstripe");
    let proxy = FaultProxy::start(&stripe.url()).await.expect("proxy");
    let app = spawn_sync_app(Setup::new(backend, &proxy.url())).await;
    let customer = app
        .create(json!({"email": email("failed-run"), "name": "Listed"}))
        .await;
    let id = customer["id"].as_str().unwrap();
    let link = app.wait_link(id, SETTLE, |l| l["state"] == "synced").await;
    let remote_id = link["remote_id"].as_str().unwrap();
    // The first page holds the record, renamed there, and says more
    // follow; the next page is refused for good.
    let mut record = stripe_customer(&stripe.url(), remote_id)
        .await
        .expect("in Stripe");
    record["name"] = json!("Renamed There");
    let page =
        json!({"object": "list", "data": [record], "has_more": true, "url": "/v1/customers"});
    proxy.push(
        Match::request("GET", "/v1/customers"),
        Fault::Respond {
            status: 200,
            headers: vec![("content-type".into(), "application/json".into())],
            body: page.to_string().into_bytes(),
        },
    );
    proxy.push(
        Match::request("GET", "/v1/customers"),
        Fault::Respond {
            status: 400,
            headers: vec![("content-type".into(), "application/json".into())],
            body: br#"{"error":{"type":"invalid_request_error","message":"refused"}}"#.to_vec(),
        },
    );
    let run = run_to_end(&app, json!({"connector": "stripe"})).await;
    assert_eq!(run["status"], "failed", "{run:#}");
    let listed = findings(&app.base, run["id"].as_str().unwrap(), Some("different")).await;
    assert_eq!(listed.len(), 1, "{listed:#?}");
    assert_eq!(counts(&run).get("different"), Some(&1), "{run:#}");
}

/// A shutdown stops a repair step at the finding it is on: the reads of
/// orphans the remote still has add nothing to the backlog, so the step
/// never paused where a shutdown is seen, and the process waited for every
/// read of the step (each up to a call's timeout against a remote that is
/// down) before it stopped.
async fn a_shutdown_stops_a_repair_step(backend: Backend) {
    let stripe = LocalStripe::start().expect("localstripe");
    let proxy = FaultProxy::start(&stripe.url()).await.expect("proxy");
    let (app, remote_ids) = four_orphans_read_slowly(backend, &proxy, "stopped-read").await;
    start_run(&app, json!({"connector": "stripe", "repair": "push_local"})).await;
    let reads = |proxy: &FaultProxy| {
        remote_ids
            .iter()
            .map(|r| {
                proxy
                    .requests_to("GET", &format!("/v1/customers/{r}"))
                    .len()
            })
            .sum::<usize>()
    };
    let deadline = tokio::time::Instant::now() + SETTLE;
    while reads(&proxy) == 0 {
        assert!(tokio::time::Instant::now() < deadline, "no orphan read");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    app.stop().await;
    // The read under way finished; none after it was started.
    assert_eq!(reads(&proxy), 1, "{:#?}", proxy.requests());
}

/// A customer synced to Stripe whose link then says the remote deleted its
/// record (which Stripe still has): `(customer id, email)`.
async fn marked_deleted_at_stripe(app: &SyncApp, tag: &str) -> (String, String) {
    let address = email(tag);
    let customer = app.create(json!({"email": address, "name": "Back"})).await;
    let id = customer["id"].as_str().unwrap().to_owned();
    app.wait_link(&id, SETTLE, |l| l["state"] == "synced").await;
    let sql = format!(
        "UPDATE sync_links SET remote_deleted = TRUE \
         WHERE connector = 'stripe' AND customer_id = '{id}' AND $1 IS NOT NULL"
    );
    execute_raw(&app.database_url, &sql, b"").await;
    (id, address)
}

/// Under `unlink`, a link whose record the remote deleted names a record
/// the listing returns again (an undelete): its customer is not missing
/// remotely, and no second record is created beside it. Before, the run's
/// `merge` recreated it.
async fn a_record_listed_again_is_not_recreated_beside_itself(backend: Backend) {
    let stripe = LocalStripe::start().expect("localstripe");
    let url = stripe.url();
    let mut setup = Setup::new(backend, &url);
    setup.extra = json!({"inbound_delete_policy": "unlink"});
    let app = spawn_sync_app(setup).await;
    // The remote's delete was applied (unlinked); the record came back.
    let (id, address) = marked_deleted_at_stripe(&app, "undeleted").await;
    let id = id.as_str();
    let run = run_to_end(&app, json!({"connector": "stripe", "repair": "merge"})).await;
    assert_eq!(run["status"], "completed", "{run:#}");
    assert!(!counts(&run).contains_key("missing_remote"), "{run:#}");
    expect_counts(&run, &[("unlinked", 1), ("repairs", 1)]);
    // Linked again: the next edit updates the record, not a second one.
    app.wait_link(id, SETTLE, |l| l["remote_deleted"] == false)
        .await;
    app.patch(id, json!({"name": "Back Again"})).await;
    let link = app.wait_synced(id, 2).await;
    let records = stripe_customers_by_email(&url, &address).await;
    assert_eq!(records.len(), 1, "{records:#?}");
    assert_eq!(records[0]["name"], "Back Again", "{link}");
}

/// A record the remote deleted (the link marked so) and has again
/// (restored: a Recycle Bin undelete) while its customer is deleted in
/// ferry is a `missing_local` finding, and a `merge` run pushes the
/// customer's delete to it, as to any record a deleted customer left.
/// Before, it was counted in no kind and repaired by no mode: the record
/// stayed at the remote for good.
async fn a_record_restored_after_its_customer_was_deleted_is_found(backend: Backend) {
    let stripe = LocalStripe::start().expect("localstripe");
    let url = stripe.url();
    let app = spawn_sync_app(Setup::new(backend, &url)).await;
    // The remote's delete (marked on the link) came first, then ferry's:
    // nothing to push. The record is there again.
    let (id, address) = marked_deleted_at_stripe(&app, "restored").await;
    let id = id.as_str();
    app.delete(id).await;
    app.wait_link(id, SETTLE, |l| l["state"] == "synced").await;
    assert_eq!(stripe_customers_by_email(&url, &address).await.len(), 1);

    let run = run_to_end(&app, json!({"connector": "stripe", "repair": "report"})).await;
    expect_counts(&run, &[("missing_local", 1)]);
    let run = run_to_end(&app, json!({"connector": "stripe", "repair": "merge"})).await;
    assert_eq!(run["status"], "completed", "{run:#}");
    expect_counts(&run, &[("missing_local", 1), ("repairs", 1)]);
    let deadline = tokio::time::Instant::now() + SETTLE;
    while !stripe_customers_by_email(&url, &address).await.is_empty() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the restored record stayed"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let run = run_to_end(&app, json!({"connector": "stripe", "repair": "report"})).await;
    assert!(!counts(&run).contains_key("missing_local"), "{run:#}");
}

/// Under the `ignore` delete policy a remote delete changes nothing, and
/// neither does a run: its orphans stay open for a person, every run, and
/// the brake does not count them. A run planned their deletes, which
/// inbound skipped, and marked them repaired; the next run found them
/// again, and two of them set off the brake for good, stopping every other
/// repair.
async fn orphans_the_delete_policy_ignores_stay_open(backend: Backend) {
    let extra = json!({"inbound_delete_policy": "ignore", "reconcile_max_delete_share": 0.25});
    let (_stripe, salesforce, app) = salesforce_app(backend, extra).await;
    let pairs = customers_with_contacts(&app, 4, "sf-ignored").await;
    for (_, contact) in &pairs[..2] {
        salesforce.delete_record("Contact", contact);
    }
    for _ in 0..2 {
        let run = run_to_end(&app, json!({"connector": "salesforce", "repair": "merge"})).await;
        assert_eq!(run["status"], "completed", "{run:#}");
        expect_counts(&run, &[("equal", 2), ("orphan", 2)]);
        let orphans = findings(&app.base, run["id"].as_str().unwrap(), Some("orphan")).await;
        assert!(orphans.iter().all(|o| o["state"] == "open"), "{orphans:?}");
    }
    for (id, _) in &pairs {
        let customer = app.store.get_customer_any(id).await.unwrap().unwrap();
        assert!(customer.deleted_at.is_none(), "{id} kept");
    }
}

/// Four customers linked to Stripe, the first two deleted in ferry (their
/// deletes refused by Stripe and dead-lettered) and their records since
/// deleted in the dashboard: `(customer id, remote id)` of the four.
async fn two_of_four_deleted_everywhere(
    app: &SyncApp,
    stripe: &LocalStripe,
    proxy: &FaultProxy,
) -> Vec<(String, String)> {
    let mut linked = Vec::new();
    for n in 0..4 {
        let customer = app
            .create(json!({"email": email(&format!("gone-{n}")), "name": "Gone"}))
            .await;
        let id = customer["id"].as_str().unwrap().to_owned();
        let link = app.wait_link(&id, SETTLE, |l| l["state"] == "synced").await;
        linked.push((id, link["remote_id"].as_str().unwrap().to_owned()));
    }
    // A 400 is permanent: dead-lettered at once.
    for (id, remote_id) in &linked[..2] {
        proxy.push(
            Match::request("DELETE", &format!("/v1/customers/{remote_id}")),
            Fault::status(400),
        );
        app.delete(id).await;
        app.wait_link(id, SETTLE, |l| l["state"] == "dead").await;
        let deleted = reqwest::Client::new()
            .delete(format!("{}/v1/customers/{remote_id}", stripe.url()))
            .bearer_auth(STRIPE_KEY)
            .send()
            .await
            .expect("localstripe answers");
        assert!(deleted.status().is_success(), "{}", deleted.status());
    }
    linked
}

/// Under the `unlink` delete policy, a `merge` run still unlinks the gone
/// records of customers deleted already: the delete is the repair (closed
/// as needing nothing, the link stayed on a record that is gone, and every
/// run found the same orphan again).
async fn orphans_of_deleted_customers_are_unlinked_under_unlink(backend: Backend) {
    let stripe = LocalStripe::start().expect("localstripe");
    let proxy = FaultProxy::start(&stripe.url()).await.expect("proxy");
    let mut setup = Setup::new(backend, &proxy.url());
    setup.extra = json!({"inbound_delete_policy": "unlink", "reconcile_max_delete_share": 1.0});
    let app = spawn_sync_app(setup).await;
    two_of_four_deleted_everywhere(&app, &stripe, &proxy).await;
    let run = run_to_end(&app, json!({"connector": "stripe", "repair": "merge"})).await;
    assert_eq!(run["status"], "completed", "{run:#}");
    assert_eq!(counts(&run).get("orphan"), Some(&2), "{run:#}");
    assert_eq!(counts(&run).get("repairs"), Some(&2), "{run:#}");
    eventually("the gone records unlinked", || async {
        let run = run_to_end(&app, json!({"connector": "stripe"})).await;
        !counts(&run).contains_key("orphan")
    })
    .await;
}

/// Orphans of customers deleted in ferry already (their delete refused and
/// dead-lettered, the record deleted at the remote since) delete nothing,
/// and the brake does not count them. Found by every run, they set it off
/// for good, stopping every other repair of the connector.
async fn orphans_of_deleted_customers_do_not_set_the_brake_off(backend: Backend) {
    let stripe = LocalStripe::start().expect("localstripe");
    let proxy = FaultProxy::start(&stripe.url()).await.expect("proxy");
    let mut setup = Setup::new(backend, &proxy.url());
    setup.extra = json!({"reconcile_max_delete_share": 0.25});
    let app = spawn_sync_app(setup).await;
    let linked = two_of_four_deleted_everywhere(&app, &stripe, &proxy).await;
    // A live customer's record changed in the dashboard: the repair the
    // brake would have stopped.
    stripe_write(
        &stripe.url(),
        &format!("/v1/customers/{}", linked[2].1),
        &[("name", "Renamed There")],
    )
    .await;
    let run = run_to_end(&app, json!({"connector": "stripe", "repair": "merge"})).await;
    assert_eq!(run["status"], "completed", "{run:#}");
    let kinds = counts(&run);
    assert_eq!(kinds.get("orphan"), Some(&2), "{run:#}");
    assert_eq!(kinds.get("different"), Some(&1), "{run:#}");
    let renamed = &linked[2].0;
    eventually("the remote's rename applied", || async {
        app.store
            .get_customer_any(renamed)
            .await
            .unwrap()
            .is_some_and(|c| c.name.as_deref() == Some("Renamed There"))
    })
    .await;
    // Nor are they repairs: a delete of a deleted customer changes nothing,
    // and a create of one is skipped. Each was counted as a repair.
    assert_eq!(kinds.get("repairs"), Some(&1), "{run:#}");
    let run = run_to_end(&app, json!({"connector": "stripe", "repair": "push_local"})).await;
    assert_eq!(run["status"], "completed", "{run:#}");
    let kinds = counts(&run);
    assert_eq!(kinds.get("orphan"), Some(&2), "{run:#}");
    assert_eq!(kinds.get("repairs").copied().unwrap_or(0), 0, "{run:#}");
    let id = run["id"].as_str().unwrap();
    for orphan in findings(&app.base, id, Some("orphan")).await {
        assert!(
            orphan["repair"]
                .as_str()
                .is_some_and(|r| r.starts_with("nothing: the customer was deleted")),
            "{orphan}"
        );
    }
}

/// A listing that silently returns only part of the records (the fake
/// truncates its queries, as a changed sharing rule would) looks like many
/// deletes: the brake aborts the run before any repair, says so, and
/// nothing is deleted. The findings stay for a person.
async fn mass_delete_brake_stops_a_partial_listing(backend: Backend) {
    let (_stripe, salesforce, app) =
        salesforce_app(backend, json!({"reconcile_max_delete_share": 0.25})).await;
    let pairs = customers_with_contacts(&app, 8, "sf-brake").await;
    salesforce.truncate_queries(Some(3));

    let run = run_to_end(&app, json!({"connector": "salesforce", "repair": "merge"})).await;
    assert_eq!(run["status"], "aborted", "{run:#}");
    let error = run["error"].as_str().unwrap();
    assert!(
        error.contains("mass-delete brake") && error.contains("5 of 8"),
        "{error}"
    );
    expect_counts(&run, &[("equal", 3), ("orphan", 5)]);
    tokio::time::sleep(Duration::from_millis(500)).await;
    for (id, contact) in &pairs {
        assert!(
            app.store
                .get_customer_any(id)
                .await
                .unwrap()
                .unwrap()
                .deleted_at
                .is_none(),
            "{id} kept"
        );
        assert!(
            salesforce.record("Contact", contact).is_some(),
            "{contact} kept"
        );
    }
    let orphans = findings(&app.base, run["id"].as_str().unwrap(), Some("orphan")).await;
    assert!(orphans.iter().all(|o| o["state"] == "open"), "{orphans:?}");
    // A person looks, sees the listing was wrong, and dismisses one.
    let path = format!(
        "/api/v1/reconciliations/{}/mismatches/{}/resolve",
        run["id"].as_str().unwrap(),
        orphans[0]["id"].as_str().unwrap()
    );
    let (status, dismissed) = app
        .send(
            reqwest::Method::POST,
            &path,
            Some(json!({"action": "dismiss"})),
        )
        .await;
    assert_eq!(
        (status, dismissed["repair"].as_str()),
        (200, Some("dismissed")),
        "{dismissed}"
    );

    // The listing is whole again: nothing is missing.
    salesforce.truncate_queries(None);
    let whole = run_to_end(&app, json!({"connector": "salesforce", "repair": "merge"})).await;
    expect_counts(&whole, &[("equal", 8)]);
}

/// The real binary, SIGKILLed in the middle of listing 500 Stripe records
/// (each page held back by a proxy): the run is taken over from its last
/// committed page, not from zero, and the report counts every record once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_run_resumes_from_its_last_page() {
    let stripe = LocalStripe::start().expect("localstripe");
    let url = stripe.url();
    let client = reqwest::Client::new();
    for i in 0..500 {
        let address = format!("kill-{i}@example.com");
        let response = client
            .post(format!("{url}/v1/customers"))
            .bearer_auth(STRIPE_KEY)
            .form(&[("email", address.as_str())])
            .send()
            .await
            .expect("localstripe");
        assert!(response.status().is_success());
    }
    let proxy = FaultProxy::start(&url).await.expect("proxy");
    for _ in 0..20 {
        proxy.push(
            Match::request("GET", "/v1/customers"),
            Fault::ForwardThenDelay(Duration::from_millis(700)),
        );
    }
    let dir = tempfile::tempdir().expect("dir");
    let connectors = dir.path().join("connectors");
    std::fs::create_dir_all(&connectors).expect("dir");
    std::fs::copy(stripe_component(), connectors.join("stripe.wasm")).expect("copy");
    let env = BTreeMap::from([
        (
            "FERRY_DATABASE_URL".to_owned(),
            format!("sqlite://{}", dir.path().join("ferry.db").display()),
        ),
        (
            "FERRY_CONNECTORS_DIR".to_owned(),
            connectors.display().to_string(),
        ),
        ("FERRY_ALLOW_PRIVATE_HOSTS".to_owned(), "true".to_owned()),
        (
            "FERRY_CONNECTORS__STRIPE__SETTINGS__API_BASE".to_owned(),
            proxy.url(),
        ),
        (
            "FERRY_CONNECTORS__STRIPE__SECRETS__API_KEY".to_owned(),
            STRIPE_KEY.to_owned(),
        ),
        ("FERRY_CONNECTOR_CALL_TIMEOUT".to_owned(), "3s".to_owned()),
        ("FERRY_SYNC_LEASE".to_owned(), "5s".to_owned()),
    ]);
    let mut ferry = FerryProcess::start(env, dir.path()).await;
    let started: Value = client
        .post(format!("{}/api/v1/reconciliations", ferry.base))
        .json(&json!({"connector": "stripe"}))
        .send()
        .await
        .expect("ferry")
        .json()
        .await
        .expect("json");
    let id = started["id"].as_str().expect("a run id").to_owned();
    let deadline = tokio::time::Instant::now() + SETTLE;
    loop {
        let run = get_run(&ferry.base, &id).await;
        if run["progress"]["pages"].as_i64() >= Some(2) {
            assert_eq!(run["status"], "running", "killed mid-run: {run:#}");
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "no progress: {run:#}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    ferry.kill();
    let listed_before = proxy.requests_to("GET", "/v1/customers").len();
    ferry.restart().await;

    let run = wait_run(&ferry.base, &id).await;
    assert_eq!(run["status"], "completed", "{run:#}\n{}", ferry.log_text());
    assert_eq!(
        (
            run["progress"]["pages"].as_i64(),
            run["progress"]["records"].as_i64()
        ),
        (Some(5), Some(500)),
        "{run:#}"
    );
    expect_counts(&run, &[("missing_local", 500)]);
    let mut remote_ids: Vec<String> = findings(&ferry.base, &id, None)
        .await
        .into_iter()
        .map(|m| m["remote_id"].as_str().unwrap().to_owned())
        .collect();
    remote_ids.sort();
    remote_ids.dedup();
    assert_eq!(remote_ids.len(), 500, "every record once");
    // Resumed from a cursor: after the restart no page was asked for from
    // the start again.
    let requests = proxy.requests_to("GET", "/v1/customers");
    let from_start = requests[listed_before..]
        .iter()
        .filter(|r| !r.query.as_deref().unwrap_or("").contains("starting_after"))
        .count();
    assert_eq!(from_start, 0, "the resumed run started over");
}

/// Runs `check` against a ferry with `extra` configuration and a customer
/// linked to Stripe record `s1`, into which a webhook brings an unlinked
/// Stripe record `s2` with the same email.
async fn duplicate_email_delivery(
    stripe: &LocalStripe,
    backend: Backend,
    strategy: &str,
) -> (SyncApp, String, String, String) {
    duplicate_email_delivery_under(stripe, backend, strategy, "last_writer_wins").await
}

/// [`duplicate_email_delivery`] under conflict policy `policy`.
async fn duplicate_email_delivery_under(
    stripe: &LocalStripe,
    backend: Backend,
    strategy: &str,
    policy: &str,
) -> (SyncApp, String, String, String) {
    let mut setup = Setup::new(backend, &stripe.url());
    setup.extra = json!({
        "connectors": {"stripe": {"duplicate_email": strategy}},
        "conflict_policy": policy,
    });
    let app = spawn_sync_app(setup).await;
    let address = email(&format!("dup-{strategy}"));
    let customer = app.create(json!({"email": address, "name": "First"})).await;
    let id = customer["id"].as_str().unwrap().to_owned();
    app.wait_synced(&id, 1).await;
    let s2 = format!("cus_dup{}", uuid::Uuid::new_v4().simple());
    let body = event(
        &format!("evt_{s2}"),
        "customer.created",
        chrono::Utc::now().timestamp(),
        json!({"id": s2, "object": "customer", "email": address, "name": "Second", "metadata": {}}),
    );
    let (status, reply) = deliver(&app, &body, &stripe_signature(&body, WEBHOOK_SECRET)).await;
    assert_eq!(status, 200, "{reply}");
    let deadline = tokio::time::Instant::now() + SETTLE;
    loop {
        let events = app.store.inbox_of_remote("stripe", &s2).await.unwrap();
        if let Some(done) = events
            .iter()
            .find(|e| e.state.as_str() != "pending" && e.state.as_str() != "retry")
        {
            let detail = done.detail.clone().unwrap_or_default();
            return (app, id, s2, format!("{}: {detail}", done.state));
        }
        assert!(tokio::time::Instant::now() < deadline, "{events:?}");
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

/// The customer's open conflicts, as the API lists them.
async fn open_conflicts_of(app: &SyncApp, id: &str) -> Value {
    app.send(
        reqwest::Method::GET,
        &format!("/api/v1/conflicts?customer_id={id}&state=open"),
        None,
    )
    .await
    .1
}

/// Each duplicate-email strategy, for a Stripe record whose email belongs
/// to a customer already linked to another record.
async fn duplicate_email_strategies(backend: Backend) {
    let stripe = LocalStripe::start().expect("localstripe");

    let (app, id, _s2, outcome) = duplicate_email_delivery(&stripe, backend, "reject").await;
    assert!(
        outcome.starts_with("dead:") && outcome.contains("duplicate_email policy is reject"),
        "{outcome}"
    );
    assert!(outcome.contains(&id), "names the customer: {outcome}");
    drop(app);

    let (app, id, s2, outcome) = duplicate_email_delivery(&stripe, backend, "flag").await;
    assert!(outcome.starts_with("applied: flagged"), "{outcome}");
    let conflicts = open_conflicts_of(&app, &id).await;
    let conflict = &conflicts["data"][0];
    assert_eq!(conflict["policy"], "duplicate_email", "{conflicts:#}");
    assert!(
        conflict["fields"][0]["detail"]
            .as_str()
            .unwrap()
            .contains(&s2),
        "{conflict:#}"
    );
    assert!(
        app.store
            .link_by_remote_id("stripe", &s2)
            .await
            .unwrap()
            .is_none(),
        "left unlinked"
    );
    drop(app);

    let (app, id, s2, outcome) = duplicate_email_delivery(&stripe, backend, "merge").await;
    assert!(outcome.starts_with("applied: relinked"), "{outcome}");
    let link = app
        .store
        .link_by_remote_id("stripe", &s2)
        .await
        .unwrap()
        .expect("linked");
    assert_eq!(link.customer_id, id);
    drop(app);

    // Merged under the `flag` policy, the name both records set differently
    // waits for a person rather than keeping ferry's silently.
    let (app, id, _s2, outcome) =
        duplicate_email_delivery_under(&stripe, backend, "merge", "flag").await;
    assert!(outcome.starts_with("applied: relinked"), "{outcome}");
    let conflicts = open_conflicts_of(&app, &id).await;
    let fields = &conflicts["data"][0]["fields"];
    let name = fields
        .as_array()
        .and_then(|f| f.iter().find(|f| f["field"] == "name"))
        .unwrap_or_else(|| panic!("the name is flagged: {conflicts:#}"));
    assert_eq!(
        (&name["local"], &name["remote"]),
        (&json!("First"), &json!("Second"))
    );
    drop(app);

    let (app, id, s2, outcome) = duplicate_email_delivery(&stripe, backend, "auto_rename").await;
    assert!(
        outcome.starts_with("applied: created with the email rewritten"),
        "{outcome}"
    );
    let link = app
        .store
        .link_by_remote_id("stripe", &s2)
        .await
        .unwrap()
        .expect("linked");
    assert_ne!(link.customer_id, id);
    let renamed = app
        .store
        .get_customer_any(&link.customer_id)
        .await
        .unwrap()
        .unwrap();
    let first = app.store.get_customer_any(&id).await.unwrap().unwrap();
    // A plus-address on the first one's domain, that the API accepts (the
    // test's local part is long: the tag is a hash of it).
    assert_eq!(
        renamed.email,
        ferry::sync::inbound::renamed_email(&first.email, "stripe", &s2)
    );
    let (_, domain) = first.email.split_once('@').unwrap();
    assert!(renamed.email.ends_with(&format!("@{domain}")) && renamed.email.contains("+dup-"));
    assert!(
        ferry::api::customers::is_valid_email(&renamed.email),
        "{}",
        renamed.email
    );
    assert_eq!(renamed.name.as_deref(), Some("Second"));
}

/// `auto_rename` keeps the remote's email. The rewrite was taken for a
/// local change: the next edit of the record in Stripe pushed it over
/// Stripe's email, and so did every local edit of the customer kept apart.
async fn auto_rename_keeps_the_remote_email(backend: Backend) {
    let stripe = LocalStripe::start().expect("localstripe");
    let url = stripe.url();
    let mut setup = Setup::new(backend, &url);
    setup.extra = json!({"connectors": {"stripe": {"duplicate_email": "auto_rename"}}});
    let app = spawn_sync_app(setup).await;
    let address = email("kept-apart");
    let first = app.create(json!({"email": address, "name": "First"})).await;
    app.wait_synced(first["id"].as_str().unwrap(), 1).await;
    let s2 = stripe_create(&url, &[("email", &address), ("name", "Second")]).await;
    let now = chrono::Utc::now().timestamp();
    for (kind, at, name) in [
        ("customer.created", now, "Second"),
        ("customer.updated", now + 2, "Second Renamed"),
    ] {
        if kind == "customer.updated" {
            stripe_update(&url, &s2, &[("name", name)]).await;
        }
        let body = event(
            &format!("evt_{kind}_{s2}"),
            kind,
            at,
            json!({"id": s2, "object": "customer", "email": address, "name": name, "metadata": {}}),
        );
        let (status, reply) = deliver(&app, &body, &stripe_signature(&body, WEBHOOK_SECRET)).await;
        assert_eq!(status, 200, "{reply}");
        app.wait_inbox_settled("stripe", &s2, 1).await;
    }
    let kept = app
        .store
        .link_by_remote_id("stripe", &s2)
        .await
        .unwrap()
        .expect("linked")
        .customer_id;
    eventually("the edit in Stripe is applied", || async {
        app.store
            .get_customer_any(&kept)
            .await
            .unwrap()
            .is_some_and(|c| c.name.as_deref() == Some("Second Renamed"))
    })
    .await;
    app.wait_synced(&kept, 2).await;
    let remote = stripe_customer(&url, &s2).await.expect("in Stripe");
    assert_eq!(remote["email"], address.as_str(), "{remote:#}");

    // A local edit is pushed with Stripe's own email.
    app.patch(&kept, json!({"name": "Edited Here"})).await;
    app.wait_synced(&kept, 3).await;
    let remote = stripe_customer(&url, &s2).await.expect("in Stripe");
    assert_eq!(
        (remote["email"].as_str(), remote["name"].as_str()),
        (Some(address.as_str()), Some("Edited Here")),
        "{remote:#}"
    );
    let customer = app.store.get_customer_any(&kept).await.unwrap().unwrap();
    assert!(customer.email.contains("+dup-"), "{}", customer.email);
}

/// A customer made through the API from `fields`, once synced to Stripe:
/// its id and its Stripe record's.
async fn synced(app: &SyncApp, fields: Value) -> (String, String) {
    let customer = app.create(fields).await;
    let id = customer["id"].as_str().unwrap().to_owned();
    let link = app.wait_synced(&id, 1).await;
    (id, link["remote_id"].as_str().unwrap().to_owned())
}

/// Delivers the signed Stripe event `body` and waits until it, the only
/// event of record `remote_id`, is applied.
async fn delivered_and_applied(app: &SyncApp, body: &str, remote_id: &str) {
    let (status, reply) = deliver(app, body, &stripe_signature(body, WEBHOOK_SECRET)).await;
    assert_eq!(status, 200, "{reply}");
    let events = app.wait_inbox_settled("stripe", remote_id, 1).await;
    assert_eq!(events[0].state.as_str(), "applied", "{events:?}");
}

/// Field ownership under the `flag` policy: both sides changed name and
/// phone. Stripe owns the phone (its value is taken), ferry owns the name
/// (its value is kept and pushed back over Stripe's); neither is a conflict.
async fn field_owners_decide_before_the_conflict_policy(backend: Backend) {
    let stripe = LocalStripe::start().expect("localstripe");
    let proxy = FaultProxy::start(&stripe.url()).await.expect("proxy");
    let mut setup = Setup::new(backend, &proxy.url());
    setup.extra = json!({
        "conflict_policy": "flag",
        "field_owners": {"phone": "stripe", "name": "ferry"},
        "sync_max_attempts": 100,
    });
    let app = spawn_sync_app(setup).await;
    let address = email("owners");
    let (id, s1) = synced(
        &app,
        json!({"email": address, "name": "Ann", "phone": "+100"}),
    )
    .await;

    proxy.set_down(true);
    app.patch(&id, json!({"name": "Ann Local", "phone": "+101"}))
        .await;
    let body = event(
        "evt_owners",
        "customer.updated",
        chrono::Utc::now().timestamp() + 3,
        json!({"id": s1, "object": "customer", "email": address, "name": "Ann Remote", "phone": "+200", "metadata": {}}),
    );
    delivered_and_applied(&app, &body, &s1).await;
    let now = app.store.get_customer_any(&id).await.unwrap().unwrap();
    assert_eq!(
        (now.name.as_deref(), now.phone.as_deref()),
        (Some("Ann Local"), Some("+200"))
    );
    let (_, conflicts) = app
        .send(
            reqwest::Method::GET,
            &format!("/api/v1/conflicts?customer_id={id}"),
            None,
        )
        .await;
    assert_eq!(conflicts["data"], json!([]), "{conflicts:#}");

    proxy.set_down(false);
    eventually("Stripe has ferry's name and its own phone", || async {
        stripe_customer(&stripe.url(), &s1)
            .await
            .is_some_and(|c| c["name"] == "Ann Local" && c["phone"] == "+200")
    })
    .await;
}

/// The owner's event about another field does not revert an API write
/// of an owned one not yet pushed: Stripe owns the phone, ferry's API
/// changes it while Stripe is unreachable, and Stripe's dashboard renames
/// the customer (its event still holds the old phone). The phone was taken
/// back from the event, the link marked synced at the new version, and the
/// API's write skipped as synced: lost everywhere under a 200.
async fn an_owner_event_about_another_field_keeps_an_api_write(backend: Backend) {
    let stripe = LocalStripe::start().expect("localstripe");
    let proxy = FaultProxy::start(&stripe.url()).await.expect("proxy");
    let mut setup = Setup::new(backend, &proxy.url());
    setup.extra = json!({
        "field_owners": {"phone": "stripe"},
        "sync_max_attempts": 100,
    });
    let app = spawn_sync_app(setup).await;
    let address = email("owner-api");
    let (id, s1) = synced(
        &app,
        json!({"email": address, "name": "Ann", "phone": "+100"}),
    )
    .await;

    proxy.set_down(true);
    app.patch(&id, json!({"phone": "+101"})).await;
    let body = event(
        "evt_owner_rename",
        "customer.updated",
        chrono::Utc::now().timestamp() + 3,
        json!({"id": s1, "object": "customer", "email": address, "name": "Ann Renamed", "phone": "+100", "metadata": {}}),
    );
    delivered_and_applied(&app, &body, &s1).await;
    let now = app.store.get_customer_any(&id).await.unwrap().unwrap();
    assert_eq!(
        (now.name.as_deref(), now.phone.as_deref()),
        (Some("Ann Renamed"), Some("+101"))
    );

    proxy.set_down(false);
    eventually("Stripe has its own name and ferry's phone", || async {
        stripe_customer(&stripe.url(), &s1)
            .await
            .is_some_and(|c| c["name"] == "Ann Renamed" && c["phone"] == "+101")
    })
    .await;
}

/// Metadata removed in ferry is removed in Stripe (which merges metadata:
/// a key goes only when posted empty; it stayed there for good), and a key
/// another system set in Stripe just before ferry's push is taken in when
/// its event comes (the push's answer held it, the snapshot counted it as
/// agreed, and its event read as ferry having removed it: never taken in).
async fn metadata_removed_in_ferry_and_added_in_stripe_both_arrive(backend: Backend) {
    let stripe = LocalStripe::start().expect("localstripe");
    let app = spawn_sync_app(Setup::new(backend, &stripe.url())).await;
    let address = email("metadata");
    let (id, s1) = synced(
        &app,
        json!({"email": address, "name": "Ann", "metadata": {"tier": "gold"}}),
    )
    .await;

    // Another system sets a key in Stripe; its event has not reached ferry.
    let vip_at = chrono::Utc::now().timestamp();
    stripe_write(
        &stripe.url(),
        &format!("/v1/customers/{s1}"),
        &[("metadata[vip]", "yes")],
    )
    .await;
    app.patch(&id, json!({"metadata": {"tier": null}})).await;
    app.wait_synced(&id, 2).await;
    let there = stripe_customer(&stripe.url(), &s1).await.expect("there");
    assert!(
        there["metadata"]["tier"].as_str().is_none_or(str::is_empty),
        "removed in Stripe: {there}"
    );
    assert_eq!(there["metadata"]["vip"], "yes", "{there}");

    let body = event(
        "evt_vip",
        "customer.updated",
        vip_at,
        json!({"id": s1, "object": "customer", "email": address, "name": "Ann",
            "metadata": {"vip": "yes", "ferry_id": id}}),
    );
    delivered_and_applied(&app, &body, &s1).await;
    let now = app.store.get_customer_any(&id).await.unwrap().unwrap();
    assert_eq!(
        serde_json::to_value(&now.metadata).unwrap(),
        json!({"vip": "yes"}),
        "{now:?}"
    );
}

/// A phone someone sets in the Stripe dashboard just before ferry pushes a
/// new name: the push sends the name only, the phone stays at Stripe, and
/// its event (read again after the push, as any event so close to one)
/// brings it to ferry. The push sent the whole record: the phone was
/// unset at Stripe, and the event, read again, was taken for the push's
/// echo; lost on both sides.
/// `imported`: the customer came from Stripe (its link made by the
/// event), not from ferry: its first update names what it changes too.
async fn a_field_changed_in_stripe_just_before_a_push_stays(backend: Backend, imported: bool) {
    let stripe = LocalStripe::start().expect("localstripe");
    let app = spawn_sync_app(Setup::new(backend, &stripe.url())).await;
    let address = email("before-push");
    let (id, s1) = if imported {
        let s1 = stripe_create(&stripe.url(), &[("email", &address), ("name", "Ann")]).await;
        let body = event(
            "evt_imported",
            "customer.created",
            chrono::Utc::now().timestamp() - 5,
            json!({"id": s1, "object": "customer", "email": address, "name": "Ann",
                "metadata": {}}),
        );
        delivered_and_applied(&app, &body, &s1).await;
        let customer = app.wait_customer_by_email(&address).await;
        (customer["id"].as_str().unwrap().to_owned(), s1)
    } else {
        synced(&app, json!({"email": address, "name": "Ann"})).await
    };

    let phone_at = chrono::Utc::now().timestamp();
    stripe_write(
        &stripe.url(),
        &format!("/v1/customers/{s1}"),
        &[("phone", "+4930123")],
    )
    .await;
    app.patch(&id, json!({"name": "Ann Lee"})).await;
    app.wait_synced(&id, 2).await;
    let there = stripe_customer(&stripe.url(), &s1).await.expect("there");
    assert_eq!(
        (&there["name"], &there["phone"]),
        (&json!("Ann Lee"), &json!("+4930123")),
        "{there}"
    );

    let body = event(
        "evt_phone",
        "customer.updated",
        phone_at,
        json!({"id": s1, "object": "customer", "email": address, "name": "Ann",
            "phone": "+4930123", "metadata": {"ferry_id": id}}),
    );
    delivered_and_applied(&app, &body, &s1).await;
    let now = app.store.get_customer_any(&id).await.unwrap().unwrap();
    assert_eq!(
        (now.name.as_deref(), now.phone.as_deref()),
        (Some("Ann Lee"), Some("+4930123")),
        "{now:?}"
    );
    let link = app.wait_link(&id, SETTLE, |l| l["state"] == "synced").await;
    let there = stripe_customer(&stripe.url(), &s1).await.expect("there");
    assert_eq!(there["phone"], "+4930123", "{there} {link}");
}

/// A phone added in ferry whose push gave up (Stripe unreachable until
/// its attempts ran out) is a difference: the remote lacks a value the
/// local version set. It was reported `equal` (a field the remote does not
/// set read as one its system does not know), and no repair ever sent it.
/// `merge` pushes it.
async fn a_field_added_by_a_push_that_gave_up_is_a_difference(backend: Backend) {
    let stripe = LocalStripe::start().expect("localstripe");
    let proxy = FaultProxy::start(&stripe.url()).await.expect("proxy");
    let mut setup = Setup::new(backend, &proxy.url());
    setup.extra = json!({"sync_max_attempts": 2});
    let app = spawn_sync_app(setup).await;
    let customer = app
        .create(json!({"email": email("gave-up"), "name": "Gave Up"}))
        .await;
    let id = customer["id"].as_str().unwrap().to_owned();
    let link = app.wait_synced(&id, 1).await;
    let remote_id = link["remote_id"].as_str().unwrap().to_owned();

    proxy.set_down(true);
    app.patch(&id, json!({"phone": "+4930123"})).await;
    app.wait_link(&id, SETTLE, |l| l["state"] == "dead").await;
    proxy.set_down(false);

    let report = run_to_end(&app, json!({"connector": "stripe"})).await;
    expect_counts(&report, &[("different", 1)]);
    let different = findings(&app.base, report["id"].as_str().unwrap(), None).await;
    assert_eq!(different[0]["fields"][0]["field"], "phone", "{different:?}");

    let repaired = run_to_end(&app, json!({"connector": "stripe", "repair": "merge"})).await;
    expect_counts(&repaired, &[("different", 1), ("repairs", 1)]);
    eventually("Stripe has the phone", || async {
        stripe_customer(&stripe.url(), &remote_id)
            .await
            .is_some_and(|c| c["phone"] == "+4930123")
    })
    .await;
}

/// ferry (with `extra` configuration) and a localstripe that sends it its
/// signed webhooks.
async fn with_stripe_webhooks(backend: Backend, extra: Value) -> (LocalStripe, SyncApp) {
    let stripe = LocalStripe::start().expect("localstripe");
    let mut setup = Setup::new(backend, &stripe.url());
    setup.extra = extra;
    let app = spawn_sync_app(setup).await;
    app.receive_stripe_webhooks(&stripe).await;
    (stripe, app)
}

/// A customer Ann (phone +100) created through the API and pushed to
/// Stripe: her id and her Stripe id.
async fn ann_in_sync(app: &SyncApp) -> (String, String) {
    let customer = app
        .create(json!({"email": email("ann"), "name": "Ann", "phone": "+100"}))
        .await;
    let id = customer["id"].as_str().unwrap().to_owned();
    let link = app.wait_synced(&id, 1).await;
    (id, link["remote_id"].as_str().unwrap().to_owned())
}

/// A customer in sync is renamed in Stripe's dashboard, then renamed back
/// through ferry's API to the name ferry pushed first. That version's
/// record is the one ferry last pushed, but Stripe holds the dashboard's
/// name since: it is pushed, not skipped as "content unchanged since the
/// last push" (the webhook's apply forgets the last push's hash).
async fn a_change_back_to_the_last_push_is_pushed(backend: Backend) {
    let (stripe, app) = with_stripe_webhooks(backend, json!({})).await;
    let (id, s1) = ann_in_sync(&app).await;
    stripe_write(
        &stripe.url(),
        &format!("/v1/customers/{s1}"),
        &[("name", "Ann Remote")],
    )
    .await;
    eventually("ferry takes Stripe's name", || async {
        let now = app.store.get_customer_any(&id).await.unwrap().unwrap();
        now.name.as_deref() == Some("Ann Remote")
    })
    .await;
    app.wait_synced(&id, 2).await;

    app.patch(&id, json!({"name": "Ann"})).await;
    app.wait_synced(&id, 3).await;
    eventually("Stripe has the name back", || async {
        stripe_customer(&stripe.url(), &s1)
            .await
            .is_some_and(|c| c["name"] == "Ann")
    })
    .await;
}

/// Ferry owns the name of a customer in sync; Stripe's dashboard changes
/// its name and phone. Through localstripe's own signed webhook ferry takes
/// the phone, keeps its name, and pushes that version back. The link was
/// synced when the webhook came and nothing local was pending, so only the
/// apply's own write can schedule the push (the relay's intake leaves the
/// source connector's link to it).
async fn an_owned_field_changed_remotely_is_pushed_back(backend: Backend) {
    let (stripe, app) =
        with_stripe_webhooks(backend, json!({"field_owners": {"name": "ferry"}})).await;
    let (id, s1) = ann_in_sync(&app).await;

    stripe_write(
        &stripe.url(),
        &format!("/v1/customers/{s1}"),
        &[("name", "Ann Remote"), ("phone", "+200")],
    )
    .await;
    eventually("ferry takes Stripe's phone", || async {
        let now = app.store.get_customer_any(&id).await.unwrap().unwrap();
        now.phone.as_deref() == Some("+200")
    })
    .await;
    let now = app.store.get_customer_any(&id).await.unwrap().unwrap();
    assert_eq!((now.name.as_deref(), now.version), (Some("Ann"), 2));
    eventually(
        "Stripe has ferry's name back and keeps its phone",
        || async {
            stripe_customer(&stripe.url(), &s1)
                .await
                .is_some_and(|c| c["name"] == "Ann" && c["phone"] == "+200")
        },
    )
    .await;
    app.wait_synced(&id, 2).await;
}

/// The second a finding was written, as Stripe stamps an event: an edit
/// made then came after the listing the finding was read from.
fn found_second(finding: &Value) -> i64 {
    let at = finding["created_at"].as_str().expect("created_at");
    chrono::DateTime::parse_from_rfc3339(at)
        .expect("RFC 3339")
        .timestamp()
}

/// Delivers a signed `customer.updated` of `remote` at second `created`;
/// waits until it is applied or skipped and returns its detail.
async fn webhook_at(
    app: &SyncApp,
    id: &str,
    created: i64,
    remote: &str,
    customer: Value,
) -> String {
    let body = event(id, "customer.updated", created, customer);
    let (status, answer) = deliver(app, &body, &stripe_signature(&body, WEBHOOK_SECRET)).await;
    assert_eq!(status, 200, "{answer}");
    let settled = app.wait_inbox_settled("stripe", remote, 1).await;
    let delivered = settled.iter().find(|e| e.event_id == id).expect("stored");
    delivered.detail.clone().unwrap_or_default()
}

/// A resolution by hand whose process died after storing its event and
/// before describing it left its claim, opened again once stalled;
/// resolved again the same way, it stored a second event (the record
/// applied once more, over local edits made between). Once per action.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_finding_resolved_again_stores_its_event_once() {
    let stripe = LocalStripe::start().expect("localstripe");
    let url = stripe.url();
    let app = spawn_sync_app(Setup::new(Backend::Sqlite, &url)).await;
    let address = email("resolved-again");
    let remote = stripe_create(&url, &[("email", &address), ("name", "Only There")]).await;
    let run = run_to_end(&app, json!({"connector": "stripe", "repair": "report"})).await;
    let id = run["id"].as_str().expect("id").to_owned();
    let missing = findings(&app.base, &id, Some("missing_local")).await;
    let finding = missing
        .iter()
        .find(|f| f["remote_id"] == remote.as_str())
        .expect("the Stripe-only record")
        .clone();
    resolve_by_hand(&app, &id, &finding, "pull_remote").await;
    // What the stall sweep makes of a claim whose description never came.
    let reopen = format!(
        "UPDATE reconciliation_mismatches SET state = 'open', repair = NULL, \
         resolved_at = NULL WHERE id = '{}'",
        finding["id"].as_str().unwrap()
    );
    execute_raw(&app.database_url, &reopen, b"").await;
    resolve_by_hand(&app, &id, &finding, "pull_remote").await;
    app.wait_customer_by_email(&address).await;
    let events = app
        .store
        .inbox_of_remote("stripe", &remote)
        .await
        .expect("inbox");
    let by_hand: Vec<_> = events
        .iter()
        .filter(|e| e.event_id.starts_with(&format!("reconcile:{id}:")))
        .collect();
    assert_eq!(by_hand.len(), 1, "{events:?}");
}

/// A finding of an earlier run is not repaired while a newer run of its
/// connector goes (409 `reconciliation_running`, naming that run): the
/// newer run looks at the record again and may repair it itself. Before,
/// both repairs went, the older one over what the newer had moved past.
/// Dismissing it changes nothing, and is not held back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_finding_waits_for_a_newer_run_of_its_connector() {
    let stripe = LocalStripe::start().expect("localstripe");
    let proxy = FaultProxy::start(&stripe.url()).await.expect("proxy");
    let mut setup = Setup::new(Backend::Sqlite, &proxy.url());
    setup.extra = json!({"connector_call_timeout": "15s", "sync_lease": "20s"});
    let app = spawn_sync_app(setup).await;
    let customer = app
        .create(json!({"email": email("newer-run"), "name": "Ours"}))
        .await;
    let id = customer["id"].as_str().unwrap().to_owned();
    let remote = app.wait_synced(&id, 1).await["remote_id"]
        .as_str()
        .unwrap()
        .to_owned();
    stripe_update(&stripe.url(), &remote, &[("name", "Theirs")]).await;
    let report = run_to_end(&app, json!({"connector": "stripe"})).await;
    let report_id = report["id"].as_str().unwrap().to_owned();
    let finding = findings(&app.base, &report_id, Some("different")).await[0].clone();

    proxy.push(
        Match::request("GET", "/v1/customers"),
        Fault::ForwardThenDelay(Duration::from_secs(5)),
    );
    let listed = proxy.requests_to("GET", "/v1/customers").len();
    let newer = start_run(&app, json!({"connector": "stripe"})).await;
    let newer_id = newer["id"].as_str().unwrap().to_owned();
    eventually("the newer run lists", || async {
        proxy.requests_to("GET", "/v1/customers").len() > listed
    })
    .await;
    let (status, problem) = resolve(&app, &report_id, &finding, "push_local").await;
    assert_eq!(
        (status, problem["code"].as_str()),
        (409, Some("reconciliation_running")),
        "{problem}"
    );
    assert!(
        problem["detail"]
            .as_str()
            .unwrap_or_default()
            .contains(&newer_id),
        "{problem}"
    );
    let resolved = resolve_by_hand(&app, &report_id, &finding, "dismiss").await;
    assert_eq!(resolved["state"], "resolved", "{resolved}");
    wait_run(&app.base, &newer_id).await;
}

/// `POST …/mismatches/{id}/resolve` with `action`: the status and body.
async fn resolve(app: &SyncApp, run: &str, finding: &Value, action: &str) -> (u16, Value) {
    let path = format!(
        "/api/v1/reconciliations/{run}/mismatches/{}/resolve",
        finding["id"].as_str().unwrap()
    );
    app.send(
        reqwest::Method::POST,
        &path,
        Some(json!({"action": action})),
    )
    .await
}

/// [`resolve`], answered 200: the finding as resolved.
pub(crate) async fn resolve_by_hand(
    app: &SyncApp,
    run: &str,
    finding: &Value,
    action: &str,
) -> Value {
    let (status, resolved) = resolve(app, run, finding, action).await;
    assert_eq!(status, 200, "{resolved}");
    resolved
}

/// Resolves finding `finding` of run `run` with `action`; waits until the
/// repair's inbox event for `remote` is applied or skipped.
async fn resolve_and_settle(app: &SyncApp, run: &str, finding: &Value, action: &str, remote: &str) {
    let before = app
        .store
        .inbox_of_remote("stripe", remote)
        .await
        .expect("inbox")
        .len();
    let path = format!(
        "/api/v1/reconciliations/{run}/mismatches/{}/resolve",
        finding["id"].as_str().unwrap()
    );
    let (status, resolved) = app
        .send(
            reqwest::Method::POST,
            &path,
            Some(json!({"action": action})),
        )
        .await;
    assert_eq!(
        (status, resolved["state"].as_str()),
        (200, Some("resolved")),
        "{resolved}"
    );
    app.wait_inbox_settled("stripe", remote, before + 1).await;
}

/// A repair of a linked record reads it again before it applies: with
/// ferry's clock ahead of the remote's by more than the repair's second of
/// margin, an edit made after the listing was dated before the repair (its
/// webhook here dated two seconds before the finding), and the older
/// listed copy, applied over it, stayed on both sides.
async fn a_repair_reads_a_linked_record_again(backend: Backend) {
    let stripe = LocalStripe::start().expect("localstripe");
    let url = stripe.url();
    let app = spawn_sync_app(Setup::new(backend, &url)).await;
    let (ann, s_ann) = ann_in_sync(&app).await;
    // Past the echo window of ferry's push, the repair's second of margin
    // included: nothing is read again for being near it.
    tokio::time::sleep(Duration::from_millis(4_200)).await;
    stripe_update(&url, &s_ann, &[("name", "Ann Listed")]).await;
    let report = run_to_end(&app, json!({"connector": "stripe"})).await;
    expect_counts(&report, &[("different", 1)]);
    let run = report["id"].as_str().unwrap();
    let finding = findings(&app.base, run, Some("different")).await.remove(0);

    stripe_update(&url, &s_ann, &[("name", "Ann Skewed")]).await;
    let remote = json!({"id": s_ann, "object": "customer", "email": email("ann"),
        "name": "Ann Skewed", "phone": "+100", "metadata": {}});
    let detail = webhook_at(
        &app,
        "evt_ann_skewed",
        found_second(&finding) - 2,
        &s_ann,
        remote,
    )
    .await;
    let now = app.store.get_customer_any(&ann).await.unwrap().unwrap();
    assert_eq!(now.name.as_deref(), Some("Ann Skewed"), "{detail}");
    resolve_and_settle(&app, run, &finding, "pull_remote", &s_ann).await;
    let now = app.store.get_customer_any(&ann).await.unwrap().unwrap();
    assert_eq!(
        now.name.as_deref(),
        Some("Ann Skewed"),
        "the listed copy came back over a later edit"
    );
}

/// A repair carries the record as its listing read it, and is stamped
/// with the time of that read, not with the (later) time its finding was
/// written. Two edits made in Stripe after the listing, in the second the
/// findings were written, reach ferry by webhook:
/// - Ann's webhook applies before a person pulls the listed record:
///   the older listed name does not come back over it.
/// - Bob, imported from the listing, is renamed after it: the webhook
///   that follows the import is newer than the import and applies.
async fn a_repair_keeps_edits_made_after_its_listing(backend: Backend) {
    let stripe = LocalStripe::start().expect("localstripe");
    let url = stripe.url();
    let app = spawn_sync_app(Setup::new(backend, &url)).await;
    let (ann, s_ann) = ann_in_sync(&app).await;
    // Past the echo window of ferry's push: no event is re-fetched for it.
    tokio::time::sleep(Duration::from_millis(2_100)).await;
    stripe_update(&url, &s_ann, &[("name", "Ann Listed")]).await;
    let bob = email("bob");
    let s_bob = stripe_create(&url, &[("email", &bob), ("name", "Bob Listed")]).await;

    let report = run_to_end(&app, json!({"connector": "stripe"})).await;
    expect_counts(&report, &[("different", 1), ("missing_local", 1)]);
    let run = report["id"].as_str().unwrap();
    let ann_finding = findings(&app.base, run, Some("different")).await.remove(0);
    let bob_finding = findings(&app.base, run, Some("missing_local"))
        .await
        .remove(0);

    stripe_update(&url, &s_ann, &[("name", "Ann Newer")]).await;
    let ann_remote = json!({"id": s_ann, "object": "customer", "email": email("ann"),
        "name": "Ann Newer", "phone": "+100", "metadata": {}});
    let detail = webhook_at(
        &app,
        "evt_ann_newer",
        found_second(&ann_finding),
        &s_ann,
        ann_remote,
    )
    .await;
    let now = app.store.get_customer_any(&ann).await.unwrap().unwrap();
    assert_eq!(now.name.as_deref(), Some("Ann Newer"), "{detail}");
    // Two people pull it at once: one repair is scheduled, the other is
    // told the finding is no longer open.
    let before = app.store.inbox_of_remote("stripe", &s_ann).await.unwrap();
    let path = format!(
        "/api/v1/reconciliations/{run}/mismatches/{}/resolve",
        ann_finding["id"].as_str().unwrap()
    );
    let pull = || {
        app.send(
            reqwest::Method::POST,
            &path,
            Some(json!({"action": "pull_remote"})),
        )
    };
    let (first, second) = tokio::join!(pull(), pull());
    let mut answers = [
        (first.0, first.1["code"].as_str().map(str::to_owned)),
        (second.0, second.1["code"].as_str().map(str::to_owned)),
    ];
    answers.sort();
    assert_eq!(
        answers,
        [(200, None), (409, Some("mismatch_not_open".to_owned()))],
        "{first:?} {second:?}"
    );
    let events = app
        .wait_inbox_settled("stripe", &s_ann, before.len() + 1)
        .await;
    assert_eq!(events.len(), before.len() + 1, "one repair scheduled");
    let resolved = if first.0 == 200 { &first.1 } else { &second.1 };
    assert!(
        resolved["repair"]
            .as_str()
            .is_some_and(|r| r.starts_with("inbox event")),
        "{resolved}"
    );
    let now = app.store.get_customer_any(&ann).await.unwrap().unwrap();
    assert_eq!(
        now.name.as_deref(),
        Some("Ann Newer"),
        "the listed name came back over a newer webhook"
    );

    resolve_and_settle(&app, run, &bob_finding, "merge", &s_bob).await;
    let imported = app.wait_customer_by_email(&bob).await;
    assert_eq!(imported["name"], "Bob Listed");
    stripe_update(&url, &s_bob, &[("name", "Bob Newer")]).await;
    let bob_remote = json!({"id": s_bob, "object": "customer", "email": bob,
        "name": "Bob Newer", "metadata": {}});
    let detail = webhook_at(
        &app,
        "evt_bob_newer",
        found_second(&bob_finding),
        &s_bob,
        bob_remote,
    )
    .await;
    let now = app.customer_by_email(&bob).await.expect("bob");
    assert_eq!(
        now["name"], "Bob Newer",
        "the webhook after the import: {detail}"
    );
}

/// Starting a run: unknown and unready connectors, a bad body.
async fn starting_a_run_checks_its_request(backend: Backend) {
    let stripe = LocalStripe::start().expect("localstripe");
    let mut setup = Setup::new(backend, &stripe.url());
    setup.stripe_url = None;
    let app = spawn_sync_app(setup).await;
    let cases = [
        (json!({"connector": "nope"}), 404, "connector_not_found"),
        (json!({"connector": "stripe"}), 409, "connector_not_ready"),
        (
            json!({"connector": "stripe", "repair": "everything"}),
            422,
            "validation_failed",
        ),
        (
            json!({"connector": "stripe", "colour": "blue"}),
            422,
            "validation_failed",
        ),
    ];
    for (body, status, code) in cases {
        let (got, problem) = app
            .send(
                reqwest::Method::POST,
                "/api/v1/reconciliations",
                Some(body.clone()),
            )
            .await;
        assert_eq!(
            (got, problem["code"].as_str()),
            (status, Some(code)),
            "{body}: {problem}"
        );
    }
    let (status, problem) = app
        .send(
            reqwest::Method::GET,
            "/api/v1/reconciliations/rec_nope",
            None,
        )
        .await;
    assert_eq!(
        (status, problem["code"].as_str()),
        (404, Some("reconciliation_not_found"))
    );
    let (status, list) = app
        .send(reqwest::Method::GET, "/api/v1/reconciliations", None)
        .await;
    assert_eq!((status, &list["data"]), (200, &json!([])));
}

/// A customer missing in Stripe when it was listed, and pushed there since
/// (an edit after the connector's enable): resolving the finding with
/// `push_local` leaves the link's live record alone instead of making a
/// second Stripe customer beside it.
async fn a_repair_does_not_recreate_a_record_pushed_since(backend: Backend) {
    let stripe = LocalStripe::start().expect("localstripe");
    let url = stripe.url();
    let mut setup = Setup::new(backend, &url);
    setup.stripe_url = None;
    let app = spawn_sync_app(setup).await;
    let address = email("since");
    let customer = app.create(json!({"email": address, "name": "Early"})).await;
    let id = customer["id"].as_str().unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while app.store.outbox_events(id).await.unwrap()[0].queued {
        assert!(tokio::time::Instant::now() < deadline, "never relayed");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    configure_stripe(&app, &url).await;

    let report = run_to_end(&app, json!({"connector": "stripe"})).await;
    let run = report["id"].as_str().unwrap();
    let missing = &findings(&app.base, run, Some("missing_remote")).await[0];
    assert_eq!(missing["customer_id"], id, "{missing}");

    // Edited after the enable: pushed, so Stripe now has the customer.
    app.patch(id, json!({"name": "Edited"})).await;
    app.wait_synced(id, 2).await;
    assert_eq!(stripe_customers_by_email(&url, &address).await.len(), 1);

    // What the repair scheduled says it: a push over the linked record,
    // not a create (which a later look at Stripe could miss, if it ran
    // after the look).
    let resolved = resolve_by_hand(&app, run, missing, "push_local").await;
    let repair = resolved["repair"].as_str().unwrap_or("");
    assert!(
        repair.starts_with("push of version") || repair.starts_with("nothing"),
        "{resolved}"
    );
    app.wait_synced(id, 2).await;
    assert_eq!(
        stripe_customers_by_email(&url, &address).await.len(),
        1,
        "one Stripe customer for one ferry customer"
    );
}

/// A repairing run waits for the pushes that are due, not for work that
/// waits by itself: 600 changes queued for Salesforce while it is
/// switched off do not hold a Stripe run in its repair phase.
async fn a_run_does_not_wait_for_another_connectors_paused_work(backend: Backend) {
    use ferry::store::customers::WriteContext;
    use ferry::store::CustomerFields;
    let stripe = LocalStripe::start().expect("localstripe");
    let url = stripe.url();
    let mut setup = Setup::new(backend, &url);
    setup.stripe_url = None;
    setup.extra_connectors.push(ExtraConnector {
        name: "salesforce".to_owned(),
        component: salesforce_component(),
        config: json!({
            "enabled": false,
            "settings": {"login_url": "http://127.0.0.1:9", "organization_id": "00D000000000001"},
        }),
    });
    let app = spawn_sync_app(setup).await;
    // Switched on once before (else `enabled = false` leaves it
    // unconfigured, taking no changes): paused now.
    execute_raw(
        &app.database_url,
        "UPDATE connectors SET switched_on = TRUE, revision = revision + 1 \
         WHERE name = 'salesforce' AND $1 IS NOT NULL",
        b"",
    )
    .await;
    let deadline = tokio::time::Instant::now() + SETTLE;
    loop {
        let (_, connector) = app
            .send(reqwest::Method::GET, "/api/v1/connectors/salesforce", None)
            .await;
        if connector["state"] == "disabled" {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "{connector:#}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let mut last = String::new();
    for n in 0..600 {
        let fields = CustomerFields {
            name: Some("Waiting".to_owned()),
            email: email(&format!("paused{n}")),
            phone: None,
            address: None,
            metadata: BTreeMap::new(),
        };
        let customer = app
            .store
            .create_customer(fields, WriteContext::default())
            .await
            .expect("customer");
        last = customer.id.as_str().to_owned();
    }
    // Every change is queued for the switched-off Salesforce, and waits.
    app.wait_link_of("salesforce", &last, Duration::from_secs(30), |l| {
        l["state"] == "pending"
    })
    .await;
    configure_stripe(&app, &url).await;

    // pull_remote acts on none of the 600 `missing_remote` findings, but
    // its repair phase still runs, behind the back-pressure.
    let run = run_to_end(
        &app,
        json!({"connector": "stripe", "repair": "pull_remote"}),
    )
    .await;
    assert_eq!(run["status"], "completed", "{run:#}");
    expect_counts(&run, &[("missing_remote", 600)]);
}

/// A customer edited while a backfill lists is not created in Stripe beside
/// the record with its email that the backfill links it to: its create
/// waits for the run's end, and goes as what the link makes it (here
/// nothing more: the merge took the edit).
async fn an_edit_during_a_backfill_does_not_create_a_second_record(backend: Backend) {
    let stripe = LocalStripe::start().expect("localstripe");
    let url = stripe.url();
    let address = email("bf-edited");
    let remote = stripe_create(&url, &[("email", &address), ("name", "Remote Name")]).await;
    let proxy = FaultProxy::start(&url).await.expect("proxy");
    let mut setup = Setup::new(backend, &proxy.url());
    setup.stripe_url = None;
    setup.extra = json!({"connector_call_timeout": "15s", "sync_lease": "20s"});
    let app = spawn_sync_app(setup).await;
    let customer = app.create(json!({"email": address})).await;
    let id = customer["id"].as_str().unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while app.store.outbox_events(id).await.unwrap()[0].queued {
        assert!(tokio::time::Instant::now() < deadline, "{id} never relayed");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    configure_stripe(&app, &proxy.url()).await;
    // The listing's page is held while the customer is edited.
    proxy.push(
        Match::request("GET", "/v1/customers"),
        Fault::ForwardThenDelay(Duration::from_secs(3)),
    );
    let run = start_run(&app, json!({"connector": "stripe", "mode": "backfill"})).await;
    eventually("the listing started", || async {
        !proxy.requests_to("GET", "/v1/customers").is_empty()
    })
    .await;
    let edited = app.patch(id, json!({"name": "Edited Meanwhile"})).await;
    // Its sync status says why nothing went.
    app.wait_link(id, SETTLE, |l| {
        l["last_error"]
            .as_str()
            .is_some_and(|e| e.contains("backfill"))
    })
    .await;
    let run = wait_run(&app.base, run["id"].as_str().unwrap()).await;
    assert_eq!(run["status"], "completed", "{run:#}");
    expect_counts(&run, &[("unlinked", 1), ("repairs", 1)]);
    let link = app
        .wait_link(id, SETTLE, |l| {
            l["remote_id"] == remote.as_str() && l["state"] == "synced"
        })
        .await;
    assert!(
        link["synced_version"].as_i64() > edited["version"].as_i64(),
        "{link}"
    );
    // Linked as a first sync: the remote's name is the news
    // (`last_writer_wins` with no snapshot), and no second record exists.
    let customer = app.customer_by_email(&address).await.expect("customer");
    assert_eq!(customer["name"], "Remote Name", "{customer}");
    let records = stripe_customers_by_email(&url, &address).await;
    assert_eq!(records.len(), 1, "{records:#?}");
    assert!(
        proxy
            .requests_to("POST", "/v1/customers")
            .iter()
            .all(|r| r.path != "/v1/customers"),
        "a create was sent"
    );
}

/// A connector switched off while its run lists waits with the run: the
/// page in flight is still read and classified, but no repair is
/// scheduled (no Stripe-only record imported) until it is switched on.
/// Meanwhile the waiting run holds no place: with one run at a time, a
/// Salesforce run goes to its end.
async fn a_run_switched_off_mid_listing_repairs_nothing_until_on(backend: Backend) {
    let stripe = LocalStripe::start().expect("localstripe");
    let url = stripe.url();
    let address = email("paused-import");
    stripe_create(&url, &[("email", &address), ("name", "Only In Stripe")]).await;
    let proxy = FaultProxy::start(&url).await.expect("proxy");
    proxy.push(
        Match::request("GET", "/v1/customers"),
        Fault::ForwardThenDelay(Duration::from_secs(8)),
    );
    // The page is held long enough for the switch to land first on a busy
    // machine, within a call timeout that outlasts it.
    let mut setup = Setup::new(backend, &proxy.url());
    setup.extra = json!({
        "connector_call_timeout": "15s",
        "sync_lease": "20s",
        "reconcile_max_runs": 1,
    });
    let salesforce = FakeSalesforce::start(FakeSalesforceConfig::default())
        .await
        .expect("fake salesforce");
    setup.extra_connectors.push(salesforce_against(&salesforce));
    let app = spawn_sync_app(setup).await;
    let run = start_run(&app, json!({"connector": "stripe", "repair": "merge"})).await;
    let id = run["id"].as_str().unwrap();
    // The listing is on the wire; the operator switches Stripe off.
    eventually("the listing started", || async {
        !proxy.requests_to("GET", "/v1/customers").is_empty()
    })
    .await;
    let (status, _) = switch_stripe(&app, "disable").await;
    assert_eq!(status, 200);
    eventually("the run reached its repairs", || async {
        let run = get_run(&app.base, id).await;
        run["progress"]["phase"] == "repairing" || run["status"] != "running"
    })
    .await;
    tokio::time::sleep(Duration::from_millis(1_500)).await;
    assert_eq!(get_run(&app.base, id).await["status"], "running");
    assert!(
        app.customer_by_email(&address).await.is_none(),
        "imported while switched off"
    );
    let other = run_to_end(&app, json!({"connector": "salesforce"})).await;
    assert_eq!(other["status"], "completed", "{other:#}");
    assert_eq!(get_run(&app.base, id).await["status"], "running");

    // Switching on with a backfill while this run goes: refused before the
    // switch, which stays off (it was switched on and answered 409).
    let (status, problem) = switch_stripe(&app, "enable?backfill=true").await;
    assert_eq!(
        (status, problem["code"].as_str()),
        (409, Some("reconciliation_running")),
        "{problem}"
    );
    let (_, connector) = app
        .send(reqwest::Method::GET, "/api/v1/connectors/stripe", None)
        .await;
    assert_eq!(connector["enabled"], false, "{connector}");

    let (status, _) = switch_stripe(&app, "enable").await;
    assert_eq!(status, 200);
    let run = wait_run(&app.base, id).await;
    assert_eq!(run["status"], "completed", "{run:#}");
    app.wait_customer_by_email(&address).await;
}

/// An import carries the record as listed. The record deleted since (its
/// `customer.deleted` delivered, and skipped: nothing linked it) is not
/// brought back by a person pulling the finding afterwards.
async fn an_import_does_not_bring_back_a_record_deleted_since_its_listing(backend: Backend) {
    let gone = ListedThenDeleted::new(backend, "cy", "Cy Listed").await;
    let (app, run, finding) = (&gone.app, gone.run.as_str(), &gone.finding);
    let (cy, s_cy) = (&gone.email, &gone.remote_id);
    let listed = json!({"id": s_cy, "object": "customer", "email": cy, "name": "Cy Listed",
        "metadata": {}});
    let body = event(
        "evt_cy_deleted",
        "customer.deleted",
        found_second(finding) + 1,
        listed,
    );
    let (status, answer) = deliver(app, &body, &stripe_signature(&body, WEBHOOK_SECRET)).await;
    assert_eq!(status, 200, "{answer}");
    app.wait_inbox_settled("stripe", s_cy, 1).await;
    resolve_and_settle(app, run, finding, "merge", s_cy).await;
    assert_eq!(
        app.customer_by_email(cy).await,
        None,
        "the deleted record came back"
    );
}

/// A Stripe record a report run found `missing_local` (`finding`), then
/// deleted at Stripe without a webhook.
struct ListedThenDeleted {
    _stripe: LocalStripe,
    app: SyncApp,
    email: String,
    remote_id: String,
    run: String,
    finding: Value,
}

impl ListedThenDeleted {
    async fn new(backend: Backend, who: &str, name: &str) -> Self {
        let stripe = LocalStripe::start().expect("localstripe");
        let url = stripe.url();
        let app = spawn_sync_app(Setup::new(backend, &url)).await;
        let address = email(who);
        let remote_id = stripe_create(&url, &[("email", &address), ("name", name)]).await;
        let report = run_to_end(&app, json!({"connector": "stripe"})).await;
        expect_counts(&report, &[("missing_local", 1)]);
        let run = report["id"].as_str().unwrap().to_owned();
        let finding = findings(&app.base, &run, Some("missing_local"))
            .await
            .remove(0);
        stripe_delete(&url, &remote_id).await;
        Self {
            _stripe: stripe,
            app,
            email: address,
            remote_id,
            run,
            finding,
        }
    }
}

/// A record deleted since an old listing, and no delete ever sent (as
/// Salesforce sends none): a person pulling the finding days later does
/// not bring it back. The listed copy was applied as is: a customer made
/// of a record gone, then pushed to every other system.
async fn an_old_listing_is_read_again_before_an_import(backend: Backend) {
    let gone = ListedThenDeleted::new(backend, "dee", "Dee Listed").await;
    let (app, run, finding) = (&gone.app, gone.run.as_str(), &gone.finding);
    let (dee, s_dee) = (&gone.email, &gone.remote_id);
    // Listed two hours ago.
    let sql = format!(
        "UPDATE reconciliation_mismatches SET listed_at_ms = listed_at_ms - 7200000 \
         WHERE id = '{}' AND $1 IS NOT NULL",
        finding["id"].as_str().unwrap()
    );
    execute_raw(&app.database_url, &sql, b"").await;
    resolve_and_settle(app, run, finding, "merge", s_dee).await;
    assert_eq!(
        app.customer_by_email(dee).await,
        None,
        "the deleted record came back"
    );
    let events = app.store.inbox_of_remote("stripe", s_dee).await.unwrap();
    assert_eq!(events[0].state.as_str(), "skipped", "{events:?}");
}

/// `push_local` on a record matched by email (`unlinked`): make the
/// remote match ferry. The link is made, ferry's name stands and reaches
/// Stripe; Stripe's phone, which ferry lacked, fills the gap. Before, the
/// first sync took every differing remote value, so ferry's customer took
/// Stripe's name and Stripe kept it.
async fn push_local_links_an_unlinked_record_keeping_ferrys_values(backend: Backend) {
    let stripe = LocalStripe::start().expect("localstripe");
    let url = stripe.url();
    let mut setup = Setup::new(backend, &url);
    setup.stripe_url = None;
    let app = spawn_sync_app(setup).await;
    let ann = email("ann-local");
    let local = app
        .create(json!({"email": ann, "name": "Ann Lovelace"}))
        .await;
    let id = local["id"].as_str().unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while app.store.outbox_events(id).await.unwrap()[0].queued {
        assert!(tokio::time::Instant::now() < deadline, "never relayed");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let s_ann = stripe_create(
        &url,
        &[("email", &ann), ("name", "Ann"), ("phone", "+15550002")],
    )
    .await;
    configure_stripe(&app, &url).await;
    let report = run_to_end(&app, json!({"connector": "stripe"})).await;
    expect_counts(&report, &[("unlinked", 1)]);
    let run = report["id"].as_str().unwrap();
    let finding = findings(&app.base, run, Some("unlinked")).await.remove(0);
    resolve_by_hand(&app, run, &finding, "push_local").await;
    app.wait_link(id, SETTLE, |l| {
        l["remote_id"] == s_ann.as_str() && l["state"] == "synced"
    })
    .await;
    eventually("Stripe took ferry's name", || async {
        stripe_customer(&url, &s_ann)
            .await
            .is_some_and(|c| c["name"] == "Ann Lovelace")
    })
    .await;
    let now = app.customer_by_email(&ann).await.expect("ann");
    assert_eq!(now["name"], "Ann Lovelace", "{now}");
    assert_eq!(now["phone"], "+15550002", "{now}");
}

/// Two Stripe records with one email, under the `merge` strategy: the
/// first run links the customer to one of them. The next finds the other
/// a duplicate of a customer linked to a live record, and leaves it open
/// for a person; before, it moved the link to it, the run after moved it
/// back, each move a merge fanned out.
async fn a_merged_duplicate_does_not_move_the_link_on_every_run(backend: Backend) {
    let stripe = LocalStripe::start().expect("localstripe");
    let url = stripe.url();
    let mut setup = Setup::new(backend, &url);
    setup.stripe_url = None;
    setup.extra = json!({"connectors": {"stripe": {"duplicate_email": "merge"}}});
    let app = spawn_sync_app(setup).await;
    let cee = email("cee");
    let one = stripe_create(&url, &[("email", &cee), ("name", "Cee One")]).await;
    let two = stripe_create(&url, &[("email", &cee), ("name", "Cee Two")]).await;
    configure_stripe(&app, &url).await;
    let first = run_to_end(&app, json!({"connector": "stripe", "repair": "merge"})).await;
    expect_counts(&first, &[("duplicate", 2), ("repairs", 2)]);
    app.wait_inbox_settled("stripe", &one, 1).await;
    app.wait_inbox_settled("stripe", &two, 1).await;
    let customer = app.wait_customer_by_email(&cee).await;
    let id = customer["id"].as_str().unwrap().to_owned();
    let linked = app
        .wait_link(&id, SETTLE, |l| {
            l["state"] == "synced" && !l["remote_id"].is_null()
        })
        .await;
    let before = app.store.get_customer_any(&id).await.unwrap().unwrap();

    let second = run_to_end(&app, json!({"connector": "stripe", "repair": "merge"})).await;
    expect_counts(&second, &[("duplicate", 1), ("equal", 1)]);
    let open = findings(&app.base, second["id"].as_str().unwrap(), Some("duplicate")).await;
    assert_eq!(open[0]["state"], "open", "{open:?}");
    tokio::time::sleep(Duration::from_millis(500)).await;
    let after = app.store.get_customer_any(&id).await.unwrap().unwrap();
    let link = app.wait_link(&id, SETTLE, |_| true).await;
    assert_eq!(link["remote_id"], linked["remote_id"], "the link moved");
    assert_eq!(after.version, before.version, "merged again");
}

mod sqlite {
    use super::*;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn backfill() {
        backfill_links_imports_and_pushes(Backend::Sqlite).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn creates_that_waited_for_the_switch_wait_for_its_backfill() {
        super::creates_that_waited_for_the_switch_wait_for_its_backfill(Backend::Sqlite).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_parked_backfill_goes_with_the_switch() {
        super::a_parked_backfill_goes_with_the_switch(Backend::Sqlite).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_orphan_is_not_recreated_beside_a_record_with_its_email() {
        super::an_orphan_is_not_recreated_beside_a_record_with_its_email(Backend::Sqlite).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_waiting_link_a_backfill_fills_sends_its_changes_alone() {
        super::a_waiting_link_a_backfill_fills_sends_its_changes_alone(Backend::Sqlite).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn drift() {
        drift_is_found_reported_and_repaired(Backend::Sqlite).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn salesforce_delete() {
        salesforce_delete_is_an_orphan(Backend::Sqlite).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn salesforce_record_out_of_reach() {
        a_salesforce_record_out_of_reach_is_not_deleted(Backend::Sqlite).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn mass_delete_brake() {
        mass_delete_brake_stops_a_partial_listing(Backend::Sqlite).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn ignored_orphans_stay_open() {
        orphans_the_delete_policy_ignores_stay_open(Backend::Sqlite).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_field_added_by_a_push_that_gave_up() {
        a_field_added_by_a_push_that_gave_up_is_a_difference(Backend::Sqlite).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn duplicate_emails() {
        duplicate_email_strategies(Backend::Sqlite).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn auto_rename_keeps_the_remote_email() {
        super::auto_rename_keeps_the_remote_email(Backend::Sqlite).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn field_owners() {
        field_owners_decide_before_the_conflict_policy(Backend::Sqlite).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn metadata_removed_in_ferry_and_added_in_stripe_both_arrive() {
        super::metadata_removed_in_ferry_and_added_in_stripe_both_arrive(Backend::Sqlite).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_field_changed_in_stripe_just_before_a_push_stays() {
        super::a_field_changed_in_stripe_just_before_a_push_stays(Backend::Sqlite, false).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_field_changed_in_stripe_just_before_a_first_push_stays() {
        super::a_field_changed_in_stripe_just_before_a_push_stays(Backend::Sqlite, true).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_owner_event_about_another_field_keeps_an_api_write() {
        super::an_owner_event_about_another_field_keeps_an_api_write(Backend::Sqlite).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn owned_field_pushed_back() {
        an_owned_field_changed_remotely_is_pushed_back(Backend::Sqlite).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn change_back_to_the_last_push() {
        a_change_back_to_the_last_push_is_pushed(Backend::Sqlite).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn repair_keeps_later_edits() {
        a_repair_keeps_edits_made_after_its_listing(Backend::Sqlite).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn repair_reads_again() {
        a_repair_reads_a_linked_record_again(Backend::Sqlite).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn import_after_a_delete() {
        an_import_does_not_bring_back_a_record_deleted_since_its_listing(Backend::Sqlite).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn push_local_on_unlinked() {
        push_local_links_an_unlinked_record_keeping_ferrys_values(Backend::Sqlite).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn merged_duplicate_stays() {
        a_merged_duplicate_does_not_move_the_link_on_every_run(Backend::Sqlite).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn bad_requests() {
        starting_a_run_checks_its_request(Backend::Sqlite).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn no_second_record() {
        a_repair_does_not_recreate_a_record_pushed_since(Backend::Sqlite).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn switched_off_mid_listing() {
        a_run_switched_off_mid_listing_repairs_nothing_until_on(Backend::Sqlite).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn edited_during_a_backfill() {
        an_edit_during_a_backfill_does_not_create_a_second_record(Backend::Sqlite).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn orphan_still_there() {
        an_orphan_the_remote_still_has_is_not_deleted(Backend::Sqlite).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_orphan_the_remote_still_has_is_not_recreated() {
        super::an_orphan_the_remote_still_has_is_not_recreated(Backend::Sqlite).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_orphan_the_run_finds_there_is_no_repair() {
        super::an_orphan_the_run_finds_there_is_no_repair(Backend::Sqlite).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn orphans_of_deleted_customers_do_not_set_the_brake_off() {
        super::orphans_of_deleted_customers_do_not_set_the_brake_off(Backend::Sqlite).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_step_of_slow_reads_keeps_its_lease() {
        super::a_step_of_slow_reads_keeps_its_lease(Backend::Sqlite).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn orphans_of_deleted_customers_are_unlinked_under_unlink() {
        super::orphans_of_deleted_customers_are_unlinked_under_unlink(Backend::Sqlite).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_failed_run_counts_its_findings() {
        super::a_failed_run_counts_its_findings(Backend::Sqlite).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_shutdown_stops_a_repair_step() {
        super::a_shutdown_stops_a_repair_step(Backend::Sqlite).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_old_listing_is_read_again_before_an_import() {
        super::an_old_listing_is_read_again_before_an_import(Backend::Sqlite).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn listed_again() {
        a_record_listed_again_is_not_recreated_beside_itself(Backend::Sqlite).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn restored_after_a_delete() {
        super::a_record_restored_after_its_customer_was_deleted_is_found(Backend::Sqlite).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn paused_work_elsewhere() {
        a_run_does_not_wait_for_another_connectors_paused_work(Backend::Sqlite).await;
    }
}

mod postgres {
    use super::*;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_field_changed_in_stripe_just_before_a_push_stays() {
        super::a_field_changed_in_stripe_just_before_a_push_stays(Backend::Postgres, false).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_field_changed_in_stripe_just_before_a_first_push_stays() {
        super::a_field_changed_in_stripe_just_before_a_push_stays(Backend::Postgres, true).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn backfill() {
        backfill_links_imports_and_pushes(Backend::Postgres).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_waiting_link_a_backfill_fills_sends_its_changes_alone() {
        super::a_waiting_link_a_backfill_fills_sends_its_changes_alone(Backend::Postgres).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn drift() {
        drift_is_found_reported_and_repaired(Backend::Postgres).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn no_second_record() {
        a_repair_does_not_recreate_a_record_pushed_since(Backend::Postgres).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn switched_off_mid_listing() {
        a_run_switched_off_mid_listing_repairs_nothing_until_on(Backend::Postgres).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn edited_during_a_backfill() {
        an_edit_during_a_backfill_does_not_create_a_second_record(Backend::Postgres).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn orphan_still_there() {
        an_orphan_the_remote_still_has_is_not_deleted(Backend::Postgres).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_orphan_the_remote_still_has_is_not_recreated() {
        super::an_orphan_the_remote_still_has_is_not_recreated(Backend::Postgres).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_orphan_the_run_finds_there_is_no_repair() {
        super::an_orphan_the_run_finds_there_is_no_repair(Backend::Postgres).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn orphans_of_deleted_customers_do_not_set_the_brake_off() {
        super::orphans_of_deleted_customers_do_not_set_the_brake_off(Backend::Postgres).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn listed_again() {
        a_record_listed_again_is_not_recreated_beside_itself(Backend::Postgres).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn restored_after_a_delete() {
        super::a_record_restored_after_its_customer_was_deleted_is_found(Backend::Postgres).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn paused_work_elsewhere() {
        a_run_does_not_wait_for_another_connectors_paused_work(Backend::Postgres).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn mass_delete_brake() {
        mass_delete_brake_stops_a_partial_listing(Backend::Postgres).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn ignored_orphans_stay_open() {
        orphans_the_delete_policy_ignores_stay_open(Backend::Postgres).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_field_added_by_a_push_that_gave_up() {
        a_field_added_by_a_push_that_gave_up_is_a_difference(Backend::Postgres).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn duplicate_emails() {
        duplicate_email_strategies(Backend::Postgres).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn auto_rename_keeps_the_remote_email() {
        super::auto_rename_keeps_the_remote_email(Backend::Postgres).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn field_owners() {
        field_owners_decide_before_the_conflict_policy(Backend::Postgres).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn owned_field_pushed_back() {
        an_owned_field_changed_remotely_is_pushed_back(Backend::Postgres).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn change_back_to_the_last_push() {
        a_change_back_to_the_last_push_is_pushed(Backend::Postgres).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn repair_keeps_later_edits() {
        a_repair_keeps_edits_made_after_its_listing(Backend::Postgres).await;
    }
}
