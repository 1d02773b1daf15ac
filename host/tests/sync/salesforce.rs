//! Salesforce end to end: the real ferry app with two connectors, Stripe
//! (against a real localstripe, webhooks registered) and Salesforce (the
//! connector in connectors/salesforce, against the fake Salesforce in
//! tests/support, which follows Salesforce's documented REST, OAuth and
//! Outbound Message behaviour).
//!
//! Changes "made in Salesforce" go to the fake directly, as a person in the
//! Salesforce UI would, and reach ferry as Outbound Messages the fake sends.

use std::time::Duration;

use ferry::store::inbox::{NewInboxEvent, RemoteChange};
use ferry::store::{Store, StoreOptions};
use ferry_test_support::fake_salesforce::{FakeSalesforce, FakeSalesforceConfig, RecordedRequest};
use ferry_test_support::localstripe::LocalStripe;
use serde_json::{json, Value};

use crate::helpers::{
    email, new_database, salesforce_component, spawn_sync_app, stripe_customer, Backend,
    ExtraConnector, Setup, SyncApp, STRIPE_KEY,
};

/// How long any one step may take to settle.
const SETTLE: Duration = Duration::from_secs(20);

/// The `client_name` ferry sends in `Sforce-Call-Options`.
const CLIENT_NAME: &str = "ferry-e2e";

struct Rig {
    stripe: LocalStripe,
    salesforce: FakeSalesforce,
    app: SyncApp,
}

impl Rig {
    /// Posts `xml` to ferry's Salesforce webhook; it must be acknowledged.
    async fn deliver_acked(&self, xml: String) {
        let delivery = self
            .salesforce
            .send_raw(&self.webhook_url(), xml)
            .await
            .expect("delivery");
        assert!(delivery.acked, "{delivery:?}");
    }

    /// The Salesforce connector's open dead letters, as the API lists them.
    async fn dead_letters(&self) -> Value {
        let (_, letters) = self
            .app
            .send(
                reqwest::Method::GET,
                "/api/v1/dead-letters?connector=salesforce",
                None,
            )
            .await;
        letters
    }

    fn webhook_url(&self) -> String {
        format!("{}/webhooks/salesforce", self.app.base)
    }

    /// Data API requests ferry made (anything but the token endpoint).
    fn data_requests(&self) -> Vec<RecordedRequest> {
        self.salesforce
            .requests()
            .into_iter()
            .filter(|r| r.path.starts_with("/services/data/"))
            .collect()
    }

    /// Data API writes ferry made.
    fn salesforce_writes(&self) -> Vec<String> {
        self.data_requests()
            .into_iter()
            .filter(|r| r.method != "GET")
            .map(|r| format!("{} {}", r.method, r.path))
            .collect()
    }

