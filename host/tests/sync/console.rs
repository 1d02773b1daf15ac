//! The operator console in a real headless chromium, against a running
//! ferry with localstripe: sign-in, a customer reaching Stripe, a flagged
//! conflict resolved field by field, a dead letter replayed after its
//! secret is fixed, a connector uploaded and rolled back, a reconciliation
//! started and read; CSRF refusals, the redirect to sign-in, no secret in
//! any page, and nothing fetched from another host (`/docs` included).
//! Screenshots of every page land in `target/console-screenshots/`.

use std::path::PathBuf;
use std::time::Duration;

use ferry_test_support::browser::thirtyfour::prelude::*;
use ferry_test_support::browser::Browser;
use ferry_test_support::fault_proxy::FaultProxy;
use ferry_test_support::localstripe::LocalStripe;
use ferry_test_support::wasm::{component_path, variant_path};
use serde_json::{json, Value};

use crate::conflicts::modify_in_stripe;
use crate::helpers::{
    csrf_field, email, spawn_sync_app, stripe_customer, Backend, Setup, SyncApp, STRIPE_KEY,
    WEBHOOK_SECRET,
};

const TOKEN: &str = "console-admin-token-0123456789";
const MASTER_KEY: &str = "test-master-key-0123456789abcdef";
const WRONG_KEY: &str = "sk_test_not_the_right_key";

/// The browser on the console, keeping every page's HTML for the checks at
/// the end.
struct Console {
    browser: Browser,
    base: String,
    shots: PathBuf,
    pages: Vec<(String, String)>,
}

impl Console {
    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    /// Notes the page now shown: its HTML, and that every field is labelled.
    async fn seen(&mut self) -> String {
        let driver = &self.browser.driver;
        let url = driver.current_url().await.expect("url").to_string();
        let html = driver.source().await.expect("page source");
        let unlabelled = driver
            .execute(
                "return [...document.querySelectorAll('input:not([type=hidden]), select, textarea')]\
                 .filter(e => !(e.labels && e.labels.length) && !e.getAttribute('aria-label'))\
                 .map(e => e.name)",
                vec![],
            )
            .await
            .expect("label check");
        assert_eq!(
            unlabelled.json(),
            &json!([]),
            "fields without a label on {url}"
        );
        self.pages.push((url, html.clone()));
        html
    }

    async fn open(&mut self, path: &str) -> String {
        self.browser
            .driver
            .goto(self.url(path))
            .await
            .expect("goto");
        self.seen().await
    }

    /// Presses `key` on whatever has the focus.
    async fn press(&self, key: Key) {
        self.browser
            .driver
            .action_chain()
            .send_keys(key)
            .perform()
            .await
            .expect("key press");
    }

    async fn shot(&self, name: &str) {
        let png = self
            .browser
            .driver
            .screenshot_as_png()
            .await
            .expect("screenshot");
        std::fs::write(self.shots.join(format!("{name}.png")), png).expect("screenshot saved");
    }

    async fn find(&self, css: &str) -> WebElement {
        self.browser
            .driver
            .find(By::Css(css))
            .await
            .unwrap_or_else(|e| panic!("{css}: {e}"))
    }

    async fn click(&self, css: &str) {
        self.find(css)
            .await
            .click()
            .await
            .unwrap_or_else(|e| panic!("click {css}: {e}"));
    }

