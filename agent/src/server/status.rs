//! Each module's errors mapped to gRPC status codes, in one place.

use super::*;

impl From<container::Error> for Status {
    fn from(e: container::Error) -> Status {
        use container::Error as E;
        let message = chain(&e);
        match e {
            E::NotFound(_) | E::ProcessNotFound { .. } => Status::not_found(message),
            E::Exists(_) | E::ProcessExists { .. } => Status::already_exists(message),
            E::Invalid(_) | E::Cgroup(crate::cgroup::Error::Invalid(_)) => {
                Status::invalid_argument(message)
            }
            E::Storage(storage::Error::Invalid(_)) => Status::invalid_argument(message),
            E::Storage(storage::Error::NotFound(_)) => Status::not_found(message),
            E::Precondition(_) | E::Storage(storage::Error::Precondition(_)) => {
                Status::failed_precondition(message)
            }
            _ => Status::internal(message),
        }
    }
}

impl From<storage::Error> for Status {
    fn from(e: storage::Error) -> Status {
        let message = chain(&e);
        match e {
            storage::Error::Invalid(_) => Status::invalid_argument(message),
            storage::Error::NotFound(_) => Status::not_found(message),
            storage::Error::Precondition(_) => Status::failed_precondition(message),
            storage::Error::Exists(_) => Status::already_exists(message),
            _ => Status::internal(message),
        }
    }
}

impl From<sandbox::Error> for Status {
    fn from(e: sandbox::Error) -> Status {
        let message = chain(&e);
        match e {
            sandbox::Error::Invalid(_)
            | sandbox::Error::Cgroup(crate::cgroup::Error::Invalid(_)) => {
                Status::invalid_argument(message)
            }
            sandbox::Error::AlreadySetUp => Status::failed_precondition(message),
            _ => Status::internal(message),
        }
    }
}

impl From<network::Error> for Status {
    fn from(e: network::Error) -> Status {
        let message = chain(&e);
        match e {
            network::Error::Invalid(_) => Status::invalid_argument(message),
            network::Error::NotFound(_) => Status::not_found(message),
            network::Error::Exists(_) => Status::already_exists(message),
            _ if e.is_refused_argument() => Status::invalid_argument(message),
            _ => Status::internal(message),
        }
    }
}

pub(super) fn join_error(e: tokio::task::JoinError) -> Status {
    Status::internal(format!("a blocking task failed: {e}"))
}