    /// Waits until the Contact `remote_id` satisfies `done` (`None` once deleted).
    async fn wait_contact(&self, remote_id: &str, done: impl Fn(Option<&Value>) -> bool) -> Value {
        let deadline = tokio::time::Instant::now() + SETTLE;
        loop {
            let record = self.salesforce.record("Contact", remote_id);
            if done(record.as_ref()) {
                return record.unwrap_or(Value::Null);
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "Contact {remote_id} did not settle: {record:?}"
            );
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }
}

async fn rig(backend: Backend, config: FakeSalesforceConfig) -> Rig {
    rig_on(backend, config, None).await
}

/// The rig on database `database_url` (default: a new one of `backend`).
async fn rig_on(
    backend: Backend,
    config: FakeSalesforceConfig,
    database_url: Option<String>,
) -> Rig {
    let stripe = LocalStripe::start().expect("localstripe");
    let salesforce = FakeSalesforce::start(config)
        .await
        .expect("fake salesforce");
    let app = spawn_sync_app(setup(backend, &stripe, &salesforce, database_url)).await;
    app.assert_enabled("salesforce").await;
    app.receive_stripe_webhooks(&stripe).await;
    Rig {
        stripe,
        salesforce,
        app,
    }
}

/// The rig on SQLite, the Salesforce connector given `settings` besides
/// its own, and Stripe's webhooks not forwarded.
async fn rig_without_stripe_webhooks(settings: Value) -> Rig {
    rig_adjusted(|setup| {
        if let Some(given) = settings.as_object() {
            for (name, value) in given {
                setup.extra_connectors[0].config["settings"][name] = value.clone();
            }
        }
    })
    .await
}

/// The rig on SQLite, its setup changed by `adjust`, and Stripe's webhooks
/// not forwarded.
async fn rig_adjusted(adjust: impl FnOnce(&mut Setup)) -> Rig {
    let stripe = LocalStripe::start().expect("localstripe");
    let salesforce = FakeSalesforce::start(FakeSalesforceConfig::default())
        .await
        .expect("fake salesforce");
    let mut setup = setup(Backend::Sqlite, &stripe, &salesforce, None);
    adjust(&mut setup);
    let app = spawn_sync_app(setup).await;
    app.assert_enabled("salesforce").await;
    Rig {
        stripe,
        salesforce,
        app,
    }
}

/// ferry with Stripe at `stripe` and Salesforce at `salesforce`.
fn setup(
    backend: Backend,
    stripe: &LocalStripe,
    salesforce: &FakeSalesforce,
    database_url: Option<String>,
) -> Setup {
    let mut setup = Setup::new(backend, &stripe.url());
    setup.database_url = database_url;
    setup.extra_connectors.push(ExtraConnector {
        name: "salesforce".to_owned(),
        component: salesforce_component(),
        config: json!({
            "settings": {
                "login_url": salesforce.url(),
                "organization_id": salesforce.org_id(),
                "client_name": CLIENT_NAME,
                "api_version": "62.0",
            },
            "secrets": {
                "client_id": salesforce.config().client_id,
                "client_secret": salesforce.config().client_secret,
            },
        }),
    });
    setup
}

/// Both links of customer `id` settled at `version` or later.
async fn wait_both_synced(app: &SyncApp, id: &str, version: i64) -> (Value, Value) {
    let synced =
        |l: &Value| l["state"] == "synced" && l["synced_version"].as_i64() >= Some(version);
    let salesforce = app.wait_link_of("salesforce", id, SETTLE, synced).await;
    let stripe = app.wait_link_of("stripe", id, SETTLE, synced).await;
    (stripe, salesforce)
}

/// Waits until customer `id`, as the API answers it, satisfies `done`;
/// returns it.
async fn wait_customer(app: &SyncApp, id: &str, done: impl Fn(&Value) -> bool) -> Value {
    let deadline = tokio::time::Instant::now() + SETTLE;
    loop {
        let (_, customer) = app
            .send(
                reqwest::Method::GET,
                &format!("/api/v1/customers/{id}"),
                None,
            )
            .await;
        if done(&customer) {
            return customer;
        }
        assert!(tokio::time::Instant::now() < deadline, "{customer}");
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

fn remote_id(link: &Value) -> String {
    link["remote_id"].as_str().expect("remote id").to_owned()
}

/// Created, renamed and deleted through ferry's API: the Contact follows,
/// with one token for the whole run and `Sforce-Call-Options` on every call.
async fn api_changes_reach_salesforce(backend: Backend) {
    let rig = rig(backend, FakeSalesforceConfig::default()).await;
    let address = email("sf-api");
    let created = rig
        .app
        .create(json!({
            "name": "Ada King Lovelace",
            "email": address,
            "phone": "+44 20 7946 0000",
            "address": {"line1": "12 St James's Square", "line2": "Flat 2", "city": "London",
                "postal_code": "SW1Y 4JH", "country": "GB"},
        }))
        .await;
    let id = created["id"].as_str().expect("id").to_owned();
    let (_, link) = wait_both_synced(&rig.app, &id, 1).await;
    let contact_id = remote_id(&link);
    let contact = rig.wait_contact(&contact_id, |c| c.is_some()).await;
    assert_eq!(contact["FirstName"], "Ada King", "{contact}");
    assert_eq!(contact["LastName"], "Lovelace", "{contact}");
    assert_eq!(contact["Email"], address.as_str(), "{contact}");
    assert_eq!(contact["Phone"], "+44 20 7946 0000", "{contact}");
    assert_eq!(
        contact["MailingStreet"], "12 St James's Square\nFlat 2",
        "{contact}"
    );
    assert_eq!(contact["MailingCity"], "London", "{contact}");
    assert_eq!(contact["MailingCountry"], "GB", "{contact}");

    // Someone moves the Contact to Cambridge just before ferry's push of
    // a new name: the push writes the name and phone only.
    rig.salesforce
        .update_record("Contact", &contact_id, json!({"MailingCity": "Cambridge"}));
    rig.app
        .patch(&id, json!({"name": "Ada Byron", "phone": null}))
        .await;
    wait_both_synced(&rig.app, &id, 2).await;
    let contact = rig.wait_contact(&contact_id, |c| c.is_some()).await;
    assert_eq!(
        (
            &contact["FirstName"],
            &contact["LastName"],
            &contact["Phone"],
            &contact["MailingCity"]
        ),
        (
            &json!("Ada"),
            &json!("Byron"),
            &Value::Null,
            &json!("Cambridge")
        ),
        "{contact}"
    );

    rig.app.delete(&id).await;
    rig.wait_contact(&contact_id, |c| c.is_none()).await;

    let counts = rig.salesforce.counts();
    assert_eq!(
        (counts.creates, counts.updates, counts.deletes),
        (1, 1, 1),
        "{:?}",
        rig.salesforce_writes()
    );
    assert_eq!(counts.token_requests, 1, "one token for the whole run");
    for request in rig.data_requests() {
        assert_eq!(
            request.header("sforce-call-options"),
            Some(format!("client={CLIENT_NAME}").as_str()),
            "{} {}",
            request.method,
            request.path
        );
    }
}

/// A value longer than its Contact field holds (a city past 40
/// characters, which ferry takes) refuses the whole create, as Salesforce
/// does: a dead letter naming the field and its length, Stripe's copy
/// unaffected; the customer fixed, the create goes through.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_value_longer_than_its_field_is_a_dead_letter_naming_it() {
    let rig = rig(Backend::Sqlite, FakeSalesforceConfig::default()).await;
    let created = rig
        .app
        .create(json!({
            "name": "Ada Lovelace",
            "email": email("sf-long"),
            "address": {"city": "Llanfairpwllgwyngyllgogerychwyrndrobwllllantysiliogogogoch"},
        }))
        .await;
    let id = created["id"].as_str().expect("id").to_owned();
    rig.app
        .wait_link_of("salesforce", &id, SETTLE, |l| l["state"] == "dead")
        .await;
    let letters = rig.dead_letters().await;
    let error = letters["data"][0]["error"].as_str().unwrap_or_default();
    assert!(
        error.contains("STRING_TOO_LONG")
            && error.contains("MailingCity")
            && error.contains("max length=40"),
        "{letters:#}"
    );
    assert_eq!(letters["data"][0]["error_kind"], "permanent", "{letters:#}");
    rig.app
        .wait_link_of("stripe", &id, SETTLE, |l| l["state"] == "synced")
        .await;
    assert_eq!(rig.salesforce.counts().creates, 0);

    rig.app
        .patch(&id, json!({"address": {"city": "Llanfair PG"}}))
        .await;
    let (_, link) = wait_both_synced(&rig.app, &id, 2).await;
    let contact = rig.wait_contact(&remote_id(&link), |c| c.is_some()).await;
    assert_eq!(contact["MailingCity"], "Llanfair PG", "{contact}");
}

/// An org pinned to an API version Salesforce has since retired: its
/// requests are answered 410, which is not a record gone. Read as one, a
/// customer's delete counted as done and the Contact stayed; now the
/// delete is dead-lettered for a person, and the Contact is still there.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_salesforce_cannot_serve_is_not_a_record_gone() {
    let rig = rig(Backend::Sqlite, FakeSalesforceConfig::default()).await;
    // A retired API version (410), a mistyped object and a version newer
    // than the org runs (both a plain 404 `NOT_FOUND`, as a record that is
    // not there): each delete is a dead letter that says so, and the
    // Contact stays.
    let cases = [
        (json!({"api_version": "30.0"}), "410"),
        (
            json!({"object": "Contacts"}),
            "does not know object `Contacts` under API version 62.0",
        ),
        (
            json!({"api_version": "99.0"}),
            "does not know object `Contact` under API version 99.0",
        ),
    ];
    let mut customers = Vec::new();
    for (n, _) in cases.iter().enumerate() {
        let created = rig
            .app
            .create(json!({"name": "Ada Lovelace", "email": email(&format!("sf-unserved-{n}"))}))
            .await;
        let id = created["id"].as_str().expect("id").to_owned();
        let (_, link) = wait_both_synced(&rig.app, &id, 1).await;
        customers.push((id, remote_id(&link)));
    }
    for ((setting, error), (id, contact_id)) in cases.into_iter().zip(customers) {
        let mut settings = json!({
            "login_url": rig.salesforce.url(),
            "organization_id": rig.salesforce.org_id(),
            "client_name": CLIENT_NAME,
            "api_version": "62.0",
        });
        for (name, value) in setting.as_object().unwrap() {
            settings[name] = value.clone();
        }
        let (status, body) = rig
            .app
            .send(
                reqwest::Method::PUT,
                "/api/v1/connectors/salesforce/settings",
                Some(json!({
                    "settings": settings,
                    "secrets": {"client_id": null, "client_secret": null},
                })),
            )
            .await;
        assert_eq!(status, 200, "{body}");
        rig.app.delete(&id).await;
        let link = rig
            .app
            .wait_link_of("salesforce", &id, SETTLE, |l| l["state"] == "dead")
            .await;
        assert!(
            link["last_error"]
                .as_str()
                .is_some_and(|e| e.contains(error)),
            "{setting}: {link}"
        );
        assert!(rig.salesforce.record("Contact", &contact_id).is_some());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_changes_reach_salesforce_sqlite() {
    api_changes_reach_salesforce(Backend::Sqlite).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_changes_reach_salesforce_postgres() {
    api_changes_reach_salesforce(Backend::Postgres).await;
}

/// Reads of a Salesforce that is down (503 `SERVER_UNAVAILABLE`) go
/// through the connector's circuit breaker, as its pushes do: once it
/// opens, the Outbound Message's events wait, spending no attempt, and are
/// applied when Salesforce is back. Every event needs a read (the default
/// `fetch_records = always`); each read spent an attempt, and an outage
/// longer than the attempts' backoff dead-lettered every event of it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_outage_of_salesforce_holds_its_events_without_spending_attempts() {
    let rig = rig_adjusted(|setup| {
        setup.extra = json!({
            "sync_max_attempts": 4,
            "sync_backoff_base": "50ms",
            "sync_backoff_max": "100ms",
            "breaker_failure_threshold": 2,
            "breaker_cooldown": "2s",
        });
    })
    .await;
    let (app, salesforce) = (&rig.app, &rig.salesforce);
    let people: Vec<String> = (0..5).map(|n| email(&format!("sf-outage-{n}"))).collect();
    let ids: Vec<String> = people
        .iter()
        .map(|address| {
            salesforce.insert_record("Contact", json!({"LastName": "Outage", "Email": address}))
        })
        .collect();
    let id_refs: Vec<&str> = ids.iter().map(String::as_str).collect();
    salesforce.set_unavailable(true);
    let delivery = salesforce
        .send_outbound_message(&rig.webhook_url(), "Contact", &id_refs)
        .await
        .expect("delivery");
    assert!(delivery.acked, "{delivery:?}");
    // Longer than four attempts' backoff, shorter than two cool-downs.
    tokio::time::sleep(Duration::from_secs(3)).await;
    salesforce.set_unavailable(false);

    for address in &people {
        app.wait_customer_by_email(address).await;
    }
    let letters = rig.dead_letters().await;
    assert_eq!(letters["data"], json!([]), "{letters}");
}

/// A read the org refuses for the connector's credentials (its token
/// request answered `invalid_client`) is dead-lettered as `unauthorized`,
/// as a push's is: the letter says what to mend (it said `permanent`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_read_refused_for_credentials_is_an_unauthorized_dead_letter() {
    let rig = rig_adjusted(|setup| {
        setup.extra_connectors[0].config["secrets"]["client_secret"] = json!("not-the-secret");
    })
    .await;
    let salesforce = &rig.salesforce;
    let address = email("sf-refused");
    let id = salesforce.insert_record("Contact", json!({"LastName": "Refused", "Email": address}));
    let delivery = salesforce
        .send_outbound_message(&rig.webhook_url(), "Contact", &[&id])
        .await
        .expect("delivery");
    assert!(delivery.acked, "{delivery:?}");
    let deadline = tokio::time::Instant::now() + SETTLE;
    let letter = loop {
        let letters = rig.dead_letters().await;
        if let Some(letter) = letters["data"].as_array().and_then(|d| d.first()) {
            break letter.clone();
        }
        assert!(tokio::time::Instant::now() < deadline, "{letters}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(letter["error_kind"], "unauthorized", "{letter}");
    assert_eq!(letter["direction"], "inbound", "{letter}");
}

/// An Outbound Message with three notifications is acknowledged, each
/// Contact becomes a ferry customer that travels on to Stripe, nothing is
/// written back to Salesforce, and a redelivery of the same notifications
/// is acknowledged without being applied again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn outbound_message_is_acknowledged_applied_once_and_reaches_stripe() {
    let rig = rig(Backend::Sqlite, FakeSalesforceConfig::default()).await;
    let people = [
        ("Grace", "Hopper", email("sf-grace")),
        ("Edsger", "Dijkstra", email("sf-edsger")),
        ("Barbara", "Liskov", email("sf-barbara")),
    ];
    let ids: Vec<String> = people
        .iter()
        .map(|(first, last, address)| {
            rig.salesforce.insert_record(
                "Contact",
                json!({"FirstName": first, "LastName": last, "Email": address,
                    "MailingCity": "Arlington", "MailingCountry": "US"}),
            )
        })
        .collect();
    let id_refs: Vec<&str> = ids.iter().map(String::as_str).collect();
    let delivery = rig
        .salesforce
        .send_outbound_message(&rig.webhook_url(), "Contact", &id_refs)
        .await
        .expect("delivery");
    assert!(delivery.acked, "{delivery:?}");
    assert_eq!(delivery.notification_ids.len(), 3);

    let mut customers = Vec::new();
    for ((first, last, address), contact_id) in people.iter().zip(&ids) {
        let customer = rig.app.wait_customer_by_email(address).await;
        assert_eq!(customer["name"], format!("{first} {last}"), "{customer}");
        assert_eq!(customer["address"]["city"], "Arlington", "{customer}");
        let id = customer["id"].as_str().expect("id").to_owned();
        let link = rig
            .app
            .wait_link_of("salesforce", &id, SETTLE, |l| {
                l["remote_id"] == **contact_id
            })
            .await;
        assert_eq!(link["state"], "synced", "{link}");
        let (stripe_link, _) = wait_both_synced(&rig.app, &id, 1).await;
        let in_stripe = stripe_customer(&rig.stripe.url(), &remote_id(&stripe_link))
            .await
            .expect("in Stripe");
        assert_eq!(in_stripe["name"], format!("{first} {last}"), "{in_stripe}");
        assert_eq!(in_stripe["email"], address.as_str(), "{in_stripe}");
        customers.push(customer);
    }
    assert_eq!(
        rig.salesforce_writes(),
        Vec::<String>::new(),
        "nothing goes back to Salesforce"
    );

    // Salesforce redelivers until it sees an Ack: the same notification ids.
    let again: Vec<(String, String)> = delivery
        .notification_ids
        .iter()
        .cloned()
        .zip(ids.iter().cloned())
        .collect();
    let redeliver = |notifications: &[(String, String)]| {
        let rig = &rig;
        let xml =
            rig.salesforce
                .outbound_message_xml(rig.salesforce.org_id(), "Contact", notifications);
        async move {
            rig.deliver_acked(xml).await;
        }
    };
    redeliver(&again).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    for (customer, contact_id) in customers.iter().zip(&ids) {
        let id = customer["id"].as_str().expect("id");
        let now = rig.app.sync_status(id).await;
        assert_eq!(now["version"], 1, "applied once: {now}");
        let events = rig
            .app
            .store
            .inbox_of_remote("salesforce", contact_id)
            .await
            .expect("inbox");
        assert_eq!(events.len(), 1, "stored once");
    }

    // A notification sent again after a later edit (its Ack lost, and the
    // rule fires no second notification) carries the record as it is then:
    // that edit is applied, not dropped as the notification already taken.
    rig.salesforce
        .update_record("Contact", &ids[0], json!({"LastName": "Hopper-Murray"}));
    redeliver(&again[..1]).await;
    let id = customers[0]["id"].as_str().expect("id");
    wait_customer(&rig.app, id, |c| c["name"] == "Grace Hopper-Murray").await;
}

/// Salesforce dates records in whole seconds: two edits within one second
/// carry one date. Their messages (taken as they are, `fetch_records =
/// never`) delivered backwards end on the later edit: the earlier one,
/// dated as the last applied, is read afresh from the org instead of being
/// applied or dropped on its date.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn edits_of_one_second_delivered_backwards_end_on_the_later() {
    let rig = rig_without_stripe_webhooks(json!({"fetch_records": "never"})).await;
    let address = email("sf-one-second");
    let contact = rig.salesforce.insert_record(
        "Contact",
        json!({"FirstName": "Ada", "LastName": "First", "Email": address}),
    );
    let message = |n: &str| {
        rig.salesforce.outbound_message_xml(
            rig.salesforce.org_id(),
            "Contact",
            &[(format!("04l00000000SEC{n}"), contact.clone())],
        )
    };
    rig.deliver_acked(message("0")).await;
    let customer = rig.app.wait_customer_by_email(&address).await;
    let id = customer["id"].as_str().unwrap().to_owned();
    rig.app.wait_inbox_settled("salesforce", &contact, 1).await;

    rig.salesforce
        .update_record("Contact", &contact, json!({"LastName": "One"}));
    let one = message("1");
    rig.salesforce
        .update_record("Contact", &contact, json!({"LastName": "Two"}));
    let two = message("2");
    let date = |xml: &str| {
        let start = xml.find("<sf:LastModifiedDate>").expect("dated");
        xml[start..start + 45].to_owned()
    };
    // As Salesforce writes them in a message: whole seconds, in `Z`.
    assert!(date(&two).ends_with(".000Z"), "{}", date(&two));
    let same_second = date(&one) == date(&two);
    let retrieves = rig.salesforce.counts().retrieves;
    rig.deliver_acked(two).await;
    rig.deliver_acked(one).await;
    rig.app.wait_inbox_settled("salesforce", &contact, 3).await;
    let now = wait_customer(&rig.app, &id, |c| c["name"] == "Ada Two").await;
    assert_eq!(now["name"], "Ada Two", "{now}");
    if same_second {
        assert!(
            rig.salesforce.counts().retrieves > retrieves,
            "the message dated as the last applied was read afresh"
        );
    }
}

/// An Outbound Message dated in the future (Salesforce's messages carry
/// their own `LastModifiedDate`, which a forged or mangled message can set
/// to anything) is stored as happening at most five minutes after it
/// arrived: the record's later changes are held as stale for that long at
/// most, not until the date it claims.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_event_dated_in_the_future_does_not_freeze_its_record() {
    let rig = rig(Backend::Sqlite, FakeSalesforceConfig::default()).await;
    let address = email("sf-future");
    let contact_id = rig.salesforce.insert_record(
        "Contact",
        json!({"FirstName": "Ada", "LastName": "Early", "Email": address}),
    );
    let xml = rig.salesforce.outbound_message_xml(
        rig.salesforce.org_id(),
        "Contact",
        &[("04l00000000FUTURE".to_owned(), contact_id.clone())],
    );
    let start = xml.find("<sf:LastModifiedDate>").expect("dated") + "<sf:LastModifiedDate>".len();
    let end = start + xml[start..].find('<').expect("closed");
    let future = format!("{}2099-01-01T00:00:00.000Z{}", &xml[..start], &xml[end..]);
    let sent_at = chrono::Utc::now().timestamp_millis();
    rig.deliver_acked(future).await;
    rig.app.wait_customer_by_email(&address).await;
    let stored = rig
        .app
        .store
        .inbox_of_remote("salesforce", &contact_id)
        .await
        .expect("inbox");
    let received_by = chrono::Utc::now().timestamp_millis();
    assert_eq!(stored.len(), 1);
    let at = stored[0].occurred_at_ms;
    assert!(
        at >= sent_at && at <= received_by + 5 * 60 * 1000,
        "stored as {at}, sent at {sent_at}"
    );
}

/// An Outbound Message that does not send a mapped field (`Phone`, left
/// off the message's field list in Salesforce's setup) does not clear it:
/// Salesforce leaves out empty fields and unsent ones alike, so a message
/// lacking a mapped field makes ferry read the Contact from the API.
/// Before, the customer lost its phone on the next edit in Salesforce, and
/// Stripe with it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_field_the_message_does_not_send_is_not_cleared() {
    let rig = rig(Backend::Sqlite, FakeSalesforceConfig::default()).await;
    let address = email("sf-partial");
    let customer = rig
        .app
        .create(json!({"email": address, "name": "Ada Partial", "phone": "+14155550100"}))
        .await;
    let id = customer["id"].as_str().expect("id").to_owned();
    let (_, link) = wait_both_synced(&rig.app, &id, 1).await;
    let contact_id = link["remote_id"].as_str().expect("linked").to_owned();

