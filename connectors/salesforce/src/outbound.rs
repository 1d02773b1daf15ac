//! Salesforce Outbound Messages: the SOAP `notifications` call a workflow
//! rule or flow sends, parsed into notifications, and the `Ack` reply that
//! tells Salesforce to stop redelivering.

use ferry_sdk::json::{Map, Value};
use ferry_sdk::ConnectorError;
use roxmltree::{Document, Node};

/// The namespace of the outbound messaging `notifications` call.
pub(crate) const OUTBOUND_NS: &str = "http://soap.sforce.com/2005/09/outbound";
const SOAP11_NS: &str = "http://schemas.xmlsoap.org/soap/envelope/";
const SOAP12_NS: &str = "http://www.w3.org/2003/05/soap-envelope";
const XSI_NS: &str = "http://www.w3.org/2001/XMLSchema-instance";

/// The most notifications one message holds (`maxOccurs="100"` in the WSDL).
pub(crate) const MAX_NOTIFICATIONS: usize = 100;

/// The body that acknowledges a message: Salesforce retries (for up to 24
/// hours) until it sees `Ack` `true`.
pub(crate) const ACK_REPLY: &str = concat!(
    r#"<?xml version="1.0" encoding="UTF-8"?>"#,
    r#"<soapenv:Envelope xmlns:soapenv="http://schemas.xmlsoap.org/soap/envelope/">"#,
    "<soapenv:Body>",
    r#"<notificationsResponse xmlns="http://soap.sforce.com/2005/09/outbound">"#,
    "<Ack>true</Ack>",
    "</notificationsResponse>",
    "</soapenv:Body>",
    "</soapenv:Envelope>"
);

/// One parsed outbound message.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct OutboundMessage {
    /// `OrganizationId`, if present.
    pub(crate) organization_id: Option<String>,
    pub(crate) notifications: Vec<Notification>,
    /// Notifications that named no record (see [`notification`]).
    pub(crate) skipped: usize,
}

/// One `Notification`: a record's current state.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Notification {
    /// The notification's own id (`04l…`), stable across redeliveries.
    pub(crate) id: String,
    /// The object named by the `sObject`'s `xsi:type`, without its prefix.
    pub(crate) object: String,
    /// `sf:Id`.
    pub(crate) record_id: String,
    /// Every field element by local name, as text.
    pub(crate) fields: Map<String, Value>,
}

fn malformed(why: impl std::fmt::Display) -> ConnectorError {
    ConnectorError::permanent(format!("malformed outbound message: {why}"))
}

fn is(node: &Node<'_, '_>, ns: &str, local: &str) -> bool {
    node.is_element() && node.tag_name().name() == local && node.tag_name().namespace() == Some(ns)
}

fn child<'a, 'i>(node: Node<'a, 'i>, ns: &str, local: &str) -> Option<Node<'a, 'i>> {
    node.children().find(|c| is(c, ns, local))
}

fn child_text(node: Node<'_, '_>, ns: &str, local: &str) -> Option<String> {
    child(node, ns, local)
        .and_then(|c| c.text())
        .map(str::trim)
        .filter(|t| !t.is_empty())
        .map(str::to_owned)
}

/// Parses a message. Anything that is not a SOAP envelope holding a
/// `notifications` call is malformed (permanent: redelivery sends the same
/// bytes).
pub(crate) fn parse(body: &[u8]) -> Result<OutboundMessage, ConnectorError> {
    let text = std::str::from_utf8(body).map_err(|e| malformed(format!("not UTF-8: {e}")))?;
    let doc = Document::parse(text).map_err(malformed)?;
    let envelope = doc.root_element();
    let soap_ns = [SOAP11_NS, SOAP12_NS]
        .into_iter()
        .find(|ns| is(&envelope, ns, "Envelope"))
        .ok_or_else(|| malformed("the root element is not a SOAP Envelope"))?;
    let soap_body =
        child(envelope, soap_ns, "Body").ok_or_else(|| malformed("the Envelope has no Body"))?;
    let notifications = child(soap_body, OUTBOUND_NS, "notifications").ok_or_else(|| {
        malformed(format!(
            "the Body holds no `notifications` element in namespace {OUTBOUND_NS}"
        ))
    })?;
    let mut parsed = Vec::new();
    let mut skipped = 0;
    for node in notifications
        .children()
        .filter(|c| is(c, OUTBOUND_NS, "Notification"))
    {
        if parsed.len() + skipped == MAX_NOTIFICATIONS {
            return Err(malformed(format!(
                "more than {MAX_NOTIFICATIONS} notifications"
            )));
        }
        match notification(node)? {
            Some(n) => parsed.push(n),
            None => skipped += 1,
        }
    }
    Ok(OutboundMessage {
        organization_id: child_text(notifications, OUTBOUND_NS, "OrganizationId"),
        notifications: parsed,
        skipped,
    })
}

