//! The kubernetes Python client (PyPI), an independent WebSocket client,
//! runs `kubectl exec`'s WebSocket form through the fake API server.
//!
//! The lab's L1 has no Python: the host ships Debian's interpreter (a
//! program, with its libraries), and a tarball of its standard library,
//! the client's packages (a venv `scripts/deps.sh` makes) and the shared
//! libraries the standard library's extension modules load.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{Context, ensure};
use serde_json::Value;

use std::sync::Arc;

use super::apiserver::{self, ApiServer, ContainerSpec, PodSpec};
use super::kubectl::{Containers, streaming_url};
use crate::cri::harness::{
    Daemon, container_config, create, pod_config, remove_pod_without_leaks, run_pod, start,
};

/// The interpreter and the tarball, in the lab.
pub const PYTHON_ENV: &str = "FRAKTI_TEST_PYTHON";
pub const PYTHON_TREE_ENV: &str = "FRAKTI_TEST_PYTHON_TREE";
/// Where `scripts/deps.sh` makes the venv holding the client.
const VENV: &str = "/usr/local/lib/frakti-test/pyk8s";
const INTERPRETER: &str = "/usr/bin/python3.11";
const STDLIB: &str = "/usr/lib/python3.11";
/// Parts of the standard library and the venv no client import needs.
const LEFT_OUT: &[&str] = &[
    "python3.11/test",
    "python3.11/idlelib",
    "python3.11/tkinter",
    "python3.11/lib2to3",
    "python3.11/ensurepip",
    "python3.11/unittest/test",
    "python3.11/config-3.11-x86_64-linux-gnu",
    "site-packages/kubernetes/aio",
    "site-packages/pip",
    "site-packages/setuptools",
    "site-packages/pkg_resources",
    "site-packages/aiohttp",
];
const SCRIPT: &str = include_str!("ws_exec.py");

/// Builds the tarball on the host; returns `(env var, file)` pairs for
/// the lab.
pub fn prepare(dir: &Path) -> anyhow::Result<Vec<(&'static str, PathBuf)>> {
    let site = Path::new(VENV).join("lib/python3.11/site-packages");
    ensure!(
        site.join("kubernetes").is_dir(),
        "the kubernetes Python client is missing from {VENV}: run scripts/deps.sh as root"
    );
    // The extension modules' libraries (ssl, ctypes, lzma, pydantic's
    // librt, …).
    let libs = dir.join("sharedlibs");
    std::fs::create_dir_all(&libs)?;
    let mut modules = Vec::new();
    extension_modules(&Path::new(STDLIB).join("lib-dynload"), &mut modules)?;
    extension_modules(&site, &mut modules)?;
    for module in modules {
        for lib in frakti_lab::initramfs::shared_libraries(&module)? {
            let name = lib.file_name().context("a library without a name")?;
            std::fs::copy(&lib, libs.join(name))?;
        }
    }
    let tar = dir.join("python-tree.tar");
    let mut command = std::process::Command::new("tar");
    command.arg("-cf").arg(&tar);
    for part in LEFT_OUT {
        command.arg(format!("--exclude={part}"));
    }
    command
        .args(["--exclude=__pycache__/*.opt-*.pyc"])
        .arg("-C")
        .arg("/usr/lib")
        .arg("python3.11")
        .arg("-C")
        .arg(site.parent().context("no parent")?)
        .arg("site-packages")
        .arg("-C")
        .arg(dir)
        .arg("sharedlibs");
    let status = command.status().context("tar")?;
    ensure!(status.success(), "tar of the Python tree failed");
    Ok(vec![
        (PYTHON_ENV, PathBuf::from(INTERPRETER)),
        (PYTHON_TREE_ENV, tar),
    ])
}