    /// Clicks what leads to another page, and waits until it has loaded.
    async fn follow(&mut self, css: &str) -> String {
        let driver = &self.browser.driver;
        driver
            .execute("window.__left = true", vec![])
            .await
            .expect("mark");
        self.click(css).await;
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        loop {
            let loaded = self
                .browser
                .driver
                .execute(
                    "return !window.__left && document.readyState === 'complete'",
                    vec![],
                )
                .await
                .map(|r| r.json() == &json!(true))
                .unwrap_or(false);
            if loaded {
                return self.seen().await;
            }
            assert!(tokio::time::Instant::now() < deadline, "{css} led nowhere");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// The page's visible text (empty while a navigation is under way).
    async fn text(&self) -> String {
        let text = self
            .browser
            .driver
            .execute(
                "return document.body ? document.body.innerText : ''",
                vec![],
            )
            .await
            .expect("text");
        text.json().as_str().unwrap_or("").to_owned()
    }

    /// Reloads until the page's text contains `needle`.
    async fn wait_text(&mut self, needle: &str) -> String {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        loop {
            let text = self.text().await;
            if text.contains(needle) {
                self.seen().await;
                return text;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "never showed {needle:?}: {text}"
            );
            tokio::time::sleep(Duration::from_millis(300)).await;
            self.browser.driver.refresh().await.expect("refresh");
        }
    }
}

async fn api_get(app: &SyncApp, path: &str) -> Value {
    let (status, body) = app.send(reqwest::Method::GET, path, None).await;
    assert_eq!(status, 200, "{path}: {body}");
    body
}

async fn wait_api(app: &SyncApp, path: &str, done: impl Fn(&Value) -> bool) -> Value {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let body = api_get(app, path).await;
        if done(&body) {
            return body;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{path} never got there: {body:#}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_operator_console_in_a_real_browser() {
    let stripe = LocalStripe::start().expect("localstripe");
    let proxy = FaultProxy::start(&stripe.url()).await.expect("proxy");
    let mut setup = Setup::new(Backend::Sqlite, &proxy.url());
    setup.extra = json!({
        "admin_token": TOKEN,
        "conflict_policy": "flag",
        "sync_max_attempts": 3,
    });
    let app = spawn_sync_app(setup).await;
    app.receive_stripe_webhooks(&stripe).await;
    let shots = PathBuf::from(env!("CARGO_TARGET_TMPDIR"))
        .parent()
        .expect("target dir")
        .join("console-screenshots");
    std::fs::create_dir_all(&shots).expect("screenshot dir");
    let mut console = Console {
        browser: Browser::start().await.expect("chromium and chromedriver"),
        base: app.base.clone(),
        shots,
        pages: Vec::new(),
    };

    // Without a session: to sign-in, which returns to the page asked for.
    console.open("/console/conflicts").await;
    let url = console.browser.driver.current_url().await.unwrap();
    assert_eq!(url.path(), "/console/sign-in");
    assert_eq!(url.query(), Some("next=%2Fconsole%2Fconflicts"));
    console
        .find("#token")
        .await
        .send_keys("not-the-token")
        .await
        .unwrap();
    console.follow("main form button[type=submit]").await;
    assert!(console
        .text()
        .await
        .contains("That is not the admin token."));
    console.shot("sign-in").await;
    console.find("#token").await.send_keys(TOKEN).await.unwrap();
    console.follow("main form button[type=submit]").await;
    assert_eq!(
        console.browser.driver.current_url().await.unwrap().path(),
        "/console/conflicts"
    );
    console.open("/console").await;
    assert!(console.text().await.contains("stripe"));
    console.shot("overview").await;
    // The keyboard: the first Tab reaches "Skip to content", Enter jumps to
    // the page's content.
    console.press(Key::Tab).await;
    let focused = console
        .browser
        .driver
        .execute("return document.activeElement.textContent", vec![])
        .await
        .unwrap();
    assert_eq!(focused.json(), &json!("Skip to content"));
    console.press(Key::Enter).await;
    assert_eq!(
        console
            .browser
            .driver
            .current_url()
            .await
            .unwrap()
            .fragment(),
        Some("main")
    );

    // 2. A customer created through the API reaches Stripe: the customer page shows it.
    let address = email("console");
    let customer = app
        .create(json!({"email": address, "name": "Ada Console", "phone": "+15550000001"}))
        .await;
    let id = customer["id"].as_str().unwrap().to_owned();
    let link = app.wait_synced(&id, 1).await;
    let remote_id = link["remote_id"].as_str().unwrap().to_owned();
    console.open("/console/customers").await;
    console
        .find("#q")
        .await
        .send_keys(address.as_str())
        .await
        .unwrap();
    console.follow("main form[role=search] button").await;
    console.shot("customers").await;
    console
        .follow(&format!("a[href='/console/customers/{id}']"))
        .await;
    let text = console.wait_text(&remote_id).await;
    assert!(text.contains("synced"), "{text}");
    console.shot("customer").await;

    // 3. A flagged conflict, resolved by picking a side per field. The
    // remote's note has a line break, which a browser sends back as CRLF:
    // the pick takes the value the conflict recorded, not the form's copy.
    tokio::time::sleep(Duration::from_millis(3_200)).await; // past the echo window
    proxy.set_down(true);
    app.patch(
        &id,
        json!({"name": "Local Name", "phone": "+15550000002", "metadata": {"note": "local"}}),
    )
    .await;
    modify_in_stripe(
        &stripe.url(),
        &remote_id,
        "name='Remote Name', metadata={'note': 'line 1\\nline 2'}",
    );
    let conflicts = wait_api(&app, "/api/v1/conflicts?state=open", |b| {
        b["data"].as_array().is_some_and(|d| !d.is_empty())
    })
    .await;
    let conflict_id = conflicts["data"][0]["id"].as_str().unwrap().to_owned();
    proxy.set_down(false);
    // The overview's count of open conflicts lists the connector's.
    console.open("/console").await;
    console
        .follow("a[href='/console/conflicts?state=open&connector=stripe']")
        .await;
    let text = console.text().await;
    assert!(text.contains("from connector stripe"), "{text}");
    assert!(text.contains(&conflict_id), "{text}");
    console.shot("conflicts").await;
    // Stored with a trailing space (as an earlier release kept values):
    // the same value as recorded, compared as the merge compares them.
    crate::helpers::execute_raw(
        &app.database_url,
        &format!("UPDATE customers SET name = 'Local Name ' WHERE id = '{id}'"),
        b"",
    )
    .await;
    console
        .follow(&format!("a[href='/console/conflicts/{conflict_id}']"))
        .await;
    let html = console.seen().await;
    assert!(
        html.contains("Local Name") && html.contains("Remote Name"),
        "both sides shown"
    );
    assert!(
        !html.contains("changed since the conflict"),
        "a value nothing changed marked changed"
    );
    console.shot("conflict").await;
    // ferry's side is ferry's value as the page showed it: a write since
    // the page was drawn is not decided unseen (before, the page showed
    // the value recorded with the conflict and a local pick wrote
    // whatever ferry held when it was sent). The page is shown again with
    // the new value, and nothing is resolved.
    app.patch(&id, json!({"name": "Local Name 2"})).await;
    console
        .click("input[name='pick.metadata.note'][value=remote]")
        .await;
    console.follow("main form button[type=submit]").await;
    let text = console
        .wait_text("The customer changed since this page was drawn")
        .await;
    assert!(
        text.contains("Local Name 2")
            && text.contains("changed since the conflict, from Local Name"),
        "{text}"
    );
    let open = api_get(&app, &format!("/api/v1/conflicts/{conflict_id}")).await;
    assert_eq!(open["state"], "open");
    console
        .click("input[name='pick.metadata.note'][value=remote]")
        .await;
    console.follow("main form button[type=submit]").await;
    console.wait_text("Conflict resolved").await;
    let resolved = api_get(&app, &format!("/api/v1/conflicts/{conflict_id}")).await;
    assert_eq!(resolved["state"], "resolved");
    let merged = api_get(&app, &format!("/api/v1/customers/{id}")).await;
    assert_eq!(
        (merged["name"].as_str(), merged["phone"].as_str()),
        (Some("Local Name 2"), Some("+15550000002"))
    );
    assert_eq!(merged["metadata"]["note"], "line 1\nline 2", "{merged}");
    app.wait_synced(&id, merged["version"].as_i64().unwrap())
        .await;
    let in_stripe = stripe_customer(&stripe.url(), &remote_id)
        .await
        .expect("in Stripe");
    assert_eq!(
        (in_stripe["name"].as_str(), in_stripe["phone"].as_str()),
        (Some("Local Name 2"), Some("+15550000002"))
    );

    // 4. A wrong API key dead-letters a push; fixing the secret in the
    // console and replaying delivers it.
    proxy.require_api_key(STRIPE_KEY);
    let (status, body) = app
        .send(
            reqwest::Method::PUT,
            "/api/v1/connectors/stripe/settings",
            Some(json!({"settings": {"api_base": proxy.url()}, "secrets": {"api_key": WRONG_KEY, "webhook_secret": WEBHOOK_SECRET}})),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    let stuck = app
        .create(json!({"email": email("dead"), "name": "Dee Letter"}))
        .await;
    let stuck_id = stuck["id"].as_str().unwrap().to_owned();
    let letters = wait_api(&app, "/api/v1/dead-letters?connector=stripe", |b| {
        b["data"]
            .as_array()
            .is_some_and(|d| d.iter().any(|l| l["customer_id"] == stuck_id.as_str()))
    })
    .await;
    let letter = letters["data"]
        .as_array()
        .unwrap()
        .iter()
        .find(|l| l["customer_id"] == stuck_id.as_str())
        .unwrap()["id"]
        .as_str()
        .unwrap()
        .to_owned();
    console
        .open("/console/dead-letters?connector=stripe&direction=outbound")
        .await;
    let page = console.text().await;
    assert!(page.contains(&letter));
    // Filtered to a direction, the bulk replay keeps to it.
    assert!(page.contains("Replay all of stripe's outbound"), "{page}");
    console.shot("dead-letters").await;
    console.open("/console/connectors/stripe").await;
    // Someone else disables it while the page is open: saving the
    // secret does not switch it back on.
    let (status, body) = app
        .send(
            reqwest::Method::POST,
            "/api/v1/connectors/stripe/disable",
            None,
        )
        .await;
    assert_eq!(status, 200, "{body}");
    console
        .find("#secret-api_key")
        .await
        .send_keys(STRIPE_KEY)
        .await
        .unwrap();
    console.follow("main form.card button[type=submit]").await;
    console.wait_text("Settings saved").await;
    let (_, connector) = app
        .send(reqwest::Method::GET, "/api/v1/connectors/stripe", None)
        .await;
    assert_eq!(connector["state"], "disabled", "{connector}");
    let (status, body) = app
        .send(
            reqwest::Method::POST,
            "/api/v1/connectors/stripe/enable",
            None,
        )
        .await;
    assert_eq!(status, 200, "{body}");
    console.open("/console/connectors/stripe").await;
    console.shot("connector-stripe").await;
    console.open("/console/dead-letters?connector=stripe").await;
    console
        .follow(&format!("button[aria-label='Replay {letter}']"))
        .await;
    console.wait_text("Replayed 1 dead letter").await;
    // Back to the list as it was filtered, not the first page of all.
    let back = console.browser.driver.current_url().await.unwrap();
    assert!(
        back.query().is_some_and(|q| q.contains("connector=stripe")),
        "{back}"
    );
    app.wait_synced(&stuck_id, 1).await;
    let config = api_get(&app, "/api/v1/connectors/stripe").await;
    assert_eq!(
        config["secrets"],
        json!(["api_key", "webhook_secret"]),
        "the other secret was kept"
    );

    // 5. Upload two versions of a connector, then roll back to the first.
    for (file, active) in [
        (component_path("ferry_test_recorder"), "0.1.0"),
        (variant_path("ferry_test_recorder", "version-2"), "0.2.0"),
    ] {
        console.open("/console/connectors").await;
        console
            .find("#component")
            .await
            .send_keys(file.display().to_string())
            .await
            .unwrap();
        console.follow("main form.card button[type=submit]").await;
        console.wait_text("Version uploaded").await;
        let recorder = api_get(&app, "/api/v1/connectors/recorder").await;
        assert_eq!(recorder["active_version"], active);
    }
    console.shot("connector-recorder").await;
    console
        .follow("button[aria-label='Activate version 0.1.0']")
        .await;
    console.wait_text("Version 0.1.0 is active").await;
    assert_eq!(
        api_get(&app, "/api/v1/connectors/recorder").await["active_version"],
        "0.1.0"
    );
    console.open("/console/connectors").await;
    console.shot("connectors").await;

    // 6. Start a reconciliation and read its report.
    console.open("/console/reconciliations").await;
    console.click("#connector option[value=stripe]").await;
    console.follow("main form.card button[type=submit]").await;
    console.wait_text("completed").await;
    let run_path = console
        .browser
        .driver
        .current_url()
        .await
        .unwrap()
        .path()
        .to_owned();
    let run_id = run_path.rsplit('/').next().unwrap().to_owned();
    let run = api_get(&app, &format!("/api/v1/reconciliations/{run_id}")).await;
    let report = console.find("#report").await.text().await.unwrap();
    let equal = run["counts"]["equal"].as_i64().unwrap();
    assert!(equal >= 2, "{run:#}");
    assert!(report.contains(&format!("equal\n{equal}")), "{report}");
    console.shot("reconciliation").await;
    console.open("/console/reconciliations").await;
    console.shot("reconciliations").await;

    // A phone's width: nothing wider than the screen.
    console
        .browser
        .driver
        .set_window_rect(0, 0, 390, 844)
        .await
        .unwrap();
    for (path, name) in [
        ("/console", "overview-phone"),
        (&*format!("/console/customers/{id}"), "customer-phone"),
    ] {
        console.open(path).await;
        let overflow = console
            .browser
            .driver
            .execute(
                "return document.documentElement.scrollWidth - window.innerWidth",
                vec![],
            )
            .await
            .unwrap();
        console.shot(name).await;
        assert!(
            overflow.json().as_i64().unwrap() <= 0,
            "{path} scrolls sideways on a phone"
        );
    }
    console
        .browser
        .driver
        .set_window_rect(0, 0, 1280, 900)
        .await
        .unwrap();

    // Offline: /docs renders from ferry's own assets.
    console
        .browser
        .driver
        .goto(console.url("/docs"))
        .await
        .unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while !console
        .text()
        .await
        .contains("Customer catalog kept in two-way sync")
    {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the API reference never rendered"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    console.shot("docs").await;
    let resources = console
        .browser
        .driver
        .execute(
            "return performance.getEntriesByType('resource').map(e => e.name)",
            vec![],
        )
        .await
        .unwrap();
    for name in resources.json().as_array().unwrap() {
        assert!(
            name.as_str().unwrap().starts_with(&app.base),
            "/docs loaded {name}"
        );
    }
    assert_eq!(
        console.browser.trapped(),
        Vec::<String>::new(),
        "requests for other hosts"
    );

    // No page ever carried a secret.
    for (url, html) in &console.pages {
        for secret in [STRIPE_KEY, WRONG_KEY, WEBHOOK_SECRET, TOKEN, MASTER_KEY] {
            assert!(!html.contains(secret), "{url} shows a secret");
        }
    }

    // CSRF: a form posted with the session cookie but without (or with a
    // wrong) token is refused and changes nothing; without a session it
    // goes to sign-in.
    console.open("/console").await; // the cookie's path
    let cookie = console
        .browser
        .driver
        .get_named_cookie("ferry_console")
        .await
        .expect("session cookie");
    let client = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap();
    let replay = format!("{}/console/dead-letters/replay", app.base);
    for form in ["connector=stripe", "connector=stripe&csrf=0000"] {
        let response = client
            .post(&replay)
            .header("cookie", format!("ferry_console={}", cookie.value))
            .header("content-type", "application/x-www-form-urlencoded")
            .body(form)
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 403, "{form}");
        assert!(response.text().await.unwrap().contains("csrf_failed"));
    }
    // A second post of a resolution (a double click): the conflict's page
    // says it is no longer open, not an error over the first one's work,
    // nor that nothing was resolved (the form carries the version its page
    // drew, which the first post's write moved past).
    let csrf = csrf_field(&console.seen().await);
    let again = client
        .post(format!(
            "{}/console/conflicts/{conflict_id}/resolve",
            app.base
        ))
        .header("cookie", format!("ferry_console={}", cookie.value))
        .header("content-type", "application/x-www-form-urlencoded")
        .body(format!("csrf={csrf}&resolution=local&local_version=1"))
        .send()
        .await
        .unwrap();
    assert_eq!(again.status(), 303);
    let location = again.headers()["location"].to_str().unwrap().to_owned();
    assert!(
        location.starts_with(&format!(
            "/console/conflicts/{conflict_id}?notice=This+conflict+is+no+longer+open"
        )),
        "{location}"
    );
    let response = client
        .post(&replay)
        .header("content-type", "application/x-www-form-urlencoded")
        .body("connector=stripe")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 303);
    assert_eq!(
        response.headers()["location"],
        "/console/sign-in?next=%2Fconsole"
    );
    let response = client
        .get(format!("{}/console/dead-letters", app.base))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 303);
    assert_eq!(
        response.headers()["location"],
        "/console/sign-in?next=%2Fconsole%2Fdead-letters"
    );
    // Signed in through a TLS proxy: the cookie never travels over plain
    // HTTP.
    for (name, value) in [
        ("x-forwarded-proto", "https"),
        ("forwarded", "for=192.0.2.1;proto=https;host=ferry.example"),
    ] {
        let behind_tls = client
            .post(format!("{}/console/sign-in", app.base))
            .header(name, value)
            .form(&[("token", TOKEN), ("next", "/console")])
            .send()
            .await
            .unwrap();
        let set_cookie = behind_tls.headers()["set-cookie"].to_str().unwrap();
        assert!(set_cookie.ends_with("; Secure"), "{name}: {set_cookie}");
    }

    console.browser.quit().await;
}

/// With no admin token (loopback only), signing in needs no token, but the
/// session cookie and CSRF tokens work as with one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn open_mode_signs_in_without_a_token_and_still_checks_csrf() {
    let mut setup = Setup::new(Backend::Sqlite, "http://127.0.0.1:9");
    setup.stripe_url = None;
    let app = spawn_sync_app(setup).await;
    let client = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap();
    let url = |path: &str| format!("{}{path}", app.base);

    let response = client.get(url("/console")).send().await.unwrap();
    assert_eq!(
        (
            response.status().as_u16(),
            response.headers()["location"].to_str().unwrap()
        ),
        (303, "/console/sign-in?next=%2Fconsole")
    );
    let page = client
        .get(url("/console/sign-in"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        page.contains("No admin token is configured") && !page.contains("id=\"token\""),
        "{page}"
    );

    // `next` only ever leads into the console.
    let response = client
        .post(url("/console/sign-in"))
        .form(&[("next", "https://evil.example/")])
        .send()
        .await
        .unwrap();
    assert_eq!(
        (
            response.status().as_u16(),
            response.headers()["location"].to_str().unwrap()
        ),
        (303, "/console")
    );
    let set_cookie = response.headers()["set-cookie"]
        .to_str()
        .unwrap()
        .to_owned();
    for attribute in ["HttpOnly", "SameSite=Lax", "Path=/console"] {
        assert!(set_cookie.contains(attribute), "{set_cookie}");
    }
    assert!(!set_cookie.contains("Secure"), "plain HTTP: {set_cookie}");
    // An answer made outside the console's routes carries its headers too.
    let missing = client.get(url("/console/nope")).send().await.unwrap();
    assert_eq!(missing.status(), 404);
    assert_eq!(missing.headers()["x-frame-options"], "DENY");
    assert!(missing.headers()["content-security-policy"]
        .to_str()
        .unwrap()
        .contains("frame-ancestors 'none'"));
    // Through a proxy, no: open, anyone who reached it signed in (a proxy
    // on this machine keeping a loopback `Host`).
    for (name, value) in [
        ("x-forwarded-proto", "https"),
        ("forwarded", "for=192.0.2.1;proto=https;host=ferry.example"),
    ] {
        let proxied = client
            .post(url("/console/sign-in"))
            .header(name, value)
            .form(&[("next", "/console")])
            .send()
            .await
            .unwrap();
        assert_eq!(proxied.status(), 403, "{name}");
        assert!(!proxied.headers().contains_key("set-cookie"), "{name}");
    }
    let cookie = set_cookie.split(';').next().unwrap().to_owned();
    let page = client
        .get(url("/console"))
        .header("cookie", &cookie)
        .send()
        .await
        .unwrap();
    assert_eq!(page.status(), 200);
    assert!(page.headers()["content-security-policy"]
        .to_str()
        .unwrap()
        .starts_with("default-src 'none'"));
    let html = page.text().await.unwrap();
    let csrf = crate::helpers::csrf_field(&html);

    // Settings saved with the switch left as drawn leave a connector never
    // switched on as it is: sent as off, it was paused, and queued every
    // change for a later enable to push as a create.
    let saved = client
        .post(url("/console/connectors/stripe/settings"))
        .header("cookie", &cookie)
        .form(&[
            ("csrf", csrf.as_str()),
            ("enabled_was", "false"),
            ("setting.api_base", "http://127.0.0.1:9"),
        ])
        .send()
        .await
        .unwrap();
    assert_eq!(saved.status(), 303);
    let location = saved.headers()["location"].to_str().unwrap();
    assert!(location.contains("notice=Settings"), "{location}");
    let stripe = api_get(&app, "/api/v1/connectors/stripe").await;
    assert_eq!(
        (stripe["state"].as_str(), stripe["config_source"].as_str()),
        (Some("unconfigured"), Some("api")),
        "{stripe}"
    );

    // A setting left as the page drew it keeps the value in effect: the
    // save replaces the whole set, and sent as drawn it undid a change
    // made since the page was drawn (here through the API).
    let (status, body) = app
        .send(
            reqwest::Method::PUT,
            "/api/v1/connectors/stripe/settings",
            Some(json!({"enabled": null, "settings": {"api_base": "http://127.0.0.1:10"}})),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    // A value drawn with line breaks (a pretty-printed JSON setting) comes
    // back from its input without them (browsers strip them from an
    // input's value), and from the hidden copy with CRLF: still as drawn.
    for (sent, drawn, kept) in [
        (
            "http://127.0.0.1:9",
            "http://127.0.0.1:9",
            "http://127.0.0.1:10",
        ),
        (
            "http://127.0.0.1:11",
            "http://127.0.0.1:9",
            "http://127.0.0.1:11",
        ),
        (
            "http://127.0.0.1:9",
            "http://127.0.0.1:\r\n9",
            "http://127.0.0.1:11",
        ),
    ] {
        let saved = client
            .post(url("/console/connectors/stripe/settings"))
            .header("cookie", &cookie)
            .form(&[
                ("csrf", csrf.as_str()),
                ("enabled_was", "false"),
                ("setting.api_base", sent),
                ("setting_was.api_base", drawn),
            ])
            .send()
            .await
            .unwrap();
        assert_eq!(saved.status(), 303);
        let stripe = api_get(&app, "/api/v1/connectors/stripe").await;
        assert_eq!(
            stripe["settings"]["api_base"], kept,
            "sent {sent}: {stripe}"
        );
    }

    // Only a whole id opens a customer: an email may start with `cus_`.
    let search = |q: &str| {
        client
            .get(url("/console/customers"))
            .query(&[("q", q)])
            .header("cookie", &cookie)
            .send()
    };
    let by_email = search("cus_billing@example.com").await.unwrap();
    assert_eq!(by_email.status(), 200);
    let id = format!("cus_{}", "0".repeat(32));
    let by_id = search(&id).await.unwrap();
    assert_eq!(
        (
            by_id.status().as_u16(),
            by_id.headers()["location"].to_str().unwrap()
        ),
        (303, format!("/console/customers/{id}").as_str())
    );

    // Switched on, so that a disable pauses it (one never switched on
    // stays unconfigured).
    let (status, enabled) = app
        .send(
            reqwest::Method::PUT,
            "/api/v1/connectors/stripe/settings",
            Some(
                json!({"secrets": {"api_key": "sk_test_console", "webhook_secret": "whsec_console"},
                "enabled": true}),
            ),
        )
        .await;
    assert_eq!(status, 200, "{enabled}");
    let disable = url("/console/connectors/stripe/disable");
    let refused = client
        .post(&disable)
        .header("cookie", &cookie)
        .form(&[("x", "1")])
        .send()
        .await
        .unwrap();
    assert_eq!(refused.status(), 403);
    let forged = format!(
        "{}0",
        cookie.trim_end_matches(|c: char| c.is_ascii_hexdigit())
    );
    let response = client
        .post(&disable)
        .header("cookie", &forged)
        .form(&[("csrf", &csrf)])
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 303, "a forged session signs in again");
    assert!(response.headers()["location"]
        .to_str()
        .unwrap()
        .starts_with("/console/sign-in"));
    assert_ne!(
        api_get(&app, "/api/v1/connectors/stripe").await["state"],
        "disabled"
    );

    let done = client
        .post(&disable)
        .header("cookie", &cookie)
        .form(&[("csrf", &csrf)])
        .send()
        .await
        .unwrap();
    assert_eq!(done.status(), 303);
    let location = done.headers()["location"].to_str().unwrap().to_owned();
    assert!(
        location.starts_with("/console/connectors/stripe?notice=Disabled.&tag="),
        "{location}"
    );
    // The notice shows with this session's tag, and not from a link
    // someone wrote (no tag, another tag, or another text under the tag).
    let tag = location.rsplit_once("tag=").unwrap().1.to_owned();
    let notice_shown = |path: String| {
        let client = client.clone();
        let cookie = cookie.clone();
        async move {
            let html = client
                .get(url(&path))
                .header("cookie", &cookie)
                .send()
                .await
                .unwrap()
                .text()
                .await
                .unwrap();
            html.contains(r#"class="notice""#)
        }
    };
    assert!(notice_shown(location.clone()).await);
    for forged in [
        "/console/connectors/stripe?notice=Call+555-0100".to_owned(),
        format!("/console/connectors/stripe?notice=Call+555-0100&tag={tag}"),
        "/console/connectors/stripe?notice=Disabled.&tag=00000000000000000000000000000000"
            .to_owned(),
    ] {
        assert!(!notice_shown(forged.clone()).await, "{forged}");
    }
    assert_eq!(
        api_get(&app, "/api/v1/connectors/stripe").await["state"],
        "disabled"
    );

    // An API refusal is shown with its problem details.
    let refused = client
        .post(url("/console/connectors/stripe/activate"))
        .header("cookie", &cookie)
        .form(&[("csrf", csrf.as_str()), ("version", "9.9.9")])
        .send()
        .await
        .unwrap();
    let status = refused.status().as_u16();
    let html = refused.text().await.unwrap();
    assert_eq!(status, 404, "{html}");
    assert!(html.contains("version_not_found"), "{html}");

    // Signing out ends the session everywhere: a copy of the cookie kept
    // (another tab, a stolen one) is sent to sign in again, as is a form
    // it posts.
    let sign_out = client
        .post(url("/console/sign-out"))
        .header("cookie", &cookie)
        .form(&[("csrf", csrf.as_str())])
        .send()
        .await
        .unwrap();
    assert_eq!(sign_out.status(), 303);
    assert!(sign_out.headers()["set-cookie"]
        .to_str()
        .unwrap()
        .contains("Max-Age=0"));
    let kept = client
        .get(url("/console"))
        .header("cookie", &cookie)
        .send()
        .await
        .unwrap();
    assert_eq!(
        kept.status(),
        303,
        "a signed-out session still opened a page"
    );
    let enable = client
        .post(url("/console/connectors/stripe/enable"))
        .header("cookie", &cookie)
        .form(&[("csrf", csrf.as_str())])
        .send()
        .await
        .unwrap();
    assert_eq!(enable.status(), 303);
    assert!(enable.headers()["location"]
        .to_str()
        .unwrap()
        .starts_with("/console/sign-in"));
    assert_eq!(
        api_get(&app, "/api/v1/connectors/stripe").await["state"],
        "disabled"
    );
}

/// Two replicas: the connector page an upload through one lands on, read
/// at once through the other (a load balancer's choice), shows the new
/// connector and its version. The other answered from its own view, a
/// poll behind: 404 for a connector uploaded a moment ago.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_connector_page_of_another_replica_shows_an_upload_at_once() {
    let dir = tempfile::tempdir().expect("dir");
    let database_url = crate::helpers::new_database(Backend::Postgres, dir.path()).await;
    let replica = || {
        let mut setup = Setup::new(Backend::Postgres, "http://127.0.0.1:9");
        setup.stripe_url = None;
        setup.database_url = Some(database_url.clone());
        setup
    };
    let first = spawn_sync_app(replica()).await;
    let second = spawn_sync_app(replica()).await;
    let (client, cookie) = crate::helpers::console_session(&second.base).await;
    // The second reads its view now, so the upload is newer than it.
    let page = crate::helpers::console_page(
        &client,
        &cookie,
        &format!("{}/console/connectors", second.base),
    )
    .await;
    assert!(!page.contains("/console/connectors/recorder\""), "{page}");
    let uploaded = first
        .client
        .post(format!("{}/api/v1/connectors", first.base))
        .header("content-type", "application/wasm")
        .body(std::fs::read(crate::helpers::recorder_component()).expect("the recorder"))
        .send()
        .await
        .expect("upload");
    assert_eq!(uploaded.status(), 201);
    let response = client
        .get(format!("{}/console/connectors/recorder", second.base))
        .header("cookie", &cookie)
        .send()
        .await
        .expect("page");
    assert_eq!(response.status(), 200);
    let page = response.text().await.expect("its HTML");
    assert!(page.contains("0.1.0"), "{page}");

    // A hand-edited history length is clamped to what the API serves, not
    // answered with an error page.
    let customer = first.create(json!({"email": email("history")})).await;
    let id = customer["id"].as_str().expect("id");
    for history in ["5000", "0"] {
        let response = client
            .get(format!(
                "{}/console/customers/{id}?history={history}",
                second.base
            ))
            .header("cookie", &cookie)
            .send()
            .await
            .expect("page");
        assert_eq!(response.status(), 200, "history={history}");
    }
}

/// The switch's form is conditional on the connector as its page was drawn:
/// posted again from a stale page (a double click whose first post is done,
/// another operator's tab), "Enable" with its backfill box ticked changes
/// nothing. It started a second backfill, a whole listing and merge of the
/// remote's catalog, once the first had completed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stale_enable_form_starts_no_second_backfill() {
    let remote = crate::recorder_remote::RecorderRemote::start().await;
    let mut setup = Setup::new(Backend::Sqlite, "http://127.0.0.1:9");
    setup.stripe_url = None;
    let mut off = remote.connector();
    off.config["enabled"] = json!(false);
    setup.extra_connectors.push(off);
    let app = spawn_sync_app(setup).await;
    let (client, cookie) = crate::helpers::console_session(&app.base).await;
    let page = crate::helpers::console_page(
        &client,
        &cookie,
        &format!("{}/console/connectors/recorder", app.base),
    )
    .await;
    assert!(page.contains("and backfill"), "{page}");
    let revision = page
        .split("name=\"revision\" value=\"")
        .nth(1)
        .and_then(|rest| rest.split('"').next())
        .expect("the revision the form was drawn at")
        .to_owned();
    let csrf = csrf_field(&page);
    let enable = || {
        client
            .post(format!("{}/console/connectors/recorder/enable", app.base))
            .header("cookie", &cookie)
            .form(&[
                ("csrf", csrf.as_str()),
                ("revision", revision.as_str()),
                ("backfill", "true"),
            ])
            .send()
    };
    let first = enable().await.expect("enabled");
    assert_eq!(first.status(), 303);
    let location = first.headers()["location"].to_str().unwrap().to_owned();
    assert!(location.contains("notice=Enabled."), "{location}");
    let runs = "/api/v1/reconciliations?connector=recorder";
    wait_api(&app, runs, |runs| {
        runs["data"][0]["status"].as_str() == Some("completed")
    })
    .await;

    let again = enable().await.expect("posted again");
    assert_eq!(again.status(), 303);
    let location = again.headers()["location"].to_str().unwrap().to_owned();
    assert!(location.contains("changed+nothing"), "{location}");
    let runs = api_get(&app, runs).await;
    assert_eq!(
        runs["data"].as_array().map(Vec::len),
        Some(1),
        "a second backfill: {runs}"
    );
}
