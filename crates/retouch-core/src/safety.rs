//! The safety-checker policy: whether diffusers' `StableDiffusionSafetyChecker` runs after
//! decoding, and what a flagged image becomes.
//!
//! diffusers runs the checker whenever the checkpoint's `model_index.json` names one (a
//! `safety_checker` and a `feature_extractor` component): `requires_safety_checker` only
//! decides whether *removing* it logs a warning. A flagged image comes out black. Retouch's
//! `auto` does exactly that; `on` requires a checker, `off` never loads one, and `block`
//! requires one and fails a flagged job instead of writing a black image.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// `--safety-checker` / the worker's `safety_checker` setting.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SafetyPolicy {
    /// As diffusers: run the checker when the checkpoint ships one; flagged images are black.
    #[default]
    Auto,
    /// Run the checker (a checkpoint without one is refused at load); flagged images are black.
    On,
    /// Never load or run a checker: outputs as without one.
    Off,
    /// Run the checker (required, like `on`), and fail a flagged job with the `nsfw` error kind
    /// instead of writing any output.
    Block,
}

/// A checkpoint that `on` or `block` cannot be honoured with.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error(
    "--safety-checker {policy} needs a checkpoint with a safety checker, and its model_index.json names no \
     safety_checker and feature_extractor (use auto or off)"
)]
pub struct NoSafetyChecker {
    /// The policy that required one.
    pub policy: SafetyPolicy,
}

impl SafetyPolicy {
    /// Every policy, in documentation order.
    pub const ALL: [SafetyPolicy; 4] = [Self::Auto, Self::On, Self::Off, Self::Block];

    /// The CLI / configuration name.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Auto => "auto",
            Self::On => "on",
            Self::Off => "off",
            Self::Block => "block",
        }
    }

    /// Whether the checker runs, given whether the checkpoint ships one.
    ///
    /// # Errors
    /// [`NoSafetyChecker`] when the policy requires a checker the checkpoint does not have.
    pub fn runs_checker(self, checkpoint_has_one: bool) -> Result<bool, NoSafetyChecker> {
        match self {
            Self::Off => Ok(false),
            Self::Auto => Ok(checkpoint_has_one),
            Self::On | Self::Block if checkpoint_has_one => Ok(true),
            Self::On | Self::Block => Err(NoSafetyChecker { policy: self }),
        }
    }

    /// Whether a flagged image fails its job (instead of becoming black).
    pub fn blocks(self) -> bool {
        self == Self::Block
    }
}

impl fmt::Display for SafetyPolicy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// An unknown policy name.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("unknown safety-checker policy {0:?}; expected auto, on, off or block")]
pub struct UnknownPolicy(pub String);

impl FromStr for SafetyPolicy {
    type Err = UnknownPolicy;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::ALL.into_iter().find(|p| p.as_str() == s).ok_or_else(|| UnknownPolicy(s.to_string()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn auto_follows_the_checkpoint_and_on_and_block_require_a_checker() {
        assert_eq!(SafetyPolicy::default(), SafetyPolicy::Auto);
        assert_eq!(SafetyPolicy::Auto.runs_checker(true), Ok(true));
        assert_eq!(SafetyPolicy::Auto.runs_checker(false), Ok(false));
        assert_eq!(SafetyPolicy::Off.runs_checker(true), Ok(false));
        assert_eq!(SafetyPolicy::On.runs_checker(true), Ok(true));
        assert_eq!(SafetyPolicy::Block.runs_checker(true), Ok(true));
        let e = SafetyPolicy::Block.runs_checker(false).expect_err("no checker");
        assert!(e.to_string().contains("--safety-checker block"), "{e}");
        assert!(SafetyPolicy::Block.blocks() && !SafetyPolicy::On.blocks() && !SafetyPolicy::Auto.blocks());
    }

    #[test]
    fn names_round_trip_through_the_cli_and_serde() {
        for p in SafetyPolicy::ALL {
            assert_eq!(p.as_str().parse::<SafetyPolicy>(), Ok(p));
            assert_eq!(serde_json::to_value(p).expect("json"), serde_json::json!(p.as_str()));
        }
        let e = "strict".parse::<SafetyPolicy>().expect_err("unknown");
        assert!(e.to_string().contains("strict") && e.to_string().contains("block"), "{e}");
    }
}
