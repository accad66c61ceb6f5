//! The lab's L1: Debian's cloud kernel with kvm-amd, and an initramfs holding
//! busybox, QEMU (for baselines) and whatever a batch needs.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::process::Command;

use crate::initramfs::{self, Initramfs};

/// Debian's meta package whose dependency is the L1 kernel.
const KERNEL_META_PACKAGE: &str = "linux-image-cloud-amd64";

/// Modules loaded in L1, in order (dependencies first), relative to
/// `lib/modules/<version>/kernel`, with their parameters: KVM with nested
/// SVM; tun for taps; vhost-vsock so QEMU baselines get a vsock device.
const L1_MODULES: &[(&str, &str)] = &[
    ("virt/lib/irqbypass.ko", ""),
    ("arch/x86/kvm/kvm.ko", ""),
    ("arch/x86/kvm/kvm-amd.ko", "nested=1"),
    ("drivers/net/tun.ko", ""),
    ("net/vmw_vsock/vsock.ko", ""),
    ("net/vmw_vsock/vmw_vsock_virtio_transport_common.ko", ""),
    ("drivers/vhost/vhost_iotlb.ko", ""),
    ("drivers/vhost/vhost.ko", ""),
    ("drivers/vhost/vhost_vsock.ko", ""),
    // Pod networks: CNI's bridge and veth pairs, and the tc ingress
    // redirect that joins a pod's tap to its CNI interface.
    ("net/llc/llc.ko", ""),
    ("net/802/stp.ko", ""),
    ("net/bridge/bridge.ko", ""),
    ("drivers/net/veth.ko", ""),
    ("net/sched/sch_ingress.ko", ""),
    ("net/sched/cls_u32.ko", ""),
    ("net/sched/act_mirred.ko", ""),
    // hostPort: CNI's portmap plugin programs iptables (legacy) NAT rules.
    ("net/netfilter/x_tables.ko", ""),
    ("net/ipv4/netfilter/ip_tables.ko", ""),
    ("net/ipv4/netfilter/iptable_filter.ko", ""),
    ("net/ipv4/netfilter/nf_defrag_ipv4.ko", ""),
    ("net/ipv6/netfilter/nf_defrag_ipv6.ko", ""),
    ("lib/libcrc32c.ko", ""),
    ("net/netfilter/nf_conntrack.ko", ""),
    ("net/netfilter/nf_nat.ko", ""),
    ("net/ipv4/netfilter/iptable_nat.ko", ""),
    ("net/ipv6/netfilter/ip6_tables.ko", ""),
    ("net/ipv6/netfilter/ip6table_filter.ko", ""),
    ("net/ipv6/netfilter/ip6table_nat.ko", ""),
    ("net/netfilter/xt_conntrack.ko", ""),
    ("net/netfilter/xt_MASQUERADE.ko", ""),
    ("net/netfilter/xt_nat.ko", ""),
    ("net/netfilter/xt_comment.ko", ""),
    ("net/netfilter/xt_multiport.ko", ""),
    ("net/netfilter/xt_addrtype.ko", ""),
    ("net/netfilter/xt_mark.ko", ""),
    ("net/netfilter/xt_tcpudp.ko", ""),
    // Block volumes: loop devices stand for a node's disks.
    ("drivers/block/loop.ko", ""),
];

/// iptables (legacy: the nf_tables backend would need more modules) as
/// `iptables` and `ip6tables` (the multi-call binary goes by its name), and
/// the extensions it loads at run time.
const IPTABLES: &str = "/usr/sbin/xtables-legacy-multi";
const XTABLES_EXTENSIONS: &str = "/usr/lib/x86_64-linux-gnu/xtables";

/// Debian's CNI plugins (containernetworking-plugins), put at the same
/// path in L1, where the daemon looks after /opt/cni/bin.
const CNI_PLUGIN_DIR: &str = "/usr/lib/cni";
const CNI_PLUGINS: &[&str] = &["bridge", "host-local", "loopback", "portmap", "ptp"];
/// Lists the modules kept in the cache, one `file params` per line; a
/// module the package builds in is left out.
const MODULES_MANIFEST: &str = "modules.list";

