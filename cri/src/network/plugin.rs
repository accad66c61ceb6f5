//! Running CNI plugins as the CNI spec says: the plugin binary found in the
//! plugin dirs, its configuration on stdin, the parameters in its own
//! process environment (never the daemon's: pods start in parallel), its
//! result or error on stdout, a time limit after which it is killed.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use rscni_types::types::CNIResult;
use serde_json::Value;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};

/// The most a plugin may print on stdout (a result) or stderr (kept for the
/// error message).
const MAX_OUTPUT: u64 = 1 << 20;
/// How much of a failed plugin's stderr goes into the error.
const STDERR_TAIL: usize = 2048;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("CNI plugin {plugin:?} not found in {}", dirs_text(.dirs))]
    NotFound { plugin: String, dirs: Vec<PathBuf> },
    #[error("cannot run CNI plugin {}", path.display())]
    Spawn {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("CNI plugin {plugin} ({command}) did not finish within {} s: killed", timeout.as_secs())]
    Timeout {
        plugin: String,
        command: &'static str,
        timeout: Duration,
    },
    #[error("CNI plugin {plugin} ({command}) failed: {message}")]
    Failed {
        plugin: String,
        command: &'static str,
        message: String,
    },
    #[error("CNI plugin {plugin} ({command}) returned an invalid result: {message}")]
    InvalidResult {
        plugin: String,
        command: &'static str,
        message: String,
    },
    #[error("CNI plugin {plugin} ({command}): {source}")]
    Io {
        plugin: String,
        command: &'static str,
        #[source]
        source: std::io::Error,
    },
}

fn dirs_text(dirs: &[PathBuf]) -> String {
    let dirs: Vec<String> = dirs.iter().map(|d| d.display().to_string()).collect();
    dirs.join(":")
}

/// The CNI commands the daemon runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Command {
    Add,
    Del,
    Check,
    Status,
    Gc,
}

impl Command {
    pub fn as_str(self) -> &'static str {
        match self {
            Command::Add => "ADD",
            Command::Del => "DEL",
            Command::Check => "CHECK",
            Command::Status => "STATUS",
            Command::Gc => "GC",
        }
    }
}

/// Where plugins are and how long one may run.
#[derive(Debug, Clone)]
pub struct Plugins {
    pub dirs: Vec<PathBuf>,
    pub timeout: Duration,
}

/// What identifies one attachment of a pod to the network (the CNI_*
/// parameters besides the command).
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Attachment {
    pub container_id: String,
    pub netns: PathBuf,
    pub ifname: String,
    /// CNI_ARGS as `KEY=VALUE` pairs.
    pub args: Vec<(String, String)>,
}

impl Plugins {
    /// The plugin binary `kind` in the first dir that has it.
    pub fn find(&self, kind: &str) -> Result<PathBuf, Error> {
        self.dirs
            .iter()
            .map(|dir| dir.join(kind))
            .find(|path| is_executable(path))
            .ok_or_else(|| Error::NotFound {
                plugin: kind.to_string(),
                dirs: self.dirs.clone(),
            })
    }

    /// Runs plugin `kind` for `command` with `stdin`; returns its stdout.
    /// A non-zero exit is the plugin's error (its stdout's error object,
    /// else its stderr).
    pub async fn exec(
        &self,
        kind: &str,
        command: Command,
        attachment: Option<&Attachment>,
        stdin: &[u8],
    ) -> Result<Vec<u8>, Error> {
        let path = self.find(kind)?;
        let io = |source| Error::Io {
            plugin: kind.to_string(),
            command: command.as_str(),
            source,
        };
        let mut child = tokio::process::Command::new(&path);
        child
            .env("CNI_COMMAND", command.as_str())
            .env(
                "CNI_PATH",
                std::env::join_paths(&self.dirs).unwrap_or_default(),
            )
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        if let Some(a) = attachment {
            child
                .env("CNI_CONTAINERID", &a.container_id)
                .env("CNI_NETNS", &a.netns)
                .env("CNI_IFNAME", &a.ifname)
                .env("CNI_ARGS", args_text(&a.args));
        }
        let mut child = child.spawn().map_err(|source| Error::Spawn {
            path: path.clone(),
            source,
        })?;
        let run = async {
            let mut input = child.stdin.take().ok_or_else(|| io(broken("stdin")))?;
            let stdout = child.stdout.take().ok_or_else(|| io(broken("stdout")))?;
            let stderr = child.stderr.take().ok_or_else(|| io(broken("stderr")))?;
            let write = async {
                // A plugin may exit without reading it all.
                let _ = input.write_all(stdin).await;
                drop(input);
                Ok::<_, std::io::Error>(())
            };
            let (_, out, err, status) = tokio::try_join!(
                write,
                read_bounded(stdout),
                read_bounded(stderr),
                child.wait()
            )
            .map_err(io)?;
            Ok::<_, Error>((out, err, status))
        };
        let (out, err, status) =
            tokio::time::timeout(self.timeout, run)
                .await
                .map_err(|_| Error::Timeout {
                    plugin: kind.to_string(),
                    command: command.as_str(),
                    timeout: self.timeout,
                })??;
        if status.success() {
            return Ok(out);
        }
        Err(Error::Failed {
            plugin: kind.to_string(),
            command: command.as_str(),
            message: failure_message(&out, &err, &status.to_string()),
        })
    }
}

