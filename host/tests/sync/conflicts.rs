//! Concurrent local and remote edits: different fields merge; the same
//! field is a conflict the policy decides, and `flag` holds the link until a
//! person resolves it through the API.

use std::process::Command;
use std::time::Duration;

use ferry_test_support::fault_proxy::{Fault, FaultProxy, Match};
use ferry_test_support::localstripe::{venv_python, LocalStripe};
use serde_json::{json, Value};

use crate::helpers::{
    email, execute_raw, spawn_sync_app, stripe_create, stripe_customer, Backend, Setup, SyncApp,
    STRIPE_KEY,
};

struct Harness {
    stripe: LocalStripe,
    proxy: FaultProxy,
    app: SyncApp,
    id: String,
    remote_id: String,
}

/// A customer synced to Stripe, with localstripe's webhooks going to ferry,
/// ferry's pushes going through a proxy that can be taken down, and enough
/// time passed that the next remote event is not mistaken for an echo.
async fn synced_customer(policy: &str) -> Harness {
    synced_customer_on(Backend::Sqlite, policy).await
}

/// [`synced_customer`] on `backend`.
async fn synced_customer_on(backend: Backend, policy: &str) -> Harness {
    synced_customer_with(
        backend,
        json!({"conflict_policy": policy, "sync_max_attempts": 100}),
    )
    .await
}

/// [`synced_customer`] on `backend`, with the configuration `extra`.
async fn synced_customer_with(backend: Backend, extra: Value) -> Harness {
    synced_customer_watched(backend, extra, true).await
}

/// [`synced_customer`] under `flag`, with no webhooks from localstripe: a
/// test sends the remote's events itself.
async fn synced_customer_unwatched() -> Harness {
    synced_customer_watched(
        Backend::Sqlite,
        json!({"conflict_policy": "flag", "sync_max_attempts": 100}),
        false,
    )
    .await
}

/// [`synced_customer_with`], receiving localstripe's webhooks if `webhooks`.
async fn synced_customer_watched(backend: Backend, extra: Value, webhooks: bool) -> Harness {
    let stripe = LocalStripe::start().expect("localstripe");
    let proxy = FaultProxy::start(&stripe.url()).await.expect("proxy");
    let mut setup = Setup::new(backend, &proxy.url());
    setup.extra = extra;
    // These tests fail pushes on purpose while the remote is read: reads
    // go through the connector's breaker with the pushes, which would open
    // it and hold the reads for a cool-down.
    if let Some(extra) = setup.extra.as_object_mut() {
        extra
            .entry("breaker_failure_threshold")
            .or_insert(json!(1000));
    }
    let app = spawn_sync_app(setup).await;
    if webhooks {
        app.receive_stripe_webhooks(&stripe).await;
    }
    let customer = app
        .create(json!({"email": email("conflict"), "name": "Original", "phone": "+15550000001"}))
        .await;
    let id = customer["id"].as_str().unwrap().to_owned();
    let link = app.wait_synced(&id, 1).await;
    let remote_id = link["remote_id"].as_str().unwrap().to_owned();
    // Stripe's event times are whole seconds; ferry re-fetches events close
    // to its own last push (possible echoes). Step past that window.
    tokio::time::sleep(Duration::from_millis(3_200)).await;
    Harness {
        stripe,
        proxy,
        app,
        id,
        remote_id,
    }
}

/// Edits the customer in Stripe as a dashboard user would.
pub(crate) fn edit_in_stripe(stripe_url: &str, remote_id: &str, field: &str, value: &str) {
    edit_fields_in_stripe(stripe_url, remote_id, &[(field, value)]);
}

/// Edits several fields of the customer in Stripe at once (one event).
pub(crate) fn edit_fields_in_stripe(stripe_url: &str, remote_id: &str, fields: &[(&str, &str)]) {
    let fields: Vec<String> = fields
        .iter()
        .map(|(field, value)| format!("{field}='{value}'"))
        .collect();
    modify_in_stripe(stripe_url, remote_id, &fields.join(", "));
}

