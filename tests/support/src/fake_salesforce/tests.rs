use super::*;

struct Api {
    fake: FakeSalesforce,
    http: reqwest::Client,
    token: String,
}

impl Api {
    async fn start(cfg: FakeSalesforceConfig) -> Self {
        let fake = FakeSalesforce::start(cfg).await.unwrap();
        let http = reqwest::Client::new();
        let mut api = Self {
            fake,
            http,
            token: String::new(),
        };
        api.token = api.login().await;
        api
    }

    async fn login(&self) -> String {
        let cfg = self.fake.config();
        let resp = self
            .http
            .post(format!("{}/services/oauth2/token", self.fake.url()))
            .form(&[
                ("grant_type", "client_credentials"),
                ("client_id", cfg.client_id.as_str()),
                ("client_secret", cfg.client_secret.as_str()),
            ])
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 200);
        let body: Value = resp.json().await.unwrap();
        assert_eq!(body["instance_url"], self.fake.url());
        assert_eq!(body["token_type"], "Bearer");
        assert!(body.get("expires_in").is_none());
        body["access_token"].as_str().unwrap().to_owned()
    }

    fn url(&self, rest: &str) -> String {
        format!("{}/services/data/v62.0/{rest}", self.fake.url())
    }

    async fn call(&self, method: reqwest::Method, rest: &str, body: Option<Value>) -> (u16, Value) {
        let mut req = self
            .http
            .request(method, self.url(rest))
            .bearer_auth(&self.token)
            .header("Sforce-Call-Options", "client=ferry");
        if let Some(body) = body {
            req = req.json(&body);
        }
        let resp = req.send().await.unwrap();
        let status = resp.status().as_u16();
        let text = resp.text().await.unwrap();
        let body = if text.is_empty() {
            Value::Null
        } else {
            serde_json::from_str(&text).unwrap()
        };
        (status, body)
    }
}

#[test]
fn ids_and_datetimes_have_salesforce_shapes() {
    assert_eq!(make_id("003", 1), "003000000000001AAA");
    assert_eq!(make_id("a0X", 7), "a0X000000000007EAA");
    assert_eq!(id_suffix("00D000000000001"), "EAA");
    assert_eq!(format_datetime(0), "1970-01-01T00:00:00.000+0000");
    let ms = parse_datetime("2026-11-29T08:00:00.000+0000").unwrap();
    assert_eq!(format_datetime(ms), "2026-11-29T08:00:00.000+0000");
    assert_eq!(parse_datetime("2026-11-29T09:00:00+01:00"), Some(ms));
    assert_eq!(parse_datetime("2026-11-29T08:00:00Z"), Some(ms));
}

#[tokio::test]
async fn fake_salesforce_token_errors() {
    let fake = FakeSalesforce::start(FakeSalesforceConfig::default())
        .await
        .unwrap();
    let http = reqwest::Client::new();
    let token = |form: Vec<(&'static str, &'static str)>| {
        http.post(format!("{}/services/oauth2/token", fake.url()))
            .form(&form)
            .send()
    };
    let resp = token(vec![
        ("grant_type", "client_credentials"),
        ("client_id", "ferry-test-client"),
        ("client_secret", "wrong"),
    ])
    .await
    .unwrap();
    assert_eq!(resp.status(), 400);
    let body: Value = resp.json().await.unwrap();
    assert_eq!(body["error"], "invalid_client");
    let resp = token(vec![("grant_type", "password")]).await.unwrap();
    assert_eq!(resp.status(), 400);
    let body: Value = resp.json().await.unwrap();
    assert_eq!(body["error"], "unsupported_grant_type");
    assert_eq!(fake.counts().token_requests, 0);
}

