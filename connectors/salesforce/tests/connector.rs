//! The Salesforce connector as a third-party author tests one: the built
//! component in ferry's real runtime, HTTP (the token endpoint included)
//! answered by a script (`ferry_sdk::testkit`), no network.

use ferry_sdk::testkit::{self, CallError, TestKit};
use ferry_sdk::{ChangeKind, ConnectorError, Operation, PushRequest};
use serde_json::{json, Value};

const ORG: &str = "https://acme.my.salesforce.com";
const TOKEN_URL: &str = "https://acme.my.salesforce.com/services/oauth2/token";
const DATA: &str = "https://acme.my.salesforce.com/services/data/v62.0";
const CONTACTS: &str = "https://acme.my.salesforce.com/services/data/v62.0/sobjects/Contact";
const ORG_ID: &str = "00D000000000001EAA";

async fn kit() -> TestKit {
    TestKit::this_crate()
        .await
        .expect("load")
        .setting("login_url", ORG)
        .setting("organization_id", "00D000000000001")
        .setting("field_map", r#"{"metadata.tier":"Tier__c"}"#)
        .secret("client_id", "cid")
        .secret("client_secret", "csecret")
}

fn token(value: &str) -> Value {
    json!({"access_token": value, "instance_url": ORG, "id": format!("{ORG}/id/{ORG_ID}/005000000000001AAA"),
        "token_type": "Bearer", "issued_at": "1795939200000", "signature": "sig"})
}

/// Scripts the token endpoint to hand out `values` in turn.
fn script_tokens(kit: &TestKit, values: &[&str]) {
    let mut rule = kit.http().on("POST", TOKEN_URL);
    for value in values {
        rule = rule.respond_json(200, &token(value));
    }
}

fn sf_error(code: &str, message: &str, fields: &[&str]) -> Value {
    json!([{"message": message, "errorCode": code, "fields": fields}])
}

/// Salesforce's refusal of a write as a duplicate of `field`'s value held
/// by record `holder`.
fn duplicate_of(field: &str, holder: &str, fields: &[&str]) -> Value {
    sf_error(
        "DUPLICATE_VALUE",
        &format!("duplicate value found: {field} duplicates value on record with id: {holder}"),
        fields,
    )
}

fn create_request() -> PushRequest {
    let record = json!({"id": "c1", "name": "Ada King Lovelace", "email": "ada@example.com",
        "address": {"line1": "12 St James's Sq", "line2": "Flat 1", "city": "London", "country": "GB"},
        "metadata": {"tier": "gold"}});
    testkit::push_request(
        "customer",
        Operation::Create,
        "c1",
        None,
        record.to_string(),
    )
}

fn linked(operation: Operation, id: &str) -> PushRequest {
    let mut req = create_request();
    req.operation = operation;
    req.remote_id = Some(id.to_owned());
    req
}

/// An update of the linked record `id` in which `changed` changed.
fn update_of(id: &str, changed: &[&str]) -> PushRequest {
    let mut update = linked(Operation::Update, id);
    let mut record: Value = serde_json::from_str(&update.record).unwrap();
    record["changed_fields"] = json!(changed);
    update.record = record.to_string();
    update
}

fn connector_error(result: Result<impl std::fmt::Debug, CallError>) -> ConnectorError {
    match result {
        Err(CallError::Connector(err)) => err,
        other => panic!("expected a connector error, got {other:?}"),
    }
}

fn token_requests(kit: &TestKit) -> usize {
    kit.http()
        .requests()
        .iter()
        .filter(|r| r.url == TOKEN_URL)
        .count()
}

#[tokio::test]
async fn manifest_declares_what_the_connector_needs() {
    let kit = kit().await;
    let m = kit.manifest();
    assert_eq!(m.name, "salesforce");
    assert_eq!(m.entities, ["customer"]);
    assert!(m.hosts.is_empty());
    assert_eq!(m.host_settings, ["login_url", "instance_url"]);
    let secrets: Vec<_> = m.secrets.iter().map(|s| s.name.as_str()).collect();
    assert_eq!(secrets, ["client_id", "client_secret"]);
    let login = m.settings.iter().find(|s| s.name == "login_url").unwrap();
    assert!(login.required);
    assert!(m.webhooks);
}

#[tokio::test]
async fn create_sends_mapped_fields_with_one_token_for_two_calls() {
    let kit = kit().await;
    script_tokens(&kit, &["tok-1"]);
    kit.http().on("POST", &format!("{CONTACTS}/")).respond_json(
        201,
        &json!({"id": "003000000000001AAA", "success": true, "errors": []}),
    );

    let result = kit.push(create_request()).await.expect("push");
    assert_eq!(result.remote_id, "003000000000001AAA");
    kit.push(create_request()).await.expect("second push");

    assert_eq!(token_requests(&kit), 1, "the host caches the token");
    let sent = kit.http().requests();
    let token_req = &sent[0];
    assert_eq!(
        token_req.form_value("grant_type").as_deref(),
        Some("client_credentials")
    );
    assert_eq!(token_req.form_value("client_id").as_deref(), Some("cid"));
    let create = &sent[1];
    assert_eq!(create.url, format!("{CONTACTS}/"));
    assert_eq!(create.header("authorization"), Some("Bearer tok-1"));
    assert_eq!(create.header("sforce-call-options"), Some("client=ferry"));
    assert_eq!(create.header("content-type"), Some("application/json"));
    let body: Value = serde_json::from_str(&create.body_text()).unwrap();
    assert_eq!(
        body,
        json!({"FirstName": "Ada King", "LastName": "Lovelace", "Email": "ada@example.com",
            "MailingStreet": "12 St James's Sq\nFlat 1", "MailingCity": "London",
            "MailingCountry": "GB", "Tier__c": "gold"})
    );
    assert!(kit.http().unmatched().is_empty());
}

#[tokio::test]
async fn an_expired_session_refreshes_the_token_once() {
    let kit = kit().await;
    script_tokens(&kit, &["tok-old", "tok-new"]);
    kit.http()
        .on("GET", &format!("{CONTACTS}/003A"))
        .respond_json(200, &json!({"FirstName": "Ada", "LastName": "Lovelace"}));
    kit.http()
        .on("PATCH", &format!("{CONTACTS}/003A"))
        .respond_json(
            401,
            &sf_error("INVALID_SESSION_ID", "Session expired or invalid", &[]),
        )
        .respond(204, &[], "");

    let result = kit
        .push(linked(Operation::Update, "003A"))
        .await
        .expect("retried");
    assert_eq!(result.remote_id, "003A");
    assert_eq!(token_requests(&kit), 2);
    let patches: Vec<_> = kit
        .http()
        .requests()
        .into_iter()
        .filter(|r| r.method == "PATCH")
        .collect();
    assert_eq!(patches.len(), 2);
    assert_eq!(patches[0].header("authorization"), Some("Bearer tok-old"));
    assert_eq!(patches[1].header("authorization"), Some("Bearer tok-new"));
    // An update sends every mapped field; absent ones as null.
    let body: Value = serde_json::from_str(&patches[1].body_text()).unwrap();
    assert_eq!(body["Phone"], Value::Null);
    assert_eq!(body["MailingState"], Value::Null);
    assert_eq!(body["LastName"], "Lovelace");
}

#[tokio::test]
async fn a_second_401_is_unauthorized() {
    let kit = kit().await;
    script_tokens(&kit, &["tok-1", "tok-2", "tok-3"]);
    kit.http()
        .on("DELETE", &format!("{CONTACTS}/003A"))
        .respond_json(
            401,
            &sf_error("INVALID_SESSION_ID", "Session expired or invalid", &[]),
        );
    match connector_error(kit.push(linked(Operation::Delete, "003A")).await) {
        ConnectorError::Unauthorized(m) => assert!(m.contains("INVALID_SESSION_ID"), "{m}"),
        other => panic!("{other:?}"),
    }
    assert_eq!(token_requests(&kit), 2, "one refresh, not a loop");
}

#[tokio::test]
async fn salesforce_error_codes_map_to_their_kinds() {
    let kit = kit().await;
    script_tokens(&kit, &["tok-1"]);
    kit.http().on("POST", &format!("{CONTACTS}/")).respond_json(
        403,
        &sf_error(
            "REQUEST_LIMIT_EXCEEDED",
            "TotalRequests Limit exceeded.",
            &[],
        ),
    );
    kit.http()
        .on("GET", &format!("{CONTACTS}/003A"))
        .respond_json(200, &json!({"FirstName": "Ada", "LastName": "Lovelace"}));
    kit.http()
        .on("PATCH", &format!("{CONTACTS}/003A"))
        .respond_json(
            400,
            &sf_error(
                "REQUIRED_FIELD_MISSING",
                "Required fields are missing: [LastName]",
                &["LastName"],
            ),
        );
    kit.http()
        .on("DELETE", &format!("{CONTACTS}/003A"))
        .respond_json(
            404,
            &sf_error("ENTITY_IS_DELETED", "entity is deleted", &[]),
        );
    kit.http()
        .on("GET", &format!("{CONTACTS}/003B"))
        .respond_json(503, &sf_error("SERVER_UNAVAILABLE", "try later", &[]));

    // The org's daily allowance comes back as old requests age out: an
    // hour between probes, not a push's backoff of seconds (which spent a
    // change's attempts and dead-lettered it within minutes).
    assert!(matches!(
        connector_error(kit.push(create_request()).await),
        ConnectorError::RateLimited(r) if r.retry_after_ms == Some(3_600_000)
            && r.message.contains("REQUEST_LIMIT_EXCEEDED")
    ));
    match connector_error(kit.push(linked(Operation::Update, "003A")).await) {
        ConnectorError::Permanent(m) => {
            assert!(m.contains("REQUIRED_FIELD_MISSING"), "{m}");
            assert!(m.contains("Required fields are missing"), "{m}");
            assert!(m.contains("LastName"), "{m}");
        }
        other => panic!("{other:?}"),
    }
    assert!(matches!(
        connector_error(kit.push(linked(Operation::Delete, "003A")).await),
        ConnectorError::NotFound(_)
    ));
    assert!(matches!(
        connector_error(kit.fetch("customer", "003B").await),
        ConnectorError::Retryable(_)
    ));
    assert!(matches!(
        connector_error(kit.fetch("invoice", "003B").await),
        ConnectorError::Unsupported(_)
    ));
    // A permission the integration user lacks (one record's sharing, or an
    // object's access) is no expired token: refreshing would not help, and
    // "unauthorized" reads as "fix the secret".
    kit.http()
        .on("DELETE", &format!("{CONTACTS}/003D"))
        .respond_json(
            403,
            &sf_error(
                "INSUFFICIENT_ACCESS_OR_READONLY",
                "insufficient access rights on object id",
                &[],
            ),
        );
    match connector_error(kit.push(linked(Operation::Delete, "003D")).await) {
        ConnectorError::Permanent(m) => assert!(m.contains("INSUFFICIENT_ACCESS"), "{m}"),
        other => panic!("{other:?}"),
    }
    assert_eq!(token_requests(&kit), 1, "none of these refreshes the token");
}

/// An update reads the name's parts first and leaves them alone when they
/// already make up the name: ferry's split (the last word is the last name)
/// is a guess, and "van Beethoven" stays a last name. A new name is split.
#[tokio::test]
async fn an_update_keeps_name_parts_that_make_up_the_name() {
    let kit = kit().await;
    script_tokens(&kit, &["tok-1"]);
    kit.http()
        .on("GET", &format!("{CONTACTS}/003A"))
        .respond_json(
            200,
            &json!({"attributes": {"type": "Contact"}, "Id": "003A",
                "FirstName": "Ada", "LastName": "King Lovelace"}),
        );
    kit.http()
        .on("PATCH", &format!("{CONTACTS}/003A"))
        .respond(204, &[], "");
    let result = kit
        .push(linked(Operation::Update, "003A"))
        .await
        .expect("update");
    let read = &kit.http().requests()[1];
    assert_eq!(read.method, "GET");
    assert_eq!(
        read.query(),
        [("fields".to_owned(), "FirstName,LastName".to_owned())]
    );
    let patch = kit.http().last_request().expect("patch");
    let body: Value = serde_json::from_str(&patch.body_text()).unwrap();
    assert!(
        body.get("FirstName").is_none() && body.get("LastName").is_none(),
        "{body}"
    );
    assert_eq!(body["Email"], "ada@example.com");
    // What the record holds after the write is the kept split.
    let record: Value = serde_json::from_str(result.record.as_deref().expect("record")).unwrap();
    assert_eq!(record["name"], "Ada King Lovelace");

    let mut renamed = linked(Operation::Update, "003A");
    renamed.record = renamed.record.replace("Ada King Lovelace", "Ada Byron");
    kit.push(renamed).await.expect("rename");
    let patch = kit.http().last_request().expect("patch");
    let body: Value = serde_json::from_str(&patch.body_text()).unwrap();
    assert_eq!(
        (&body["FirstName"], &body["LastName"]),
        (&json!("Ada"), &json!("Byron"))
    );
}

/// An update writes only the fields ferry changed since the last sync
/// (`changed_fields`): a phone someone set in Salesforce just before the
/// push stays. The name unchanged, its parts are not read either.
#[tokio::test]
async fn an_update_writes_only_what_changed() {
    let kit = kit().await;
    script_tokens(&kit, &["tok-1"]);
    kit.http()
        .on("PATCH", &format!("{CONTACTS}/003A"))
        .respond(204, &[], "");
    let result = kit
        .push(update_of("003A", &["email", "address.line2"]))
        .await
        .expect("update");
    assert_eq!(kit.http().requests().len(), 2, "a token and the write");
    let patch = kit.http().last_request().expect("patch");
    let body: Value = serde_json::from_str(&patch.body_text()).unwrap();
    let written: Vec<&String> = body.as_object().unwrap().keys().collect();
    assert_eq!(written, ["Email", "MailingStreet"], "{body}");
    // The result still names every mapped field, as ferry sent them.
    let record: Value = serde_json::from_str(result.record.as_deref().expect("record")).unwrap();
    assert_eq!(record["name"], "Ada King Lovelace", "{record}");

    // A nameless customer's new email moves the stand-in its required
    // last name holds: left as the old email's, it read back as a name.
    // The record is read first: a name someone typed there meanwhile (its
    // message not applied yet) is left alone, not overwritten by the
    // stand-in, and stays out of what ferry keeps as synced, so that name
    // still reaches ferry as Salesforce's edit.
    kit.http()
        .on("GET", &format!("{CONTACTS}/003A"))
        .respond_json(
            200,
            &json!({"Id": "003A", "LastName": "old (no name)", "Email": "old@example.com"}),
        )
        .respond_json(
            200,
            &json!({"Id": "003A", "FirstName": "Ada", "LastName": "Lovelace",
                "Email": "old@example.com"}),
        );
    let nameless = || {
        let mut nameless = linked(Operation::Update, "003A");
        nameless.record = json!({"id": "c1", "email": "bob@example.com",
            "changed_fields": ["email"]})
        .to_string();
        nameless
    };
    kit.push(nameless()).await.expect("update");
    let patch = kit.http().last_request().expect("patch");
    let body: Value = serde_json::from_str(&patch.body_text()).unwrap();
    assert_eq!(
        (&body["Email"], &body["LastName"]),
        (&json!("bob@example.com"), &json!("bob (no name)")),
        "{body}"
    );
    let result = kit.push(nameless()).await.expect("update");
    let patch = kit.http().last_request().expect("patch");
    let body: Value = serde_json::from_str(&patch.body_text()).unwrap();
    assert_eq!(
        body,
        json!({"Email": "bob@example.com"}),
        "the typed name is kept"
    );
    let record: Value = serde_json::from_str(result.record.as_deref().expect("record")).unwrap();
    assert_eq!(record["name"], Value::Null, "{record}");

    // Only a field the mapping does not hold changed: no write at all.
    let before = kit.http().requests().len();
    kit.push(update_of("003A", &["metadata.plan"]))
        .await
        .expect("update");
    assert_eq!(kit.http().requests().len(), before, "nothing to write");
}

/// The org's concurrent-request limit clears in seconds (the push's own
/// backoff), and a row lock met inside a trigger is transient however it is
/// wrapped.
#[tokio::test]
async fn a_concurrency_limit_and_a_wrapped_row_lock_are_transient() {
    let kit = kit().await;
    script_tokens(&kit, &["tok-1"]);
    kit.http().on("POST", &format!("{CONTACTS}/")).respond_json(
        403,
        &sf_error(
            "REQUEST_LIMIT_EXCEEDED",
            "ConcurrentPerOrgLongTxn Limit exceeded.",
            &[],
        ),
    );
    kit.http()
        .on("GET", &format!("{CONTACTS}/003C"))
        .respond_json(
            200,
            &json!({"FirstName": "Ada King", "LastName": "Lovelace"}),
        );
    kit.http()
        .on("PATCH", &format!("{CONTACTS}/003C"))
        .respond_json(
            400,
            &sf_error(
                "CANNOT_INSERT_UPDATE_ACTIVATE_ENTITY",
                "ContactTrigger: execution of AfterUpdate caused by: System.DmlException: \
                 Update failed. First exception on row 0; first error: UNABLE_TO_LOCK_ROW, \
                 unable to obtain exclusive access to this record: []",
                &[],
            ),
        );
    assert!(matches!(
        connector_error(kit.push(create_request()).await),
        ConnectorError::RateLimited(r) if r.retry_after_ms.is_none()
    ));
    assert!(matches!(
        connector_error(kit.push(linked(Operation::Update, "003C")).await),
        ConnectorError::Retryable(m) if m.contains("UNABLE_TO_LOCK_ROW")
    ));
}

/// Salesforce's errors that are not what their status says: a 404
/// `NOT_FOUND` for an id sent under another object (or a missing external
/// id field) is a wrong request, not a record gone (read as gone, a delete
/// counted as done and left the record there); the org's maintenance
/// window and a query's timeout pass; and a query answer without `done`
/// is not a complete listing.
#[tokio::test]
async fn salesforce_errors_are_read_for_what_they_mean() {
    let kit = kit().await;
    script_tokens(&kit, &["tok-1"]);
    kit.http()
        .on("DELETE", &format!("{CONTACTS}/001A"))
        .respond_json(
            404,
            &sf_error(
                "NOT_FOUND",
                "Provided external ID field does not exist or is not accessible: 001A",
                &[],
            ),
        );
    kit.http()
        .on("DELETE", &format!("{CONTACTS}/003G"))
        .respond_json(
            404,
            &sf_error("ENTITY_IS_DELETED", "entity is deleted", &[]),
        );
    kit.http()
        .on("DELETE", &format!("{CONTACTS}/003V"))
        .respond(410, &[], "");
    kit.http()
        .on("PATCH", &format!("{CONTACTS}/003M"))
        .respond_json(
            400,
            &sf_error(
                "INSERT_UPDATE_DELETE_NOT_ALLOWED_DURING_MAINTENANCE",
                "Updates can't be made during maintenance.",
                &[],
            ),
        );
    kit.http()
        .on("GET", &format!("{CONTACTS}/003M"))
        .respond_json(200, &json!({"FirstName": "Ada", "LastName": "King"}));
    assert!(matches!(
        connector_error(kit.push(linked(Operation::Delete, "001A")).await),
        ConnectorError::Permanent(m) if m.contains("external ID field")
    ));
    assert!(matches!(
        connector_error(kit.push(linked(Operation::Delete, "003G")).await),
        ConnectorError::NotFound(_)
    ));
    // A retired API version is not a record gone.
    assert!(matches!(
        connector_error(kit.push(linked(Operation::Delete, "003V")).await),
        ConnectorError::Permanent(_)
    ));
    // A maintenance lasts hours: the connector pauses, no change spends
    // an attempt on it (each one's ran out within the window).
    assert!(matches!(
        connector_error(kit.push(linked(Operation::Update, "003M")).await),
        ConnectorError::RateLimited(r) if r.message.contains("MAINTENANCE")
            && r.retry_after_ms == Some(60_000)
    ));
    kit.http().on("PATCH", &format!("{CONTACTS}/003U")).respond(
        503,
        &[("Content-Type", "application/json"), ("Retry-After", "120")],
        sf_error("SERVER_UNAVAILABLE", "Server is unavailable.", &[]).to_string(),
    );
    kit.http()
        .on("GET", &format!("{CONTACTS}/003U"))
        .respond_json(200, &json!({"FirstName": "Ada", "LastName": "King"}));
    assert!(matches!(
        connector_error(kit.push(linked(Operation::Update, "003U")).await),
        ConnectorError::RateLimited(r) if r.retry_after_ms == Some(120_000)
    ));

    kit.http()
        .on("GET", &format!("{DATA}/query?q="))
        .respond_json(200, &json!({"records": []}));
    assert!(matches!(
        connector_error(kit.list("customer", None, 10).await),
        ConnectorError::Retryable(_)
    ));
}

/// A query locator Salesforce released before its next batch was asked for
/// (a user holds 10 open at most): the listing asks again, not fails.
#[tokio::test]
async fn a_released_query_locator_is_asked_again() {
    let kit = kit().await;
    script_tokens(&kit, &["tok-1"]);
    let locator = "/services/data/v62.0/query/01gB-1";
    kit.http()
        .on("GET", &format!("{DATA}/query?q="))
        .respond_json(
            200,
            &json!({"totalSize": 2, "done": false, "nextRecordsUrl": locator,
            "records": [{"attributes": {"type": "Contact"}, "Id": "003000000000001AAA",
                "LastName": "L1", "LastModifiedDate": "2026-11-29T08:00:00Z"}]}),
        );
    kit.http()
        .on("GET", &format!("{ORG}{locator}"))
        .respond_json(
            400,
            &json!([{"errorCode": "INVALID_QUERY_LOCATOR", "message": "invalid query locator"}]),
        );
    assert!(matches!(
        connector_error(kit.list("customer", None, 2).await),
        ConnectorError::Retryable(m) if m.contains("INVALID_QUERY_LOCATOR")
    ));
}

#[tokio::test]
async fn fetch_maps_the_record_back() {
    let kit = kit().await;
    script_tokens(&kit, &["tok-1"]);
    kit.http()
        .on("GET", &format!("{CONTACTS}/003A"))
        .respond_json(
            200,
            &json!({"attributes": {"type": "Contact"}, "Id": "003A", "FirstName": "Ada",
            "LastName": "Lovelace", "Email": "ada@example.com", "Phone": null,
            "MailingStreet": "1 Road\nFlat 2", "Tier__c": "gold",
            "LastModifiedDate": "2026-11-29T08:00:00.000+0000"}),
        );
    let record = kit.fetch("customer", "003A").await.unwrap();
    // The mapped fields by name: a field the integration user may not see
    // is left out of a whole record's answer, and read as cleared.
    let asked = kit.http().last_request().expect("the read").url;
    let fields = asked.split("fields=").nth(1).expect("fields named");
    for field in [
        "Id",
        "LastModifiedDate",
        "FirstName",
        "LastName",
        "Email",
        "Phone",
        "Tier__c",
    ] {
        assert!(fields.split("%2C").any(|f| f == field), "{asked}");
    }
    assert_eq!(record.remote_id, "003A");
    assert_eq!(record.updated_at_ms, Some(1_795_939_200_000));
    let c: Value = serde_json::from_str(&record.record).unwrap();
    assert_eq!(
        c,
        json!({"id": "003A", "name": "Ada Lovelace", "email": "ada@example.com",
            "address": {"line1": "1 Road", "line2": "Flat 2"}, "metadata": {"tier": "gold"}})
    );
}

#[tokio::test]
async fn list_pages_by_id_and_follows_batches() {
    let kit = kit().await;
    script_tokens(&kit, &["tok-1"]);
    let id = |n: u8| format!("003000000000{n:03}AAA");
    let row = |n: u8| {
        json!({"attributes": {"type": "Contact"}, "Id": id(n), "LastName": format!("L{n}"),
            "LastModifiedDate": "2026-11-29T08:00:00Z"})
    };
    // The first page's answer comes in two batches (Salesforce may split
    // even a LIMITed query); the connector follows nextRecordsUrl.
    let locator = "/services/data/v62.0/query/01gA-1";
    kit.http()
        .on("GET", &format!("{DATA}/query?q="))
        .respond_json(
            200,
            &json!({"totalSize": 2, "done": false, "nextRecordsUrl": locator,
                "records": [row(1)]}),
        )
        .respond_json(
            200,
            &json!({"totalSize": 1, "done": true, "records": [row(3)]}),
        );
    kit.http()
        .on("GET", &format!("{ORG}{locator}"))
        .respond_json(
            200,
            &json!({"totalSize": 2, "done": true, "records": [row(2)]}),
        );

    let first = kit.list("customer", None, 2).await.unwrap();
    let ids: Vec<&str> = first.records.iter().map(|r| r.remote_id.as_str()).collect();
    assert_eq!(ids, [id(1), id(2)]);
    assert_eq!(
        first.next_cursor,
        Some(id(2)),
        "a full page: there may be more"
    );
    let requests = kit.http().requests();
    let query = requests
        .iter()
        .find(|r| r.url.contains("/query?q="))
        .expect("a query");
    assert_eq!(query.header("sforce-query-options"), Some("batchSize=200"));
    assert_eq!(query.header("sforce-call-options"), Some("client=ferry"));
    let q = query.query().into_iter().find(|(k, _)| k == "q").unwrap().1;
    assert!(
        q.starts_with("SELECT Id, LastModifiedDate, FirstName, LastName, Email"),
        "{q}"
    );
    assert!(
        q.ends_with("Tier__c FROM Contact ORDER BY Id LIMIT 2"),
        "{q}"
    );

    let second = kit.list("customer", first.next_cursor, 5000).await.unwrap();
    assert_eq!(second.records[0].remote_id, id(3));
    assert_eq!(second.next_cursor, None, "a short page is the last");
    let page = kit.http().last_request().unwrap();
    let q = page.query().into_iter().find(|(k, _)| k == "q").unwrap().1;
    assert!(
        q.ends_with(&format!("WHERE Id > '{}' ORDER BY Id LIMIT 2000", id(2))),
        "{q}"
    );
    assert_eq!(page.header("sforce-query-options"), Some("batchSize=2000"));
    assert!(kit.http().unmatched().is_empty());

    for bad in [
        "https://evil.example/x",
        "003' OR Name != '",
        "/services/data/v62.0/query/x",
    ] {
        assert!(matches!(
            connector_error(kit.list("customer", Some(bad.into()), 10).await),
            ConnectorError::Permanent(_)
        ));
    }
}

#[tokio::test]
async fn an_external_id_makes_create_an_upsert() {
    let kit = kit()
        .await
        .setting("external_id_field", "Ferry_Id__c")
        .setting("client_name", "acme-sync");
    script_tokens(&kit, &["tok-1"]);
    let upsert = format!("{CONTACTS}/Ferry_Id__c/c1");
    kit.http()
        .on("PATCH", &upsert)
        .respond_json(
            201,
            &json!({"id": "003N", "success": true, "errors": [], "created": true}),
        )
        .respond(204, &[], "");
    kit.http().on("GET", &upsert).respond_json(
        200,
        &json!({"attributes": {"type": "Contact"}, "Id": "003N"}),
    );

    assert_eq!(kit.push(create_request()).await.unwrap().remote_id, "003N");
    let sent = kit.http().last_request().unwrap();
    assert_eq!(
        (sent.method.as_str(), sent.url.as_str()),
        ("PATCH", upsert.as_str())
    );
    assert_eq!(sent.header("sforce-call-options"), Some("client=acme-sync"));
    // The record its external id names may exist already: fields ferry
    // does not hold are cleared there, as an update clears them.
    let body: Value = serde_json::from_str(&sent.body_text()).unwrap();
    assert_eq!(body["Phone"], Value::Null, "{body}");
    assert!(body.as_object().unwrap().contains_key("Phone"), "{body}");
    // An older API version answers 204: the id is read back.
    assert_eq!(kit.push(create_request()).await.unwrap().remote_id, "003N");
    assert_eq!(kit.http().last_request().unwrap().method, "GET");
}

/// Two upserts of one external id at once (a create retried while its
/// first attempt still ran): on a Unique field Salesforce refuses the
/// second as a duplicate of the record the first made. Its retry finds
/// that record; refused for good, the create was dead-lettered while its
/// Contact existed.
#[tokio::test]
async fn an_upsert_that_raced_its_own_first_attempt_is_retried() {
    let kit = kit().await.setting("external_id_field", "Ferry_Id__c");
    script_tokens(&kit, &["tok-1"]);
    let upsert = format!("{CONTACTS}/Ferry_Id__c/c1");
    kit.http()
        .on("PATCH", &upsert)
        .respond_json(400, &duplicate_of("Ferry_Id__c", "003N", &[]));
    kit.http()
        .on("GET", &upsert)
        .respond_json(
            200,
            &json!({"attributes": {"type": "Contact"}, "Id": "003N"}),
        )
        .respond_json(
            404,
            &sf_error("NOT_FOUND", "The requested resource does not exist", &[]),
        );
    assert!(matches!(
        connector_error(kit.push(create_request()).await),
        ConnectorError::Retryable(m) if m.contains("DUPLICATE_VALUE")
    ));
    // No live record holds the value: a deleted one in the Recycle Bin
    // does, which no retry or replay gets past until a person undeletes or
    // purges it.
    match connector_error(kit.push(create_request()).await) {
        ConnectorError::Permanent(m) => assert!(m.contains("Recycle Bin"), "{m}"),
        other => panic!("{other:?}"),
    }
    // A duplicate of another field (a duplicate rule on Email) stays a
    // refusal.
    let kit = self::kit()
        .await
        .setting("external_id_field", "Ferry_Id__c");
    script_tokens(&kit, &["tok-1"]);
    kit.http()
        .on("PATCH", &upsert)
        .respond_json(400, &duplicate_of("Email", "003M", &["Email"]));
    assert!(matches!(
        connector_error(kit.push(create_request()).await),
        ConnectorError::Permanent(_)
    ));
}

/// An update stamps the external id; when another record holds it (the
/// Contact the customer was linked to before a merge or a relink, in the
/// Recycle Bin or alive), the change goes without the stamp. Before, the
/// refusal was permanent and every later change of the customer was
/// dead-lettered. The setting's spelling of the field need not match the
/// org's.
#[tokio::test]
async fn an_update_whose_external_id_another_record_holds_goes_without_it() {
    let kit = kit().await.setting("external_id_field", "ferry_id__c");
    script_tokens(&kit, &["tok-1"]);
    kit.http()
        .on("PATCH", &format!("{CONTACTS}/003B"))
        .respond_json(400, &duplicate_of("Ferry_Id__c", "003A", &[]))
        .respond(204, &[], "");
    let update = update_of("003B", &["email"]);
    let result = kit.push(update).await.expect("update");
    let patches: Vec<Value> = kit
        .http()
        .requests()
        .iter()
        .filter(|r| r.method == "PATCH")
        .map(|r| serde_json::from_str(&r.body_text()).unwrap())
        .collect();
    assert_eq!(
        patches,
        [
            json!({"Email": "ada@example.com", "ferry_id__c": "c1"}),
            json!({"Email": "ada@example.com"}),
        ]
    );
    let record: Value = serde_json::from_str(result.record.as_deref().expect("record")).unwrap();
    assert_eq!(record["email"], "ada@example.com", "{record}");

    // A duplicate of another unique field whose name holds this one's is
    // that field's refusal.
    let kit = self::kit()
        .await
        .setting("external_id_field", "Ferry_Id__c");
    script_tokens(&kit, &["tok-1"]);
    kit.http()
        .on("PATCH", &format!("{CONTACTS}/003B"))
        .respond_json(400, &duplicate_of("Legacy_Ferry_Id__c", "003A", &[]));
    let update = update_of("003B", &["email"]);
    assert!(matches!(
        connector_error(kit.push(update).await),
        ConnectorError::Permanent(_)
    ));
}

/// Salesforce answers a mistyped `object`, an API version newer than the
/// org runs, or an object the integration user cannot see with the same
/// 404 `NOT_FOUND` as a record that is not there. Read as the record gone,
/// a delete counted as done and left the record in Salesforce; the object
/// is asked about first.
#[tokio::test]
async fn a_404_of_an_object_the_org_does_not_know_is_not_a_record_gone() {
    let not_found = sf_error("NOT_FOUND", "The requested resource does not exist", &[]);
    for (object_known, expect_gone) in [(false, false), (true, true)] {
        let kit = kit().await;
        script_tokens(&kit, &["tok-1"]);
        kit.http()
            .on("DELETE", &format!("{CONTACTS}/003A"))
            .respond_json(404, &not_found);
        kit.http()
            .on("GET", &format!("{CONTACTS}/003A"))
            .respond_json(404, &not_found);
        let describe = json!({"objectDescribe": {"name": "Contact"}, "recentItems": []});
        match object_known {
            true => kit.http().on("GET", CONTACTS).respond_json(200, &describe),
            false => kit.http().on("GET", CONTACTS).respond_json(404, &not_found),
        };
        for (read, error) in [
            (
                false,
                connector_error(kit.push(linked(Operation::Delete, "003A")).await),
            ),
            (true, connector_error(kit.fetch("customer", "003A").await)),
        ] {
            match (expect_gone, read, error) {
                (true, false, ConnectorError::NotFound(_)) => {}
                // A read's plain `NOT_FOUND` is no proof of a delete
                // either (a_read_takes_only_a_deleted_record_as_gone).
                (true, true, ConnectorError::Permanent(m)) => {
                    assert!(m.contains("ENTITY_IS_DELETED"), "{m}")
                }
                (false, _, ConnectorError::Permanent(m)) => {
                    assert!(m.contains("does not know object `Contact`"), "{m}")
                }
                (_, _, other) => panic!("object known: {object_known}: {other:?}"),
            }
        }
        let probes = kit
            .http()
            .requests()
            .iter()
            .filter(|r| r.method == "GET" && r.url == CONTACTS)
            .count();
        assert_eq!(probes, 2, "one probe after each 404");
    }
}

/// A record a merge deleted answers its read `ENTITY_IS_DELETED` like any
/// delete; its `MasterRecordId` (read with `queryAll`) names the winner,
/// and the read is a dead letter naming it, not a delete (the customer
/// was deleted in ferry and everywhere else). Without a winner it is a
/// delete, and so it is for an object without `MasterRecordId` (a custom
/// one: `INVALID_FIELD`).
#[tokio::test(flavor = "multi_thread")]
async fn a_record_a_merge_deleted_is_not_gone() {
    let kit = kit().await;
    script_tokens(&kit, &["tok-1"]);
    let query_all = "https://acme.my.salesforce.com/services/data/v62.0/queryAll";
    let (merged, deleted, custom) = (
        "003000000000001AAA",
        "003000000000002AAA",
        "003000000000003AAA",
    );
    for id in [merged, deleted, custom] {
        kit.http()
            .on("GET", &format!("{CONTACTS}/{id}"))
            .respond_json(
                404,
                &sf_error("ENTITY_IS_DELETED", "entity is deleted", &[]),
            );
    }
    let row = |id: &str, master: Value| {
        json!({"totalSize": 1, "done": true, "records": [
            {"attributes": {"type": "Contact"}, "Id": id, "MasterRecordId": master}]})
    };
    kit.http()
        .on("GET", query_all)
        .respond_json(200, &row(merged, json!("003000000000009AAA")))
        .respond_json(200, &row(deleted, Value::Null))
        .respond_json(
            400,
            &sf_error(
                "INVALID_FIELD",
                "No such column 'MasterRecordId' on sobject of type Contact",
                &[],
            ),
        );
    match connector_error(kit.fetch("customer", merged).await) {
        ConnectorError::Permanent(m) => {
            assert!(m.contains("was merged into 003000000000009AAA"), "{m}");
        }
        other => panic!("{other:?}"),
    }
    for id in [deleted, custom] {
        assert!(matches!(
            connector_error(kit.fetch("customer", id).await),
            ConnectorError::NotFound(m) if m.contains("ENTITY_IS_DELETED")
        ));
    }
    let asked = kit
        .http()
        .requests()
        .iter()
        .filter(|r| r.url.starts_with(query_all))
        .count();
    assert_eq!(asked, 3);
}

/// A read answered 404 `NOT_FOUND` (not `ENTITY_IS_DELETED`) is not the
/// record gone: Salesforce answers so for a record a sharing change hides
/// from the integration user, and a reconciliation whose listing missed
/// it for the same reason deleted the customer (and fanned the delete
/// out). A deleted record's own answer still is.
#[tokio::test]
async fn a_read_takes_only_a_deleted_record_as_gone() {
    let kit = kit().await;
    script_tokens(&kit, &["tok-1"]);
    let describe = json!({"objectDescribe": {"name": "Contact"}, "recentItems": []});
    kit.http().on("GET", CONTACTS).respond_json(200, &describe);
    kit.http()
        .on("GET", &format!("{CONTACTS}/003H"))
        .respond_json(
            404,
            &sf_error("NOT_FOUND", "The requested resource does not exist", &[]),
        );
    kit.http()
        .on("GET", &format!("{CONTACTS}/003D"))
        .respond_json(
            404,
            &sf_error("ENTITY_IS_DELETED", "entity is deleted", &[]),
        );
    // A 404 without Salesforce's own error (a proxy's page) says nothing
    // either.
    kit.http().on("GET", &format!("{CONTACTS}/003P")).respond(
        404,
        &[("content-type", "text/html")],
        "<html>Not Found</html>",
    );
    match connector_error(kit.fetch("customer", "003H").await) {
        ConnectorError::Permanent(m) => {
            assert!(m.contains("NOT_FOUND"), "{m}");
            assert!(m.contains("may not see (sharing)"), "{m}");
        }
        other => panic!("{other:?}"),
    }
    assert!(matches!(
        connector_error(kit.fetch("customer", "003D").await),
        ConnectorError::NotFound(m) if m.contains("ENTITY_IS_DELETED")
    ));
    assert!(matches!(
        connector_error(kit.fetch("customer", "003P").await),
        ConnectorError::Permanent(m) if m.contains("HTTP 404")
    ));
    // Nor is it a delete's answer: counted as done, the record stayed.
    kit.http()
        .on("DELETE", &format!("{CONTACTS}/003P"))
        .respond(
            404,
            &[("content-type", "text/html")],
            "<html>Not Found</html>",
        );
    assert!(matches!(
        connector_error(kit.push(linked(Operation::Delete, "003P")).await),
        ConnectorError::Permanent(_)
    ));
}

/// A URL setting with a path (an API URL pasted whole) is refused before
/// any call: requests under it went to paths Salesforce answers with a
/// record's 404, and deletes counted as done.
#[tokio::test]
async fn a_url_setting_with_a_path_is_refused() {
    for (name, url) in [
        (
            "instance_url",
            "https://acme.my.salesforce.com/services/data/v62.0",
        ),
        (
            "login_url",
            "https://login.salesforce.com/services/oauth2/token",
        ),
        ("login_url", "login.salesforce.com"),
    ] {
        let kit = kit().await.setting(name, url);
        assert!(
            matches!(
                connector_error(kit.push(linked(Operation::Delete, "003A")).await),
                ConnectorError::Permanent(m) if m.contains(name) && m.contains("host only")
            ),
            "{name} = {url}"
        );
        assert!(kit.http().requests().is_empty(), "{name}: no call made");
    }
    let kit = kit()
        .await
        .setting("instance_url", "https://acme.my.salesforce.com/");
    script_tokens(&kit, &["tok-1"]);
    kit.http()
        .on("DELETE", &format!("{CONTACTS}/003A"))
        .respond(204, &[], "");
    kit.push(linked(Operation::Delete, "003A"))
        .await
        .expect("a trailing slash is kept off");
}

/// An outbound message as the fake Salesforce (tests/support) writes one.
fn outbound_message(org_id: &str, records: &[(&str, &str, &str)]) -> String {
    let mut xml = String::from(concat!(
        r#"<?xml version="1.0" encoding="UTF-8"?>"#,
        r#"<soapenv:Envelope xmlns:soapenv="http://schemas.xmlsoap.org/soap/envelope/""#,
        r#" xmlns:xsd="http://www.w3.org/2001/XMLSchema""#,
        r#" xmlns:xsi="http://www.w3.org/2001/XMLSchema-instance">"#,
        "<soapenv:Body>",
    ));
    xml.push_str(&format!(
        concat!(
            r#"<notifications xmlns="http://soap.sforce.com/2005/09/outbound">"#,
            "<OrganizationId>{org}</OrganizationId>",
            "<ActionId>04k000000000001AAA</ActionId>",
            r#"<SessionId xsi:nil="true"/>"#,
            "<EnterpriseUrl>{base}/services/Soap/c/62.0/{org15}</EnterpriseUrl>",
            "<PartnerUrl>{base}/services/Soap/u/62.0/{org15}</PartnerUrl>",
        ),
        org = org_id,
        org15 = &org_id[..15],
        base = ORG,
    ));
    for (notification, object, id) in records {
        xml.push_str(&format!(
            concat!(
                "<Notification><Id>{nid}</Id>",
                r#"<sObject xsi:type="sf:{object}" xmlns:sf="urn:sobject.enterprise.soap.sforce.com">"#,
                "<sf:Id>{id}</sf:Id>",
                "<sf:CreatedDate>2026-11-29T07:00:00.000Z</sf:CreatedDate>",
                "<sf:Email>{id}@example.com</sf:Email>",
                "<sf:FirstName>Ada</sf:FirstName>",
                "<sf:LastModifiedDate>2026-11-29T08:00:00.000Z</sf:LastModifiedDate>",
                "<sf:LastName>O&apos;Brien &amp; Co</sf:LastName>",
                "<sf:MailingCity>London</sf:MailingCity>",
                "<sf:SystemModstamp>2026-11-29T08:00:00.000Z</sf:SystemModstamp>",
                "<sf:Tier__c>gold</sf:Tier__c>",
                "</sObject></Notification>",
            ),
            nid = notification,
            object = object,
            id = id,
        ));
    }
    xml.push_str("</notifications></soapenv:Body></soapenv:Envelope>");
    xml
}

/// A message taken as it is (`fetch_records` = `never`: the operator set
/// the message up to send every mapped field, so a missing one was
/// cleared).
#[tokio::test]
async fn an_outbound_message_becomes_events_and_an_ack() {
    let kit = kit().await.setting("fetch_records", "never");
    let body = outbound_message(
        ORG_ID,
        &[
            ("04l01", "Contact", "003A"),
            ("04l02", "Contact", "003B"),
            ("04l03", "Contact", "003C"),
            ("04l04", "Account", "001A"),
        ],
    );
    let parsed = kit
        .receive_webhook(testkit::webhook_request(
            &[
                ("content-type", "text/xml; charset=utf-8"),
                ("soapaction", "\"\""),
            ],
            body.clone(),
        ))
        .await
        .expect("verified and parsed");
    // The Account notification is not the configured object: skipped.
    assert_eq!(parsed.events.len(), 3);
    let ids: Vec<_> = parsed.events.iter().map(|e| e.id.as_str()).collect();
    // Each with its record's date and a digest of its fields: a
    // notification sent again after a later edit carries that edit, under
    // an id of its own, also when the edit is of the same second
    // (Salesforce dates in whole seconds).
    for (id, prefix) in ids.iter().zip([
        "04l01:003A:1795939200000:",
        "04l02:003B:1795939200000:",
        "04l03:003C:1795939200000:",
    ]) {
        let digest = id.strip_prefix(prefix).unwrap_or_else(|| panic!("{id}"));
        assert!(
            digest.len() == 16 && digest.chars().all(|c| c.is_ascii_hexdigit()),
            "{id}"
        );
    }
    let receive = |xml: String| {
        let kit = &kit;
        async move {
            kit.receive_webhook(testkit::webhook_request(
                &[("content-type", "text/xml; charset=utf-8")],
                xml,
            ))
            .await
            .expect("verified and parsed")
        }
    };
    let redelivered = receive(body.clone()).await;
    assert_eq!(
        redelivered.events[0].id, ids[0],
        "a redelivery is one event"
    );
    let later = receive(body.replace("2026-11-29T08:00:00.000Z", "2026-11-29T08:05:00.000Z")).await;
    assert!(later.events[0].id.starts_with("04l01:003A:1795939500000:"));
    let same_second = receive(body.replacen(">London<", ">Paris<", 1)).await;
    assert!(same_second.events[0]
        .id
        .starts_with("04l01:003A:1795939200000:"));
    assert_ne!(
        same_second.events[0].id, ids[0],
        "an edit of the same second"
    );
    let event = &parsed.events[1];
    assert_eq!(event.entity, "customer");
    assert_eq!(event.kind, ChangeKind::Upsert);
    assert_eq!(event.remote_id, "003B");
    assert_eq!(event.occurred_at_ms, 1_795_939_200_000);
    assert_eq!(event.origin_key, None);
    assert_eq!(event.remote_type, "outbound_message.Contact");
    let record: Value = serde_json::from_str(event.record.as_deref().unwrap()).unwrap();
    assert_eq!(
        record,
        json!({"id": "003B", "name": "Ada O'Brien & Co", "email": "003B@example.com",
            "address": {"city": "London"}, "metadata": {"tier": "gold"}})
    );
    let reply = parsed.reply.expect("a SOAP acknowledgement");
    assert_eq!(reply.content_type, "text/xml; charset=utf-8");
    let reply = String::from_utf8(reply.body).unwrap();
    assert!(
        reply.contains(
            r#"<notificationsResponse xmlns="http://soap.sforce.com/2005/09/outbound"><Ack>true</Ack></notificationsResponse>"#
        ),
        "{reply}"
    );
    assert!(kit.http().requests().is_empty(), "no API call needed");
}

/// `body`, an Outbound Message of `outbound_message`, with every mapped
/// field of its Contact.
fn complete(body: &str) -> String {
    body.replace(
        "<sf:MailingCity>London</sf:MailingCity>",
        concat!(
            "<sf:MailingCity>London</sf:MailingCity>",
            "<sf:MailingCountry>United Kingdom</sf:MailingCountry>",
            "<sf:MailingPostalCode>N1 9GU</sf:MailingPostalCode>",
            "<sf:MailingState>London</sf:MailingState>",
            "<sf:MailingStreet>1 Road</sf:MailingStreet>",
            "<sf:Phone>+44 20 7946 0000</sf:Phone>",
        ),
    )
}

/// Under `incomplete` a message that lacks a mapped field (here `Phone`
/// and the mailing address but the city) is a trigger: Salesforce leaves
/// out empty fields and fields the message is not set up to send alike,
/// and read as cleared, one never sent wiped the customer's value. A
/// message carrying every mapped field is taken as it is, without an API
/// call.
#[tokio::test]
async fn a_message_without_every_mapped_field_is_a_trigger() {
    let kit = kit().await.setting("fetch_records", "incomplete");
    let body = outbound_message(ORG_ID, &[("04l01", "Contact", "003A")]);
    let parsed = kit
        .receive_webhook(testkit::webhook_request(&[], body.clone()))
        .await
        .expect("verified and parsed");
    let event = &parsed.events[0];
    assert_eq!(event.remote_id, "003A");
    assert_eq!(event.record, None, "ferry reads the record when it applies");
    assert_eq!(
        event.occurred_at_ms, 1_795_939_200_000,
        "dated as the message, as the complete ones are"
    );

    let complete = complete(&body);
    let parsed = kit
        .receive_webhook(testkit::webhook_request(&[], complete.clone()))
        .await
        .expect("verified and parsed");
    let record: Value =
        serde_json::from_str(parsed.events[0].record.as_deref().expect("a record")).unwrap();
    assert_eq!(record["phone"], "+44 20 7946 0000", "{record}");
    assert_eq!(parsed.events[0].occurred_at_ms, 1_795_939_200_000);
    assert!(kit.http().requests().is_empty(), "no API call needed");

    // The same message not set up to send its date cannot be ordered
    // against the record's other messages (Salesforce redelivers one it
    // had no Ack for, later): a trigger.
    let undated = complete
        .replace(
            "<sf:LastModifiedDate>2026-11-29T08:00:00.000Z</sf:LastModifiedDate>",
            "",
        )
        .replace(
            "<sf:SystemModstamp>2026-11-29T08:00:00.000Z</sf:SystemModstamp>",
            "",
        );
    let parsed = kit
        .receive_webhook(testkit::webhook_request(&[], undated.clone()))
        .await
        .expect("verified and parsed");
    assert_eq!(
        (
            parsed.events[0].record.as_deref(),
            parsed.events[0].occurred_at_ms
        ),
        (None, 0)
    );
    // Unless the message is all the operator lets ferry have.
    let parsed = kit
        .setting("fetch_records", "never")
        .receive_webhook(testkit::webhook_request(&[], undated))
        .await
        .expect("verified and parsed");
    assert!(parsed.events[0].record.is_some());
}

/// `fetch_records` (`always`, the default): the events only name their
/// records, undated (ferry dates them on arrival, by the clock its
/// replicas share), and nothing is read until ferry applies them (it calls
/// `fetch`). The organization id is no secret: a forged message that
/// carried every mapped field wrote what it said under the earlier
/// default, `incomplete`.
#[tokio::test]
async fn fetch_records_turns_a_message_into_triggers() {
    let kit = kit().await;
    let body = outbound_message(ORG_ID, &[("04l01", "Contact", "003A")]);
    let complete = complete(&body);
    let parsed = kit
        .receive_webhook(testkit::webhook_request(&[], complete))
        .await
        .expect("verified and parsed");
    assert_eq!(
        (
            parsed.events[0].record.as_deref(),
            parsed.events[0].occurred_at_ms
        ),
        (None, 0),
        "a complete message is a trigger too"
    );
    let kit = kit.setting("fetch_records", "true");
    let parsed = kit
        .receive_webhook(testkit::webhook_request(
            &[("content-type", "text/xml; charset=utf-8")],
            body.clone(),
        ))
        .await
        .expect("verified and parsed");
    let event = &parsed.events[0];
    assert!(
        event.id.starts_with("04l01:003A:1795939200000:"),
        "{}",
        event.id
    );
    assert_eq!(event.remote_id, "003A");
    assert_eq!(event.kind, ChangeKind::Upsert);
    assert_eq!(event.record, None);
    assert_eq!(
        event.occurred_at_ms, 0,
        "not the message's date, nor this clock's"
    );
    assert!(parsed.reply.is_some());
    assert!(kit.http().requests().is_empty(), "ferry fetches later");

    let kit = kit.setting("fetch_records", "yes");
    let refused = kit
        .receive_webhook(testkit::webhook_request(&[], body))
        .await;
    assert!(matches!(
        connector_error(refused),
        ConnectorError::Permanent(m) if m.contains("fetch_records")
    ));
}

#[tokio::test]
async fn outbound_messages_from_another_org_or_malformed_are_refused() {
    let kit = kit().await;
    let other_org = outbound_message("00D000000000002EAA", &[("04l01", "Contact", "003A")]);
    assert!(matches!(
        connector_error(
            kit.receive_webhook(testkit::webhook_request(&[], other_org))
                .await
        ),
        ConnectorError::InvalidSignature(_)
    ));
    let no_org = outbound_message(ORG_ID, &[])
        .replace(&format!("<OrganizationId>{ORG_ID}</OrganizationId>"), "");
    assert!(matches!(
        connector_error(
            kit.verify_webhook(testkit::webhook_request(&[], no_org))
                .await
        ),
        ConnectorError::InvalidSignature(_)
    ));
    for body in ["<soapenv:Envelope", "{\"not\":\"xml\"}", "<Envelope/>"] {
        // Not a message: nothing names an org, so it is not verified (not
        // a verified message ferry failed to read).
        match connector_error(
            kit.verify_webhook(testkit::webhook_request(&[], body))
                .await,
        ) {
            ConnectorError::InvalidSignature(m) => {
                assert!(m.starts_with("malformed outbound message"), "{m}")
            }
            other => panic!("{body}: {other:?}"),
        }
    }
    // An 18-character setting matches too.
    let kit = kit.setting("organization_id", ORG_ID);
    let ok = outbound_message(ORG_ID, &[("04l01", "Contact", "003A")]);
    kit.verify_webhook(testkit::webhook_request(&[], ok))
        .await
        .expect("same org");
}
