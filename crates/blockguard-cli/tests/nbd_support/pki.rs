//! Certificates for the TLS tests, made by `openssl` in a test's temporary directory: two CAs,
//! a server certificate, client certificates, and the credential directories clients and
//! servers take (qemu's `tls-creds-x509`, libnbd's and blockguard's `tls-certificates`,
//! nbdkit's `--tls-certificates`).

use super::require;
use std::path::{Path, PathBuf};

/// Runs `openssl args…` in `dir`.
pub fn openssl(dir: &Path, args: &[&str]) {
    let out = std::process::Command::new("openssl")
        .current_dir(dir)
        .args(args)
        .output()
        .expect("run openssl");
    assert!(
        out.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A key and a certificate `<name>-cert.pem` / `<name>-key.pem` signed by CA `ca`.
pub fn make_cert(dir: &Path, ca: &str, name: &str, ext: &str) {
    let (cert, key, csr, extf) = (
        format!("{name}-cert.pem"),
        format!("{name}-key.pem"),
        format!("{name}.csr"),
        format!("{name}.ext"),
    );
    std::fs::write(dir.join(&extf), ext).unwrap();
    let subj = format!("/CN={name}");
    openssl(
        dir,
        &[
            "req", "-newkey", "rsa:2048", "-nodes", "-keyout", &key, "-out", &csr, "-subj", &subj,
        ],
    );
    let ca_cert = format!("{ca}-ca-cert.pem");
    let ca_key = format!("{ca}-ca-key.pem");
    openssl(
        dir,
        &[
            "x509",
            "-req",
            "-in",
            &csr,
            "-CA",
            &ca_cert,
            "-CAkey",
            &ca_key,
            "-CAcreateserial",
            "-out",
            &cert,
            "-days",
            "2",
            "-extfile",
            &extf,
        ],
    );
}

/// Certificates for a test: CAs `good` and `other`; the server's certificate (for
/// localhost and 127.0.0.1) and a client certificate from `good`, another client
/// certificate from `other`; and the credential directories clients take (qemu's
/// `tls-creds-x509` and libnbd's `tls-certificates` layout).
pub struct Pki {
    pub dir: PathBuf,
}

impl Pki {
    pub fn new(dir: &Path) -> Pki {
        require("openssl");
        let dir = dir.join("pki");
        std::fs::create_dir(&dir).unwrap();
        for ca in ["good", "other"] {
            let subj = format!("/CN={ca} test CA");
            let (cert, key) = (format!("{ca}-ca-cert.pem"), format!("{ca}-ca-key.pem"));
            openssl(
                &dir,
                &[
                    "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", &key, "-out", &cert, "-days",
                    "2", "-subj", &subj,
                ],
            );
        }
        let server = "subjectAltName=DNS:localhost,IP:127.0.0.1\nextendedKeyUsage=serverAuth\n";
        make_cert(&dir, "good", "server", server);
        make_cert(&dir, "good", "client", "extendedKeyUsage=clientAuth\n");
        make_cert(&dir, "other", "stranger", "extendedKeyUsage=clientAuth\n");
        let pki = Pki { dir };
        // (CA the client trusts, client certificate): the right ones; a CA that did not
        // sign the server's certificate; no client certificate; one the server's CA did
        // not sign.
        pki.creds("right", "good", Some("client"));
        pki.creds("wrong-ca", "other", Some("client"));
        pki.creds("no-client-cert", "good", None);
        pki.creds("stranger", "good", Some("stranger"));
        // nbdkit's --tls-certificates layout: the CA (which also checks client
        // certificates with --tls-verify-peer) and the server's identity.
        let srv = pki.dir.join("nbdkit");
        std::fs::create_dir(&srv).unwrap();
        for (from, to) in [
            ("good-ca-cert.pem", "ca-cert.pem"),
            ("server-cert.pem", "server-cert.pem"),
            ("server-key.pem", "server-key.pem"),
        ] {
            std::fs::copy(pki.dir.join(from), srv.join(to)).unwrap();
        }
        pki
    }

    pub fn creds(&self, name: &str, ca: &str, client: Option<&str>) {
        let d = self.dir.join(name);
        std::fs::create_dir(&d).unwrap();
        std::fs::copy(self.dir.join(format!("{ca}-ca-cert.pem")), d.join("ca-cert.pem")).unwrap();
        if let Some(c) = client {
            std::fs::copy(self.dir.join(format!("{c}-cert.pem")), d.join("client-cert.pem")).unwrap();
            std::fs::copy(self.dir.join(format!("{c}-key.pem")), d.join("client-key.pem")).unwrap();
        }
    }

    /// A file of the PKI directory.
    pub fn file(&self, name: &str) -> String {
        self.dir.join(name).to_str().unwrap().to_owned()
    }

    /// A credentials directory made by [`Pki::new`].
    pub fn creds_dir(&self, name: &str) -> String {
        self.file(name)
    }

    /// `serve` arguments for TLS in `mode`, with client certificates required or not.
    pub fn serve_args(&self, mode: &str, client_ca: bool) -> Vec<String> {
        let mut a = vec![
            "--tls-cert".to_string(),
            self.file("server-cert.pem"),
            "--tls-key".into(),
            self.file("server-key.pem"),
            "--tls".into(),
            mode.into(),
        ];
        if client_ca {
            a.push("--tls-client-ca".into());
            a.push(self.file("good-ca-cert.pem"));
        }
        a
    }
}
