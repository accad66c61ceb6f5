//! The CRI streaming server (`kubectl exec`, `attach`, `port-forward`)
//! driven by an independent client: Debian's kubectl 1.20 talks to a fake
//! API server ([`apiserver`]), which asks frakti for the streaming URL
//! through the CRI and proxies the connection there, as kubelet does; and
//! our own SPDY and WebSocket clients ([`clients`]) for what kubectl
//! cannot do; the kubernetes Python client ([`python`]) for WebSocket exec.

pub mod apiserver;
mod clients;
mod kubectl;
pub mod python;
mod spdy_client;

use libtest_mimic::Trial;

use crate::cri::harness::with_daemon;

pub fn tests() -> Vec<Trial> {
    vec![
        Trial::test("streaming::kubectl_exec_attach_and_port_forward", || {
            with_daemon(&[], kubectl::kubectl_streaming)
        }),
        Trial::test("streaming::own_spdy_and_websocket_clients", || {
            with_daemon(&[], clients::own_clients)
        }),
        Trial::test("streaming::python_client_websocket_exec", || {
            with_daemon(&[], python::python_websocket_exec)
        }),
    ]
}