    rig.salesforce
        .update_record("Contact", &contact_id, json!({"LastName": "Edited"}));
    let xml = rig.salesforce.outbound_message_xml(
        rig.salesforce.org_id(),
        "Contact",
        &[("04l00000000PARTL".to_owned(), contact_id.clone())],
    );
    let phone = "<sf:Phone>+14155550100</sf:Phone>";
    assert!(xml.contains(phone), "{xml}");
    // Dated past the echo window of ferry's push (an event inside it is
    // read again from the API anyway).
    let start = xml.find("<sf:LastModifiedDate>").expect("dated") + "<sf:LastModifiedDate>".len();
    let end = start + xml[start..].find('<').expect("closed");
    let later =
        (chrono::Utc::now() + chrono::Duration::seconds(10)).format("%Y-%m-%dT%H:%M:%S%.3fZ");
    let xml = format!("{}{later}{}", &xml[..start], &xml[end..]);
    rig.deliver_acked(xml.replace(phone, "")).await;
    let deadline = tokio::time::Instant::now() + SETTLE;
    let customer = loop {
        let customer = rig.app.customer_by_email(&address).await.expect("live");
        if customer["name"] == "Ada Edited" {
            break customer;
        }
        assert!(tokio::time::Instant::now() < deadline, "{customer}");
        tokio::time::sleep(Duration::from_millis(25)).await;
    };
    assert_eq!(customer["phone"], "+14155550100", "{customer}");
}