#[tokio::test]
async fn fake_salesforce_contact_lifecycle() {
    use reqwest::Method;
    let api = Api::start(FakeSalesforceConfig::default()).await;
    let (status, created) = api
        .call(
            Method::POST,
            "sobjects/Contact/",
            Some(json!({"FirstName": "Ada", "LastName": "Lovelace", "Email": "ada@example.com"})),
        )
        .await;
    assert_eq!(status, 201, "{created}");
    assert_eq!(created["success"], true);
    assert_eq!(created["errors"], json!([]));
    let id = created["id"].as_str().unwrap().to_owned();
    assert_eq!(id.len(), 18);
    assert!(id.starts_with("003"));

    let (status, got) = api
        .call(Method::GET, &format!("sobjects/Contact/{id}"), None)
        .await;
    assert_eq!(status, 200);
    assert_eq!(got["attributes"]["type"], "Contact");
    assert_eq!(
        got["attributes"]["url"],
        format!("/services/data/v62.0/sobjects/Contact/{id}")
    );
    assert_eq!(got["Id"], id.as_str());
    assert_eq!(got["LastName"], "Lovelace");
    assert_eq!(got["IsDeleted"], false);
    assert!(got["Phone"].is_null());
    let stamp = got["LastModifiedDate"].as_str().unwrap();
    assert_eq!(stamp.len(), "2026-11-29T08:00:00.000+0000".len());
    assert!(stamp.ends_with("+0000"));
    assert_eq!(got["SystemModstamp"], got["LastModifiedDate"]);

    let (status, body) = api
        .call(
            Method::PATCH,
            &format!("sobjects/Contact/{id}"),
            Some(json!({"Phone": "+44 20 7946 0000", "Email": null})),
        )
        .await;
    assert_eq!((status, body), (204, Value::Null));
    let now = api.fake.record("Contact", &id).unwrap();
    assert_eq!(now["Phone"], "+44 20 7946 0000");
    assert!(now["Email"].is_null());

    // A custom field is one field whatever the case it is written or read
    // in, as Salesforce's field names are.
    api.fake
        .update_record("Contact", &id, json!({"Tier__c": "gold"}));
    api.fake
        .update_record("Contact", &id, json!({"tier__c": "silver"}));
    let now = api.fake.record("Contact", &id).unwrap();
    assert_eq!(now["Tier__c"], "silver", "{now}");
    assert!(now.get("tier__c").is_none(), "one key: {now}");
    api.fake
        .update_record("Contact", &id, json!({"TIER__C": null}));
    let now = api.fake.record("Contact", &id).unwrap();
    assert!(now.get("Tier__c").is_none(), "cleared: {now}");

    // Validation.
    let (status, body) = api
        .call(
            Method::PATCH,
            &format!("sobjects/Contact/{id}"),
            Some(json!({"LastName": ""})),
        )
        .await;
    assert_eq!(status, 400);
    assert_eq!(body[0]["errorCode"], "REQUIRED_FIELD_MISSING");
    assert_eq!(body[0]["fields"], json!(["LastName"]));
    let (status, body) = api
        .call(
            Method::POST,
            "sobjects/Account",
            Some(json!({"Phone": "1"})),
        )
        .await;
    assert_eq!(status, 400);
    assert_eq!(
        body[0]["fields"],
        json!(["Name"]),
        "an Account's Name is required"
    );
    let (status, body) = api
        .call(
            Method::POST,
            "sobjects/Contact",
            Some(json!({"FirstName": "No"})),
        )
        .await;
    assert_eq!(status, 400);
    assert_eq!(
        body[0]["message"],
        "Required fields are missing: [LastName]"
    );
    let (_, body) = api
        .call(
            Method::POST,
            "sobjects/Contact",
            Some(json!({"LastName": "X", "Email": "nope"})),
        )
        .await;
    assert_eq!(body[0]["errorCode"], "INVALID_EMAIL_ADDRESS");
    assert_eq!(body[0]["fields"], json!(["Email"]));
    // A value past its field's length, counted in characters.
    let (status, body) = api
        .call(
            Method::POST,
            "sobjects/Contact",
            Some(json!({"LastName": "X", "mailingcity": "ü".repeat(41)})),
        )
        .await;
    assert_eq!(status, 400);
    assert_eq!(body[0]["errorCode"], "STRING_TOO_LONG");
    assert_eq!(body[0]["fields"], json!(["MailingCity"]));
    let (_, body) = api
        .call(
            Method::POST,
            "sobjects/Contact",
            Some(json!({"LastName": "X", "Shoe": 9})),
        )
        .await;
    assert_eq!(body[0]["errorCode"], "INVALID_FIELD");
    assert_eq!(
        body[0]["message"],
        "No such column 'Shoe' on sobject of type Contact"
    );
    let resp = api
        .http
        .post(api.url("sobjects/Contact"))
        .bearer_auth(&api.token)
        .header("Content-Type", "application/json")
        .body("{not json")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 400);
    let body: Value = resp.json().await.unwrap();
    assert_eq!(body[0]["errorCode"], "JSON_PARSER_ERROR");
    let (status, _) = api
        .call(
            Method::POST,
            "sobjects/Contact",
            Some(json!({"LastName": "X", "Shoe__c": 9})),
        )
        .await;
    assert_eq!(status, 201);

    // Delete, then everything on it is ENTITY_IS_DELETED.
    let (status, body) = api
        .call(Method::DELETE, &format!("sobjects/Contact/{id}"), None)
        .await;
    assert_eq!((status, body), (204, Value::Null));
    for method in [Method::GET, Method::DELETE] {
        let (status, body) = api
            .call(method, &format!("sobjects/Contact/{id}"), None)
            .await;
        assert_eq!(status, 404);
        assert_eq!(
            body,
            json!([{"errorCode": "ENTITY_IS_DELETED", "message": "entity is deleted", "fields": []}])
        );
    }
    let (status, body) = api
        .call(
            Method::PATCH,
            &format!("sobjects/Contact/{id}"),
            Some(json!({"Phone": "1"})),
        )
        .await;
    assert_eq!(
        (status, body[0]["errorCode"].as_str()),
        (404, Some("ENTITY_IS_DELETED"))
    );
    assert!(api.fake.record("Contact", &id).is_none());
    let (status, body) = api
        .call(Method::GET, "sobjects/Contact/003000000000999AAA", None)
        .await;
    assert_eq!(status, 404);
    assert_eq!(body[0]["errorCode"], "NOT_FOUND");

    let counts = api.fake.counts();
    assert_eq!((counts.creates, counts.updates, counts.deletes), (2, 1, 1));
    assert_eq!(counts.token_requests, 1);
    let requests = api.fake.requests();
    let first_data = requests
        .iter()
        .find(|r| r.path.starts_with("/services/data"))
        .unwrap();
    assert_eq!(first_data.method, "POST");
    assert_eq!(
        first_data.header("Sforce-Call-Options"),
        Some("client=ferry")
    );

    // Other objects take any field and get their own key prefix.
    let (status, created) = api
        .call(
            Method::POST,
            "sobjects/Foo__c",
            Some(json!({"Anything__c": "x", "Name": "y"})),
        )
        .await;
    assert_eq!(status, 201);
    assert!(created["id"].as_str().unwrap().starts_with("a0X"));
}

