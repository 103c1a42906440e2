//! The one error classifier of the engine: every failure a job can meet on its way — storage,
//! the image codec, a crashed blocking task, the model, the result publish — becomes a
//! [`JobError`] here, with its protocol kind and whether another attempt may help. The engine's
//! stages only say *where* a failure happened; what it means is decided in this file.
//!
//! Retried (transient): storage 5xx / throttling / timeouts, a model failure (out of memory,
//! a device error, a panic), the model thread being unavailable, a result the broker did not
//! confirm. Everything else is permanent: the job gets a failure result and a dead letter on
//! its first attempt.

use retouch_core::editor::{EditError, EditErrorKind};
use retouch_core::error::{ErrorKind, JobError};
use retouch_core::imaging::ImageError;
use retouch_core::queue::QueueError;
use retouch_core::store::StoreError;
use tokio::task::JoinError;

/// Where in the job's life a storage call failed: the same [`StoreError`] means a different
/// thing for the input than for the output.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Object {
    /// Reading the source image.
    Source,
    /// Checking for, or writing, the output.
    Output,
}

/// A storage failure.
pub(crate) fn storage(object: Object, error: StoreError) -> JobError {
    match (object, error) {
        (Object::Source, StoreError::NotFound(m)) => JobError::new(ErrorKind::SourceNotFound, m),
        (Object::Source, StoreError::TooLarge { size, limit }) => {
            JobError::new(ErrorKind::ImageTooLarge, format!("{size} bytes exceeds the limit of {limit} bytes"))
        }
        (_, StoreError::Invalid(m)) => JobError::new(ErrorKind::InvalidJob, m),
        (_, StoreError::Transient(m)) => JobError::transient(ErrorKind::Storage, m),
        (_, StoreError::Denied(m)) => {
            JobError::new(ErrorKind::Storage, format!("access denied (check the S3 credentials): {m}"))
        }
        (Object::Output, other) => JobError::new(ErrorKind::Storage, other.to_string()),
    }
}

/// A decode or encode failure of the image codec.
pub(crate) fn image(error: ImageError) -> JobError {
    match error {
        ImageError::TooLarge(m) => JobError::new(ErrorKind::ImageTooLarge, m),
        ImageError::Invalid(m) | ImageError::TooSmall(m) => JobError::new(ErrorKind::InvalidImage, m),
        ImageError::Encode(m) => JobError::new(ErrorKind::Internal, m),
    }
}

/// The blocking task that decoded or encoded the image panicked. A decoder crash is blamed on
/// the input (a crafted file must not be retried forever); an encoder crash is ours.
pub(crate) fn crashed(object: Object, error: &JoinError) -> JobError {
    match object {
        Object::Source => JobError::new(ErrorKind::InvalidImage, format!("decoder crashed: {error}")),
        Object::Output => JobError::new(ErrorKind::Internal, format!("encoder crashed: {error}")),
    }
}

/// A model call that produced no images ([`EditErrorKind::Cancelled`] never reaches here:
/// cancelled jobs are given back, not failed).
pub(crate) fn edit(error: &EditError) -> JobError {
    match error.kind {
        EditErrorKind::InvalidInput => JobError::new(ErrorKind::InvalidJob, error.message.clone()),
        EditErrorKind::Timeout => JobError::new(ErrorKind::Timeout, error.message.clone()),
        EditErrorKind::Model => JobError::transient(ErrorKind::Model, error.message.clone()),
        EditErrorKind::Unavailable | EditErrorKind::Cancelled => {
            JobError::transient(ErrorKind::Internal, error.message.clone())
        }
    }
}

/// The job names no scheduler and the checkpoint's is not implemented.
pub(crate) fn no_scheduler() -> JobError {
    JobError::new(ErrorKind::InvalidJob, "the checkpoint's scheduler is not implemented; set params.scheduler")
}

/// `karras_sigmas` asked of a scheduler that has none in diffusers.
pub(crate) fn no_karras_sigmas(scheduler: impl std::fmt::Display) -> JobError {
    JobError::new(
        ErrorKind::InvalidJob,
        format!("params.karras_sigmas: the scheduler {scheduler} has no Karras sigmas"),
    )
}

/// The safety checker flagged the edit and the policy is `block`.
pub(crate) fn blocked_nsfw() -> JobError {
    JobError::new(
        ErrorKind::Nsfw,
        "the safety checker flagged the edited image; no output was written (safety_checker = block)",
    )
}

/// The output exists but its result could not be published: another delivery will find the
/// output and publish a duplicate result, so this is worth a retry.
/// A job whose webhook this worker may not call (none configured, or the host not allowed):
/// permanent, the job is invalid here.
pub(crate) fn webhook(why: String) -> JobError {
    JobError::new(ErrorKind::InvalidJob, format!("webhook: {why}"))
}

pub(crate) fn unpublished(error: &QueueError) -> JobError {
    JobError::transient(ErrorKind::Internal, format!("result not published: {error}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn storage_failures_depend_on_the_object() {
        let not_found = || StoreError::NotFound("s3://b/k".into());
        assert_eq!(storage(Object::Source, not_found()).kind, ErrorKind::SourceNotFound);
        assert_eq!(storage(Object::Output, not_found()).kind, ErrorKind::Storage);
        let too_large = StoreError::TooLarge { size: 10, limit: 5 };
        assert_eq!(storage(Object::Source, too_large).kind, ErrorKind::ImageTooLarge);
        for object in [Object::Source, Object::Output] {
            let transient = storage(object, StoreError::Transient("503".into()));
            assert_eq!((transient.kind, transient.retryable), (ErrorKind::Storage, true));
            let denied = storage(object, StoreError::Denied("403".into()));
            assert_eq!((denied.kind, denied.retryable), (ErrorKind::Storage, false));
            assert!(denied.message.contains("credentials"), "{}", denied.message);
            assert_eq!(storage(object, StoreError::Invalid("x".into())).kind, ErrorKind::InvalidJob);
        }
    }

    #[test]
    fn model_failures_retry_only_what_may_pass() {
        let of = |kind| edit(&EditError { kind, message: "m".into() });
        assert_eq!((of(EditErrorKind::Model).kind, of(EditErrorKind::Model).retryable), (ErrorKind::Model, true));
        assert_eq!(
            (of(EditErrorKind::Timeout).kind, of(EditErrorKind::Timeout).retryable),
            (ErrorKind::Timeout, false)
        );
        assert!(!of(EditErrorKind::InvalidInput).retryable);
        assert_eq!(of(EditErrorKind::InvalidInput).kind, ErrorKind::InvalidJob);
        assert!(of(EditErrorKind::Unavailable).retryable);
    }

    #[test]
    fn image_failures_blame_the_input_except_encoding() {
        assert_eq!(image(ImageError::TooSmall("1x1".into())).kind, ErrorKind::InvalidImage);
        assert_eq!(image(ImageError::TooLarge("big".into())).kind, ErrorKind::ImageTooLarge);
        assert_eq!(image(ImageError::Encode("io".into())).kind, ErrorKind::Internal);
    }

    #[test]
    fn an_unpublished_result_is_retried_and_says_why() {
        let e = unpublished(&QueueError::Unconfirmed("no confirm within 30s".into()));
        assert!(e.retryable && e.message.ends_with("publish not confirmed: no confirm within 30s"), "{}", e.message);
        assert_eq!(e.kind, ErrorKind::Internal);
    }
}
