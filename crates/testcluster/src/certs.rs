//! The certificates of a TLS cluster: a CA, a server certificate, client certificates (one
//! signed by another CA, which the server does not trust), generated with `openssl`.

use std::fs;
use std::path::PathBuf;
use std::process::{Command, Stdio};

use crate::{err, Cluster, Error, Result, CERT_USER};

/// Certificate files generated for a TLS cluster (PEM).
#[derive(Clone, Debug)]
pub struct Certs {
    /// The CA certificate that signed the server and client certificates (the server trusts it
    /// for client certificates too).
    pub ca_cert: PathBuf,
    /// A CA that signed nothing the server uses: "untrusted" from the server's side.
    pub other_ca_cert: PathBuf,
    /// Server certificate, valid for `localhost` and `127.0.0.1` only (not `127.0.0.2`).
    pub server_cert: PathBuf,
    /// Server key.
    pub server_key: PathBuf,
    /// Client certificate for [`CERT_USER`], signed by the trusted CA.
    pub client_cert: PathBuf,
    /// Its key.
    pub client_key: PathBuf,
    /// Client certificate for [`CERT_USER`] signed by the other CA: the server refuses it.
    pub untrusted_client_cert: PathBuf,
    /// Its key.
    pub untrusted_client_key: PathBuf,
}

impl Cluster {
    /// Generates the certificates in `<cluster dir>/certs`.
    pub(crate) fn make_certs(&self) -> Result<Certs> {
        let d = self.dir.join("certs");
        fs::create_dir_all(&d).map_err(|e| Error(format!("creating {}: {e}", d.display())))?;
        let p = |name: &str| d.join(name).to_string_lossy().to_string();
        let ec = [
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
        ];
        for (name, cn) in [("ca", "pgstate test CA"), ("other_ca", "untrusted test CA")] {
            let subj = format!("/CN={cn}");
            let (key, crt) = (p(&format!("{name}.key")), p(&format!("{name}.crt")));
            let mut args = vec!["req", "-x509", "-days", "3650", "-subj", &subj];
            args.extend_from_slice(&ec);
            args.extend_from_slice(&["-keyout", &key, "-out", &crt]);
            args.extend_from_slice(&[
                "-addext",
                "basicConstraints=critical,CA:TRUE",
                "-addext",
                "keyUsage=critical,keyCertSign,cRLSign",
            ]);
            openssl(&args)?;
        }
        let client_ext = "basicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature,keyEncipherment\nextendedKeyUsage=clientAuth\n";
        for (name, cn, ca, ext) in [
            (
                "server",
                "localhost",
                "ca",
                "basicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature,keyEncipherment\nextendedKeyUsage=serverAuth\nsubjectAltName=DNS:localhost,IP:127.0.0.1\n",
            ),
            ("client", CERT_USER, "ca", client_ext),
            ("untrusted_client", CERT_USER, "other_ca", client_ext),
        ] {
            let (key, csr, crt, extf) = (
                p(&format!("{name}.key")),
                p(&format!("{name}.csr")),
                p(&format!("{name}.crt")),
                p(&format!("{name}.ext")),
            );
            let (ca_crt, ca_key) = (p(&format!("{ca}.crt")), p(&format!("{ca}.key")));
            fs::write(&extf, ext).map_err(|e| Error(format!("writing {extf}: {e}")))?;
            let subj = format!("/CN={cn}");
            let mut req = vec!["req", "-new", "-subj", &subj, "-keyout", &key, "-out", &csr];
            req.extend_from_slice(&ec);
            openssl(&req)?;
            openssl(&[
                "x509", "-req", "-in", &csr, "-CA", &ca_crt, "-CAkey", &ca_key, "-CAcreateserial",
                "-days", "3650", "-out", &crt, "-extfile", &extf,
            ])?;
        }
        // Keys are 0600. The server's files belong to the server user; the client's stay with
        // the user running the tests (libpq refuses a key owned by someone else).
        for entry in fs::read_dir(&d).map_err(|e| Error(e.to_string()))? {
            let path = entry.map_err(|e| Error(e.to_string()))?.path();
            let name = path
                .file_name()
                .map(|n| n.to_string_lossy().to_string())
                .unwrap_or_default();
            if name.starts_with("server") || name.starts_with("ca.") {
                self.chown(&path)?;
            }
            use std::os::unix::fs::PermissionsExt;
            let mode = if name.ends_with(".key") { 0o600 } else { 0o644 };
            fs::set_permissions(&path, fs::Permissions::from_mode(mode))
                .map_err(|e| Error(format!("chmod {}: {e}", path.display())))?;
        }
        Ok(Certs {
            ca_cert: d.join("ca.crt"),
            other_ca_cert: d.join("other_ca.crt"),
            server_cert: d.join("server.crt"),
            server_key: d.join("server.key"),
            client_cert: d.join("client.crt"),
            client_key: d.join("client.key"),
            untrusted_client_cert: d.join("untrusted_client.crt"),
            untrusted_client_key: d.join("untrusted_client.key"),
        })
    }
}

fn openssl(args: &[&str]) -> Result<()> {
    let out = Command::new("openssl")
        .args(args)
        .stdin(Stdio::null())
        .output()
        .map_err(|e| {
            Error(format!(
                "running openssl (install the Debian package openssl): {e}"
            ))
        })?;
    if !out.status.success() {
        return err(format!(
            "openssl {} failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    Ok(())
}