/// What Salesforce answers for an object, a version or a record id it
/// does not serve: the same 404 `NOT_FOUND` as a record not there, and the
/// object's basic information for one it has.
#[tokio::test]
async fn fake_salesforce_objects_and_versions_it_does_not_serve() {
    use reqwest::Method;
    let api = Api::start(FakeSalesforceConfig::default()).await;
    let (status, described) = api.call(Method::GET, "sobjects/Contact", None).await;
    assert_eq!(status, 200, "{described}");
    assert_eq!(described["objectDescribe"]["name"], "Contact");
    assert_eq!(described["objectDescribe"]["keyPrefix"], "003");
    for path in ["sobjects/Contacts", "sobjects/Contacts/003000000000001AAA"] {
        let (status, body) = api.call(Method::GET, path, None).await;
        assert_eq!(
            (status, &body[0]["errorCode"]),
            (404, &json!("NOT_FOUND")),
            "{path}"
        );
    }
    let (status, body) = api
        .call(Method::GET, "query?q=SELECT+Id+FROM+Contacts", None)
        .await;
    assert_eq!(
        (status, &body[0]["errorCode"]),
        (400, &json!("INVALID_TYPE"))
    );
    let newer = api
        .http
        .get(format!(
            "{}/services/data/v99.0/sobjects/Contact",
            api.fake.url()
        ))
        .bearer_auth(&api.token)
        .send()
        .await
        .unwrap();
    assert_eq!(newer.status(), 404);
    // A record id of another object under Contact.
    let (_, account) = api
        .call(
            Method::POST,
            "sobjects/Account",
            Some(json!({"Name": "Acme"})),
        )
        .await;
    let account_id = account["id"].as_str().unwrap();
    let (status, body) = api
        .call(Method::GET, &format!("sobjects/Contact/{account_id}"), None)
        .await;
    assert_eq!(status, 404);
    assert!(
        body[0]["message"]
            .as_str()
            .unwrap()
            .starts_with("Provided external ID field does not exist"),
        "{body}"
    );
}

#[tokio::test]
async fn fake_salesforce_sessions_expire_and_limits_run_out() {
    use reqwest::Method;
    let mut api = Api::start(FakeSalesforceConfig::default()).await;
    let id = api.fake.insert_record("Account", json!({"Name": "Acme"}));
    assert!(id.starts_with("001"));
    let path = format!("sobjects/Account/{id}");
    assert_eq!(api.call(Method::GET, &path, None).await.0, 200);

    api.fake.expire_sessions();
    let (status, body) = api.call(Method::GET, &path, None).await;
    assert_eq!(status, 401);
    assert_eq!(
        body,
        json!([{"message": "Session expired or invalid", "errorCode": "INVALID_SESSION_ID"}])
    );
    api.token = api.login().await;
    assert_eq!(api.call(Method::GET, &path, None).await.0, 200);
    assert_eq!(api.fake.counts().token_requests, 2);

    api.fake.fail_with_request_limit(2);
    for _ in 0..2 {
        let (status, body) = api.call(Method::GET, &path, None).await;
        assert_eq!(status, 403);
        assert_eq!(
            body,
            json!([{"message": "ConcurrentPerOrgLongTxn Limit exceeded.", "errorCode": "REQUEST_LIMIT_EXCEEDED"}])
        );
    }
    assert_eq!(api.call(Method::GET, &path, None).await.0, 200);
}

