//! The hub's built-in parts beyond the admin API: the services and background
//! tasks that [`crate::server::start_with`] plugs into one hub. The binary and
//! the end-to-end tests both start the hub through [`default_extensions`], so a
//! test hub is the same hub an operator runs.

use crate::config::Config;
use crate::server::Extensions;

/// Every built-in service and task, configured from `config`.
#[allow(unused_mut, unused_variables)]
pub fn default_extensions(config: &Config) -> Extensions {
    let mut extensions = Extensions::default();
    // Each part adds its hooks here, one line per part.
    extensions.tasks.push(crate::resolve_loop::task(config));
    crate::session::register(&mut extensions, config);
    extensions
}
