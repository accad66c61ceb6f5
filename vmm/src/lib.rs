//! frakti-vmm: the micro-VMM behind every Frakti pod sandbox. One process
//! runs one KVM virtual machine: it boots our guest kernel and initrd, runs
//! the vCPUs, emulates the few devices the guest needs, and offers a control
//! API on a unix socket.
//!
//! Reading order: [`config`] (what a VM is), [`vm`] (building and running
//! it), [`vcpu`] (the run loop), [`arch`] (x86_64 boot), [`devices`],
//! [`api`], [`seccomp`].

pub mod api;
pub mod arch;
pub mod builder;
pub mod config;
pub mod devices;
pub mod memory;
pub mod metrics;
pub mod seccomp;
pub mod vcpu;
pub mod vm;