/// A Contact whose Email a Salesforce user cleared keeps the customer's
/// email, which goes back to the Contact, and the Contact's later edits
/// apply. Before, the merged record had no email: the event, and every
/// later one of the Contact, was dead-lettered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_contact_whose_email_is_cleared_gets_it_back() {
    let rig = rig(Backend::Sqlite, FakeSalesforceConfig::default()).await;
    let address = email("sf-cleared");
    let customer = rig
        .app
        .create(json!({"email": address, "name": "Ada Cleared"}))
        .await;
    let id = customer["id"].as_str().expect("id").to_owned();
    let (_, link) = wait_both_synced(&rig.app, &id, 1).await;
    let contact_id = remote_id(&link);
    for (fields, name) in [
        (json!({"Email": null, "LastName": "Emptied"}), "Ada Emptied"),
        (json!({"LastName": "Later"}), "Ada Later"),
    ] {
        rig.salesforce.update_record("Contact", &contact_id, fields);
        let delivery = rig
            .salesforce
            .send_outbound_message(&rig.webhook_url(), "Contact", &[contact_id.as_str()])
            .await
            .expect("delivery");
        assert!(delivery.acked, "{delivery:?}");
        let customer = wait_customer(&rig.app, &id, |c| c["name"] == name).await;
        assert_eq!(customer["email"], address.as_str(), "{customer}");
        let deadline = tokio::time::Instant::now() + SETTLE;
        loop {
            let contact = rig.salesforce.record("Contact", &contact_id).expect("kept");
            if contact["Email"] == address.as_str() {
                break;
            }
            assert!(tokio::time::Instant::now() < deadline, "{contact}");
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }
    let (status, dead) = rig
        .app
        .send(reqwest::Method::GET, "/api/v1/dead-letters", None)
        .await;
    assert_eq!(status, 200, "{dead}");
    assert_eq!(dead["data"], json!([]), "{dead}");
}

