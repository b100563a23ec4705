// A throwaway certificate authority for TLS tests, made with the openssl command line: a CA,
// a server certificate for the name `localhost` only (so that 127.0.0.1 is a wrong host name
// for verify-full), client certificates whose common name is a user name, and the server key
// in both PEM forms operators have (PKCS#8 and traditional RSA).

use super::scratch_dir;
use std::path::{Path, PathBuf};
use std::process::Command;

pub struct Certs {
    pub dir: PathBuf,
    pub ca_cert: PathBuf,
    pub server_cert: PathBuf,
    /// `BEGIN PRIVATE KEY`.
    pub server_key: PathBuf,
    /// The same key as `BEGIN RSA PRIVATE KEY`.
    pub server_key_rsa: PathBuf,
}

fn openssl(dir: &Path, args: &[&str]) {
    let out = Command::new("openssl").args(args).current_dir(dir).output().expect("run openssl");
    assert!(
        out.status.success(),
        "openssl {args:?} failed:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

impl Certs {
    pub fn make() -> Certs {
        let dir = scratch_dir("certs");
        openssl(
            &dir,
            &[
                "req",
                "-x509",
                "-newkey",
                "rsa:2048",
                "-nodes",
                "-keyout",
                "ca.key",
                "-out",
                "ca.crt",
                "-days",
                "2",
                "-subj",
                "/CN=pgcorral test CA",
            ],
        );
        let certs = Certs {
            ca_cert: dir.join("ca.crt"),
            server_cert: dir.join("server.crt"),
            server_key: dir.join("server.key"),
            server_key_rsa: dir.join("server-rsa.key"),
            dir,
        };
        certs.sign("server", "localhost", Some("subjectAltName=DNS:localhost"));
        openssl(&certs.dir, &["rsa", "-in", "server.key", "-out", "server-rsa.key", "-traditional"]);
        certs
    }

    /// `<name>.key` and `<name>.crt` with the given common name, signed by the CA.
    fn sign(&self, name: &str, common_name: &str, extension: Option<&str>) -> (PathBuf, PathBuf) {
        let (key, csr, crt) = (format!("{name}.key"), format!("{name}.csr"), format!("{name}.crt"));
        let subject = format!("/CN={common_name}");
        openssl(
            &self.dir,
            &["req", "-newkey", "rsa:2048", "-nodes", "-keyout", &key, "-out", &csr, "-subj", &subject],
        );
        let ext_file = format!("{name}.ext");
        std::fs::write(self.dir.join(&ext_file), extension.unwrap_or("basicConstraints=CA:FALSE")).unwrap();
        openssl(
            &self.dir,
            &[
                "x509",
                "-req",
                "-in",
                &csr,
                "-CA",
                "ca.crt",
                "-CAkey",
                "ca.key",
                "-CAcreateserial",
                "-out",
                &crt,
                "-days",
                "2",
                "-extfile",
                &ext_file,
            ],
        );
        (self.dir.join(crt), self.dir.join(key))
    }

    /// The same key as `key`, written as a traditional `BEGIN RSA PRIVATE KEY` file.
    pub fn traditional(&self, key: &Path) -> PathBuf {
        let out = key.with_extension("rsa.key");
        openssl(
            &self.dir,
            &["rsa", "-in", &key.display().to_string(), "-out", &out.display().to_string(), "-traditional"],
        );
        out
    }

    /// A client certificate (cert, key) whose common name is `user`.
    pub fn client(&self, user: &str) -> (PathBuf, PathBuf) {
        self.sign(&format!("client-{user}"), user, None)
    }
}