/// Firmware QEMU `-M microvm` loads in L1.
const QEMU_FIRMWARE: &[&str] = &[
    "bios-microvm.bin",
    "qboot.rom",
    "pvh.bin",
    "linuxboot_dma.bin",
    "kvmvapic.bin",
];

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(
        "missing Debian packages for the lab: {0}\n  install them with: apt-get install \
         --no-install-recommends {0}"
    )]
    MissingPackages(String),
    #[error("cannot run {command}")]
    Spawn {
        command: String,
        #[source]
        source: io::Error,
    },
    #[error("`{command}` failed: {stderr}")]
    CommandFailed { command: String, stderr: String },
    #[error("cannot find the package {KERNEL_META_PACKAGE} depends on (run apt-get update?)")]
    NoKernelPackage,
    #[error("the L1 kernel package lacks {0}")]
    MissingInPackage(String),
    #[error("cannot prepare {}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error(transparent)]
    Initramfs(#[from] initramfs::Error),
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> Error + '_ {
    move |source| Error::Io {
        path: path.to_path_buf(),
        source,
    }
}

fn run(command: &mut Command) -> Result<String, Error> {
    let name = format!("{command:?}").replace('"', "");
    let output = command.output().map_err(|source| Error::Spawn {
        command: name.clone(),
        source,
    })?;
    if !output.status.success() {
        return Err(Error::CommandFailed {
            command: name,
            stderr: String::from_utf8_lossy(&output.stderr).trim().to_string(),
        });
    }
    Ok(String::from_utf8_lossy(&output.stdout).into_owned())
}

/// Fails with the list of missing Debian packages if the host lacks what
/// the lab needs.
pub fn check_host_tools() -> Result<(), Error> {
    let needs = [
        ("/usr/bin/qemu-system-x86_64", "qemu-system-x86"),
        ("/bin/busybox", "busybox-static"),
        ("/usr/bin/dpkg-deb", "dpkg"),
        ("/usr/bin/apt-get", "apt"),
        ("/usr/bin/ldd", "libc-bin"),
    ];
    let missing: Vec<&str> = needs
        .iter()
        .filter(|(path, _)| !Path::new(path).exists())
        .map(|(_, pkg)| *pkg)
        .collect();
    if missing.is_empty() {
        Ok(())
    } else {
        Err(Error::MissingPackages(missing.join(" ")))
    }
}

/// The L1 kernel and the KVM modules, unpacked once into the cache.
#[derive(Debug, Clone)]
pub struct L1Kernel {
    pub package: String,
    pub vmlinuz: PathBuf,
    /// Module files to insmod in order, with their parameters.
    pub modules: Vec<(PathBuf, String)>,
}

impl L1Kernel {
    /// Returns the cached L1 kernel, downloading and unpacking Debian's cloud
    /// kernel package on first use.
    pub fn ensure(cache: &Path) -> Result<L1Kernel, Error> {
        let package = kernel_package()?;
        let dir = cache.join("lab").join(&package);
        if let Some(kernel) = Self::load(&package, &dir) {
            return Ok(kernel);
        }
        eprintln!(
            "lab: fetching the L1 kernel ({package}) into {}",
            dir.display()
        );
        // Own staging dir: tests in parallel (or two suites) may fetch at
        // once; the first to finish installs its copy.
        let staging = cache.join("lab").join(format!(
            "{package}.partial-{}-{:?}",
            std::process::id(),
            std::thread::current().id()
        ));
        let _ = fs::remove_dir_all(&staging);
        fs::create_dir_all(&staging).map_err(io_err(&staging))?;
        run(Command::new("apt-get")
            .args(["download", "-q", &package])
            .current_dir(&staging))?;
        let deb = fs::read_dir(&staging)
            .map_err(io_err(&staging))?
            .filter_map(Result::ok)
            .map(|e| e.path())
            .find(|p| p.extension().is_some_and(|e| e == "deb"))
            .ok_or_else(|| Error::MissingInPackage(format!("a .deb for {package}")))?;
        let root = staging.join("root");
        run(Command::new("dpkg-deb").arg("-x").arg(&deb).arg(&root))?;
        Self::keep_what_the_lab_needs(&root, &staging)?;
        fs::remove_dir_all(&root).map_err(io_err(&root))?;
        fs::remove_file(&deb).map_err(io_err(&deb))?;
        if let Some(kernel) = Self::load(&package, &dir) {
            // Another fetch finished first.
            let _ = fs::remove_dir_all(&staging);
            return Ok(kernel);
        }
        let _ = fs::remove_dir_all(&dir);
        if let Err(e) = fs::rename(&staging, &dir) {
            let _ = fs::remove_dir_all(&staging);
            // Another fetch installed its copy in between.
            return Self::load(&package, &dir).ok_or_else(|| io_err(&dir)(e));
        }
        Self::load(&package, &dir).ok_or_else(|| Error::MissingInPackage("vmlinuz".into()))
    }