/// A nameless customer's Contact holds a stand-in last name (required);
/// its email changed in Salesforce, the stand-in made of the old email
/// read as a name the customer never had, taken in and pushed to Stripe.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_nameless_contacts_new_email_gives_it_no_name() {
    let rig = rig(Backend::Sqlite, FakeSalesforceConfig::default()).await;
    let customer = rig.app.create(json!({"email": email("sf-nameless")})).await;
    let id = customer["id"].as_str().expect("id").to_owned();
    let (stripe_link, link) = wait_both_synced(&rig.app, &id, 1).await;
    let contact_id = remote_id(&link);
    let moved = email("sf-renamed-mailbox");
    rig.salesforce
        .update_record("Contact", &contact_id, json!({"Email": moved}));
    let delivery = rig
        .salesforce
        .send_outbound_message(&rig.webhook_url(), "Contact", &[contact_id.as_str()])
        .await
        .expect("delivery");
    assert!(delivery.acked, "{delivery:?}");
    let customer = wait_customer(&rig.app, &id, |c| c["email"] == moved.as_str()).await;
    assert_eq!(customer["name"], Value::Null, "{customer}");
    let (_, link) = wait_both_synced(&rig.app, &id, 2).await;
    assert_eq!(link["state"], "synced");
    let in_stripe = stripe_customer(&rig.stripe.url(), &remote_id(&stripe_link))
        .await
        .expect("in Stripe");
    assert_eq!(in_stripe["email"], moved.as_str(), "{in_stripe}");
    assert_eq!(in_stripe["name"], Value::Null, "{in_stripe}");
}