#[tokio::test]
async fn fake_salesforce_query_pages_with_next_records_url() {
    use reqwest::Method;
    let api = Api::start(FakeSalesforceConfig {
        query_page_size: Some(2),
        ..FakeSalesforceConfig::default()
    })
    .await;
    let ids: Vec<String> = (0..5)
        .map(|i| {
            api.fake.insert_record(
                "Contact",
                json!({"LastName": format!("L{i}"), "Email": format!("c{i}@example.com")}),
            )
        })
        .collect();
    api.fake.delete_record("Contact", &ids[4]);
    api.fake
        .update_record("Contact", &ids[0], json!({"FirstName": "First"}));
    assert_eq!(api.fake.records("Contact").len(), 4);

    let q = "select Id, LastName, Email from Contact order by Id";
    let (status, first) = api
        .call(
            Method::GET,
            &format!("query?q={}", q.replace(' ', "+")),
            None,
        )
        .await;
    assert_eq!(status, 200, "{first}");
    assert_eq!(first["totalSize"], 4);
    assert_eq!(first["done"], false);
    assert_eq!(first["records"].as_array().unwrap().len(), 2);
    assert_eq!(first["records"][0]["Id"], ids[0].as_str());
    assert_eq!(first["records"][0]["attributes"]["type"], "Contact");
    assert_eq!(first["records"][1]["Email"], "c1@example.com");
    assert!(first["records"][0].get("FirstName").is_none());
    let next = first["nextRecordsUrl"].as_str().unwrap();
    assert!(next.starts_with("/services/data/v62.0/query/01g"), "{next}");
    assert!(next.ends_with("-2"), "{next}");

    let mut seen = 2;
    let mut next = next.to_owned();
    loop {
        let rest = next
            .strip_prefix("/services/data/v62.0/")
            .unwrap()
            .to_owned();
        let (status, page) = api.call(Method::GET, &rest, None).await;
        assert_eq!(status, 200, "{page}");
        seen += page["records"].as_array().unwrap().len();
        if page["done"] == true {
            assert!(page.get("nextRecordsUrl").is_none());
            break;
        }
        next = page["nextRecordsUrl"].as_str().unwrap().to_owned();
    }
    assert_eq!(seen, 4);

    let (status, body) = api.call(Method::GET, "query/01gBOGUS-2", None).await;
    assert_eq!(status, 400);
    assert_eq!(body[0]["errorCode"], "INVALID_QUERY_LOCATOR");

    let where_id = format!(
        "SELECT LastName FROM Contact WHERE Id = '{}' LIMIT 1",
        ids[2]
    );
    let url = format!(
        "{}?{}",
        api.url("query"),
        serde_urlencoded::to_string([("q", where_id)]).unwrap()
    );
    let one: Value = api
        .http
        .get(url)
        .bearer_auth(&api.token)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(one["totalSize"], 1);
    assert_eq!(one["done"], true);
    assert_eq!(one["records"][0]["LastName"], "L2");

    let since = api.fake.record("Contact", &ids[0]).unwrap()["SystemModstamp"]
        .as_str()
        .unwrap()
        .to_owned();
    let q =
        format!("SELECT Id FROM Contact WHERE SystemModstamp >= {since} ORDER BY SystemModstamp");
    let url = format!(
        "{}?{}",
        api.url("query"),
        serde_urlencoded::to_string([("q", q)]).unwrap()
    );
    let recent: Value = api
        .http
        .get(url)
        .bearer_auth(&api.token)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert!(recent["records"]
        .as_array()
        .unwrap()
        .iter()
        .any(|r| r["Id"] == ids[0].as_str()));

    let (status, body) = api
        .call(Method::GET, "query?q=DELETE+FROM+Contact", None)
        .await;
    assert_eq!(status, 400);
    assert_eq!(body[0]["errorCode"], "MALFORMED_QUERY");
    assert_eq!(api.fake.counts().queries, 3);
    assert_eq!(api.fake.counts().query_pages, 1);
}

