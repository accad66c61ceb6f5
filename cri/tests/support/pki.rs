//! A throwaway certificate authority for TLS registries, made with the
//! `openssl` CLI (Debian package `openssl`).
//!
//! The CA signs one server certificate valid for `IP:127.0.0.1` and
//! `DNS:localhost`, so a [`super::registry::Registry`] started with it can be
//! reached as `https://127.0.0.1:PORT` by clients that trust `ca_cert`, and
//! by nothing else.

use std::path::{Path, PathBuf};
use std::process::Command;

use super::{require_tool, run};

/// A CA and a server certificate for 127.0.0.1/localhost, as PEM files.
#[derive(Debug, Clone)]
pub struct TestCa {
    /// The CA certificate (PEM): what a client must trust.
    pub ca_cert: PathBuf,
    /// The CA's private key (PEM).
    pub ca_key: PathBuf,
    /// The server certificate (PEM), signed by the CA, SAN IP:127.0.0.1 and
    /// DNS:localhost, extendedKeyUsage serverAuth.
    pub server_cert: PathBuf,
    /// The server certificate's private key (PEM, EC P-256).
    pub server_key: PathBuf,
    /// A directory holding only `ca.crt` (a copy of `ca_cert`): the layout
    /// of a containers/image `--cert-dir` (skopeo) or a
    /// `/etc/docker/certs.d/HOST/` directory.
    pub cert_dir: PathBuf,
}

impl TestCa {
    /// Makes a new CA and server certificate under `dir` (created if
    /// missing). Panics (naming the package to install) if `openssl` is
    /// missing, or with openssl's error output if a step fails.
    pub fn new(dir: &Path) -> TestCa {
        require_tool("openssl", "openssl");
        std::fs::create_dir_all(dir).expect("create the CA directory");
        let p = |name: &str| dir.join(name);
        let ca = TestCa {
            ca_cert: p("ca.crt"),
            ca_key: p("ca.key"),
            server_cert: p("server.crt"),
            server_key: p("server.key"),
            cert_dir: p("certs.d"),
        };

        let ca_ext = p("ca.ext");
        std::fs::write(
            &ca_ext,
            "[req]\ndistinguished_name = dn\n[dn]\n[v3_ca]\n\
             basicConstraints = critical, CA:TRUE\n\
             keyUsage = critical, keyCertSign, cRLSign\n\
             subjectKeyIdentifier = hash\n",
        )
        .expect("write ca.ext");
        run(Command::new("openssl")
            .args(["req", "-x509", "-new", "-nodes", "-newkey", "ec"])
            .args(["-pkeyopt", "ec_paramgen_curve:prime256v1", "-sha256"])
            .args(["-days", "3650", "-subj", "/CN=frakti test CA"])
            .arg("-config")
            .arg(&ca_ext)
            .args(["-extensions", "v3_ca", "-keyout"])
            .arg(&ca.ca_key)
            .arg("-out")
            .arg(&ca.ca_cert));

        let csr = p("server.csr");
        run(Command::new("openssl")
            .args(["req", "-new", "-nodes", "-newkey", "ec"])
            .args(["-pkeyopt", "ec_paramgen_curve:prime256v1", "-sha256"])
            .args(["-subj", "/CN=localhost", "-keyout"])
            .arg(&ca.server_key)
            .arg("-out")
            .arg(&csr));
        let server_ext = p("server.ext");
        std::fs::write(
            &server_ext,
            "basicConstraints = critical, CA:FALSE\n\
             keyUsage = critical, digitalSignature, keyEncipherment\n\
             extendedKeyUsage = serverAuth\n\
             subjectAltName = IP:127.0.0.1, DNS:localhost\n\
             subjectKeyIdentifier = hash\n\
             authorityKeyIdentifier = keyid, issuer\n",
        )
        .expect("write server.ext");
        ca.sign(&csr, &server_ext, "2", &ca.server_cert);

        std::fs::create_dir_all(&ca.cert_dir).expect("create certs.d");
        std::fs::copy(&ca.ca_cert, ca.cert_dir.join("ca.crt")).expect("copy ca.crt to certs.d");
        ca
    }

    /// A client certificate (extendedKeyUsage clientAuth) and its key
    /// signed by this CA, as `<name>.cert` and `<name>.key` under the CA's
    /// directory; also copied into `cert_dir` when `for_skopeo` (the
    /// containers/image layout: `*.cert` + `*.key` are client identities).
    pub fn client_cert(&self, name: &str, for_skopeo: bool) -> (PathBuf, PathBuf) {
        let dir = self.ca_cert.parent().expect("the CA's directory");
        let (cert, key, csr, ext) = (
            dir.join(format!("{name}.cert")),
            dir.join(format!("{name}.key")),
            dir.join(format!("{name}.csr")),
            dir.join(format!("{name}.ext")),
        );
        run(Command::new("openssl")
            .args(["req", "-new", "-nodes", "-newkey", "ec"])
            .args(["-pkeyopt", "ec_paramgen_curve:prime256v1", "-sha256"])
            .args(["-subj", &format!("/CN={name}"), "-keyout"])
            .arg(&key)
            .arg("-out")
            .arg(&csr));
        std::fs::write(
            &ext,
            "basicConstraints = critical, CA:FALSE\n\
             keyUsage = critical, digitalSignature\n\
             extendedKeyUsage = clientAuth\n",
        )
        .expect("write the client extensions");
        self.sign(&csr, &ext, "3", &cert);
        if for_skopeo {
            std::fs::copy(&cert, self.cert_dir.join(format!("{name}.cert"))).expect("copy");
            std::fs::copy(&key, self.cert_dir.join(format!("{name}.key"))).expect("copy");
        }
        (cert, key)
    }

    /// Signs the request `csr` with this CA: extensions from `ext`, serial
    /// `serial`, the certificate written to `out`.
    fn sign(&self, csr: &Path, ext: &Path, serial: &str, out: &Path) {
        run(Command::new("openssl")
            .args(["x509", "-req", "-sha256", "-days", "825", "-in"])
            .arg(csr)
            .arg("-CA")
            .arg(&self.ca_cert)
            .arg("-CAkey")
            .arg(&self.ca_key)
            .args(["-set_serial", serial, "-extfile"])
            .arg(ext)
            .arg("-out")
            .arg(out));
    }

    /// The CA certificate's PEM bytes.
    pub fn ca_pem(&self) -> Vec<u8> {
        std::fs::read(&self.ca_cert).expect("read ca.crt")
    }
}
