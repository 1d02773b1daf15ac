//! The catalog's validation in the API's types: the rules are
//! `ferry_runtime::customer`'s, which the connector test kit applies to a
//! connector's records too.

use super::CustomerInput;
use crate::api::error::{ApiError, FieldError};
use crate::runtime::customer::{self, FieldProblem};
use crate::store::CustomerFields;

pub use crate::runtime::customer::{is_valid_email, normalise_email, MAX_EMAIL, MAX_METADATA_KEYS};

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

/// The catalog's problems as the API's 422.
fn problems(problems: Vec<FieldProblem>) -> ApiError {
    ApiError::Validation(
        problems
            .into_iter()
            .map(|p| FieldError::new(p.field, p.message))
            .collect(),
    )
}