fn broken(what: &str) -> std::io::Error {
    std::io::Error::other(format!("no {what} pipe"))
}

fn is_executable(path: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(path).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

/// `K=V;K=V`, the CNI_ARGS format.
fn args_text(args: &[(String, String)]) -> String {
    let pairs: Vec<String> = args.iter().map(|(k, v)| format!("{k}={v}")).collect();
    pairs.join(";")
}

async fn read_bounded(pipe: impl AsyncRead + Unpin) -> std::io::Result<Vec<u8>> {
    let mut out = Vec::new();
    let mut limited = pipe.take(MAX_OUTPUT);
    limited.read_to_end(&mut out).await?;
    // Drain the rest so the plugin is not blocked on a full pipe.
    let mut rest = limited.into_inner();
    tokio::io::copy(&mut rest, &mut tokio::io::sink()).await?;
    Ok(out)
}

/// The spec's error object, read as the plugin wrote it (rscni-types'
/// conversion replaces the message of a well-known code with its own).
#[derive(serde::Deserialize)]
struct ErrorObject {
    code: u32,
    msg: String,
    #[serde(default)]
    details: String,
}

/// A failed plugin's message: its CNI error object (code, msg, details),
/// else the end of its stderr, else how it exited.
fn failure_message(stdout: &[u8], stderr: &[u8], exit: &str) -> String {
    if let Ok(error) = serde_json::from_slice::<ErrorObject>(stdout) {
        let ErrorObject { code, msg, details } = error;
        return if details.is_empty() || details == msg {
            format!("{msg} (code {code})")
        } else {
            format!("{msg}: {details} (code {code})")
        };
    }
    let stderr = String::from_utf8_lossy(stderr);
    let stderr = stderr.trim();
    if !stderr.is_empty() {
        let start = stderr.len().saturating_sub(STDERR_TAIL);
        let start = (start..stderr.len())
            .find(|i| stderr.is_char_boundary(*i))
            .unwrap_or(stderr.len());
        return format!("{} ({exit})", &stderr[start..]);
    }
    let stdout = String::from_utf8_lossy(stdout);
    if !stdout.trim().is_empty() {
        let text: String = stdout.trim().chars().take(STDERR_TAIL).collect();
        return format!("{text} ({exit})");
    }
    exit.to_string()
}

/// A plugin's ADD result: the raw JSON (the next plugin's `prevResult` and
/// what is cached) and its typed form.
#[derive(Debug, Clone, PartialEq)]
pub struct AddResult {
    pub raw: Value,
    pub result: CNIResult,
}

/// Parses an ADD result (layouts 0.3.0 to 1.1.0 share the fields we use:
/// 0.3/0.4's `ips[].version` is ignored).
pub fn parse_result(kind: &str, stdout: &[u8]) -> Result<AddResult, Error> {
    let invalid = |message: String| Error::InvalidResult {
        plugin: kind.to_string(),
        command: Command::Add.as_str(),
        message,
    };
    let raw: Value =
        serde_json::from_slice(stdout).map_err(|e| invalid(format!("not JSON: {e}")))?;
    if !raw.is_object() {
        return Err(invalid("not a JSON object".into()));
    }
    if raw.get("ip4").is_some() || raw.get("ip6").is_some() {
        return Err(invalid(
            "a result in the pre-0.3.0 layout (ip4/ip6): set cniVersion 0.3.0 or later".into(),
        ));
    }
    let result: CNIResult =
        serde_json::from_value(raw.clone()).map_err(|e| invalid(e.to_string()))?;
    for ip in &result.ips {
        if let Some(index) = ip.interface {
            let index = usize::try_from(index).unwrap_or(usize::MAX);
            if index >= result.interfaces.len() {
                return Err(invalid(format!(
                    "ip {} names interface {index}, but the result has {}",
                    ip.address,
                    result.interfaces.len()
                )));
            }
        }
    }
    Ok(AddResult { raw, result })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn script(dir: &Path, name: &str, body: &str) {
        let path = dir.join(name);
        std::fs::write(&path, format!("#!/bin/sh\n{body}\n")).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
    }

    fn plugins(dir: &Path) -> Plugins {
        Plugins {
            dirs: vec![dir.join("missing"), dir.to_path_buf()],
            timeout: Duration::from_secs(2),
        }
    }

    fn attachment() -> Attachment {
        Attachment {
            container_id: "c1".into(),
            netns: "/run/frakti/netns/c1".into(),
            ifname: "eth0".into(),
            args: vec![
                ("K8S_POD_NAMESPACE".into(), "default".into()),
                ("K8S_POD_NAME".into(), "web".into()),
            ],
        }
    }

    #[tokio::test]
    async fn a_plugin_gets_its_parameters_in_its_own_environment() {
        let dir = tempfile::tempdir().unwrap();
        script(
            dir.path(),
            "echoer",
            "cat >/dev/null; echo \"$CNI_COMMAND|$CNI_CONTAINERID|$CNI_NETNS|$CNI_IFNAME|$CNI_ARGS|$CNI_PATH\"",
        );
        let out = plugins(dir.path())
            .exec("echoer", Command::Add, Some(&attachment()), b"{}")
            .await
            .unwrap();
        let want = format!(
            "ADD|c1|/run/frakti/netns/c1|eth0|K8S_POD_NAMESPACE=default;K8S_POD_NAME=web|{}/missing:{}\n",
            dir.path().display(),
            dir.path().display()
        );
        assert_eq!(String::from_utf8(out).unwrap(), want);
        assert!(std::env::var_os("CNI_COMMAND").is_none());
    }

    #[tokio::test]
    async fn stdin_reaches_the_plugin() {
        let dir = tempfile::tempdir().unwrap();
        script(dir.path(), "cat", "cat");
        let out = plugins(dir.path())
            .exec("cat", Command::Check, Some(&attachment()), b"{\"a\":1}")
            .await
            .unwrap();
        assert_eq!(out, b"{\"a\":1}");
    }

    #[tokio::test]
    async fn failures_carry_the_plugins_message() {
        let dir = tempfile::tempdir().unwrap();
        script(
            dir.path(),
            "cnierr",
            r#"echo '{"cniVersion":"1.0.0","code":7,"msg":"bad config","details":"no subnet"}'; exit 1"#,
        );
        script(dir.path(), "stderr", "echo 'panic: boom' >&2; exit 2");
        script(dir.path(), "silent", "exit 3");
        script(dir.path(), "hang", "sleep 30");
        let p = plugins(dir.path());
        let err = |kind: &'static str| {
            let p = p.clone();
            async move {
                p.exec(kind, Command::Add, Some(&attachment()), b"{}")
                    .await
                    .unwrap_err()
                    .to_string()
            }
        };
        let text = err("cnierr").await;
        assert!(text.contains("bad config: no subnet (code 7)"), "{text}");
        let text = err("stderr").await;
        assert!(text.contains("panic: boom"), "{text}");
        assert!(err("silent").await.contains("exit status: 3"));
        let started = std::time::Instant::now();
        let text = err("hang").await;
        assert!(text.contains("did not finish within 2 s"), "{text}");
        assert!(started.elapsed() < Duration::from_secs(10));
        let text = err("nonexistent").await;
        assert!(text.contains("\"nonexistent\" not found in"), "{text}");
    }

    #[tokio::test]
    async fn endless_output_is_bounded() {
        let dir = tempfile::tempdir().unwrap();
        script(dir.path(), "flood", "head -c 3000000 /dev/zero");
        let out = plugins(dir.path())
            .exec("flood", Command::Add, None, b"")
            .await
            .unwrap();
        assert_eq!(out.len() as u64, MAX_OUTPUT);
    }

    #[test]
    fn results_of_each_layout_parse() {
        let v040 = br#"{"cniVersion":"0.4.0","interfaces":[{"name":"eth0","mac":"0a:58:0a:58:00:05","sandbox":"/run/netns/x"}],
            "ips":[{"version":"4","interface":0,"address":"10.88.0.5/16","gateway":"10.88.0.1"}],
            "routes":[{"dst":"0.0.0.0/0"}],"dns":{}}"#;
        let parsed = parse_result("bridge", v040).unwrap();
        assert_eq!(parsed.result.ips[0].address.to_string(), "10.88.0.5/16");
        assert_eq!(parsed.raw["cniVersion"], "0.4.0");
        let v100 =
            br#"{"cniVersion":"1.0.0","ips":[{"address":"fd00::5/64","gateway":"fd00::1"}]}"#;
        assert_eq!(parse_result("ptp", v100).unwrap().result.ips.len(), 1);
    }

    #[test]
    fn malformed_results_are_refused() {
        let cases: &[(&[u8], &str)] = &[
            (b"", "not JSON"),
            (b"[1]", "not a JSON object"),
            (b"{\"ip4\":{\"ip\":\"10.0.0.2/24\"}}", "pre-0.3.0"),
            (b"{\"ips\":[{\"address\":\"nonsense\"}]}", "invalid"),
            (
                b"{\"ips\":[{\"address\":\"10.0.0.2/24\",\"interface\":3}]}",
                "names interface 3",
            ),
            (
                b"{\"ips\":[{\"address\":\"10.0.0.2/24\",\"interface\":-1}]}",
                "invalid",
            ),
            (b"{\"routes\":[{\"gw\":\"10.0.0.1\"}]}", "dst"),
        ];
        for (input, want) in cases {
            let err = parse_result("p", input).unwrap_err().to_string();
            assert!(
                err.contains(want),
                "{}: {err}",
                String::from_utf8_lossy(input)
            );
        }
    }
}