/// By default (`fetch_records = always`) an Outbound Message is only a
/// trigger: a forged one (the org id is not secret) with made-up fields and
/// a far-future date makes ferry read the Contact from the API, and the
/// customer holds what the org holds, dated when the message arrived. A
/// forged message naming a record the org does not have creates nothing.
/// Under the earlier default (`incomplete`) both messages, carrying every
/// mapped field, were applied as they said.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fetched_records_make_a_forged_message_harmless() {
    let rig = rig_without_stripe_webhooks(json!({})).await;

    let address = email("sf-fetched");
    let contact_id = rig.salesforce.insert_record(
        "Contact",
        json!({"FirstName": "Ada", "LastName": "Real", "Email": address}),
    );
    let genuine = rig.salesforce.outbound_message_xml(
        rig.salesforce.org_id(),
        "Contact",
        &[("04l00000000FORGE".to_owned(), contact_id.clone())],
    );
    let forged = genuine
        .replace(">Real<", ">Forged<")
        .replace(&address, "mallory@example.com");
    let start =
        forged.find("<sf:LastModifiedDate>").expect("dated") + "<sf:LastModifiedDate>".len();
    let end = start + forged[start..].find('<').expect("closed");
    let forged = format!(
        "{}2099-01-01T00:00:00.000Z{}",
        &forged[..start],
        &forged[end..]
    );
    assert!(
        forged.contains(">Forged<") && forged.contains("mallory@"),
        "{forged}"
    );
    let missing = rig
        .salesforce
        .outbound_message_xml(
            rig.salesforce.org_id(),
            "Contact",
            &[("04l00000000GHOST".to_owned(), contact_id.clone())],
        )
        .replace(&contact_id, "003000000000NOP");

    let sent_at = chrono::Utc::now().timestamp_millis();
    for xml in [missing, forged] {
        rig.deliver_acked(xml).await;
    }
    let customer = rig.app.wait_customer_by_email(&address).await;
    assert_eq!(customer["name"], "Ada Real", "{customer}");
    assert!(rig
        .app
        .customer_by_email("mallory@example.com")
        .await
        .is_none());
    let fetched = rig
        .data_requests()
        .into_iter()
        .any(|r| r.method == "GET" && r.path.ends_with(&format!("/sobjects/Contact/{contact_id}")));
    assert!(fetched, "{:?}", rig.data_requests());
    let stored = rig
        .app
        .wait_inbox_settled("salesforce", &contact_id, 1)
        .await;
    let received_by = chrono::Utc::now().timestamp_millis();
    let at = stored[0].occurred_at_ms;
    assert!(
        at >= sent_at && at <= received_by,
        "stored as {at}, sent at {sent_at}"
    );
    assert!(stored[0].record.is_none(), "{:?}", stored[0].record);

    let deadline = tokio::time::Instant::now() + SETTLE;
    loop {
        let ghost = rig
            .app
            .store
            .inbox_of_remote("salesforce", "003000000000NOP")
            .await
            .expect("inbox");
        // A record ferry never knew, not found: a dead letter at the first
        // read (it was read again with backoff until it was, a forged
        // message's reads against the org's API times the attempts). Not
        // a skip: Salesforce answers so for a record the integration user
        // may not see, whose message a person should look at.
        if let Some(first) = ghost.first().filter(|e| e.state.as_str() == "dead") {
            assert_eq!(first.attempts, 1, "{first:?}");
            assert!(
                first
                    .detail
                    .as_deref()
                    .is_some_and(|d| d.contains("may not see (sharing)")),
                "{first:?}"
            );
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "{ghost:?}");
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    let reads = rig
        .data_requests()
        .into_iter()
        .filter(|r| r.method == "GET" && r.path.ends_with("/sobjects/Contact/003000000000NOP"))
        .count();
    assert_eq!(reads, 1);

    // Notification ids count up: a forged message with the next one,
    // guessed, about another record took the real notification's place in
    // the inbox, and the real one (an edit at Salesforce) was acknowledged
    // as a redelivery and dropped. The real one is applied.
    let guessed = rig
        .salesforce
        .outbound_message_xml(
            rig.salesforce.org_id(),
            "Contact",
            &[("04l00000000NEXT1".to_owned(), contact_id.clone())],
        )
        .replace(&contact_id, "003000000000NOQ");
    rig.deliver_acked(guessed).await;
    rig.salesforce
        .update_record("Contact", &contact_id, json!({"LastName": "Renamed"}));
    let real = rig.salesforce.outbound_message_xml(
        rig.salesforce.org_id(),
        "Contact",
        &[("04l00000000NEXT1".to_owned(), contact_id.clone())],
    );
    rig.deliver_acked(real).await;
    let id = customer["id"].as_str().expect("id").to_owned();
    wait_customer(&rig.app, &id, |c| c["name"] == "Ada Renamed").await;
}

