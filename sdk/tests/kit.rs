//! The test kit against ferry's hostile guest (`tests/guests/hostile`,
//! built by `make connectors`): what ferry refuses of a connector, the kit
//! refuses too, so a connector that passes its author's tests is not
//! dead-lettered by the host.

use ferry_sdk::testkit::{CallError, TestKit};
use ferry_sdk::ConnectorError;

async fn kit() -> TestKit {
    TestKit::load_file(ferry_test_support::wasm::component_path(
        "ferry_test_hostile",
    ))
    .await
    .expect("the hostile guest loads")
}

fn refused(result: Result<impl std::fmt::Debug, CallError>) -> String {
    match result {
        Err(CallError::Connector(ConnectorError::Permanent(message))) => message,
        other => panic!("not refused: {other:?}"),
    }
}

/// ferry dead-letters the event a record that is no JSON object was
/// fetched for (`[]` would read as a record whose every field the remote
/// cleared): the kit's `fetch` fails.
#[tokio::test]
async fn a_fetched_record_that_is_no_object_is_refused() {
    let message = refused(kit().await.fetch("customer", "array").await);
    assert!(message.contains("not a JSON object"), "{message}");
}

/// A reconciliation skips a listed record that is no object as `invalid`
/// (never imported, linked or compared): the kit's `list` fails.
#[tokio::test]
async fn a_listed_record_that_is_no_object_is_refused() {
    let message = refused(kit().await.list("customer", Some("null".into()), 10).await);
    assert!(message.contains("listed record r0"), "{message}");
    assert!(message.contains("not a JSON object"), "{message}");
}