/// `stripe.Customer.modify(remote_id, ARGUMENTS)`, `arguments` as Python.
pub(crate) fn modify_in_stripe(stripe_url: &str, remote_id: &str, arguments: &str) {
    let script = format!(
        "import stripe\nstripe.api_key = '{STRIPE_KEY}'\nstripe.api_base = '{stripe_url}'\n\
         stripe.Customer.modify('{remote_id}', {arguments})"
    );
    let out = Command::new(venv_python().unwrap())
        .arg("-c")
        .arg(script)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

async fn customer(app: &SyncApp, id: &str) -> Value {
    app.send(
        reqwest::Method::GET,
        &format!("/api/v1/customers/{id}"),
        None,
    )
    .await
    .1
}

async fn wait_customer(app: &SyncApp, id: &str, done: impl Fn(&Value) -> bool) -> Value {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    loop {
        let current = customer(app, id).await;
        if done(&current) {
            return current;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "customer never reached the state: {current:#}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn conflicts(app: &SyncApp, query: &str) -> Vec<Value> {
    let (status, page) = app
        .send(
            reqwest::Method::GET,
            &format!("/api/v1/conflicts{query}"),
            None,
        )
        .await;
    assert_eq!(status, 200, "{page}");
    page["data"].as_array().cloned().unwrap_or_default()
}

/// Waits until a remote event of `h`'s record waits behind the open
/// conflict's hold.
async fn wait_until_an_edit_waits(h: &Harness) {
    wait_until_held(&h.app, &h.remote_id).await;
}

/// Waits until an event of Stripe record `remote_id` waits behind an open
/// conflict's hold.
async fn wait_until_held(app: &SyncApp, remote_id: &str) {
    app.wait_inbox(remote_id, |inbox| {
        inbox.iter().any(|e| {
            e.detail
                .as_deref()
                .is_some_and(|d| d.contains("held by open conflict"))
        })
    })
    .await;
}

/// `POST /api/v1/conflicts/{id}/resolve` with `body`: the status and answer.
async fn resolve(app: &SyncApp, conflict: &Value, body: Value) -> (u16, Value) {
    let path = format!(
        "/api/v1/conflicts/{}/resolve",
        conflict["id"].as_str().unwrap()
    );
    app.send(reqwest::Method::POST, &path, Some(body)).await
}

/// Waits until the customer is synced at `version`; asserts Stripe's name
/// and phone then.
async fn assert_stripe_has(h: &Harness, version: i64, name: &str, phone: &str) {
    h.app.wait_synced(&h.id, version).await;
    let remote = stripe_customer(&h.stripe.url(), &h.remote_id)
        .await
        .unwrap();
    assert_eq!(
        (remote["name"].as_str(), remote["phone"].as_str()),
        (Some(name), Some(phone)),
        "{remote}"
    );
}

/// Resolves `conflict` keeping ferry's name ("Local Name"); waits until the
/// customer also holds the phone the remote changed meanwhile
/// (+15550000009), and Stripe both.
async fn keeps_the_local_name_and_the_remote_phone(h: &Harness, conflict: &Value) {
    let (status, resolved) = resolve(&h.app, conflict, json!({"resolution": "local"})).await;
    assert_eq!(status, 200, "{resolved}");
    let settled = wait_customer(&h.app, &h.id, |c| c["phone"] == "+15550000009").await;
    assert_eq!(settled["name"], "Local Name", "{settled}");
    let version = settled["version"].as_i64().unwrap();
    assert_stripe_has(h, version, "Local Name", "+15550000009").await;
}

/// With Stripe unreachable for pushes, the name is changed in ferry
/// ("Local Name") and in Stripe's dashboard ("Remote Name"): a conflict.
async fn name_edited_on_both_sides(h: &Harness) {
    h.proxy.set_down(true);
    h.app.patch(&h.id, json!({"name": "Local Name"})).await;
    // Its push fails first: the remote's edit, taken before it, would find
    // the push not yet tried (its outcome known, unlike a failed one's).
    h.app.failed_stripe_link(&h.id).await;
    edit_in_stripe(&h.stripe.url(), &h.remote_id, "name", "Remote Name");
}

/// The Stripe connector's inbox counts in `GET /api/v1/health`.
async fn stripe_inbox(app: &SyncApp) -> Value {
    let (status, health) = app.send(reqwest::Method::GET, "/api/v1/health", None).await;
    assert_eq!(status, 200, "{health}");
    health["connectors"]
        .as_array()
        .and_then(|c| c.iter().find(|c| c["connector"] == "stripe"))
        .map(|c| c["inbox"].clone())
        .expect("stripe in health")
}

/// Waits for the first open conflict.
async fn open_conflict(app: &SyncApp) -> Value {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    loop {
        if let Some(c) = conflicts(app, "?state=open").await.into_iter().next() {
            return c;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "no conflict recorded"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Lets go of the customer's Stripe record while a conflict holds its link
/// (as a reconciliation's recreate does); its email.
async fn let_go_of_its_record(h: &Harness) -> String {
    let release = format!(
        "UPDATE sync_links SET remote_id = NULL WHERE customer_id = '{}' AND connector = 'stripe'",
        h.id
    );
    execute_raw(&h.app.database_url, &release, b"").await;
    customer(&h.app, &h.id).await["email"]
        .as_str()
        .expect("email")
        .to_owned()
}

/// A link a conflict holds whose record was let go (a reconciliation's
/// recreate clears it): another Stripe record with the customer's email
/// waits for the person too. Its first sync met the hold at its write and
/// was decided again and again, then retried until dead-lettered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_record_for_a_held_link_it_would_take_waits() {
    let h = synced_customer("flag").await;
    name_edited_on_both_sides(&h).await;
    open_conflict(&h.app).await;
    let email = let_go_of_its_record(&h).await;
    let other = stripe_create(
        &h.stripe.url(),
        &[("email", &email), ("name", "Another Record")],
    )
    .await;
    wait_until_held(&h.app, &other).await;
}

/// The same for a linked record whose email changes to the held
/// customer's, under `merge`: it waits too. The merge looked for a hold on
/// a link with a live record only, so it met the hold at its write again
/// and again (or, with no conflict of its own, moved the held link).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_record_merged_into_a_held_link_waits() {
    let h = synced_customer_with(
        Backend::Sqlite,
        json!({"conflict_policy": "flag", "duplicate_email_policy": "merge",
               "sync_max_attempts": 100}),
    )
    .await;
    let other = h
        .app
        .create(json!({"email": email("merged-away"), "name": "Another Name"}))
        .await;
    let other_id = other["id"].as_str().expect("id");
    let other_remote = h.app.wait_synced(other_id, 1).await["remote_id"]
        .as_str()
        .expect("linked")
        .to_owned();
    name_edited_on_both_sides(&h).await;
    open_conflict(&h.app).await;
    // The edit below is read again from Stripe (its record was pushed a
    // moment ago: it may be that push's echo).
    h.proxy.set_down(false);
    let email = let_go_of_its_record(&h).await;
    edit_in_stripe(&h.stripe.url(), &other_remote, "email", &email);
    wait_until_held(&h.app, &other_remote).await;
}

/// A customer deleted while a conflict holds its Stripe link: the conflict
/// has nothing left to decide and closes with the delete, which reaches
/// Stripe. (A held link is never pushed, and a deleted customer's conflict
/// cannot be resolved, so the link stayed held and Stripe kept the record.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deleting_a_customer_closes_its_conflicts() {
    let h = synced_customer("flag").await;
    name_edited_on_both_sides(&h).await;
    let conflict = open_conflict(&h.app).await;
    h.proxy.set_down(false);
    edit_in_stripe(&h.stripe.url(), &h.remote_id, "phone", "+15550000009");
    wait_until_an_edit_waits(&h).await;

    h.app.delete(&h.id).await;
    // The edit the conflict held is woken with the delete, not at its
    // next look.
    assert_eq!(stripe_inbox(&h.app).await["held"], 0);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    while stripe_customer(&h.stripe.url(), &h.remote_id)
        .await
        .is_some()
    {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the delete never reached Stripe"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(conflicts(&h.app, "?state=open").await.is_empty());
    let closed = conflicts(&h.app, "?state=resolved").await;
    assert_eq!(
        (closed[0]["id"].clone(), closed[0]["resolution"].clone()),
        (conflict["id"].clone(), json!("customer_deleted"))
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_remote_edit_made_while_held_survives_the_resolution_sqlite() {
    a_remote_edit_made_while_held_survives_the_resolution(Backend::Sqlite, false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_resolution_over_a_known_remote_state_names_its_fields() {
    a_remote_edit_made_while_held_survives_the_resolution(Backend::Sqlite, true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_remote_edit_made_while_held_survives_the_resolution_postgres() {
    a_remote_edit_made_while_held_survives_the_resolution(Backend::Postgres, false).await;
}

/// Stripe's dashboard changes the phone while a conflict over the name
/// holds the link: the edit waits. The person then keeps ferry's name. The
/// waiting edit is part of the result: ferry takes the phone, and Stripe
/// ends with ferry's name and its own phone. (The resolution used to push
/// first, over the waiting edit, which then looked like an echo of that
/// push and was dropped.) The push after a push of unknown outcome (the
/// one the proxy failed) goes whole; over a known remote state
/// (`known_base`: that push counted as never sent) it names the name
/// alone: the waiting edit's record is the remote's state, as an applied
/// event's is (it went whole, over any edit made at Stripe after the
/// fold).
async fn a_remote_edit_made_while_held_survives_the_resolution(backend: Backend, known_base: bool) {
    let h = synced_customer_on(backend, "flag").await;
    name_edited_on_both_sides(&h).await;
    let conflict = open_conflict(&h.app).await;
    h.proxy.set_down(false);

    edit_in_stripe(&h.stripe.url(), &h.remote_id, "phone", "+15550000009");
    wait_until_an_edit_waits(&h).await;
    // The edit waits on a person, not on ferry: counted as held, and left
    // out of the inbox's age (an alert on it would fire for every conflict
    // left open a while).
    let inbox = stripe_inbox(&h.app).await;
    assert_eq!(inbox["held"], 1, "{inbox}");
    assert_eq!(inbox["unapplied"], 1, "{inbox}");
    assert_eq!(inbox["oldest_age_seconds"], 0.0, "{inbox}");
    // The console's overview says so: "1 (oldest –)" looked like an event
    // on its way.
    let (client, cookie) = crate::helpers::console_session(&h.app.base).await;
    let overview =
        crate::helpers::console_page(&client, &cookie, &format!("{}/console", h.app.base)).await;
    assert!(overview.contains("1 (1 held by a conflict)"), "{overview}");
    if known_base {
        let delivered = format!(
            "UPDATE sync_links SET pushed_hash = 'remote' \
             WHERE connector = 'stripe' AND remote_id = '{}'",
            h.remote_id
        );
        execute_raw(&h.app.database_url, &delivered, b"").await;
    }

    keeps_the_local_name_and_the_remote_phone(&h, &conflict).await;
    // The name the person decided is not a conflict again.
    assert_eq!(conflicts(&h.app, "").await.len(), 1);
    let pushes = h
        .proxy
        .requests_to("POST", &format!("/v1/customers/{}", h.remote_id));
    let last =
        String::from_utf8_lossy(&pushes.last().expect("the resolution's push").body).into_owned();
    assert!(last.contains("name=Local"), "{last}");
    assert_eq!(!last.contains("email="), known_base, "{last}");
}

/// The same with thin events (an event destination's, or a Salesforce
/// Outbound Message lacking a field): the edit that waits carries no
/// record, so the resolution asks the remote for it and folds it in.
/// Before, a thin event was left out of the fold: the resolution pushed
/// over the remote's phone, and the event, fetched after that push, was
/// taken for its echo.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thin_remote_edit_made_while_held_survives_the_resolution() {
    use ferry::store::inbox::{NewInboxEvent, RemoteChange};
    // No webhooks from localstripe: each remote edit reaches ferry as a
    // thin event, below.
    let h = synced_customer_unwatched().await;
    let thin = |event_id: &str| NewInboxEvent {
        event_id: event_id.into(),
        entity: "customer".into(),
        kind: RemoteChange::Upsert,
        remote_id: h.remote_id.clone(),
        occurred_at_ms: chrono::Utc::now().timestamp_millis(),
        record: None,
        origin_key: None,
        remote_type: "v1.customer.updated".into(),
        policy: None,
    };
    let deliver = async |event: NewInboxEvent| {
        h.app
            .store
            .store_inbox_many(&[("stripe", std::slice::from_ref(&event), None)])
            .await
            .expect("stored");
        h.app.sync.wake();
    };

    // Pushes fail (reads pass: a thin event is applied by reading the
    // customer; the harness keeps the breaker from opening on them).
    for _ in 0..400 {
        h.proxy
            .push(Match::request("POST", "/v1/customers"), Fault::status(503));
    }
    h.app.patch(&h.id, json!({"name": "Local Name"})).await;
    modify_in_stripe(&h.stripe.url(), &h.remote_id, "name='Remote Name'");
    deliver(thin("evt_thin_name")).await;
    let conflict = open_conflict(&h.app).await;
    h.proxy.clear_faults();
    modify_in_stripe(&h.stripe.url(), &h.remote_id, "phone='+15550000009'");
    deliver(thin("evt_thin_phone")).await;
    wait_until_an_edit_waits(&h).await;

    // The remote cannot be read for the waiting edit: the resolution
    // waits for it, nothing written (made without it, it was pushed over
    // the phone, and the phone read after that push taken for its echo).
    let read = format!("/v1/customers/{}", h.remote_id);
    for _ in 0..20 {
        h.proxy
            .push(Match::request("GET", &read), Fault::status(503));
    }
    let (status, problem) = resolve(&h.app, &conflict, json!({"resolution": "local"})).await;
    assert_eq!(
        (status, problem["code"].as_str()),
        (503, Some("remote_unavailable")),
        "{problem}"
    );
    assert_eq!(open_conflict(&h.app).await["id"], conflict["id"]);
    h.proxy.clear_faults();

    keeps_the_local_name_and_the_remote_phone(&h, &conflict).await;
    // Part of the resolution, not applied after it by luck.
    let events = h
        .app
        .store
        .inbox_of_remote("stripe", &h.remote_id)
        .await
        .unwrap();
    let phone = events
        .iter()
        .find(|e| e.event_id == "evt_thin_phone")
        .unwrap();
    assert!(
        phone
            .detail
            .as_deref()
            .is_some_and(|d| d.contains("folded into the resolution")),
        "{phone:?}"
    );
}

/// Stripe's dashboard changes the name again while a conflict over it
/// holds the link, to a value the person never saw. The resolution's name
/// stands (the fold prefers it), and that is recorded: a second conflict,
/// decided `prefer_local`, shows the remote value it overrode. Before, the
/// value was dropped without a trace.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_remote_edit_the_resolution_overrides_is_recorded() {
    resolution_over_a_later_remote_edit(json!({"resolution": "local"}), "Local Name").await;
}

/// The same for a resolution that picks the value the conflict showed for
/// the remote (`remote`, or `fields` naming it): that value is the choice,
/// and stands over the later edit, recorded. Before, the value equalled the
/// snapshot, so the fold read the name as unchanged in ferry and took the
/// later edit: a name nobody picked, and nothing recorded.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_remote_edit_a_remote_pick_overrides_is_recorded() {
    resolution_over_a_later_remote_edit(
        json!({"resolution": "fields", "fields": {"name": "Remote Name"}}),
        "Remote Name",
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_remote_edit_a_remote_resolution_overrides_is_recorded() {
    resolution_over_a_later_remote_edit(json!({"resolution": "remote"}), "Remote Name").await;
}

async fn resolution_over_a_later_remote_edit(body: Value, name: &str) {
    let h = synced_customer("flag").await;
    name_edited_on_both_sides(&h).await;
    let conflict = open_conflict(&h.app).await;
    h.proxy.set_down(false);

    edit_in_stripe(&h.stripe.url(), &h.remote_id, "name", "Remote Again");
    wait_until_an_edit_waits(&h).await;

    let (status, resolved) = resolve(&h.app, &conflict, body).await;
    assert_eq!(status, 200, "{resolved}");
    assert_eq!(resolved["customer"]["name"], name, "{resolved}");
    let all = conflicts(&h.app, "?state=resolved").await;
    let overridden = all
        .iter()
        .find(|c| c["id"] != conflict["id"])
        .unwrap_or_else(|| panic!("no conflict recorded for the override: {all:#?}"));
    assert_eq!(
        (&overridden["policy"], &overridden["resolution"]),
        (&json!("prefer_local"), &json!("prefer_local")),
        "{overridden:#}"
    );
    let fields = overridden["fields"].as_array().unwrap();
    assert_eq!(fields.len(), 1, "{overridden:#}");
    assert_eq!(
        (
            &fields[0]["field"],
            &fields[0]["local"],
            &fields[0]["remote"]
        ),
        (&json!("name"), &json!(name), &json!("Remote Again")),
        "{overridden:#}"
    );
    let version = resolved["customer"]["version"].as_i64().unwrap();
    assert_stripe_has(&h, version, name, "+15550000001").await;
}

/// A remote edit ferry refuses (a phone it cannot read) waits behind the
/// hold like any other. The resolution no longer folds it in: it used to
/// fail every resolution with 422 (the folded record failed validation),
/// and the link stayed held for good. Resolved alone, the resolution is
/// pushed over the edit ferry cannot hold: Stripe ends with ferry's record.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_waiting_edit_ferry_refuses_does_not_block_the_resolution() {
    let h = synced_customer_on(Backend::Sqlite, "flag").await;
    name_edited_on_both_sides(&h).await;
    let conflict = open_conflict(&h.app).await;
    h.proxy.set_down(false);

    edit_in_stripe(&h.stripe.url(), &h.remote_id, "phone", "call me, maybe");
    wait_until_an_edit_waits(&h).await;

    let (status, resolved) = resolve(&h.app, &conflict, json!({"resolution": "local"})).await;
    assert_eq!(status, 200, "{resolved}");
    let settled = customer(&h.app, &h.id).await;
    assert_eq!(settled["name"], "Local Name", "{settled}");
    let phone = settled["phone"].as_str().unwrap_or_default().to_owned();
    assert_ne!(phone, "call me, maybe", "{settled}");
    let version = settled["version"].as_i64().unwrap();
    assert_stripe_has(&h, version, "Local Name", &phone).await;
}

/// ferry's name changes while the conflict over it is open: resolving for
/// the remote's name would undo that edit, which the choice was not made
/// on. Refused (409 `conflict_stale`, nothing written); `local` keeps the
/// edit, and a resolution that sets the current value is no overwrite.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_resolution_over_a_later_local_edit_is_refused() {
    let h = synced_customer_on(Backend::Sqlite, "flag").await;
    name_edited_on_both_sides(&h).await;
    let conflict = open_conflict(&h.app).await;
    h.proxy.set_down(false);
    let newer = h.app.patch(&h.id, json!({"name": "Newer Local"})).await;
    let (status, problem) = resolve(&h.app, &conflict, json!({"resolution": "remote"})).await;
    assert_eq!(status, 409, "{problem}");
    assert_eq!(problem["code"], "conflict_stale", "{problem}");
    assert!(
        problem["detail"].as_str().unwrap().contains("name"),
        "{problem}"
    );
    assert_eq!(customer(&h.app, &h.id).await["version"], newer["version"]);
    let (status, resolved) = resolve(
        &h.app,
        &conflict,
        json!({"resolution": "fields", "fields": {"name": "Newer Local"}}),
    )
    .await;
    assert_eq!(status, 200, "{resolved}");
    assert_eq!(resolved["customer"]["name"], "Newer Local", "{resolved}");
}

/// Two Stripe edits in one second: the name (which opens the conflict)
/// and then the phone (which waits behind it). The phone's event is as old
/// as the name's, so it was left out of the resolution, the resolution was
/// pushed over it, and the event, fetched afresh, was taken for the push's
/// echo: the phone was lost on both sides. It is folded in now, and since
/// the two cannot be ordered, what Stripe holds decides.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_edit_in_the_conflicts_own_second_survives_the_resolution() {
    use crate::helpers::WEBHOOK_SECRET;
    use crate::inbound::{deliver, event, stripe_signature};
    // Webhooks are sent by hand here (localstripe's own are not wanted):
    // two events of one second.
    let h = synced_customer_unwatched().await;
    let address = customer(&h.app, &h.id).await["email"].clone();
    h.proxy.set_down(true);
    h.app.patch(&h.id, json!({"name": "Local Name"})).await;
    edit_fields_in_stripe(
        &h.stripe.url(),
        &h.remote_id,
        &[("name", "Remote Name"), ("phone", "+15550000009")],
    );
    let second = chrono::Utc::now().timestamp();
    let remote = |phone: &str| {
        json!({"id": h.remote_id, "object": "customer", "email": address,
            "name": "Remote Name", "phone": phone, "metadata": {}})
    };
    let name = event(
        "evt_tick_name",
        "customer.updated",
        second,
        remote("+15550000001"),
    );
    let (status, _) = deliver(&h.app, &name, &stripe_signature(&name, WEBHOOK_SECRET)).await;
    assert_eq!(status, 200);
    let conflict = open_conflict(&h.app).await;
    let phone = event(
        "evt_tick_phone",
        "customer.updated",
        second,
        remote("+15550000009"),
    );
    let (status, _) = deliver(&h.app, &phone, &stripe_signature(&phone, WEBHOOK_SECRET)).await;
    assert_eq!(status, 200);
    wait_until_an_edit_waits(&h).await;
    h.proxy.set_down(false);

    let (status, resolved) = resolve(&h.app, &conflict, json!({"resolution": "local"})).await;
    assert_eq!(status, 200, "{resolved}");
    assert_eq!(resolved["customer"]["phone"], "+15550000009", "{resolved}");
    let version = resolved["customer"]["version"].as_i64().unwrap();
    assert_stripe_has(&h, version, "Local Name", "+15550000009").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn different_fields_changed_on_both_sides_merge() {
    let h = synced_customer("flag").await;
    h.proxy.set_down(true);
    h.app.patch(&h.id, json!({"phone": "+15550000002"})).await;
    edit_in_stripe(&h.stripe.url(), &h.remote_id, "name", "Remote Name");
    let merged = wait_customer(&h.app, &h.id, |c| c["name"] == "Remote Name").await;
    assert_eq!(
        merged["phone"], "+15550000002",
        "the local edit survives: {merged}"
    );
    assert!(
        conflicts(&h.app, "").await.is_empty(),
        "no conflict for different fields"
    );

    // Back up: Stripe gets the merged record.
    h.proxy.set_down(false);
    let version = merged["version"].as_i64().unwrap();
    assert_stripe_has(&h, version, "Remote Name", "+15550000002").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn flagged_conflicts_hold_the_link_until_resolved() {
    let h = synced_customer("flag").await;
    name_edited_on_both_sides(&h).await;

    let conflict = open_conflict(&h.app).await;
    assert_eq!(conflict["customer_id"], h.id.as_str());
    // Listed by its connector, and by no other.
    let of_stripe = conflicts(&h.app, "?state=open&connector=stripe").await;
    assert_eq!(of_stripe.len(), 1, "{of_stripe:?}");
    assert!(conflicts(&h.app, "?connector=salesforce").await.is_empty());
    assert_eq!(conflict["fields"][0]["field"], "name");
    assert_eq!(conflict["fields"][0]["local"], "Local Name");
    assert_eq!(conflict["fields"][0]["remote"], "Remote Name");
    assert_eq!(conflict["fields"][0]["resolution"], "pending");
    assert_eq!(
        customer(&h.app, &h.id).await["name"],
        "Local Name",
        "the local value stays meanwhile"
    );

    // Held: with Stripe reachable again, nothing is pushed.
    h.proxy.set_down(false);
    tokio::time::sleep(Duration::from_millis(2_000)).await;
    assert_eq!(
        stripe_customer(&h.stripe.url(), &h.remote_id)
            .await
            .unwrap()["name"],
        "Remote Name"
    );

    let (status, problem) = resolve(
        &h.app,
        &conflict,
        json!({"resolution": "fields", "fields": {"phone": "x"}}),
    )
    .await;
    assert_eq!(
        (status, problem["code"].as_str()),
        (422, Some("validation_failed")),
        "{problem}"
    );
    let (status, resolved) = resolve(
        &h.app,
        &conflict,
        json!({"resolution": "fields", "fields": {"name": "Agreed Name"}}),
    )
    .await;
    assert_eq!(status, 200, "{resolved}");
    assert_eq!(resolved["conflict"]["state"], "resolved");
    assert_eq!(resolved["customer"]["name"], "Agreed Name");
    // The record says what the person decided, field by field.
    let decided = &resolved["conflict"]["fields"][0];
    assert_eq!(decided["resolution"], "fields", "{decided}");
    assert_eq!(decided["value"], "Agreed Name", "{decided}");
    assert_eq!(decided["local"], "Local Name", "{decided}");
    let version = resolved["customer"]["version"].as_i64().unwrap();
    h.app.wait_synced(&h.id, version).await;
    assert_eq!(
        stripe_customer(&h.stripe.url(), &h.remote_id)
            .await
            .unwrap()["name"],
        "Agreed Name",
        "sync resumed"
    );
    let (status, problem) = resolve(&h.app, &conflict, json!({"resolution": "local"})).await;
    assert_eq!(
        (status, problem["code"].as_str()),
        (409, Some("conflict_not_open"))
    );
}

/// The API keeps a metadata value as sent (`"silver "`); the merge compares
/// and records it trimmed. Every resolution but `local` was refused as
/// stale (409) until someone edited the customer: the stale check compared
/// the stored text with the recorded one byte for byte.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_conflict_over_an_untrimmed_value_resolves() {
    let h = synced_customer("flag").await;
    h.proxy.set_down(true);
    h.app
        .patch(&h.id, json!({"metadata": {"tier": "silver "}}))
        .await;
    modify_in_stripe(
        &h.stripe.url(),
        &h.remote_id,
        "metadata={'tier': 'platinum'}",
    );
    let conflict = open_conflict(&h.app).await;
    assert_eq!(
        conflict["fields"][0]["field"], "metadata.tier",
        "{conflict}"
    );
    assert_eq!(conflict["fields"][0]["local"], "silver", "{conflict}");
    h.proxy.set_down(false);
    // A blank value is refused, as every other way in refuses it (Stripe
    // takes an empty one as removing the key); it was stored.
    for blank in ["", "  "] {
        let (status, refused) = resolve(
            &h.app,
            &conflict,
            json!({"resolution": "fields", "fields": {"metadata.tier": blank}}),
        )
        .await;
        assert_eq!(status, 422, "{refused}");
        assert!(refused.to_string().contains("send null"), "{refused}");
    }
    let (status, resolved) = resolve(&h.app, &conflict, json!({"resolution": "remote"})).await;
    assert_eq!(status, 200, "{resolved}");
    assert_eq!(resolved["customer"]["metadata"]["tier"], "platinum");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn policies_decide_same_field_conflicts_and_record_them() {
    for (policy, expected) in [
        ("prefer_local", "Local Name"),
        ("prefer_remote", "Remote Name"),
        // The remote edit is the later one.
        ("last_writer_wins", "Remote Name"),
    ] {
        let h = synced_customer(policy).await;
        h.proxy.set_down(true);
        h.app.patch(&h.id, json!({"name": "Local Name"})).await;
        tokio::time::sleep(Duration::from_millis(1_100)).await;
        edit_in_stripe(&h.stripe.url(), &h.remote_id, "name", "Remote Name");
        let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
        let recorded = loop {
            if let Some(c) = conflicts(&h.app, "?state=resolved")
                .await
                .into_iter()
                .next()
            {
                break c;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "{policy}: no conflict recorded"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        assert_eq!(recorded["policy"], policy);
        assert_eq!(customer(&h.app, &h.id).await["name"], expected, "{policy}");
        h.proxy.set_down(false);
        let version = customer(&h.app, &h.id).await["version"].as_i64().unwrap();
        h.app.wait_synced(&h.id, version).await;
        assert_eq!(
            stripe_customer(&h.stripe.url(), &h.remote_id)
                .await
                .unwrap()["name"],
            expected,
            "{policy}: both sides agree"
        );
        // Stripe already holds a name it won: nothing is pushed back to it.
        let updates = h
            .proxy
            .requests_to("POST", &format!("/v1/customers/{}", h.remote_id));
        let sent = updates.iter().filter(|r| r.forwarded).count();
        if expected == "Local Name" {
            assert!(sent >= 1, "{policy}: ferry's name pushed");
        } else {
            assert_eq!(sent, 0, "{policy}: pushed back what Stripe holds");
        }
    }
}

/// The console's "Resolve with these values" with ferry's side picked keeps
/// ferry's value as it is when the form is sent: a local edit made while
/// the page was open (a held link still takes local writes) is not undone
/// by the copy the conflict recorded.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_console_keeps_a_local_edit_made_while_the_conflict_was_open() {
    let h = synced_customer("flag").await;
    name_edited_on_both_sides(&h).await;
    let conflict = open_conflict(&h.app).await;
    h.proxy.set_down(false);
    let fields = conflict["fields"].as_array().unwrap();
    assert_eq!(fields[0]["local"], "Local Name", "{conflict}");
    // The page is drawn now; the name changes in ferry before it is sent.
    let (client, cookie) = crate::helpers::console_session(&h.app.base).await;
    let url = |path: &str| format!("{}{path}", h.app.base);
    let id = conflict["id"].as_str().unwrap();
    let page =
        crate::helpers::console_page(&client, &cookie, &url(&format!("/console/conflicts/{id}")))
            .await;
    let csrf = crate::helpers::csrf_field(&page);
    let newer = h.app.patch(&h.id, json!({"name": "Newer Local"})).await;

    let sent = client
        .post(url(&format!("/console/conflicts/{id}/resolve")))
        .header("cookie", &cookie)
        .form(&[
            ("csrf", csrf.as_str()),
            ("resolution", "fields"),
            ("pick.name", "local"),
            ("local.name", "Local Name"),
            ("remote.name", "Remote Name"),
        ])
        .send()
        .await
        .unwrap();
    assert_eq!(sent.status(), 303);
    let location = sent.headers()["location"].to_str().unwrap().to_owned();
    assert!(location.contains("notice="), "{location}");
    let resolved = wait_customer(&h.app, &h.id, |c| {
        c["version"].as_i64() > newer["version"].as_i64()
    })
    .await;
    assert_eq!(resolved["name"], "Newer Local", "{resolved}");
    let version = resolved["version"].as_i64().unwrap();
    assert_stripe_has(&h, version, "Newer Local", "+15550000001").await;
}

/// Under duplicate-email policy `merge`, a new Stripe record with the
/// email of a customer whose link an open conflict holds waits for the
/// person too. Before, the merge moved the held link to the new record
/// (the conflict then pointed at nothing it could release) and a second
/// conflict could take the hold.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_duplicate_merged_into_a_held_link_waits() {
    let h = synced_customer_with(
        Backend::Sqlite,
        json!({
            "conflict_policy": "flag",
            "duplicate_email_policy": "merge",
            "sync_max_attempts": 100,
        }),
    )
    .await;
    let (conflict, _) = a_duplicate_waits(&h).await;
    let links = h.app.sync_status(&h.id).await;
    let stripe_link = links["connectors"]
        .as_array()
        .and_then(|l| l.iter().find(|l| l["connector"] == "stripe"))
        .cloned()
        .unwrap_or_default();
    assert_eq!(stripe_link["remote_id"], h.remote_id.as_str(), "{links:#}");
    let open = conflicts(&h.app, "?state=open").await;
    assert_eq!(open.len(), 1, "{open:#?}");
    assert_eq!(open[0]["id"], conflict["id"]);
}

/// Opens a conflict on `h`'s customer, then makes a second Stripe record
/// with its email and waits until that record's event waits behind the
/// conflict's hold: the conflict and the second record's id.
async fn a_duplicate_waits(h: &Harness) -> (Value, String) {
    let address = customer(&h.app, &h.id).await["email"]
        .as_str()
        .expect("an email")
        .to_owned();
    name_edited_on_both_sides(h).await;
    let conflict = open_conflict(&h.app).await;
    let second = stripe_create(&h.stripe.url(), &[("email", &address), ("name", "Second")]).await;
    wait_until_held(&h.app, &second).await;
    (conflict, second)
}

/// The event of a record parked behind the conflict holding its email
/// owner's link is parked again at its recheck without reading anything:
/// decided again, a thin event read its record from the remote every
/// minute until a person resolved the conflict (a Salesforce org's daily
/// API allowance and the connector's request rate spent on it).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_parked_event_is_parked_again_without_reading_the_remote() {
    use ferry::store::inbox::{NewInboxEvent, RemoteChange};
    let h = synced_customer_watched(
        Backend::Sqlite,
        json!({
            "conflict_policy": "flag",
            "duplicate_email_policy": "merge",
            "sync_max_attempts": 100,
        }),
        true,
    )
    .await;
    let (_, second) = a_duplicate_waits(&h).await;
    h.proxy.set_down(false);
    // A thin event of it (no record: read from Stripe) parks as well.
    let thin = NewInboxEvent {
        event_id: "evt_thin_parked".into(),
        entity: "customer".into(),
        kind: RemoteChange::Upsert,
        remote_id: second.clone(),
        occurred_at_ms: chrono::Utc::now().timestamp_millis(),
        record: None,
        origin_key: None,
        remote_type: "v1.customer.updated".into(),
        policy: None,
    };
    h.app
        .store
        .store_inbox_many(&[("stripe", std::slice::from_ref(&thin), None)])
        .await
        .expect("stored");
    h.app.sync.wake();
    let read = format!("/v1/customers/{second}");
    let parked = |detail: &str| {
        let detail = detail.to_owned();
        let app = &h.app;
        let second = second.clone();
        async move {
            app.wait_inbox(&second, |inbox| {
                inbox.iter().any(|e| {
                    e.event_id == "evt_thin_parked"
                        && e.detail.as_deref().is_some_and(|d| d.contains(&detail))
                })
            })
            .await;
        }
    };
    parked("held by open conflict").await;
    let reads = h.proxy.requests_to("GET", &read).len();
    assert!(reads >= 1, "the first decision reads the record");
    // Its recheck comes (made due now): parked again, nothing read.
    for _ in 0..2 {
        let sql = "UPDATE inbox SET next_attempt_at_ms = 0, detail = 'recheck' \
                   WHERE event_id = 'evt_thin_parked'";
        crate::helpers::execute_raw(&h.app.database_url, sql, &[]).await;
        h.app.sync.wake();
        parked("held by open conflict").await;
    }
    assert_eq!(h.proxy.requests_to("GET", &read).len(), reads);
}

/// Under `merge`, the record that lost the customer's link to a second one
/// with its email does not take it back at its next event. Before, it did,
/// as a first sync whose differences were the remote's news: its old name
/// overwrote the one ferry had since written (and pushed to the second
/// record), and the second record took the link back at its own next
/// event, and so on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_record_a_merge_released_does_not_take_the_link_back() {
    let h = synced_customer_with(
        Backend::Sqlite,
        json!({"duplicate_email_policy": "merge", "sync_max_attempts": 100}),
    )
    .await;
    let address = customer(&h.app, &h.id).await["email"]
        .as_str()
        .expect("an email")
        .to_owned();
    let second = stripe_create(&h.stripe.url(), &[("email", &address), ("name", "Second")]).await;
    let settle = Duration::from_secs(30);
    h.app
        .wait_link(&h.id, settle, |l| l["remote_id"] == second.as_str())
        .await;
    let renamed = h.app.patch(&h.id, json!({"name": "Ada King"})).await;
    let version = renamed["version"].as_i64().expect("a version");
    h.app
        .wait_link(&h.id, settle, |l| {
            l["synced_version"].as_i64() >= Some(version)
        })
        .await;
    let before = h
        .app
        .store
        .inbox_of_remote("stripe", &h.remote_id)
        .await
        .expect("inbox")
        .len();
    edit_fields_in_stripe(&h.stripe.url(), &h.remote_id, &[("name", "Old Record")]);
    let settled = h
        .app
        .wait_inbox_settled("stripe", &h.remote_id, before + 1)
        .await;
    let last = settled
        .iter()
        .max_by_key(|e| e.seq)
        .expect("the released record's event");
    assert_eq!(last.state.as_str(), "skipped", "{last:?}");
    let link = h.app.wait_link(&h.id, settle, |_| true).await;
    assert_eq!(link["remote_id"], second.as_str(), "{link:#}");
    assert_eq!(customer(&h.app, &h.id).await["name"], "Ada King");
    let at_stripe = stripe_customer(&h.stripe.url(), &second)
        .await
        .expect("the second record");
    assert_eq!(at_stripe["name"], "Ada King", "{at_stripe:#}");

    // A person who chooses the first record (a reconciliation's duplicate
    // finding resolved with `merge`) gets it linked: the marker does not
    // stand in their way.
    let run =
        crate::reconcile::run_to_end(&h.app, json!({"connector": "stripe", "repair": "report"}))
            .await;
    let id = run["id"].as_str().expect("a run id");
    let duplicate = crate::reconcile::findings(&h.app.base, id, Some("duplicate"))
        .await
        .into_iter()
        .find(|f| f["remote_id"] == h.remote_id.as_str())
        .unwrap_or_else(|| panic!("the released record is a duplicate: {run:#}"));
    crate::reconcile::resolve_by_hand(&h.app, id, &duplicate, "merge").await;
    h.app
        .wait_link(&h.id, settle, |l| l["remote_id"] == h.remote_id.as_str())
        .await;
    // And the marker names the other record now: its next event does not
    // take the link back either.
    let before = h
        .app
        .store
        .inbox_of_remote("stripe", &second)
        .await
        .expect("inbox")
        .len();
    edit_fields_in_stripe(&h.stripe.url(), &second, &[("name", "Second Again")]);
    let settled = h
        .app
        .wait_inbox_settled("stripe", &second, before + 1)
        .await;
    let last = settled.iter().max_by_key(|e| e.seq).expect("its event");
    assert_eq!(last.state.as_str(), "skipped", "{last:?}");
    let link = h.app.wait_link(&h.id, settle, |_| true).await;
    assert_eq!(link["remote_id"], h.remote_id.as_str(), "{link:#}");
}

/// A customer synced under `conflict_policy` (duplicate emails flagged),
/// renamed "Local Name" in ferry while Stripe's dashboard renames it and
/// gives it another customer's email: the duplicate-email conflict.
async fn a_duplicate_email_named_on_both_sides(conflict_policy: &str) -> (Harness, Value) {
    let h = synced_customer_with(
        Backend::Sqlite,
        json!({
            "conflict_policy": conflict_policy,
            "duplicate_email_policy": "flag",
            "sync_max_attempts": 100,
        }),
    )
    .await;
    let other = email("taken");
    h.app.create(json!({"email": other, "name": "Other"})).await;
    h.proxy.set_down(true);
    h.app.patch(&h.id, json!({"name": "Local Name"})).await;
    edit_fields_in_stripe(
        &h.stripe.url(),
        &h.remote_id,
        &[("name", "Remote Name"), ("email", &other)],
    );
    let conflict = open_conflict(&h.app).await;
    assert_eq!(conflict["policy"], "duplicate_email", "{conflict:#}");
    (h, conflict)
}

/// The same duplicate email under `prefer_remote`: the name's conflict is
/// decided (the remote's name is written with the conflict), and a person
/// resolving the email with `fields` may still give the name ferry's
/// value. Before, the name the conflict itself wrote read as an edit made
/// since, and the resolution was refused as stale (409).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_duplicate_email_resolved_by_fields_over_a_decided_conflict() {
    let (h, conflict) = a_duplicate_email_named_on_both_sides("prefer_remote").await;
    let own = customer(&h.app, &h.id).await["email"].clone();
    let decided = conflict["fields"]
        .as_array()
        .and_then(|f| f.iter().find(|f| f["field"] == "name").cloned())
        .unwrap_or_else(|| panic!("the name is kept with it: {conflict:#}"));
    assert_eq!(decided["resolution"], "remote", "{conflict:#}");
    let (status, resolved) = resolve(
        &h.app,
        &conflict,
        json!({"resolution": "fields", "fields": {"email": own, "name": "Local Name"}}),
    )
    .await;
    assert_eq!(status, 200, "{resolved:#}");
    let now = customer(&h.app, &h.id).await;
    assert_eq!(
        (&now["name"], &now["email"]),
        (&json!("Local Name"), &json!(own)),
        "{now:#}"
    );
}

/// A remote edit that changes a linked record's email to another
/// customer's (duplicate-email policy `flag`) and its name, which ferry also
/// changed: the conflict that waits for a person holds both fields. Before,
/// it held the email only, and the name's conflict was dropped: ferry's
/// name was kept and later pushed over the remote's without a word.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_duplicate_email_keeps_the_merge_conflicts_with_it() {
    let (h, conflict) = a_duplicate_email_named_on_both_sides("flag").await;
    let fields = conflict["fields"].as_array().cloned().unwrap_or_default();
    let field = |name: &str| fields.iter().find(|f| f["field"] == name).cloned();
    let name = field("name").unwrap_or_else(|| panic!("the name waits too: {conflict:#}"));
    assert_eq!(
        (&name["local"], &name["remote"], &name["resolution"]),
        (
            &json!("Local Name"),
            &json!("Remote Name"),
            &json!("pending")
        ),
        "{conflict:#}"
    );
    assert!(field("email").is_some(), "{conflict:#}");
    assert_eq!(customer(&h.app, &h.id).await["name"], "Local Name");
}