/// A Contact deleted before its notification went out: Salesforce sends the
/// notification with no data. Read as fields all cleared, it wiped the
/// customer (or dead-lettered as "no email"); now it is a trigger, ferry
/// fetches the Contact and records that it no longer exists. The customer
/// keeps its values, and a notification naming no record at all is
/// acknowledged with its message, not a reason to refuse the others in it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_notification_for_a_deleted_contact_leaves_the_customer_alone() {
    let rig = rig(Backend::Sqlite, FakeSalesforceConfig::default()).await;
    let address = email("sf-gone");
    let contact_id = rig.salesforce.insert_record(
        "Contact",
        json!({"FirstName": "Gone", "LastName": "Soon", "Email": address, "Phone": "+15550000042"}),
    );
    let delivery = rig
        .salesforce
        .send_outbound_message(&rig.webhook_url(), "Contact", &[&contact_id])
        .await
        .expect("delivery");
    assert!(delivery.acked, "{delivery:?}");
    let customer = rig.app.wait_customer_by_email(&address).await;
    rig.app
        .wait_inbox_settled("salesforce", &contact_id, 1)
        .await;

    rig.salesforce.delete_record("Contact", &contact_id);
    let late = rig.salesforce.outbound_message_xml(
        rig.salesforce.org_id(),
        "Contact",
        &[("04l00000000LATE1".to_owned(), contact_id.clone())],
    );
    assert!(!late.contains("sf:Email"), "no data: {late}");
    let nameless = late
        .replace("04l00000000LATE1", "04l00000000LATE2")
        .replace(&format!("<sf:Id>{contact_id}</sf:Id>"), "");
    let both = late.replace(
        "</Notification>",
        &format!(
            "</Notification>{}",
            &nameless[nameless.find("<Notification>").unwrap()
                ..nameless.find("</notifications>").unwrap()]
        ),
    );
    rig.deliver_acked(both).await;

    let deadline = tokio::time::Instant::now() + SETTLE;
    let late_event = loop {
        let events = rig
            .app
            .store
            .inbox_of_remote("salesforce", &contact_id)
            .await
            .expect("inbox");
        if let Some(e) = events
            .iter()
            .find(|e| e.event_id.starts_with("04l00000000LATE1:"))
        {
            if e.state.as_str() == "dead" {
                break e.clone();
            }
        }
        assert!(tokio::time::Instant::now() < deadline, "{events:?}");
        tokio::time::sleep(Duration::from_millis(25)).await;
    };
    assert!(late_event.record.is_none(), "{late_event:?}");
    assert!(
        late_event
            .detail
            .as_deref()
            .is_some_and(|d| d.contains("no longer exists")),
        "{late_event:?}"
    );
    let now = rig.app.customer_by_email(&address).await.expect("kept");
    assert_eq!(now["version"], customer["version"], "{now}");
    assert_eq!(now["name"], "Gone Soon", "{now}");
    assert_eq!(now["phone"], "+15550000042", "{now}");
}

/// A message from another org, or one that is not a SOAP notification, is
/// refused with 400 and nothing is stored.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn foreign_or_malformed_outbound_messages_are_refused() {
    let rig = rig(Backend::Sqlite, FakeSalesforceConfig::default()).await;
    let contact_id = rig.salesforce.insert_record(
        "Contact",
        json!({"LastName": "Mallory", "Email": email("sf-mallory")}),
    );
    let foreign = rig.salesforce.outbound_message_xml(
        "00D000000000999EAA",
        "Contact",
        &[("04l00000000FUTURE".to_owned(), contact_id.clone())],
    );
    let refused = rig
        .salesforce
        .send_raw(&rig.webhook_url(), foreign)
        .await
        .expect("answer");
    assert_eq!(refused.status, 400, "{refused:?}");
    assert!(!refused.acked);
    assert!(refused.body.contains("invalid_signature"), "{refused:?}");

    for body in ["<notifications><Notification>", "{\"not\": \"xml\"}", ""] {
        let refused = rig
            .salesforce
            .send_raw(&rig.webhook_url(), body.to_owned())
            .await
            .expect("answer");
        assert_eq!(refused.status, 400, "{body}: {refused:?}");
        assert!(!refused.acked);
    }
    let stored = rig
        .app
        .store
        .inbox_of_remote("salesforce", &contact_id)
        .await
        .expect("inbox");
    assert!(stored.is_empty(), "{stored:?}");
}

/// The session expires mid-stream: the next push gets 401
/// `INVALID_SESSION_ID`, the host fetches one new token and the push goes
/// through. Then Salesforce answers `REQUEST_LIMIT_EXCEEDED` twice: the push
/// backs off and lands.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expired_sessions_recover_and_request_limits_back_off() {
    let rig = rig(Backend::Sqlite, FakeSalesforceConfig::default()).await;
    let created = rig
        .app
        .create(json!({"name": "Alan Turing", "email": email("sf-alan")}))
        .await;
    let id = created["id"].as_str().expect("id").to_owned();
    let (_, link) = wait_both_synced(&rig.app, &id, 1).await;
    let contact_id = remote_id(&link);
    assert_eq!(rig.salesforce.counts().token_requests, 1);

    rig.salesforce.expire_sessions();
    rig.app.patch(&id, json!({"name": "Alan M Turing"})).await;
    wait_both_synced(&rig.app, &id, 2).await;
    let contact = rig.wait_contact(&contact_id, |c| c.is_some()).await;
    assert_eq!(contact["FirstName"], "Alan M", "{contact}");
    assert_eq!(
        rig.salesforce.counts().token_requests,
        2,
        "one refresh after the session expired"
    );

    rig.salesforce.fail_with_request_limit(2);
    rig.app.patch(&id, json!({"phone": "+1 555 0100"})).await;
    wait_both_synced(&rig.app, &id, 3).await;
    let contact = rig.wait_contact(&contact_id, |c| c.is_some()).await;
    assert_eq!(contact["Phone"], "+1 555 0100", "{contact}");
    let history = rig.app.sync_status(&id).await["history"].clone();
    let limited: Vec<&Value> = history
        .as_array()
        .expect("history")
        .iter()
        .filter(|d| d["connector"] == "salesforce" && d["version"] == 3)
        .filter(|d| d["outcome"] != "delivered")
        .collect();
    assert_eq!(limited.len(), 2, "two rate-limited attempts: {history:#}");
    assert_eq!(
        rig.salesforce.counts().token_requests,
        2,
        "a request limit is not a session problem"
    );
}