    fn keep_what_the_lab_needs(root: &Path, out: &Path) -> Result<(), Error> {
        let boot = root.join("boot");
        let vmlinuz = fs::read_dir(&boot)
            .map_err(io_err(&boot))?
            .filter_map(Result::ok)
            .map(|e| e.path())
            .find(|p| {
                p.file_name()
                    .is_some_and(|n| n.to_string_lossy().starts_with("vmlinuz-"))
            })
            .ok_or_else(|| Error::MissingInPackage("boot/vmlinuz-*".into()))?;
        fs::copy(&vmlinuz, out.join("vmlinuz")).map_err(io_err(&vmlinuz))?;
        let modules_root = root.join("lib/modules");
        let version_dir = fs::read_dir(&modules_root)
            .map_err(io_err(&modules_root))?
            .filter_map(Result::ok)
            .map(|e| e.path())
            .next()
            .ok_or_else(|| Error::MissingInPackage("lib/modules/<version>".into()))?;
        let mut manifest = format!("{}\n", modules_signature());
        for (i, (module, params)) in L1_MODULES.iter().enumerate() {
            let source = version_dir.join("kernel").join(module);
            let name = Path::new(module).file_name().unwrap_or_default();
            let builtin = version_dir.join("modules.builtin");
            if !source.exists() {
                let listed = fs::read_to_string(&builtin).unwrap_or_default();
                if listed
                    .lines()
                    .any(|l| l.ends_with(&format!("/{}", name.to_string_lossy())))
                {
                    continue;
                }
                return Err(Error::MissingInPackage(module.to_string()));
            }
            let file = format!("{i}-{}", name.to_string_lossy());
            fs::copy(&source, out.join(&file)).map_err(io_err(&source))?;
            manifest.push_str(&format!("{file} {params}\n"));
        }
        // Written last: its presence says the cache is complete.
        let manifest_path = out.join(MODULES_MANIFEST);
        fs::write(&manifest_path, manifest).map_err(io_err(&manifest_path))?;
        Ok(())
    }

    fn load(package: &str, dir: &Path) -> Option<L1Kernel> {
        let vmlinuz = dir.join("vmlinuz");
        // A cache from before the module list changed has no manifest (or
        // another length): fetch again.
        let manifest = fs::read_to_string(dir.join(MODULES_MANIFEST)).ok()?;
        let mut lines = manifest.lines();
        if lines.next() != Some(modules_signature().as_str()) {
            return None;
        }
        let lines: Vec<&str> = lines.collect();
        let modules: Vec<(PathBuf, String)> = lines
            .iter()
            .filter_map(|line| {
                let (file, params) = line.split_once(' ').unwrap_or((line, ""));
                Some((dir.join(file), params.to_string())).filter(|(p, _)| p.exists())
            })
            .collect();
        let complete = modules.len() == lines.len();
        (vmlinuz.exists() && complete).then(|| L1Kernel {
            package: package.to_string(),
            vmlinuz,
            modules,
        })
    }
}

/// Names the module list a cache was made for.
fn modules_signature() -> String {
    let names: Vec<String> = L1_MODULES.iter().map(|(m, p)| format!("{m}:{p}")).collect();
    format!("modules {}", names.join(" "))
}

/// The concrete kernel package (`linux-image-6.1.0-NN-cloud-amd64`).
fn kernel_package() -> Result<String, Error> {
    let text = run(Command::new("apt-cache").args(["depends", KERNEL_META_PACKAGE]))?;
    text.lines()
        .filter_map(|l| l.trim().strip_prefix("Depends:"))
        .map(str::trim)
        .find(|p| p.starts_with("linux-image-"))
        .map(str::to_string)
        .ok_or(Error::NoKernelPackage)
}

