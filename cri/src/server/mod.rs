//! The CRI gRPC services kubelet calls, one file per service; handlers are
//! thin: they validate, call the stores, and map errors in `status.rs`.

pub mod containers_admin;
pub mod image_service;
pub mod images_admin;
pub mod runtime_service;
pub mod status;
pub mod streaming_requests;