/// With Stripe and Salesforce both enabled, a change made in either reaches
/// the other through ferry, and neither hears its own change back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn changes_cross_between_stripe_and_salesforce() {
    let rig = rig(Backend::Sqlite, FakeSalesforceConfig::default()).await;

    // Made in Stripe's dashboard: reaches Salesforce as a new Contact.
    let address = email("sf-cross");
    let response = reqwest::Client::new()
        .post(format!("{}/v1/customers", rig.stripe.url()))
        .bearer_auth(STRIPE_KEY)
        .form(&[("name", "Katherine Johnson"), ("email", &address)])
        .send()
        .await
        .expect("localstripe answers");
    assert!(response.status().is_success(), "{}", response.status());
    let customer = rig.app.wait_customer_by_email(&address).await;
    let id = customer["id"].as_str().expect("id").to_owned();
    let (stripe_link, sf_link) = wait_both_synced(&rig.app, &id, 1).await;
    let contact_id = remote_id(&sf_link);
    let contact = rig.wait_contact(&contact_id, |c| c.is_some()).await;
    assert_eq!(
        (&contact["FirstName"], &contact["LastName"]),
        (&json!("Katherine"), &json!("Johnson")),
        "{contact}"
    );

    // Salesforce's own Outbound Message for ferry's write is an echo: it
    // changes nothing and goes nowhere.
    let echo = rig
        .salesforce
        .send_outbound_message(&rig.webhook_url(), "Contact", &[&contact_id])
        .await
        .expect("echo delivery");
    assert!(echo.acked, "{echo:?}");
    let event = rig
        .app
        .wait_inbox_settled("salesforce", &contact_id, 1)
        .await;
    assert_eq!(event.len(), 1);
    assert_eq!(rig.app.sync_status(&id).await["version"], 1);

    // Changed in Salesforce: reaches Stripe, and nothing is written back.
    let writes_before = rig.salesforce_writes();
    rig.salesforce.update_record(
        "Contact",
        &contact_id,
        json!({"LastName": "Goble Johnson", "MailingCity": "Hampton"}),
    );
    let delivery = rig
        .salesforce
        .send_outbound_message(&rig.webhook_url(), "Contact", &[&contact_id])
        .await
        .expect("delivery");
    assert!(delivery.acked, "{delivery:?}");
    wait_both_synced(&rig.app, &id, 2).await;
    let in_stripe = stripe_customer(&rig.stripe.url(), &remote_id(&stripe_link))
        .await
        .expect("in Stripe");
    assert_eq!(in_stripe["name"], "Katherine Goble Johnson", "{in_stripe}");
    assert_eq!(in_stripe["address"]["city"], "Hampton", "{in_stripe}");
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(rig.salesforce_writes(), writes_before, "no write back");
    assert_eq!(rig.app.sync_status(&id).await["version"], 2);
}

/// Stripe and Salesforce both changed one customer while ferry was down
/// (Stripe the phone, Salesforce the name), so when it starts again one
/// claim of the inbox takes both events, and the claim's single read of
/// links and customers meets that customer twice. Both apply: the second
/// decides again on the customer the first wrote. (That read once handed
/// the customer to the first event only, and the second was skipped as
/// "the linked customer does not exist".)
async fn two_connectors_changes_of_one_customer_claimed_together(backend: Backend) {
    let dir = tempfile::tempdir().expect("temp dir");
    let database_url = new_database(backend, dir.path()).await;
    let rig = rig_on(
        backend,
        FakeSalesforceConfig::default(),
        Some(database_url.clone()),
    )
    .await;
    let address = email("sf-both");
    let customer = rig
        .app
        .create(json!({"email": address, "name": "Ada Lovelace", "phone": "+100"}))
        .await;
    let id = customer["id"].as_str().expect("id").to_owned();
    let (stripe_link, sf_link) = wait_both_synced(&rig.app, &id, 1).await;
    let (cus, contact) = (remote_id(&stripe_link), remote_id(&sf_link));
    let Rig {
        stripe,
        salesforce,
        app,
    } = rig;
    app.stop().await;
    let store = Store::connect(&database_url, &StoreOptions::default())
        .await
        .expect("store");

    // What each connector's webhook would have stored: the remote record
    // as ferry last synced it, with that remote's change.
    let snapshot = |connector: &str| {
        let store = store.clone();
        let (id, connector) = (id.clone(), connector.to_owned());
        async move {
            store
                .links_of(&id)
                .await
                .expect("links")
                .into_iter()
                .find(|l| l.connector == connector)
                .and_then(|l| l.snapshot)
                .expect("a snapshot")
        }
    };
    let later = chrono::Utc::now().timestamp_millis() + 10_000;
    let changed = |remote_id: &str, remote_type: &str, record: Value| NewInboxEvent {
        event_id: format!("evt_down_{remote_id}"),
        entity: "customer".into(),
        kind: RemoteChange::Upsert,
        remote_id: remote_id.to_owned(),
        occurred_at_ms: later,
        record: Some(record),
        origin_key: None,
        remote_type: remote_type.to_owned(),
        policy: None,
    };
    let mut in_stripe = snapshot("stripe").await;
    in_stripe["phone"] = json!("+200");
    // Salesforce's edit came after ferry's fan-out of Stripe's phone had
    // reached it (its event time is the later one): its record has both.
    // Were its phone still the old one, the apply's order would decide
    // the phone (a remote change back, once the fan-out is its snapshot).
    let mut in_salesforce = snapshot("salesforce").await;
    in_salesforce["name"] = json!("Ada King");
    in_salesforce["phone"] = json!("+200");
    let stored = store
        .store_inbox_many(&[
            (
                "stripe",
                &[changed(&cus, "customer.updated", in_stripe)],
                None,
            ),
            (
                "salesforce",
                &[changed(&contact, "Contact", in_salesforce)],
                None,
            ),
        ])
        .await
        .expect("stored");
    assert_eq!(stored, [1, 1]);

    let app = spawn_sync_app(setup(backend, &stripe, &salesforce, Some(database_url))).await;
    for (connector, remote) in [("stripe", &cus), ("salesforce", &contact)] {
        let events = app.wait_inbox_settled(connector, remote, 1).await;
        let last = events
            .iter()
            .find(|e| e.event_id == format!("evt_down_{remote}"));
        assert_eq!(
            last.map(|e| e.state.as_str()),
            Some("applied"),
            "{connector}: {events:?}"
        );
    }
    let now = app.store.get_customer_any(&id).await.unwrap().unwrap();
    assert_eq!(
        (now.name.as_deref(), now.phone.as_deref()),
        (Some("Ada King"), Some("+200"))
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_connectors_changes_of_one_customer_claimed_together_sqlite() {
    two_connectors_changes_of_one_customer_claimed_together(Backend::Sqlite).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_connectors_changes_of_one_customer_claimed_together_postgres() {
    two_connectors_changes_of_one_customer_claimed_together(Backend::Postgres).await;
}