/// One notification; `None` for one that names no record: a record
/// deleted before the message went out comes with no data (Salesforce
/// Help, "Considerations for Outbound Messages"). It is acknowledged with
/// the rest, not applied: refusing the message would refuse every other
/// notification in it until Salesforce gives up a day later, and the
/// deletion it stands for is reconciliation's to find.
fn notification(node: Node<'_, '_>) -> Result<Option<Notification>, ConnectorError> {
    let id =
        child_text(node, OUTBOUND_NS, "Id").ok_or_else(|| malformed("a Notification has no Id"))?;
    let Some(sobject) = child(node, OUTBOUND_NS, "sObject") else {
        return Ok(None);
    };
    // `xsi:type="sf:Contact"`: the prefix is whatever the sender bound.
    let object = sobject
        .attribute((XSI_NS, "type"))
        .map(|t| t.rsplit(':').next().unwrap_or(t).to_owned())
        .ok_or_else(|| malformed(format!("the sObject of notification {id} has no xsi:type")))?;
    let mut fields = Map::new();
    // Field elements are in the enterprise (or partner) sObject namespace;
    // match on the local name only.
    for field in sobject.children().filter(Node::is_element) {
        let nil = field.attribute((XSI_NS, "nil")) == Some("true");
        let value = match field.text() {
            Some(t) if !nil => Value::String(t.to_owned()),
            _ => Value::Null,
        };
        fields.insert(field.tag_name().name().to_owned(), value);
    }
    let record_id = fields
        .get("Id")
        .and_then(Value::as_str)
        .map(str::trim)
        .filter(|v| !v.is_empty())
        .map(str::to_owned);
    Ok(record_id.map(|record_id| Notification {
        id,
        object,
        record_id,
        fields,
    }))
}

/// Whether two organization ids name the same org: the first 15 characters
/// are the case-sensitive id, the 18-character form adds a checksum.
pub(crate) fn same_org(a: &str, b: &str) -> bool {
    match (a.trim().get(..15), b.trim().get(..15)) {
        (Some(a), Some(b)) => a == b,
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MESSAGE: &str = concat!(
        r#"<?xml version="1.0" encoding="UTF-8"?>"#,
        r#"<soapenv:Envelope xmlns:soapenv="http://schemas.xmlsoap.org/soap/envelope/""#,
        r#" xmlns:xsd="http://www.w3.org/2001/XMLSchema""#,
        r#" xmlns:xsi="http://www.w3.org/2001/XMLSchema-instance">"#,
        "<soapenv:Body>",
        r#"<notifications xmlns="http://soap.sforce.com/2005/09/outbound">"#,
        "<OrganizationId>00D000000000001EAA</OrganizationId>",
        "<ActionId>04k000000000001AAA</ActionId>",
        r#"<SessionId xsi:nil="true"/>"#,
        "<EnterpriseUrl>https://x/services/Soap/c/62.0/00D000000000001</EnterpriseUrl>",
        "<PartnerUrl>https://x/services/Soap/u/62.0/00D000000000001</PartnerUrl>",
        "<Notification><Id>04l000000000001AAA</Id>",
        r#"<sObject xsi:type="sf:Contact" xmlns:sf="urn:sobject.enterprise.soap.sforce.com">"#,
        "<sf:Id>003000000000001AAA</sf:Id>",
        "<sf:Email>ada@example.com</sf:Email>",
        "<sf:LastName>Lovelace &amp; co</sf:LastName>",
        "</sObject></Notification>",
        "</notifications></soapenv:Body></soapenv:Envelope>"
    );

    #[test]
    fn parses_the_notifications_call() {
        let msg = parse(MESSAGE.as_bytes()).unwrap();
        assert_eq!(msg.organization_id.as_deref(), Some("00D000000000001EAA"));
        assert_eq!(msg.notifications.len(), 1);
        let n = &msg.notifications[0];
        assert_eq!(n.id, "04l000000000001AAA");
        assert_eq!(n.object, "Contact");
        assert_eq!(n.record_id, "003000000000001AAA");
        assert_eq!(n.fields["LastName"], "Lovelace & co");
    }

    #[test]
    fn a_notification_naming_no_record_is_left_out_not_the_message() {
        let deleted = MESSAGE.replace(
            "<sf:Email>ada@example.com</sf:Email><sf:LastName>Lovelace &amp; co</sf:LastName>",
            "",
        );
        let no_record = MESSAGE.replace("<sf:Id>003000000000001AAA</sf:Id>", "");
        let no_sobject = MESSAGE
            .split("<sObject")
            .next()
            .map(|head| {
                format!("{head}</Notification></notifications></soapenv:Body></soapenv:Envelope>")
            })
            .unwrap();
        let msg = parse(deleted.as_bytes()).unwrap();
        assert_eq!(msg.notifications.len(), 1);
        assert_eq!(msg.notifications[0].fields.len(), 1, "only the Id");
        for body in [no_record, no_sobject] {
            let msg = parse(body.as_bytes()).unwrap();
            assert!(msg.notifications.is_empty(), "{body}");
            assert_eq!(msg.skipped, 1);
            assert_eq!(msg.organization_id.as_deref(), Some("00D000000000001EAA"));
        }
    }

    #[test]
    fn refuses_what_is_not_a_notifications_call() {
        for body in [
            "<a",
            "<html/>",
            r#"<e:Envelope xmlns:e="http://schemas.xmlsoap.org/soap/envelope/"/>"#,
            r#"<e:Envelope xmlns:e="http://schemas.xmlsoap.org/soap/envelope/"><e:Body><notifications/></e:Body></e:Envelope>"#,
        ] {
            match parse(body.as_bytes()) {
                Err(ConnectorError::Permanent(m)) => {
                    assert!(m.starts_with("malformed outbound message"), "{m}")
                }
                other => panic!("{body}: {other:?}"),
            }
        }
    }

    #[test]
    fn org_ids_compare_on_fifteen_characters() {
        assert!(same_org("00D000000000001EAA", "00D000000000001"));
        assert!(!same_org("00D000000000002EAA", "00D000000000001EAA"));
        assert!(!same_org("00d000000000001", "00D000000000001"));
        assert!(!same_org("00D", "00D"));
    }
}
