//! The catalog's validation in the API's types: the rules are
//! `ferry_runtime::customer`'s, which the connector test kit applies to a
//! connector's records too.

use super::CustomerInput;
use crate::api::error::{ApiError, FieldError};
use crate::runtime::customer::{self, FieldProblem};
use crate::store::CustomerFields;

pub use crate::runtime::customer::{is_valid_email, normalise_email, MAX_EMAIL, MAX_METADATA_KEYS};

/// Refuses the empty or blank metadata values a request gives (`values`:
/// its own, not the stored customer's): Stripe takes an empty value as
/// removing the key (and a create does not store it), so it would never
/// reach Stripe, and every reconciliation would find the two different; a
/// blank one a merge takes for no value (so a remote's edit of any field
/// dropped it everywhere). Only what a client sends: a value stored before
/// (or a remote's) still merges.
pub fn refuse_empty_metadata<'a>(
    values: impl IntoIterator<Item = (&'a String, &'a str)>,
    remove: &str,
) -> Result<(), ApiError> {
    let empty: Vec<FieldError> = values
        .into_iter()
        .filter(|(_, value)| value.trim().is_empty())
        .map(|(key, _)| {
            FieldError::new(
                format!("metadata.{}", key.chars().take(41).collect::<String>()),
                format!(
                    "an empty or blank value: Stripe takes an empty one as removing the key, \
                     and a sync takes a blank one for none; {remove}"
                ),
            )
        })
        .collect();
    if empty.is_empty() {
        Ok(())
    } else {
        Err(ApiError::Validation(empty))
    }
}

/// Validates and normalises a request into the stored fields, reporting
/// every invalid field at once.
pub fn validate(input: CustomerInput) -> Result<CustomerFields, ApiError> {
    customer::validate(customer::CustomerInput {
        name: input.name,
        email: input.email,
        phone: input.phone,
        address: input.address,
        metadata: input.metadata,
    })
    .map_err(problems)
}

/// [`validate`] for a stored customer's request whose email stays `kept`
/// and is not judged again (an email the request leaves out or sends as
/// stored).
pub fn validate_keeping_email(
    input: CustomerInput,
    kept: &str,
) -> Result<CustomerFields, ApiError> {
    customer::validate_keeping_email(
        customer::CustomerInput {
            name: input.name,
            email: input.email,
            phone: input.phone,
            address: input.address,
            metadata: input.metadata,
        },
        kept,
    )
    .map_err(problems)
}

/// The catalog's problems as the API's 422.
fn problems(problems: Vec<FieldProblem>) -> ApiError {
    ApiError::Validation(
        problems
            .into_iter()
            .map(|p| FieldError::new(p.field, p.message))
            .collect(),
    )
}
