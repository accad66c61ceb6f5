//! frakti-agent: PID 1 of a Frakti pod VM, and the agent API server.
//!
//! As PID 1 (`pid1`) the agent mounts the kernel filesystems, reaps every
//! zombie, announces readiness on the console and to the VMM, serves the
//! agent API (`frakti-proto`, `server`) on vsock and on shutdown stops the
//! containers and resets the VM. In host mode (`frakti-agent serve`) it
//! serves the same API on a unix socket as an ordinary root process, for
//! tests. Containers (`container`) are cloned by `process` and set up by
//! the re-executed agent binary (`init`).

pub mod cgroup;
pub mod container;
pub mod idmap;
pub mod init;
pub mod io;
pub mod network;
pub mod output;
pub mod pid1;
pub mod port_forward;
pub mod process;
pub mod sandbox;
pub mod seccomp;
pub mod server;
pub mod storage;
pub mod sysinfo;