/// Adds what every L1 boot needs: busybox, the KVM modules, QEMU with its
/// libraries and microvm firmware, and `/init` running `commands` in order.
pub fn add_base(
    image: &mut Initramfs,
    kernel: &L1Kernel,
    commands: &[String],
) -> Result<(), Error> {
    image.host_file("/bin/busybox", Path::new("/bin/busybox"), 0o755);
    for dir in ["/proc", "/sys", "/dev", "/tmp", "/run", "/root", "/etc"] {
        image.dir(dir);
    }
    let mut params = String::new();
    for (i, (module, module_params)) in kernel.modules.iter().enumerate() {
        image.host_file(&format!("/lab/modules/{i}.ko"), module, 0o644);
        params.push_str(&format!("{module_params}\n"));
    }
    image.bytes("/lab/modules/params", params, 0o644);
    image.program(
        "/usr/bin/qemu-system-x86_64",
        Path::new("/usr/bin/qemu-system-x86_64"),
    )?;
    for plugin in CNI_PLUGINS {
        let source = Path::new(CNI_PLUGIN_DIR).join(plugin);
        // Optional: only the network tests need them (deps.sh installs them).
        if source.exists() {
            image.program(&format!("{CNI_PLUGIN_DIR}/{plugin}"), &source)?;
        }
    }
    // Before busybox's applets of these names in PATH: those lack what the
    // network and volume tests' checks use.
    for (name, source) in [
        ("ip", "/usr/bin/ip"),
        ("tc", "/usr/sbin/tc"),
        ("nsenter", "/usr/bin/nsenter"),
        // The block volume tests check the filesystems pods used.
        ("e2fsck", "/sbin/e2fsck"),
    ] {
        let source = Path::new(source);
        if source.exists() {
            image.program(&format!("/usr/bin/{name}"), source)?;
        }
    }
    if Path::new(IPTABLES).exists() {
        image.program("/usr/bin/iptables", Path::new(IPTABLES))?;
        image.program("/usr/bin/ip6tables", Path::new(IPTABLES))?;
        for extension in fs::read_dir(XTABLES_EXTENSIONS)
            .into_iter()
            .flatten()
            .flatten()
        {
            let path = extension.path();
            let name = path.to_string_lossy().into_owned();
            image.host_file(&name, &path, 0o644);
        }
    }
    for firmware in QEMU_FIRMWARE {
        let source = Path::new("/usr/share/qemu").join(firmware);
        image.host_file(&format!("/usr/share/qemu/{firmware}"), &source, 0o644);
    }
    for (i, command) in commands.iter().enumerate() {
        let script = format!("#!/bin/sh\n{command}\n");
        image.bytes(&format!("/lab/cmd/{i}.sh"), script, 0o755);
    }
    image.bytes(
        "/init",
        init_script(kernel.modules.len(), commands.len()),
        0o755,
    );
    Ok(())
}

/// How often L1's init writes a line on the heartbeat port (ttyS2).
pub const HEARTBEAT_SECS: u64 = 5;

/// Markers the L1 init writes on the results port (ttyS1).
pub mod marker {
    pub const READY: &str = "@@frakti-lab ready";
    pub const BEGIN: &str = "@@frakti-lab begin";
    pub const END: &str = "@@frakti-lab end";
    pub const DONE: &str = "@@frakti-lab done";
    pub const FATAL: &str = "@@frakti-lab fatal";
}

fn init_script(modules: usize, commands: usize) -> String {
    use marker::*;
    format!(
        r#"#!/bin/busybox sh
/bin/busybox --install -s /bin
export PATH=/usr/bin:/bin HOME=/root TMPDIR=/tmp FRAKTI_IN_LAB=1 RUST_BACKTRACE=1
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
# Pseudo-terminals, for clients that need one (kubectl exec -it).
mkdir -p /dev/pts
mount -t devpts -o ptmxmode=0666 devpts /dev/pts
mount -t tmpfs -o size=75% tmp /tmp
# Loopback: servers under test (the streaming server) listen on 127.0.0.1.
ip link set lo up
exec 3>/dev/ttyS1
fatal() {{ echo "{FATAL} $*" >&3; poweroff -f; }}
i=0
while [ $i -lt {modules} ]; do
    err=$(insmod /lab/modules/$i.ko $(sed -n "$((i + 1))p" /lab/modules/params) 2>&1) || fatal "insmod module $i: $err"
    i=$((i + 1))
done
[ -c /dev/kvm ] || fatal "no /dev/kvm after loading kvm-amd"
echo "{READY} uptime=$(cut -d' ' -f1 /proc/uptime) cpus=$(nproc)" >&3
# A heartbeat on its own port: the host tells a frozen L1 from a slow test.
(while true; do echo beat; sleep {HEARTBEAT_SECS}; done >/dev/ttyS2) &
i=0
while [ $i -lt {commands} ]; do
    echo "{BEGIN} $i" >&3
    # Through a pipe, so programs do not see a terminal (no colours, no
    # line editing); the status comes back through a file.
    {{ (cd /tmp && /lab/cmd/$i.sh) </dev/null 2>&1; echo $? >/run/lab-status; }} | cat >&3
    rc=$(cat /run/lab-status)
    # The newline keeps the marker at a line start; the host drops it.
    printf '\n%s %s %s\n' "{END}" $i $rc >&3
    i=$((i + 1))
done
echo "{DONE}" >&3
poweroff -f
"#
    )
}