#[tokio::test]
async fn batch_size_header_is_clamped() {
    let mut headers = HeaderMap::new();
    assert_eq!(batch_size(&headers), 2000);
    headers.insert("sforce-query-options", "batchSize=5".parse().unwrap());
    assert_eq!(batch_size(&headers), 200);
    headers.insert("sforce-query-options", "batchSize=1000".parse().unwrap());
    assert_eq!(batch_size(&headers), 1000);
}

#[tokio::test]
async fn fake_salesforce_outbound_message_is_acked() {
    use axum::routing::post;
    const ACK: &str = concat!(
        r#"<?xml version="1.0" encoding="UTF-8"?>"#,
        r#"<soapenv:Envelope xmlns:soapenv="http://schemas.xmlsoap.org/soap/envelope/">"#,
        r#"<soapenv:Body><notificationsResponse xmlns="http://soap.sforce.com/2005/09/outbound">"#,
        "<Ack>true</Ack></notificationsResponse></soapenv:Body></soapenv:Envelope>",
    );
    let received: Arc<Mutex<Vec<(HeaderMap, String)>>> = Arc::default();
    let sink = Arc::clone(&received);
    let app = Router::new().route(
        "/salesforce/outbound",
        post(move |headers: HeaderMap, body: String| {
            let sink = Arc::clone(&sink);
            async move {
                sink.lock().unwrap().push((headers, body));
                ([("content-type", "text/xml; charset=utf-8")], ACK)
            }
        }),
    );
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let endpoint = format!(
        "http://{}/salesforce/outbound",
        listener.local_addr().unwrap()
    );
    let server = tokio::spawn(async move { axum::serve(listener, app).await });

    let fake = FakeSalesforce::start(FakeSalesforceConfig::default())
        .await
        .unwrap();
    let a = fake.insert_record(
        "Contact",
        json!({"LastName": "O'Brien & <Sons>", "Email": "ob@example.com"}),
    );
    let b = fake.insert_record("Contact", json!({"LastName": "Two"}));
    let delivery = fake
        .send_outbound_message(&endpoint, "Contact", &[&a, &b])
        .await
        .unwrap();
    assert_eq!(delivery.status, 200);
    assert!(delivery.acked, "{}", delivery.body);
    assert_eq!(delivery.notification_ids.len(), 2);
    assert!(delivery
        .notification_ids
        .iter()
        .all(|n| n.starts_with("04l") && n.len() == 18));

    let (headers, xml) = received.lock().unwrap()[0].clone();
    assert_eq!(headers["content-type"], "text/xml; charset=utf-8");
    assert_eq!(headers["soapaction"], "\"\"");
    assert!(xml.contains(r#"<notifications xmlns="http://soap.sforce.com/2005/09/outbound">"#));
    assert!(xml.contains("<OrganizationId>00D000000000001EAA</OrganizationId>"));
    assert!(xml.contains(r#"<SessionId xsi:nil="true"/>"#));
    assert!(xml.contains(&format!("<Id>{}</Id>", delivery.notification_ids[0])));
    assert!(xml.contains(
        r#"<sObject xsi:type="sf:Contact" xmlns:sf="urn:sobject.enterprise.soap.sforce.com">"#
    ));
    assert!(xml.contains(&format!("<sf:Id>{a}</sf:Id>")));
    assert!(xml.contains("<sf:LastName>O&apos;Brien &amp; &lt;Sons&gt;</sf:LastName>"));
    assert!(xml.contains("<sf:LastModifiedDate>"));
    assert!(!xml.contains("<sf:Phone>"), "null fields are left out");
    assert_eq!(xml.matches("<Notification>").count(), 2);

    // A redelivery of the same notifications from a crafted message.
    let again = fake.outbound_message_xml(
        fake.org_id(),
        "Contact",
        &[(delivery.notification_ids[0].clone(), a.clone())],
    );
    let redelivery = fake.send_raw(&endpoint, again).await.unwrap();
    assert!(redelivery.acked);
    assert!(received.lock().unwrap()[1]
        .1
        .contains(&format!("<Id>{}</Id>", delivery.notification_ids[0])));

    let too_many: Vec<&str> = std::iter::repeat_n(a.as_str(), 101).collect();
    assert!(fake
        .send_outbound_message(&endpoint, "Contact", &too_many)
        .await
        .is_err());
    server.abort();
}

#[test]
fn ack_detection() {
    assert!(is_ack(
        "<a:notificationsResponse><a:Ack>true</a:Ack></a:notificationsResponse>"
    ));
    assert!(!is_ack(
        "<notificationsResponse><Ack>false</Ack></notificationsResponse>"
    ));
    assert!(!is_ack("<Ack>true</Ack>"));
}
