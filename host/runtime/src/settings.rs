//! `settings.get`: the operator's non-secret settings for this connector.
//!
//! Only settings the manifest declares are visible; an undeclared name reads
//! as unset, so a connector cannot probe configuration it did not ask for.

use super::state::CallState;
use super::wit::latest::ferry::connector::settings::Host;

/// Longest setting name looked up; longer names cannot be declared anyway.
const MAX_NAME_LEN: usize = 128;

impl Host for CallState {
    fn get(&mut self, name: String) -> Option<String> {
        if name.len() > MAX_NAME_LEN {
            return None;
        }
        let spec = self
            .connector
            .manifest
            .settings
            .iter()
            .find(|s| s.name == name)?;
        self.config
            .settings
            .get(&name)
            .cloned()
            .or_else(|| spec.default.clone())
    }
}
