//! frakti's own container API (`frakti.containers.v1.Containers`): what the
//! CLI needs beyond CRI, on the same socket.

use frakti_proto::containers::v1 as pb;
use frakti_proto::containers::v1::containers_server::Containers;
use tonic::{Request, Response, Status};

use super::status::runtime_status;
use crate::runtime::Runtime;

pub struct ContainersAdmin {
    runtime: Runtime,
}

impl ContainersAdmin {
    pub fn new(runtime: Runtime) -> ContainersAdmin {
        ContainersAdmin { runtime }
    }
}

#[tonic::async_trait]
impl Containers for ContainersAdmin {
    async fn signal(
        &self,
        request: Request<pb::SignalRequest>,
    ) -> Result<Response<pb::SignalResponse>, Status> {
        let request = request.into_inner();
        if request.container_id.is_empty() {
            return Err(Status::invalid_argument("container_id is required"));
        }
        self.runtime
            .signal_container(&request.container_id, request.signal)
            .await
            .map_err(runtime_status)?;
        Ok(Response::new(pb::SignalResponse {}))
    }
}