/// Every `*.so` below `dir`.
fn extension_modules(dir: &Path, found: &mut Vec<PathBuf>) -> anyhow::Result<()> {
    for entry in std::fs::read_dir(dir).with_context(|| format!("read {}", dir.display()))? {
        let entry = entry?;
        let path = entry.path();
        if entry.file_type()?.is_dir() {
            extension_modules(&path, found)?;
        } else if path.extension().is_some_and(|e| e == "so") {
            found.push(path);
        }
    }
    Ok(())
}

/// Unpacks the tree (once per test) and returns the command running
/// `script` with it.
fn python(work: &Path, script: &Path) -> anyhow::Result<tokio::process::Command> {
    let interpreter = std::env::var_os(PYTHON_ENV).context("FRAKTI_TEST_PYTHON is not set")?;
    let tree = std::env::var_os(PYTHON_TREE_ENV).context("FRAKTI_TEST_PYTHON_TREE is not set")?;
    let home = work.join("python");
    let lib = home.join("lib");
    std::fs::create_dir_all(&lib)?;
    let status = std::process::Command::new("tar")
        .arg("-xf")
        .arg(&tree)
        .arg("-C")
        .arg(&lib)
        .status()?;
    ensure!(status.success(), "cannot unpack the Python tree");
    let mut command = tokio::process::Command::new(interpreter);
    command
        .env_clear()
        .env("PYTHONHOME", &home)
        .env("PYTHONPATH", lib.join("site-packages"))
        .env("PYTHONDONTWRITEBYTECODE", "1")
        .env("LD_LIBRARY_PATH", lib.join("sharedlibs"))
        .env("HOME", work)
        .arg(script)
        .kill_on_drop(true);
    Ok(command)
}

pub async fn python_websocket_exec(daemon: &mut Daemon) -> anyhow::Result<()> {
    let mut c = daemon.runtime().await?;
    let pod = run_pod(&mut c, pod_config("py", &daemon.log_dir())).await?;
    let main = create(&mut c, &pod, container_config("main", &["sleep", "100000"])).await?;
    start(&mut c, &main).await?;
    let server = ApiServer::start(
        [PodSpec::with("py", [ContainerSpec::new("main")])],
        apiserver::handler({
            let c = c.clone();
            let ids: Containers = Arc::new([("main".to_string(), main.clone())].into());
            let pod = pod.clone();
            move |sub| streaming_url(c.clone(), ids.clone(), pod.clone(), sub)
        }),
    )
    .await?;
    let work = tempfile::tempdir()?;
    let script = work.path().join("ws_exec.py");
    std::fs::write(&script, SCRIPT)?;
    let started = Instant::now();
    let output = python(work.path(), &script)?
        .arg(server.url())
        .arg("py")
        .arg("main")
        .stdin(Stdio::null())
        .output();
    let output = tokio::time::timeout(Duration::from_secs(300), output)
        .await
        .context("the Python client still runs after 300 s")??;
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    ensure!(
        output.status.success(),
        "the Python client failed ({}): {stdout}\n{stderr}\nAPI server: {:#?}",
        output.status,
        server.requests()
    );
    let cases: Vec<Value> = stdout
        .lines()
        .map(serde_json::from_str)
        .collect::<Result<_, _>>()
        .with_context(|| format!("the client's output: {stdout}"))?;
    let [preloaded, interactive] = &cases[..] else {
        anyhow::bail!("two cases expected: {stdout}");
    };
    ensure!(
        preloaded["stdout"] == "from python\n",
        "preloaded exec: {preloaded}"
    );
    ensure!(
        interactive["protocol"] == "v5.channel.k8s.io"
            && interactive["stdout"] == "hello from python\n"
            && interactive["stderr"] == "done\n"
            && interactive["code"] == 5,
        "exec with stdin: {interactive}"
    );
    eprintln!(
        "  python kubernetes client: WebSocket exec on {}, stdin closed by the v5 signal, exit 5, in {:.1} s (interpreter start included)",
        interactive["protocol"],
        started.elapsed().as_secs_f64()
    );
    drop(server);
    remove_pod_without_leaks(daemon, &mut c, &pod).await
}
