//! Connection tokens (JWT) for the gateway, signed the way an identity
//! provider would: HS256 with a shared secret, RS256 or ES256 with a private
//! key in PEM. Keys for RS256/ES256 are made with `openssl` (present on the
//! machine) by [`keygen`], which also writes the public key the gateway loads.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, bail};
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde::Serialize;

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum, Serialize)]
#[serde(rename_all = "UPPERCASE")]
pub enum Alg {
    Hs256,
    Rs256,
    Es256,
}

#[derive(Serialize)]
struct Rooms<'a> {
    sub: [&'a str; 1],
    #[serde(rename = "pub")]
    publish: [&'a str; 1],
}

#[derive(Serialize)]
struct Claims<'a> {
    sub: &'a str,
    exp: u64,
    iat: u64,
    rooms: Rooms<'a>,
}

/// Signs connection tokens granting every room.
pub struct Signer {
    header: Header,
    key: EncodingKey,
    ttl_secs: u64,
}

impl Signer {
    pub fn hs256(secret: &str) -> Self {
        Self {
            header: Header::new(Algorithm::HS256),
            key: EncodingKey::from_secret(secret.as_bytes()),
            ttl_secs: 3600,
        }
    }

    /// RS256 or ES256 from a PKCS#8 private key in PEM.
    pub fn from_pem(alg: Alg, pem_file: &Path) -> Result<Self> {
        let pem = std::fs::read(pem_file).with_context(|| format!("reading {}", pem_file.display()))?;
        let (algorithm, key) = match alg {
            Alg::Rs256 => (Algorithm::RS256, EncodingKey::from_rsa_pem(&pem)?),
            Alg::Es256 => (Algorithm::ES256, EncodingKey::from_ec_pem(&pem)?),
            Alg::Hs256 => bail!("HS256 uses --jwt-secret, not a key file"),
        };
        Ok(Self {
            header: Header::new(algorithm),
            key,
            ttl_secs: 3600,
        })
    }

    pub fn sign(&self, user: &str) -> Result<String> {
        let now = crate::clock::now_ns() / 1_000_000_000;
        let claims = Claims {
            sub: user,
            exp: now + self.ttl_secs,
            iat: now,
            rooms: Rooms {
                sub: ["*"],
                publish: ["*"],
            },
        };
        Ok(jsonwebtoken::encode(&self.header, &claims, &self.key)?)
    }
}

/// Writes `rs256.key`/`rs256.pub` and `es256.key`/`es256.pub` (PEM) into
/// `dir` with openssl; returns (private, public) paths for `alg`.
pub fn keygen(dir: &Path, alg: Alg) -> Result<(PathBuf, PathBuf)> {
    std::fs::create_dir_all(dir)?;
    let (name, args): (&str, &[&str]) = match alg {
        Alg::Rs256 => ("rs256", &["-algorithm", "RSA", "-pkeyopt", "rsa_keygen_bits:2048"]),
        Alg::Es256 => ("es256", &["-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256"]),
        Alg::Hs256 => bail!("HS256 has no key pair"),
    };
    let key = dir.join(format!("{name}.key"));
    let public = dir.join(format!("{name}.pub"));
    if !key.exists() {
        run(Command::new("openssl").arg("genpkey").args(args).arg("-out").arg(&key))?;
    }
    run(Command::new("openssl")
        .arg("pkey")
        .arg("-in")
        .arg(&key)
        .arg("-pubout")
        .arg("-out")
        .arg(&public))?;
    Ok((key, public))
}

fn run(cmd: &mut Command) -> Result<()> {
    let out = cmd
        .output()
        .with_context(|| format!("running {cmd:?} (is openssl installed?)"))?;
    if !out.status.success() {
        bail!("{cmd:?} failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use base64::Engine as _;

    #[test]
    fn hs256_token_carries_the_gateway_claims() {
        let t = Signer::hs256("s3cret").sign("user-7").unwrap();
        let parts: Vec<&str> = t.split('.').collect();
        assert_eq!(parts.len(), 3);
        let body = base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(parts[1])
            .unwrap();
        let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(v["sub"], "user-7");
        assert_eq!(v["rooms"]["sub"][0], "*");
        assert_eq!(v["rooms"]["pub"][0], "*");
        assert!(v["exp"].as_u64().unwrap() > v["iat"].as_u64().unwrap());
        let key = jsonwebtoken::DecodingKey::from_secret(b"s3cret");
        let mut val = jsonwebtoken::Validation::new(Algorithm::HS256);
        val.required_spec_claims.clear();
        jsonwebtoken::decode::<serde_json::Value>(&t, &key, &val).unwrap();
    }
}
