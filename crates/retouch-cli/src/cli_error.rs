//! The CLI's two failure classes: bad input (exit 2) and everything else (exit 1).

use std::fmt;

/// An error the user fixes by changing the command line or its inputs (exit code 2).
#[derive(Debug)]
pub struct BadInput(pub String);

impl fmt::Display for BadInput {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for BadInput {}

/// Shorthand for a [`BadInput`] inside `anyhow`.
pub fn bad_input(message: impl Into<String>) -> anyhow::Error {
    anyhow::Error::new(BadInput(message.into()))
}

/// 2 when any error in the chain is a [`BadInput`], else 1.
pub fn exit_code(error: &anyhow::Error) -> u8 {
    if error.chain().any(|e| e.is::<BadInput>()) { 2 } else { 1 }
}
