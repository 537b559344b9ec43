//! The RFB edge keys of a pool (contract §11): `rfb`, `clipboard`, `health_check` and the
//! per-backend credential overrides. A child of `validate`, sharing its `Problems` collector.

use std::sync::Arc;

use super::super::file::{RawRfb, RawRfbTls};
use super::super::{
    BackendConfig, Clipboard, HealthCheck, RfbConfig, RfbCredentials, RfbMode, RfbTls,
};
use super::{Environment, Problems, check_file, one_of, read_env};

/// The pool-level part: mode, TLS to the backends, and the pool's credentials.
pub(super) fn resolve_rfb(
    p: &mut Problems,
    env: Environment<'_>,
    key: &str,
    raw: Option<RawRfb>,
) -> (RfbConfig, RfbCredentials) {
    let raw = raw.unwrap_or_default();
    let key = format!("{key}.rfb");
    let mode = one_of(
        p,
        &format!("{key}.mode"),
        raw.mode,
        RfbMode::Terminate,
        &[
            ("terminate", RfbMode::Terminate),
            ("transparent", RfbMode::Transparent),
        ],
    );
    // From the keys, not from what they resolved to: in lint mode no variable is read, and a
    // credential that failed to resolve is still one the operator meant to use.
    let has_credentials =
        raw.password_env.is_some() || raw.username_env.is_some() || raw.tls.is_some();
    let credentials = RfbCredentials {
        password: raw
            .password_env
            .and_then(|name| read_env(p, env, &format!("{key}.password_env"), &name)),
        username: raw
            .username_env
            .and_then(|name| read_env(p, env, &format!("{key}.username_env"), &name)),
    };
    let tls = raw
        .tls
        .and_then(|tls| resolve_tls(p, env, &format!("{key}.tls"), tls));
    if mode == RfbMode::Transparent && has_credentials {
        // The browser does the handshake itself in transparent mode: credentials here would be
        // silently unused, which an operator would take for protection.
        p.add(
            &key,
            "password_env, username_env and tls need mode: terminate",
        );
    }
    (RfbConfig { mode, tls }, credentials)
}

fn resolve_tls(
    p: &mut Problems,
    env: Environment<'_>,
    key: &str,
    raw: RawRfbTls,
) -> Option<RfbTls> {
    let Some(ca_file) = raw.ca_file else {
        p.add(
            format!("{key}.ca_file"),
            "required: the CA that signs the backends' certificates",
        );
        return None;
    };
    let path = check_file(p, env, &format!("{key}.ca_file"), &ca_file);
    // Lint mode: the CA file exists only where the config will run.
    let client = if env.reads_files() {
        match client_config(&path) {
            Ok(client) => Some(client),
            Err(message) => {
                p.add(format!("{key}.ca_file"), message);
                return None;
            }
        }
    } else {
        None
    };
    if let Some(name) = &raw.server_name
        && rustls::pki_types::ServerName::try_from(name.as_str()).is_err()
    {
        p.add(
            format!("{key}.server_name"),
            format!("invalid server name {name:?}"),
        );
    }
    Some(RfbTls {
        client: client?,
        server_name: raw.server_name,
    })
}

/// A rustls client trusting exactly the certificates of `ca_file` (not the system roots: a
/// VNC farm's certificates come from the operator's own CA).
fn client_config(path: &std::path::Path) -> Result<Arc<rustls::ClientConfig>, String> {
    use rustls::pki_types::CertificateDer;
    use rustls::pki_types::pem::PemObject;
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(path)
        .map_err(|e| format!("cannot read certificates: {e}"))?
        .collect::<Result<_, _>>()
        .map_err(|e| format!("invalid PEM: {e}"))?;
    if certs.is_empty() {
        return Err("no certificate in the file".into());
    }
    let mut roots = rustls::RootCertStore::empty();
    for cert in certs {
        roots
            .add(cert)
            .map_err(|e| format!("unusable CA certificate: {e}"))?;
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(Arc::new(config))
}

/// `clipboard` and `health_check`, checked against the mode.
pub(super) fn resolve_policy(
    p: &mut Problems,
    key: &str,
    mode: RfbMode,
    clipboard: Option<String>,
    health_check: Option<String>,
) -> (Clipboard, HealthCheck) {
    let clipboard = one_of(
        p,
        &format!("{key}.clipboard"),
        clipboard,
        Clipboard::Both,
        &[
            ("both", Clipboard::Both),
            ("to_client", Clipboard::ToClient),
            ("to_server", Clipboard::ToServer),
            ("none", Clipboard::None),
        ],
    );
    if mode == RfbMode::Transparent && clipboard != Clipboard::Both {
        p.add(
            format!("{key}.clipboard"),
            "a clipboard policy other than both needs rfb.mode: terminate (transparent mode cannot enforce it)",
        );
    }
    // An RFB check authenticates, so it never counts against a blacklist; a transparent pool
    // has no credentials to authenticate with, so its default stays a TCP connect.
    let default_check = match mode {
        RfbMode::Terminate => HealthCheck::Rfb,
        RfbMode::Transparent => HealthCheck::Tcp,
    };
    let health_check = one_of(
        p,
        &format!("{key}.health_check"),
        health_check,
        default_check,
        &[("rfb", HealthCheck::Rfb), ("tcp", HealthCheck::Tcp)],
    );
    (clipboard, health_check)
}

/// A backend's own password overrides the pool's; the user name is the pool's.
pub(super) fn backend_credentials(
    p: &mut Problems,
    env: Environment<'_>,
    key: &str,
    password_env: Option<String>,
    pool: &RfbCredentials,
) -> RfbCredentials {
    let password = password_env
        .and_then(|name| read_env(p, env, &format!("{key}.password_env"), &name))
        .or_else(|| pool.password.clone());
    RfbCredentials {
        password,
        username: pool.username.clone(),
    }
}

/// Checks that need the whole pool: credentials on a transparent pool's backend would be unused.
pub(super) fn check_backends(
    p: &mut Problems,
    key: &str,
    mode: RfbMode,
    backends: &[(usize, BackendConfig, bool)],
) {
    for (i, _, own_credentials) in backends {
        let key = format!("{key}.backends[{i}]");
        if mode == RfbMode::Transparent && *own_credentials {
            p.add(
                format!("{key}.password_env"),
                "backend credentials need rfb.mode: terminate",
            );
        }
    }
}
